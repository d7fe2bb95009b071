//! Example-based tests of every message of `msocks-proto` and of every `DecodeError` variant,
//! with byte vectors written out by hand from the layouts of RFC 1928 (greeting, method
//! selection, request, reply, UDP header), RFC 1929 (username/password) and the MSOCKS
//! extension (mobility options, connection identifier, RECONNECT, resume counters).
//!
//! Every successful decode goes through [`assert_decodes`], which also checks that every strict
//! prefix of the vector is `Ok(None)` and that a second message pipelined behind the first
//! is left alone (`consumed` is the length of the first message only).

use std::fmt::Debug;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use msocks_proto::mobility::{FLAG_OOB_INLINE, MAX_REQUEST_TRAILER, RECONNECT_BODY_LEN, TOKEN_LEN};
use msocks_proto::userpass::USERPASS_VERSION;
use msocks_proto::{
    Command, ConnectionId, DecodeError, Decoded, Greeting, Method, MethodSelection,
    MobilityOptions, OpenRequest, ProxyFrame, ReconnectRequest, Reply, ReplyCode, ReplyContext,
    ReplyExtension, Request, ResumeCounters, SessionToken, StandbyFrame, TargetAddr, UdpHeader,
    UserPassReply, UserPassRequest, MAX_HANDSHAKE_MESSAGE, MSOCKS_VERSION, SOCKS_VERSION,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Bytes that start another message; appended to check that decoders stop where they should.
const NEXT_MESSAGE: [u8; 3] = [0x05, 0x01, 0x00];

/// Concatenates byte slices.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Runs an `encode` method into a fresh buffer.
fn enc(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out);
    out
}

/// `bytes` decodes to exactly `expected`, consuming all of it; every strict prefix is
/// incomplete; and with another message behind it, only `bytes.len()` bytes are consumed.
#[track_caller]
fn assert_decodes<T: PartialEq + Debug + Clone>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Decoded<T>,
    expected: &T,
) {
    assert_eq!(decode(bytes), Ok(Some((expected.clone(), bytes.len()))));
    for k in 0..bytes.len() {
        assert_eq!(decode(&bytes[..k]), Ok(None), "prefix of {k} bytes");
    }
    let pipelined = cat(&[bytes, &NEXT_MESSAGE, bytes]);
    assert_eq!(
        decode(&pipelined),
        Ok(Some((expected.clone(), bytes.len())))
    );
}

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

/// 2001:db8::1 (RFC 3849 documentation prefix).
fn doc_v6() -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0x0db8, 0, 0, 0, 0, 0, 1)
}

const DOC_V6_BYTES: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
];

/// A token 00 01 02 .. 0f.
fn token() -> SessionToken {
    let mut t = [0u8; TOKEN_LEN];
    for (i, b) in t.iter_mut().enumerate() {
        *b = i as u8;
    }
    SessionToken(t)
}

const TOKEN_BYTES: [u8; 16] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
];

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

#[test]
fn protocol_constants() {
    assert_eq!(SOCKS_VERSION, 0x05);
    assert_eq!(USERPASS_VERSION, 0x01);
    assert_eq!(MSOCKS_VERSION, 0x01);
    assert_eq!(FLAG_OOB_INLINE, 0x01);
    assert_eq!(TOKEN_LEN, 16);
    assert_eq!(MAX_REQUEST_TRAILER, 1 + 1 + 8 + 8);
    assert_eq!(RECONNECT_BODY_LEN, 1 + 1 + 16 + 8 + 8);
    assert_eq!(Method::NO_AUTH, Method(0x00));
    assert_eq!(Method::GSSAPI, Method(0x01));
    assert_eq!(Method::USER_PASS, Method(0x02));
    assert_eq!(Method::NO_ACCEPTABLE, Method(0xff));
}

/// `MAX_HANDSHAKE_MESSAGE` must hold the largest encoding of every message a client sends
/// before the relay starts, or an I/O layer sizing its buffer with it rejects valid clients.
#[test]
fn max_handshake_message_bounds_every_client_message() {
    let greeting = Greeting {
        methods: (0..=254).map(Method).collect(),
    };
    let userpass = UserPassRequest {
        username: "u".repeat(255),
        password: "p".repeat(255),
    };
    let request = Request::Open(OpenRequest {
        command: Command::Connect,
        target: TargetAddr::Domain("d".repeat(255), 443),
        mobility: Some(MobilityOptions::default()),
    });
    let reconnect = Request::Reconnect(ReconnectRequest {
        oob_inline: true,
        token: token(),
        data_read: u64::MAX,
        data_written: u64::MAX,
        resend_from: None,
    });
    let sizes = [
        enc(|o| greeting.encode(o)).len(),
        enc(|o| userpass.encode(o)).len(),
        enc(|o| request.encode(o)).len(),
        enc(|o| reconnect.encode(o)).len(),
    ];
    assert_eq!(sizes, [257, 513, 280, 37]);
    for size in sizes {
        assert!(
            size <= MAX_HANDSHAKE_MESSAGE,
            "{size} > {MAX_HANDSHAKE_MESSAGE}"
        );
    }
    assert_eq!(MAX_HANDSHAKE_MESSAGE, 513, "the bound should also be tight");
}

// ---------------------------------------------------------------------------------------------
// Greeting and method selection (RFC 1928 section 3)
// ---------------------------------------------------------------------------------------------

#[test]
fn greeting_no_auth() {
    let bytes = [0x05, 0x01, 0x00];
    let g = Greeting {
        methods: vec![Method::NO_AUTH],
    };
    assert_decodes(&bytes, Greeting::decode, &g);
    assert_eq!(enc(|o| g.encode(o)), bytes);
}

#[test]
fn greeting_two_methods_in_client_order() {
    let bytes = [0x05, 0x02, 0x02, 0x00];
    let g = Greeting {
        methods: vec![Method::USER_PASS, Method::NO_AUTH],
    };
    assert_decodes(&bytes, Greeting::decode, &g);
    assert_eq!(enc(|o| g.encode(o)), bytes);
    assert!(g.offers(Method::NO_AUTH));
    assert!(g.offers(Method::USER_PASS));
    assert!(!g.offers(Method::GSSAPI));
}

#[test]
fn greeting_255_methods() {
    let methods: Vec<u8> = (0..=254).collect();
    let bytes = cat(&[&[0x05, 0xff], &methods]);
    let g = Greeting {
        methods: methods.iter().copied().map(Method).collect(),
    };
    assert_eq!(bytes.len(), 257);
    assert_decodes(&bytes, Greeting::decode, &g);
}

#[test]
fn greeting_wrong_version() {
    let expected = Err(DecodeError::UnsupportedVersion {
        expected: 5,
        got: 4,
    });
    // A SOCKS4 client: the version byte alone is enough to refuse.
    assert_eq!(Greeting::decode(&[0x04, 0x01, 0x00]), expected);
    assert_eq!(Greeting::decode(&[0x04]), expected);
}

#[test]
fn greeting_without_methods() {
    assert_eq!(Greeting::decode(&[0x05, 0x00]), Err(DecodeError::NoMethods));
    assert_eq!(
        Greeting::decode(&[0x05, 0x00, 0x00]),
        Err(DecodeError::NoMethods)
    );
}

#[test]
fn greeting_incomplete() {
    assert_eq!(Greeting::decode(&[]), Ok(None));
    assert_eq!(Greeting::decode(&[0x05]), Ok(None));
    assert_eq!(Greeting::decode(&[0x05, 0x03, 0x00, 0x01]), Ok(None));
}

#[test]
fn greeting_encode_writes_at_most_255_methods() {
    let g = Greeting {
        methods: vec![Method::NO_AUTH; 300],
    };
    let bytes = enc(|o| g.encode(o));
    assert_eq!(bytes.len(), 257);
    assert_eq!(&bytes[..2], &[0x05, 0xff]);
}

#[test]
fn greetings_pipelined() {
    let bytes = [0x05, 0x01, 0x00, 0x05, 0x02, 0x00, 0x02];
    let first = Greeting {
        methods: vec![Method::NO_AUTH],
    };
    let second = Greeting {
        methods: vec![Method::NO_AUTH, Method::USER_PASS],
    };
    assert_eq!(Greeting::decode(&bytes), Ok(Some((first, 3))));
    assert_eq!(Greeting::decode(&bytes[3..]), Ok(Some((second, 4))));
}

#[test]
fn method_selection() {
    for (bytes, method) in [
        ([0x05, 0x00], Method::NO_AUTH),
        ([0x05, 0x02], Method::USER_PASS),
        ([0x05, 0xff], Method::NO_ACCEPTABLE),
    ] {
        let m = MethodSelection { method };
        assert_decodes(&bytes, MethodSelection::decode, &m);
        assert_eq!(enc(|o| m.encode(o)), bytes);
    }
}

#[test]
fn method_selection_wrong_version() {
    assert_eq!(
        MethodSelection::decode(&[0x04, 0x00]),
        Err(DecodeError::UnsupportedVersion {
            expected: 5,
            got: 4
        })
    );
    // An RFC 1929 status reply where a method selection was expected.
    assert_eq!(
        MethodSelection::decode(&[0x01, 0x00]),
        Err(DecodeError::UnsupportedVersion {
            expected: 5,
            got: 1
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Username/password (RFC 1929)
// ---------------------------------------------------------------------------------------------

#[test]
fn userpass_request() {
    let bytes = cat(&[&[0x01, 0x03], b"bob", &[0x06], b"secret"]);
    let req = UserPassRequest {
        username: "bob".into(),
        password: "secret".into(),
    };
    assert_decodes(&bytes, UserPassRequest::decode, &req);
    assert_eq!(enc(|o| req.encode(o)), bytes);
}

#[test]
fn userpass_request_multibyte_utf8() {
    let user = "jürgen";
    let pass = "пароль";
    let bytes = cat(&[
        &[0x01, user.len() as u8],
        user.as_bytes(),
        &[pass.len() as u8],
        pass.as_bytes(),
    ]);
    assert_eq!(bytes[1], 7);
    assert_eq!(bytes[9], 12);
    let req = UserPassRequest {
        username: user.into(),
        password: pass.into(),
    };
    assert_decodes(&bytes, UserPassRequest::decode, &req);
}

#[test]
fn userpass_request_255_byte_fields() {
    let bytes = cat(&[&[0x01, 0xff], &[b'u'; 255], &[0xff], &[b'p'; 255]]);
    let req = UserPassRequest {
        username: "u".repeat(255),
        password: "p".repeat(255),
    };
    assert_eq!(bytes.len(), 513);
    assert_decodes(&bytes, UserPassRequest::decode, &req);
    assert_eq!(enc(|o| req.encode(o)), bytes);
}

#[test]
fn userpass_request_wrong_version() {
    // A SOCKS5 request where the RFC 1929 sub-negotiation was expected.
    assert_eq!(
        UserPassRequest::decode(&[0x05, 0x01, 0x00]),
        Err(DecodeError::UnsupportedVersion {
            expected: 1,
            got: 5
        })
    );
}

#[test]
fn userpass_request_empty_username() {
    assert_eq!(
        UserPassRequest::decode(&[0x01, 0x00]),
        Err(DecodeError::EmptyCredential("username"))
    );
    assert_eq!(
        UserPassRequest::decode(&[0x01, 0x00, 0x01, b'p']),
        Err(DecodeError::EmptyCredential("username"))
    );
}

#[test]
fn userpass_request_empty_password() {
    let bytes = cat(&[&[0x01, 0x03], b"bob", &[0x00]]);
    assert_eq!(
        UserPassRequest::decode(&bytes),
        Err(DecodeError::EmptyCredential("password"))
    );
}

#[test]
fn userpass_request_invalid_utf8() {
    let bad_user = [0x01, 0x02, 0xff, 0xfe, 0x01, b'p'];
    assert_eq!(
        UserPassRequest::decode(&bad_user),
        Err(DecodeError::InvalidCredential("username"))
    );
    // 0xc3 0x28: a two-byte lead followed by a non-continuation byte.
    let bad_pass = [0x01, 0x01, b'u', 0x02, 0xc3, 0x28];
    assert_eq!(
        UserPassRequest::decode(&bad_pass),
        Err(DecodeError::InvalidCredential("password"))
    );
}

#[test]
fn userpass_request_debug_hides_password() {
    let req = UserPassRequest {
        username: "bob".into(),
        password: "hunter2-secret".into(),
    };
    let shown = format!("{req:?}");
    assert!(shown.contains("bob"), "{shown}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn userpass_reply() {
    assert_decodes(
        &[0x01, 0x00],
        UserPassReply::decode,
        &UserPassReply::SUCCESS,
    );
    assert_decodes(
        &[0x01, 0x01],
        UserPassReply::decode,
        &UserPassReply::FAILURE,
    );
    assert_eq!(enc(|o| UserPassReply::SUCCESS.encode(o)), [0x01, 0x00]);
    assert_eq!(enc(|o| UserPassReply::FAILURE.encode(o)), [0x01, 0x01]);
    assert!(UserPassReply::SUCCESS.is_success());
    assert!(!UserPassReply::FAILURE.is_success());
    // RFC 1929: any status other than X'00' is a failure.
    let other = UserPassReply { status: 0xff };
    assert_decodes(&[0x01, 0xff], UserPassReply::decode, &other);
    assert!(!other.is_success());
}

#[test]
fn userpass_reply_wrong_version() {
    assert_eq!(
        UserPassReply::decode(&[0x05, 0x00]),
        Err(DecodeError::UnsupportedVersion {
            expected: 1,
            got: 5
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn target_addr_ipv4() {
    let bytes = [0x01, 192, 0, 2, 1, 0x00, 0x50];
    let a = TargetAddr::Ip(v4(192, 0, 2, 1, 80));
    assert_decodes(&bytes, TargetAddr::decode, &a);
    assert_eq!(enc(|o| a.encode(o)), bytes);
    assert_eq!(a.encoded_len(), 7);
    assert_eq!(a.port(), 80);
    assert_eq!(a.to_string(), "192.0.2.1:80");
}

#[test]
fn target_addr_ipv6() {
    let bytes = cat(&[&[0x04], &DOC_V6_BYTES, &[0x01, 0xbb]]);
    let a = TargetAddr::Ip(SocketAddr::new(IpAddr::V6(doc_v6()), 443));
    assert_decodes(&bytes, TargetAddr::decode, &a);
    assert_eq!(enc(|o| a.encode(o)), bytes);
    assert_eq!(a.encoded_len(), 19);
    assert_eq!(a.to_string(), "[2001:db8::1]:443");
}

#[test]
fn target_addr_domain() {
    let bytes = cat(&[&[0x03, 0x0b], b"example.com", &[0x01, 0xbb]]);
    let a = TargetAddr::Domain("example.com".into(), 443);
    assert_decodes(&bytes, TargetAddr::decode, &a);
    assert_eq!(enc(|o| a.encode(o)), bytes);
    assert_eq!(a.encoded_len(), 15);
    assert_eq!(a.port(), 443);
    assert_eq!(a.to_string(), "example.com:443");
}

#[test]
fn target_addr_255_byte_domains() {
    let ascii = "a".repeat(255);
    let bytes = cat(&[&[0x03, 0xff], ascii.as_bytes(), &[0x00, 0x50]]);
    assert_eq!(bytes.len(), 259);
    assert_decodes(&bytes, TargetAddr::decode, &TargetAddr::Domain(ascii, 80));

    // 127 two-byte characters and one ASCII byte: 255 bytes, 128 characters.
    let unicode = format!("{}a", "é".repeat(127));
    assert_eq!(unicode.len(), 255);
    let bytes = cat(&[&[0x03, 0xff], unicode.as_bytes(), &[0x00, 0x50]]);
    let a = TargetAddr::Domain(unicode, 80);
    assert_decodes(&bytes, TargetAddr::decode, &a);
    assert_eq!(enc(|o| a.encode(o)), bytes);
}

#[test]
fn target_addr_encode_truncates_long_domain() {
    let a = TargetAddr::Domain("a".repeat(300), 80);
    let bytes = enc(|o| a.encode(o));
    assert_eq!(bytes.len(), 259);
    assert_eq!(a.encoded_len(), 259);
    assert_eq!(bytes[1], 0xff);
    assert_eq!(&bytes[257..], &[0x00, 0x50]);
}

#[test]
fn target_addr_unknown_type() {
    for atyp in [0x00, 0x02, 0x05, 0xff] {
        assert_eq!(
            TargetAddr::decode(&[atyp, 127, 0, 0, 1, 0, 80]),
            Err(DecodeError::UnknownAddressType(atyp))
        );
        // Refused as soon as the ATYP byte is in.
        assert_eq!(
            TargetAddr::decode(&[atyp]),
            Err(DecodeError::UnknownAddressType(atyp))
        );
    }
}

#[test]
fn target_addr_empty_domain() {
    assert_eq!(
        TargetAddr::decode(&[0x03, 0x00]),
        Err(DecodeError::EmptyDomain)
    );
    assert_eq!(
        TargetAddr::decode(&[0x03, 0x00, 0x00, 0x50]),
        Err(DecodeError::EmptyDomain)
    );
}

#[test]
fn target_addr_non_utf8_domain() {
    assert_eq!(
        TargetAddr::decode(&[0x03, 0x02, 0xff, 0xfe, 0x00, 0x50]),
        Err(DecodeError::InvalidDomain)
    );
    // A lone continuation byte inside otherwise ASCII text.
    let bytes = cat(&[&[0x03, 0x05], b"ab", &[0x80], b"cd", &[0x00, 0x50]]);
    assert_eq!(TargetAddr::decode(&bytes), Err(DecodeError::InvalidDomain));
}

#[test]
fn target_addr_unspecified_and_from() {
    assert_eq!(
        enc(|o| TargetAddr::UNSPECIFIED.encode(o)),
        [0x01, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        TargetAddr::from(v4(10, 0, 0, 1, 1080)),
        TargetAddr::Ip(v4(10, 0, 0, 1, 1080))
    );
}

// ---------------------------------------------------------------------------------------------
// Requests (RFC 1928 section 4 and the MSOCKS commands)
// ---------------------------------------------------------------------------------------------

/// `05 01 00 | 01 c0 00 02 01 | 00 50`: CONNECT 192.0.2.1:80.
const CONNECT_V4: [u8; 10] = [0x05, 0x01, 0x00, 0x01, 192, 0, 2, 1, 0x00, 0x50];

fn connect_v4() -> Request {
    Request::Open(OpenRequest {
        command: Command::Connect,
        target: TargetAddr::Ip(v4(192, 0, 2, 1, 80)),
        mobility: None,
    })
}

/// The RECONNECT of [`reconnect`]: token 00..0f, 4096 bytes read, 7 written, OOB inline.
fn reconnect_bytes() -> Vec<u8> {
    cat(&[
        &[0x05, 0x83, 0x00],
        &[0x01, 0x01],
        &TOKEN_BYTES,
        &[0, 0, 0, 0, 0, 0, 0x10, 0x00],
        &[0, 0, 0, 0, 0, 0, 0, 0x07],
    ])
}

fn reconnect() -> Request {
    Request::Reconnect(ReconnectRequest {
        oob_inline: true,
        token: token(),
        data_read: 4096,
        data_written: 7,
        resend_from: None,
    })
}

#[test]
fn request_connect_ipv4() {
    let r = connect_v4();
    assert_decodes(&CONNECT_V4, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), CONNECT_V4);
}

#[test]
fn request_bind_domain() {
    let bytes = cat(&[
        &[0x05, 0x02, 0x00, 0x03, 0x0b],
        b"example.com",
        &[0x1f, 0x90],
    ]);
    let r = Request::Open(OpenRequest {
        command: Command::Bind,
        target: TargetAddr::Domain("example.com".into(), 8080),
        mobility: None,
    });
    assert_decodes(&bytes, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
}

#[test]
fn request_udp_associate_ipv6() {
    let bytes = cat(&[&[0x05, 0x03, 0x00, 0x04], &DOC_V6_BYTES, &[0x00, 0x35]]);
    let r = Request::Open(OpenRequest {
        command: Command::UdpAssociate,
        target: TargetAddr::Ip(SocketAddr::new(IpAddr::V6(doc_v6()), 53)),
        mobility: None,
    });
    assert_decodes(&bytes, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
}

#[test]
fn request_udp_associate_drops_mobility_options() {
    let r = Request::Open(OpenRequest {
        command: Command::UdpAssociate,
        target: TargetAddr::UNSPECIFIED,
        mobility: Some(MobilityOptions {
            oob_inline: true,
            read_origin: 1,
            write_origin: 2,
        }),
    });
    assert_eq!(
        enc(|o| r.encode(o)),
        [0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0]
    );
}

#[test]
fn request_msocks_connect() {
    let bytes = cat(&[
        &[0x05, 0x81, 0x00, 0x01, 192, 0, 2, 1, 0x00, 0x50],
        &[0x01, 0x01],
        &[0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00],
        &[0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
    ]);
    assert_eq!(bytes.len(), 10 + MAX_REQUEST_TRAILER);
    let r = Request::Open(OpenRequest {
        command: Command::Connect,
        target: TargetAddr::Ip(v4(192, 0, 2, 1, 80)),
        mobility: Some(MobilityOptions {
            oob_inline: true,
            read_origin: 1 << 32,
            write_origin: 1 << 63,
        }),
    });
    assert_decodes(&bytes, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
}

#[test]
fn request_msocks_bind() {
    let bytes = cat(&[
        &[0x05, 0x82, 0x00, 0x04],
        &DOC_V6_BYTES,
        &[0x00, 0x15],
        &[0x01, 0x00],
        &[0xff; 8],
        &[0, 0, 0, 0, 0, 0, 0, 0x01],
    ]);
    let r = Request::Open(OpenRequest {
        command: Command::Bind,
        target: TargetAddr::Ip(SocketAddr::new(IpAddr::V6(doc_v6()), 21)),
        mobility: Some(MobilityOptions {
            oob_inline: false,
            read_origin: u64::MAX,
            write_origin: 1,
        }),
    });
    assert_decodes(&bytes, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
}

#[test]
fn request_reconnect() {
    let bytes = reconnect_bytes();
    assert_eq!(bytes.len(), 3 + RECONNECT_BODY_LEN);
    let r = reconnect();
    assert_decodes(&bytes, Request::decode, &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
    let Request::Reconnect(body) = r else {
        unreachable!("reconnect() builds a Request::Reconnect")
    };
    assert_eq!(enc(|o| body.encode_body(o)), &bytes[3..]);
}

#[test]
fn request_reserved_byte_is_ignored() {
    let mut bytes = CONNECT_V4;
    bytes[2] = 0xff;
    assert_decodes(&bytes, Request::decode, &connect_v4());
    let mut bytes = reconnect_bytes();
    bytes[2] = 0x42;
    assert_decodes(&bytes, Request::decode, &reconnect());
}

#[test]
fn requests_pipelined() {
    let bytes = cat(&[&CONNECT_V4, &reconnect_bytes()]);
    assert_eq!(Request::decode(&bytes), Ok(Some((connect_v4(), 10))));
    assert_eq!(Request::decode(&bytes[10..]), Ok(Some((reconnect(), 37))));
}

#[test]
fn request_plain_connect_reads_no_trailer() {
    // A plain CONNECT followed by what looks like mobility options: they are not its own.
    let bytes = cat(&[&CONNECT_V4, &[0x01, 0x00], &[0u8; 16]]);
    assert_eq!(Request::decode(&bytes), Ok(Some((connect_v4(), 10))));
}

#[test]
fn request_wrong_version() {
    let mut bytes = CONNECT_V4;
    bytes[0] = 0x04;
    assert_eq!(
        Request::decode(&bytes),
        Err(DecodeError::UnsupportedVersion {
            expected: 5,
            got: 4
        })
    );
}

#[test]
fn request_unknown_command() {
    for cmd in [0x00, 0x04, 0x07, 0x80, 0x85, 0xff] {
        let mut bytes = CONNECT_V4;
        bytes[1] = cmd;
        assert_eq!(
            Request::decode(&bytes),
            Err(DecodeError::UnknownCommand(cmd))
        );
        assert_eq!(
            Request::decode(&bytes[..2]),
            Err(DecodeError::UnknownCommand(cmd))
        );
    }
}

#[test]
fn request_unknown_address_type() {
    let mut bytes = CONNECT_V4;
    bytes[3] = 0x05;
    assert_eq!(
        Request::decode(&bytes),
        Err(DecodeError::UnknownAddressType(5))
    );
}

#[test]
fn request_empty_and_invalid_domain() {
    assert_eq!(
        Request::decode(&[0x05, 0x01, 0x00, 0x03, 0x00, 0x00, 0x50]),
        Err(DecodeError::EmptyDomain)
    );
    assert_eq!(
        Request::decode(&[0x05, 0x01, 0x00, 0x03, 0x01, 0xc3, 0x00, 0x50]),
        Err(DecodeError::InvalidDomain)
    );
}

/// An MSOCKS CONNECT to 192.0.2.1:80 with the given trailer version and flags.
fn msocks_connect_with(version: u8, flags: u8) -> Vec<u8> {
    cat(&[
        &[0x05, 0x81, 0x00, 0x01, 192, 0, 2, 1, 0x00, 0x50],
        &[version, flags],
        &[0u8; 16],
    ])
}

#[test]
fn request_mobility_trailer_wrong_version() {
    for version in [0x00, 0x02, 0xff] {
        assert_eq!(
            Request::decode(&msocks_connect_with(version, 0x00)),
            Err(DecodeError::UnsupportedMsocksVersion(version))
        );
    }
}

#[test]
fn request_mobility_trailer_reserved_flags() {
    assert_eq!(
        Request::decode(&msocks_connect_with(0x01, 0x02)),
        Err(DecodeError::ReservedFlags(0x02))
    );
    // Only the reserved bits are reported; the defined OOB_INLINE bit is masked out.
    assert_eq!(
        Request::decode(&msocks_connect_with(0x01, 0xff)),
        Err(DecodeError::ReservedFlags(0xfe))
    );
}

#[test]
fn request_reconnect_wrong_version_and_reserved_flags() {
    let mut bytes = reconnect_bytes();
    bytes[3] = 0x02;
    assert_eq!(
        Request::decode(&bytes),
        Err(DecodeError::UnsupportedMsocksVersion(2))
    );
    let mut bytes = reconnect_bytes();
    bytes[4] = 0x81;
    assert_eq!(
        Request::decode(&bytes),
        Err(DecodeError::ReservedFlags(0x80))
    );
}

#[test]
fn command_names() {
    assert_eq!(Command::Connect.name(), "connect");
    assert_eq!(Command::Bind.name(), "bind");
    assert_eq!(Command::UdpAssociate.name(), "udpassociate");
}

// ---------------------------------------------------------------------------------------------
// MSOCKS trailers on their own
// ---------------------------------------------------------------------------------------------

#[test]
fn mobility_options() {
    let bytes = cat(&[&[0x01, 0x00], &[0u8; 8], &[0u8; 8]]);
    assert_decodes(&bytes, MobilityOptions::decode, &MobilityOptions::default());
    let m = MobilityOptions {
        oob_inline: true,
        read_origin: 0x0102_0304_0506_0708,
        write_origin: u64::MAX,
    };
    let bytes = cat(&[&[0x01, 0x01], &[1, 2, 3, 4, 5, 6, 7, 8], &[0xff; 8]]);
    assert_decodes(&bytes, MobilityOptions::decode, &m);
    assert_eq!(enc(|o| m.encode(o)), bytes);
}

#[test]
fn mobility_options_errors() {
    assert_eq!(
        MobilityOptions::decode(&[0x02]),
        Err(DecodeError::UnsupportedMsocksVersion(2))
    );
    assert_eq!(
        MobilityOptions::decode(&[0x01, 0x04]),
        Err(DecodeError::ReservedFlags(0x04))
    );
}

/// `01 | 00..0f | 01 c0 00 02 01 | 04 38`: token 00..0f, home 192.0.2.1:1080.
fn connection_id_v4_bytes() -> Vec<u8> {
    cat(&[&[0x01], &TOKEN_BYTES, &[0x01, 192, 0, 2, 1], &[0x04, 0x38]])
}

fn connection_id_v4() -> ConnectionId {
    ConnectionId {
        token: token(),
        home: v4(192, 0, 2, 1, 1080),
    }
}

#[test]
fn connection_id() {
    let bytes = connection_id_v4_bytes();
    let id = connection_id_v4();
    assert_decodes(&bytes, ConnectionId::decode, &id);
    assert_eq!(enc(|o| id.encode(o)), bytes);

    // An unspecified IPv6 home: "this proxy, at port 1080".
    let bytes = cat(&[&[0x01], &TOKEN_BYTES, &[0x04], &[0u8; 16], &[0x04, 0x38]]);
    let id = ConnectionId {
        token: token(),
        home: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 1080),
    };
    assert_decodes(&bytes, ConnectionId::decode, &id);
    assert_eq!(enc(|o| id.encode(o)), bytes);
}

#[test]
fn connection_id_domain_home_not_allowed() {
    let bytes = cat(&[&[0x01], &TOKEN_BYTES, &[0x03, 0x04], b"home", &[0x04, 0x38]]);
    assert_eq!(
        ConnectionId::decode(&bytes),
        Err(DecodeError::AddressTypeNotAllowed(3))
    );
}

#[test]
fn connection_id_unknown_home_type_and_version() {
    let mut bytes = connection_id_v4_bytes();
    bytes[17] = 0x05;
    assert_eq!(
        ConnectionId::decode(&bytes),
        Err(DecodeError::UnknownAddressType(5))
    );
    let mut bytes = connection_id_v4_bytes();
    bytes[0] = 0x02;
    assert_eq!(
        ConnectionId::decode(&bytes),
        Err(DecodeError::UnsupportedMsocksVersion(2))
    );
}

#[test]
fn resume_counters() {
    let bytes = cat(&[
        &[0x01],
        &[0, 0, 0, 0, 0, 0, 0, 0x05],
        &[0, 0, 0, 0, 0, 0, 0x01, 0x00],
    ]);
    let rc = ResumeCounters {
        data_write: 5,
        data_salvage: 256,
    };
    assert_decodes(&bytes, ResumeCounters::decode, &rc);
    assert_eq!(enc(|o| rc.encode(o)), bytes);
    assert_eq!(
        ResumeCounters::decode(&cat(&[&[0x00], &[0u8; 16]])),
        Err(DecodeError::UnsupportedMsocksVersion(0))
    );
}

#[test]
fn session_token_display_does_not_leak() {
    let t = token();
    assert_eq!(t.to_string(), "00010203…");
    assert_eq!(format!("{t:?}"), "SessionToken(00010203…)");
    assert_eq!(t.to_hex(), "000102030405060708090a0b0c0d0e0f");
    let shown = format!("{:?}", connection_id_v4());
    assert!(!shown.contains("0405"), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// Replies (RFC 1928 section 6 and the MSOCKS trailers)
// ---------------------------------------------------------------------------------------------

/// `05 00 00 | 01 0a 00 00 01 | 04 38`: succeeded, bound 10.0.0.1:1080.
const SUCCESS_V4: [u8; 10] = [0x05, 0x00, 0x00, 0x01, 10, 0, 0, 1, 0x04, 0x38];

fn success_v4() -> Reply {
    Reply::success(TargetAddr::Ip(v4(10, 0, 0, 1, 1080)))
}

const ALL_CONTEXTS: [ReplyContext; 3] = [
    ReplyContext::Plain,
    ReplyContext::MobileOpen,
    ReplyContext::Reconnect,
];

#[test]
fn reply_plain_success() {
    let r = success_v4();
    assert_decodes(&SUCCESS_V4, |b| Reply::decode(b, ReplyContext::Plain), &r);
    assert_eq!(enc(|o| r.encode(o)), SUCCESS_V4);
}

#[test]
fn reply_plain_success_with_domain() {
    let bytes = cat(&[&[0x05, 0x00, 0x00, 0x03, 0x05], b"proxy", &[0x04, 0x38]]);
    let r = Reply::success(TargetAddr::Domain("proxy".into(), 1080));
    assert_decodes(&bytes, |b| Reply::decode(b, ReplyContext::Plain), &r);
}

#[test]
fn reply_failure_has_no_trailer_in_any_context() {
    let bytes = [0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    let r = Reply::failure(ReplyCode::ConnectionRefused);
    assert_eq!(enc(|o| r.encode(o)), bytes);
    for ctx in ALL_CONTEXTS {
        assert_decodes(&bytes, |b| Reply::decode(b, ctx), &r);
    }
    // The MSOCKS failure codes carry no trailer either.
    for code in [
        ReplyCode::UnknownSession,
        ReplyCode::BadCounters,
        ReplyCode::SessionBusy,
        ReplyCode::MsocksVersionNotSupported,
    ] {
        let bytes = [0x05, code.as_u8(), 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        for ctx in ALL_CONTEXTS {
            assert_decodes(&bytes, |b| Reply::decode(b, ctx), &Reply::failure(code));
        }
    }
}

#[test]
fn reply_mobile_open_success_carries_connection_id() {
    let bytes = cat(&[&SUCCESS_V4, &connection_id_v4_bytes()]);
    assert_eq!(bytes.len(), 10 + 24);
    let r = Reply {
        extension: ReplyExtension::Connection(connection_id_v4()),
        ..success_v4()
    };
    assert_decodes(&bytes, |b| Reply::decode(b, ReplyContext::MobileOpen), &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
    // Without the trailer the reply is incomplete.
    assert_eq!(
        Reply::decode(&SUCCESS_V4, ReplyContext::MobileOpen),
        Ok(None)
    );
}

#[test]
fn reply_reconnect_success_carries_resume_counters() {
    let trailer = cat(&[
        &[0x01],
        &[0, 0, 0, 0, 0, 0, 0, 0x05],
        &[0, 0, 0, 0, 0, 0, 0x01, 0x00],
    ]);
    let bytes = cat(&[&SUCCESS_V4, &trailer]);
    let r = Reply {
        extension: ReplyExtension::Resume(ResumeCounters {
            data_write: 5,
            data_salvage: 256,
        }),
        ..success_v4()
    };
    assert_decodes(&bytes, |b| Reply::decode(b, ReplyContext::Reconnect), &r);
    assert_eq!(enc(|o| r.encode(o)), bytes);
    assert_eq!(
        Reply::decode(&SUCCESS_V4, ReplyContext::Reconnect),
        Ok(None)
    );
}

#[test]
fn reply_trailer_only_read_in_its_context() {
    let bytes = cat(&[&SUCCESS_V4, &connection_id_v4_bytes()]);
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::Plain),
        Ok(Some((success_v4(), 10)))
    );
    // A failure in an MSOCKS context stops after BND.PORT even if bytes follow.
    let mut failed = bytes.clone();
    failed[1] = ReplyCode::UnknownSession.as_u8();
    assert_eq!(
        Reply::decode(&failed, ReplyContext::MobileOpen),
        Ok(Some((
            Reply {
                code: ReplyCode::UnknownSession,
                ..success_v4()
            },
            10
        )))
    );
}

#[test]
fn reply_connection_id_with_domain_home() {
    let bytes = cat(&[
        &SUCCESS_V4,
        &[0x01],
        &TOKEN_BYTES,
        &[0x03, 0x04],
        b"home",
        &[0x04, 0x38],
    ]);
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::MobileOpen),
        Err(DecodeError::AddressTypeNotAllowed(3))
    );
}

#[test]
fn reply_trailer_wrong_msocks_version() {
    let mut bytes = cat(&[&SUCCESS_V4, &connection_id_v4_bytes()]);
    bytes[10] = 0x02;
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::MobileOpen),
        Err(DecodeError::UnsupportedMsocksVersion(2))
    );
    let bytes = cat(&[&SUCCESS_V4, &[0x00], &[0u8; 16]]);
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::Reconnect),
        Err(DecodeError::UnsupportedMsocksVersion(0))
    );
}

#[test]
fn reply_wrong_version_and_address_type() {
    let mut bytes = SUCCESS_V4;
    bytes[0] = 0x04;
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::Plain),
        Err(DecodeError::UnsupportedVersion {
            expected: 5,
            got: 4
        })
    );
    let mut bytes = SUCCESS_V4;
    bytes[3] = 0x05;
    assert_eq!(
        Reply::decode(&bytes, ReplyContext::Plain),
        Err(DecodeError::UnknownAddressType(5))
    );
}

#[test]
fn reply_reserved_byte_is_ignored() {
    let mut bytes = SUCCESS_V4;
    bytes[2] = 0x7f;
    assert_decodes(
        &bytes,
        |b| Reply::decode(b, ReplyContext::Plain),
        &success_v4(),
    );
}

#[test]
fn reply_codes() {
    let named = [
        (0x00, ReplyCode::Succeeded),
        (0x01, ReplyCode::GeneralFailure),
        (0x02, ReplyCode::NotAllowed),
        (0x03, ReplyCode::NetworkUnreachable),
        (0x04, ReplyCode::HostUnreachable),
        (0x05, ReplyCode::ConnectionRefused),
        (0x06, ReplyCode::TtlExpired),
        (0x07, ReplyCode::CommandNotSupported),
        (0x08, ReplyCode::AddressTypeNotSupported),
        (0x80, ReplyCode::UnknownSession),
        (0x81, ReplyCode::BadCounters),
        (0x82, ReplyCode::SessionBusy),
        (0x83, ReplyCode::MsocksVersionNotSupported),
    ];
    for (byte, code) in named {
        assert_eq!(ReplyCode::from_u8(byte), code);
        assert_eq!(code.as_u8(), byte);
    }
    for byte in 0..=255u8 {
        let code = ReplyCode::from_u8(byte);
        assert_eq!(code.as_u8(), byte);
        let is_named = named.iter().any(|&(b, _)| b == byte);
        assert_eq!(code == ReplyCode::Other(byte), !is_named, "{byte:#04x}");
    }
    assert_eq!(
        ReplyCode::ConnectionRefused.to_string(),
        "connection refused (0x05)"
    );
    assert_eq!(
        ReplyCode::Other(0x42).to_string(),
        "unassigned reply code 0x42"
    );
}

// ---------------------------------------------------------------------------------------------
// UDP relay header (RFC 1928 section 7)
// ---------------------------------------------------------------------------------------------

#[test]
fn udp_header_ipv4_with_payload() {
    let header = [0x00, 0x00, 0x00, 0x01, 192, 0, 2, 1, 0x00, 0x35];
    let h = UdpHeader {
        frag: 0,
        target: TargetAddr::Ip(v4(192, 0, 2, 1, 53)),
    };
    assert_decodes(&header, UdpHeader::decode, &h);
    assert_eq!(enc(|o| h.encode(o)), header);
    let datagram = cat(&[&header, b"payload"]);
    let (decoded, consumed) = UdpHeader::decode(&datagram)
        .expect("valid header")
        .expect("complete header");
    assert_eq!(decoded, h);
    assert_eq!(&datagram[consumed..], b"payload");
}

#[test]
fn udp_header_domain_fragment_and_reserved() {
    let bytes = cat(&[&[0xab, 0xcd, 0x02, 0x03, 0x04], b"host", &[0x00, 0x35]]);
    let h = UdpHeader {
        frag: 2,
        target: TargetAddr::Domain("host".into(), 53),
    };
    assert_decodes(&bytes, UdpHeader::decode, &h);
    // Re-encoding writes RSV as zero.
    assert_eq!(enc(|o| h.encode(o))[..2], [0x00, 0x00]);
}

#[test]
fn udp_header_errors() {
    assert_eq!(
        UdpHeader::decode(&[0x00, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0]),
        Err(DecodeError::UnknownAddressType(5))
    );
    assert_eq!(
        UdpHeader::decode(&[0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x35]),
        Err(DecodeError::EmptyDomain)
    );
}

// ---------------------------------------------------------------------------------------------
// Error messages
// ---------------------------------------------------------------------------------------------

#[test]
fn decode_error_messages() {
    let cases = [
        (
            DecodeError::UnsupportedVersion {
                expected: 5,
                got: 4,
            },
            "unsupported protocol version 0x04 (expected 0x05)",
        ),
        (
            DecodeError::NoMethods,
            "the client offered no authentication method",
        ),
        (DecodeError::UnknownCommand(7), "unknown command 0x07"),
        (
            DecodeError::UnknownAddressType(5),
            "unknown address type 0x05",
        ),
        (DecodeError::EmptyDomain, "empty domain name"),
        (DecodeError::InvalidDomain, "domain name is not valid UTF-8"),
        (
            DecodeError::EmptyCredential("username"),
            "empty username in username/password authentication",
        ),
        (
            DecodeError::InvalidCredential("password"),
            "password in username/password authentication is not valid UTF-8",
        ),
        (
            DecodeError::UnsupportedMsocksVersion(2),
            "unsupported MSOCKS extension version 2",
        ),
        (
            DecodeError::ReservedFlags(0xfe),
            "reserved MSOCKS flag bits set: 0xfe",
        ),
        (
            DecodeError::AddressTypeNotAllowed(3),
            "address type 0x03 is not allowed here",
        ),
    ];
    for (error, message) in cases {
        assert_eq!(error.to_string(), message);
    }
}

// ---------------------------------------------------------------------------------------------
// STANDBY and probes (PROTOCOL.md 3.13)
// ---------------------------------------------------------------------------------------------

#[test]
fn standby_request_bytes() {
    let bytes = enc(|o| Request::Standby.encode(o));
    assert_eq!(bytes, [0x05, 0x84, 0x00, 0x01, 0x00]);
    assert_eq!(Request::decode(&bytes), Ok(Some((Request::Standby, 5))));
    for k in 0..5 {
        assert_eq!(Request::decode(&bytes[..k]), Ok(None));
    }
}

#[test]
fn standby_request_errors() {
    assert_eq!(
        Request::decode(&[0x05, 0x84, 0x00, 0x02, 0x00]),
        Err(DecodeError::UnsupportedMsocksVersion(2))
    );
    assert_eq!(
        Request::decode(&[0x05, 0x84, 0x00, 0x01, 0x80]),
        Err(DecodeError::ReservedFlags(0x80))
    );
}

#[test]
fn probe_frames() {
    let ping = enc(|o| StandbyFrame::Ping(0x0102030405060708).encode(o));
    assert_eq!(ping, [0x01, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        StandbyFrame::decode(&ping),
        Ok(Some((StandbyFrame::Ping(0x0102030405060708), 9)))
    );
    assert_eq!(StandbyFrame::decode(&ping[..8]), Ok(None));
    let pong = enc(|o| ProxyFrame::Pong(7).encode(o));
    assert_eq!(pong, [0x02, 0, 0, 0, 0, 0, 0, 0, 7]);
    assert_eq!(
        ProxyFrame::decode(&pong, ReplyContext::Reconnect),
        Ok(Some((ProxyFrame::Pong(7), 9)))
    );
    // A request after pings is the request.
    let mut both = ping.clone();
    let rc = Request::Reconnect(ReconnectRequest {
        oob_inline: true,
        token: token(),
        data_read: 1,
        data_written: 2,
        resend_from: None,
    });
    rc.encode(&mut both);
    assert_eq!(
        StandbyFrame::decode(&both[9..]),
        Ok(Some((StandbyFrame::Request(rc), 37)))
    );
    // Anything else is refused with the type byte named.
    assert_eq!(
        StandbyFrame::decode(&[0x02, 0]),
        Err(DecodeError::UnknownFrame(2))
    );
    assert_eq!(
        ProxyFrame::decode(&[0x01], ReplyContext::Plain),
        Err(DecodeError::UnknownFrame(1))
    );
    assert_eq!(StandbyFrame::decode(&[]), Ok(None));
}

#[test]
fn reconnect_with_early_resend() {
    let rc = ReconnectRequest {
        oob_inline: true,
        token: token(),
        data_read: 10,
        data_written: 20,
        resend_from: Some(15),
    };
    let bytes = enc(|o| Request::Reconnect(rc).encode(o));
    assert_eq!(bytes.len(), 45);
    assert_eq!(bytes[4], 0x03, "FLAGS: OOB_INLINE | EARLY_RESEND");
    assert_eq!(&bytes[37..], &15u64.to_be_bytes());
    assert_eq!(
        Request::decode(&bytes),
        Ok(Some((Request::Reconnect(rc), 45)))
    );
    assert_eq!(Request::decode(&bytes[..44]), Ok(None));
    // The bit is RECONNECT's only: MSOCKS CONNECT still refuses it.
    assert_eq!(
        MobilityOptions::decode(&[0x01, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        Err(DecodeError::ReservedFlags(0x02))
    );
    // Higher bits stay reserved in RECONNECT.
    let mut bad = bytes.clone();
    bad[4] = 0x07;
    assert_eq!(Request::decode(&bad), Err(DecodeError::ReservedFlags(0x04)));
}
