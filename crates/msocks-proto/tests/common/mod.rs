//! Proptest strategies shared by `roundtrip.rs` and `fuzz_decoders.rs`: one generator per
//! message type, producing only values that the wire format can represent exactly (so that
//! `decode(encode(x)) == x` is a fair property), plus the helper that encodes a value.
//!
//! What "exactly representable" rules out, and why:
//! * domain names, usernames and passwords are 1..=255 bytes of UTF-8 (longer ones are
//!   truncated by `encode`, possibly in the middle of a character; empty ones are rejected);
//! * greetings offer 1..=255 methods;
//! * IPv6 socket addresses have flowinfo and scope id 0 (SOCKS5 carries neither);
//! * reply codes come from `ReplyCode::from_u8`, so `Other(v)` never holds an assigned value;
//! * UDP ASSOCIATE requests carry no mobility options (there is no MSOCKS code for it);
//! * a reply carries a trailer only when it succeeded and its context asks for one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use msocks_proto::{
    Command, ConnectionId, Greeting, Method, MethodSelection, MobilityOptions, OpenRequest,
    ProxyFrame, ReconnectRequest, Reply, ReplyCode, ReplyContext, ReplyExtension, Request,
    ResumeCounters, SessionToken, StandbyFrame, TargetAddr, UdpHeader, UserPassReply,
    UserPassRequest,
};
use proptest::collection::vec;
use proptest::prelude::*;

/// Runs an `encode` method into a fresh buffer.
pub fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out);
    out
}

/// Appends `chars` to `s` while the result stays within 255 bytes.
fn push_fitting(mut s: String, chars: Vec<char>) -> String {
    for c in chars {
        if s.len() + c.len_utf8() > 255 {
            break;
        }
        s.push(c);
    }
    s
}

/// 1..=255 bytes of UTF-8: plain ASCII host names, arbitrary Unicode (multi-byte characters
/// stop before the 255-byte limit), and ASCII padding followed by arbitrary characters so
/// that multi-byte characters land right at the 255-byte boundary.
pub fn short_utf8() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-z0-9.-]{1,255}",
        vec(any::<char>(), 1..=255).prop_map(|cs| push_fitting(String::new(), cs)),
        (0usize..=254, vec(any::<char>(), 1..=80))
            .prop_map(|(pad, cs)| push_fitting("a".repeat(pad), cs)),
    ]
    .boxed()
}

/// An IPv4 or IPv6 socket address as SOCKS5 can carry it.
pub fn socket_addr() -> BoxedStrategy<SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
        Just(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
        Just(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 1080)),
    ]
    .boxed()
}

/// Any address: IPv4, IPv6 or a domain name of 1..=255 bytes.
pub fn target_addr() -> BoxedStrategy<TargetAddr> {
    prop_oneof![
        socket_addr().prop_map(TargetAddr::Ip),
        (short_utf8(), any::<u16>()).prop_map(|(name, port)| TargetAddr::Domain(name, port)),
    ]
    .boxed()
}

/// Counter values, biased towards the wrap-around edges the mobility code cares about.
fn counter() -> BoxedStrategy<u64> {
    prop_oneof![
        3 => any::<u64>(),
        1 => prop::sample::select(vec![0, 1, u64::from(u32::MAX), 1 << 63, u64::MAX - 1, u64::MAX]),
    ]
    .boxed()
}

pub fn session_token() -> BoxedStrategy<SessionToken> {
    any::<[u8; 16]>().prop_map(SessionToken).boxed()
}

pub fn connection_id() -> BoxedStrategy<ConnectionId> {
    (session_token(), socket_addr())
        .prop_map(|(token, home)| ConnectionId { token, home })
        .boxed()
}

pub fn mobility_options() -> BoxedStrategy<MobilityOptions> {
    (any::<bool>(), counter(), counter())
        .prop_map(|(oob_inline, read_origin, write_origin)| MobilityOptions {
            oob_inline,
            read_origin,
            write_origin,
        })
        .boxed()
}

pub fn resume_counters() -> BoxedStrategy<ResumeCounters> {
    (counter(), counter())
        .prop_map(|(data_write, data_salvage)| ResumeCounters {
            data_write,
            data_salvage,
        })
        .boxed()
}

pub fn reconnect_request() -> BoxedStrategy<ReconnectRequest> {
    (
        any::<bool>(),
        session_token(),
        counter(),
        counter(),
        proptest::option::of(counter()),
    )
        .prop_map(
            |(oob_inline, token, data_read, data_written, resend_from)| ReconnectRequest {
                oob_inline,
                token,
                data_read,
                data_written,
                resend_from,
            },
        )
        .boxed()
}

pub fn command() -> BoxedStrategy<Command> {
    prop_oneof![
        Just(Command::Connect),
        Just(Command::Bind),
        Just(Command::UdpAssociate),
    ]
    .boxed()
}

/// Every command, with and without mobility options, except UDP ASSOCIATE with options
/// (which `Request::encode` cannot express and drops).
pub fn open_request() -> BoxedStrategy<OpenRequest> {
    (
        command(),
        target_addr(),
        proptest::option::of(mobility_options()),
    )
        .prop_map(|(command, target, mobility)| OpenRequest {
            command,
            target,
            mobility: if command == Command::UdpAssociate {
                None
            } else {
                mobility
            },
        })
        .boxed()
}

pub fn request() -> BoxedStrategy<Request> {
    prop_oneof![
        3 => open_request().prop_map(Request::Open),
        1 => reconnect_request().prop_map(Request::Reconnect),
        1 => Just(Request::Standby),
    ]
    .boxed()
}

pub fn standby_frame() -> BoxedStrategy<StandbyFrame> {
    prop_oneof![
        any::<u64>().prop_map(StandbyFrame::Ping),
        request().prop_map(StandbyFrame::Request),
    ]
    .boxed()
}

pub fn proxy_frame(context: ReplyContext) -> BoxedStrategy<ProxyFrame> {
    prop_oneof![
        any::<u64>().prop_map(ProxyFrame::Pong),
        reply(context).prop_map(ProxyFrame::Reply),
    ]
    .boxed()
}

pub fn greeting() -> BoxedStrategy<Greeting> {
    vec(any::<u8>().prop_map(Method), 1..=255)
        .prop_map(|methods| Greeting { methods })
        .boxed()
}

pub fn method_selection() -> BoxedStrategy<MethodSelection> {
    any::<u8>()
        .prop_map(|b| MethodSelection { method: Method(b) })
        .boxed()
}

pub fn userpass_request() -> BoxedStrategy<UserPassRequest> {
    (short_utf8(), short_utf8())
        .prop_map(|(username, password)| UserPassRequest { username, password })
        .boxed()
}

pub fn userpass_reply() -> BoxedStrategy<UserPassReply> {
    any::<u8>()
        .prop_map(|status| UserPassReply { status })
        .boxed()
}

pub fn udp_header() -> BoxedStrategy<UdpHeader> {
    (any::<u8>(), target_addr())
        .prop_map(|(frag, target)| UdpHeader { frag, target })
        .boxed()
}

/// Any REP value, in canonical form.
pub fn reply_code() -> BoxedStrategy<ReplyCode> {
    any::<u8>().prop_map(ReplyCode::from_u8).boxed()
}

/// Any REP value except success.
pub fn failure_code() -> BoxedStrategy<ReplyCode> {
    (1u8..=255).prop_map(ReplyCode::from_u8).boxed()
}

/// A reply that decodes back to itself in `context`: a trailer exactly when the reply
/// succeeded and the context announces one.
pub fn reply(context: ReplyContext) -> BoxedStrategy<Reply> {
    let failure = (failure_code(), target_addr())
        .prop_map(|(code, bound)| Reply {
            code,
            bound,
            extension: ReplyExtension::None,
        })
        .boxed();
    match context {
        ReplyContext::Plain => (reply_code(), target_addr())
            .prop_map(|(code, bound)| Reply {
                code,
                bound,
                extension: ReplyExtension::None,
            })
            .boxed(),
        ReplyContext::MobileOpen => prop_oneof![
            (target_addr(), connection_id()).prop_map(|(bound, id)| Reply {
                code: ReplyCode::Succeeded,
                bound,
                extension: ReplyExtension::Connection(id),
            }),
            failure,
        ]
        .boxed(),
        ReplyContext::Reconnect => prop_oneof![
            (target_addr(), resume_counters()).prop_map(|(bound, rc)| Reply {
                code: ReplyCode::Succeeded,
                bound,
                extension: ReplyExtension::Resume(rc),
            }),
            failure,
        ]
        .boxed(),
    }
}
