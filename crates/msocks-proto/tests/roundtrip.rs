//! Property tests of encode/decode round trips for every message type of `msocks-proto`.
//!
//! For every generated value `x` (see `common/mod.rs` for the generators and what they leave
//! out on purpose), with `bytes = encode(x)`:
//!
//! * `decode(bytes) == Ok(Some((x, bytes.len())))`;
//! * `decode(bytes ++ extra) == Ok(Some((x, bytes.len())))` for arbitrary `extra`, i.e. a
//!   decoder consumes exactly one message and leaves pipelined bytes alone;
//! * `decode(bytes[..k]) == Ok(None)` for every strict prefix `k < bytes.len()`;
//! * `encode` appends to the buffer it is given and leaves what was there untouched.
//!
//! Plus a few message-specific properties: `TargetAddr::encoded_len`, the fixed sizes of the
//! MSOCKS trailers, `MAX_HANDSHAKE_MESSAGE` as an upper bound of every client handshake
//! message, UDP ASSOCIATE dropping mobility options, replies only reading a trailer in the
//! matching context, and back-to-back requests decoding one after the other.
//!
//! Case count: proptest's default (256), overridable with `PROPTEST_CASES`.

mod common;

use std::fmt::Debug;

use common::*;
use msocks_proto::mobility::{MAX_REQUEST_TRAILER, RECONNECT_BODY_LEN, RECONNECT_EARLY_BODY_LEN};
use msocks_proto::{
    Command, ConnectionId, Decoded, Greeting, MethodSelection, MobilityOptions, OpenRequest,
    ProxyFrame, Reply, ReplyContext, ReplyExtension, Request, ResumeCounters, StandbyFrame,
    TargetAddr, UdpHeader, UserPassReply, UserPassRequest, MAX_HANDSHAKE_MESSAGE,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Bytes that may follow a message on the wire (the next message, payload, garbage).
fn extra_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 1..64)
}

/// Checks the four generic round-trip properties of one value and returns its encoding.
fn check_roundtrip<T: PartialEq + Debug + Clone>(
    value: &T,
    encode: impl Fn(&T, &mut Vec<u8>),
    decode: impl Fn(&[u8]) -> Decoded<T>,
    extra: &[u8],
) -> Result<Vec<u8>, TestCaseError> {
    let bytes = encoded(|o| encode(value, o));
    prop_assert!(!bytes.is_empty());

    // decode(encode(x)) == x, consuming everything.
    prop_assert_eq!(decode(&bytes), Ok(Some((value.clone(), bytes.len()))));

    // Followed by arbitrary bytes: consumes exactly the message.
    let mut longer = bytes.clone();
    longer.extend_from_slice(extra);
    prop_assert_eq!(decode(&longer), Ok(Some((value.clone(), bytes.len()))));

    // Every strict prefix is "need more bytes", never an error or a shorter message.
    for k in 0..bytes.len() {
        prop_assert_eq!(decode(&bytes[..k]), Ok(None), "prefix of {} bytes", k);
    }

    // encode appends.
    let mut appended = extra.to_vec();
    encode(value, &mut appended);
    prop_assert_eq!(&appended[..extra.len()], extra);
    prop_assert_eq!(&appended[extra.len()..], &bytes[..]);

    Ok(bytes)
}

fn context() -> impl Strategy<Value = ReplyContext> {
    prop_oneof![
        Just(ReplyContext::Plain),
        Just(ReplyContext::MobileOpen),
        Just(ReplyContext::Reconnect),
    ]
}

proptest! {
    #[test]
    fn greeting_roundtrip(m in greeting(), extra in extra_bytes()) {
        let bytes = check_roundtrip(&m, Greeting::encode, Greeting::decode, &extra)?;
        prop_assert_eq!(bytes.len(), 2 + m.methods.len());
    }

    #[test]
    fn method_selection_roundtrip(m in method_selection(), extra in extra_bytes()) {
        let bytes =
            check_roundtrip(&m, MethodSelection::encode, MethodSelection::decode, &extra)?;
        prop_assert_eq!(bytes.len(), 2);
    }

    #[test]
    fn userpass_request_roundtrip(m in userpass_request(), extra in extra_bytes()) {
        let bytes =
            check_roundtrip(&m, UserPassRequest::encode, UserPassRequest::decode, &extra)?;
        prop_assert_eq!(bytes.len(), 3 + m.username.len() + m.password.len());
        prop_assert!(bytes.len() <= MAX_HANDSHAKE_MESSAGE);
    }

    #[test]
    fn userpass_reply_roundtrip(m in userpass_reply(), extra in extra_bytes()) {
        check_roundtrip(&m, UserPassReply::encode, UserPassReply::decode, &extra)?;
        prop_assert_eq!(m.is_success(), m.status == 0);
    }

    #[test]
    fn target_addr_roundtrip(a in target_addr(), extra in extra_bytes()) {
        let bytes = check_roundtrip(&a, TargetAddr::encode, TargetAddr::decode, &extra)?;
        prop_assert_eq!(bytes.len(), a.encoded_len());
        prop_assert_eq!(u16::from_be_bytes([bytes[bytes.len() - 2], bytes[bytes.len() - 1]]), a.port());
    }

    #[test]
    fn request_roundtrip(r in request(), extra in extra_bytes()) {
        let bytes = check_roundtrip(&r, Request::encode, Request::decode, &extra)?;
        prop_assert!(bytes.len() <= MAX_HANDSHAKE_MESSAGE);
        let expected_len = match &r {
            Request::Open(open) => {
                3 + open.target.encoded_len()
                    + if open.mobility.is_some() { MAX_REQUEST_TRAILER } else { 0 }
            }
            Request::Reconnect(rc) if rc.resend_from.is_some() => 3 + RECONNECT_EARLY_BODY_LEN,
            Request::Reconnect(_) => 3 + RECONNECT_BODY_LEN,
            Request::Standby => 5,
        };
        prop_assert_eq!(bytes.len(), expected_len);
    }

    /// Requests sent back to back decode one after the other.
    #[test]
    fn pipelined_requests(first in request(), second in request()) {
        let mut bytes = encoded(|o| first.encode(o));
        let first_len = bytes.len();
        second.encode(&mut bytes);
        prop_assert_eq!(Request::decode(&bytes), Ok(Some((first, first_len))));
        prop_assert_eq!(
            Request::decode(&bytes[first_len..]),
            Ok(Some((second, bytes.len() - first_len)))
        );
    }

    /// UDP ASSOCIATE has no MSOCKS command code: mobility options given to it are not
    /// written, and the request decodes without them.
    #[test]
    fn udp_associate_drops_mobility(
        target in target_addr(),
        mobility in mobility_options(),
        extra in extra_bytes(),
    ) {
        let with = Request::Open(OpenRequest {
            command: Command::UdpAssociate,
            target: target.clone(),
            mobility: Some(mobility),
        });
        let without = Request::Open(OpenRequest {
            command: Command::UdpAssociate,
            target,
            mobility: None,
        });
        let bytes = encoded(|o| with.encode(o));
        prop_assert_eq!(&bytes, &encoded(|o| without.encode(o)));
        check_roundtrip(&without, Request::encode, Request::decode, &extra)?;
    }

    #[test]
    fn reply_plain_roundtrip(r in reply(ReplyContext::Plain), extra in extra_bytes()) {
        check_roundtrip(&r, Reply::encode, |b| Reply::decode(b, ReplyContext::Plain), &extra)?;
    }

    #[test]
    fn reply_mobile_open_roundtrip(r in reply(ReplyContext::MobileOpen), extra in extra_bytes()) {
        check_roundtrip(&r, Reply::encode, |b| Reply::decode(b, ReplyContext::MobileOpen), &extra)?;
    }

    #[test]
    fn reply_reconnect_roundtrip(r in reply(ReplyContext::Reconnect), extra in extra_bytes()) {
        check_roundtrip(&r, Reply::encode, |b| Reply::decode(b, ReplyContext::Reconnect), &extra)?;
    }

    /// A failed reply never carries a trailer, so it decodes identically in every context.
    #[test]
    fn failure_reply_is_context_free(
        code in failure_code(),
        bound in target_addr(),
        ctx in context(),
        extra in extra_bytes(),
    ) {
        let r = Reply { code, bound, extension: ReplyExtension::None };
        check_roundtrip(&r, Reply::encode, |b| Reply::decode(b, ctx), &extra)?;
    }

    /// A successful reply with a trailer, decoded in a context that announces no trailer or a
    /// different one, stops after BND.PORT; the trailer bytes are left for the caller (and
    /// are exactly the trailer's own encoding).
    #[test]
    fn reply_trailer_only_read_in_matching_context(
        bound in target_addr(),
        id in connection_id(),
        rc in resume_counters(),
    ) {
        let base = Reply::success(bound);
        let base_len = encoded(|o| base.encode(o)).len();

        let with_id = Reply { extension: ReplyExtension::Connection(id), ..base.clone() };
        let bytes = encoded(|o| with_id.encode(o));
        prop_assert_eq!(
            Reply::decode(&bytes, ReplyContext::Plain),
            Ok(Some((base.clone(), base_len)))
        );
        prop_assert_eq!(
            ConnectionId::decode(&bytes[base_len..]),
            Ok(Some((id, bytes.len() - base_len)))
        );

        let with_rc = Reply { extension: ReplyExtension::Resume(rc), ..base.clone() };
        let bytes = encoded(|o| with_rc.encode(o));
        prop_assert_eq!(
            Reply::decode(&bytes, ReplyContext::Plain),
            Ok(Some((base, base_len)))
        );
        prop_assert_eq!(
            ResumeCounters::decode(&bytes[base_len..]),
            Ok(Some((rc, bytes.len() - base_len)))
        );
    }

    #[test]
    fn udp_header_roundtrip(h in udp_header(), payload in extra_bytes()) {
        let bytes = check_roundtrip(&h, UdpHeader::encode, UdpHeader::decode, &payload)?;
        prop_assert_eq!(bytes.len(), 3 + h.target.encoded_len());
    }

    #[test]
    fn connection_id_roundtrip(id in connection_id(), extra in extra_bytes()) {
        let bytes = check_roundtrip(&id, ConnectionId::encode, ConnectionId::decode, &extra)?;
        let ip_len = if id.home.is_ipv4() { 4 } else { 16 };
        prop_assert_eq!(bytes.len(), 1 + 16 + 1 + ip_len + 2);
    }

    #[test]
    fn mobility_options_roundtrip(m in mobility_options(), extra in extra_bytes()) {
        let bytes =
            check_roundtrip(&m, MobilityOptions::encode, MobilityOptions::decode, &extra)?;
        prop_assert_eq!(bytes.len(), MAX_REQUEST_TRAILER);
    }

    #[test]
    fn resume_counters_roundtrip(rc in resume_counters(), extra in extra_bytes()) {
        let bytes = check_roundtrip(&rc, ResumeCounters::encode, ResumeCounters::decode, &extra)?;
        prop_assert_eq!(bytes.len(), 1 + 8 + 8);
    }

    /// `ReconnectRequest` has no decoder of its own; its body round-trips through `Request`.
    #[test]
    fn reconnect_request_roundtrip(rc in reconnect_request(), extra in extra_bytes()) {
        let r = Request::Reconnect(rc);
        let bytes = check_roundtrip(&r, Request::encode, Request::decode, &extra)?;
        let body = encoded(|o| rc.encode_body(o));
        let want = if rc.resend_from.is_some() { RECONNECT_EARLY_BODY_LEN } else { RECONNECT_BODY_LEN };
        prop_assert_eq!(body.len(), want);
        prop_assert_eq!(&bytes[3..], &body[..]);
    }

    /// Standby frames: probes and the request that ends the standby.
    #[test]
    fn standby_frame_roundtrip(f in standby_frame(), extra in extra_bytes()) {
        check_roundtrip(&f, StandbyFrame::encode, StandbyFrame::decode, &extra)?;
    }

    /// What the proxy sends on a standby connection: pongs, then the reply.
    #[test]
    fn proxy_frame_roundtrip(f in proxy_frame(ReplyContext::Reconnect), extra in extra_bytes()) {
        check_roundtrip(
            &f,
            ProxyFrame::encode,
            |b| ProxyFrame::decode(b, ReplyContext::Reconnect),
            &extra,
        )?;
    }
}
