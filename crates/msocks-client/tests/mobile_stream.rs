//! The library against a scripted fake proxy: handshake bytes, counters, moves (salvage,
//! rewrite, FIN handling), automatic reconnects and the failure replies.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use msocks_client::{
    Credentials, Error, MobileConfig, MobileStream, ProxyPath, StreamState, TargetAddr,
};
use msocks_proto::{ConnectionId, ReconnectRequest, Request};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TARGET: &str = "127.0.0.1:8080";

fn target() -> SocketAddr {
    TARGET.parse().expect("addr")
}

/// The 37 bytes of a RECONNECT as PROTOCOL.md 3.5 lays them out.
fn reconnect_bytes(r: &ReconnectRequest) -> Vec<u8> {
    let mut v = vec![0x05, 0x83, 0x00, 0x01, u8::from(r.oob_inline)];
    v.extend_from_slice(&r.token.0);
    v.extend_from_slice(&r.data_read.to_be_bytes());
    v.extend_from_slice(&r.data_written.to_be_bytes());
    v
}

#[tokio::test]
async fn connect_handshake_is_byte_exact() {
    // The worked example of PROTOCOL.md 3.11: WRITE_ORIGIN = 2^32 - 8.
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.write_origin = 0xFFFF_FFF8;
    cfg.oob_inline = false; // the worked example's FLAGS byte
    let reply: Vec<u8> = [
        0x05, 0x00, 0x00, 0x01, 0x7f, 0x00, 0x00, 0x01, 0xc4, 0xa8, 0x01, 0x3f, 0x9a, 0x5c, 0x01,
        0xd2, 0x77, 0x4e, 0x8b, 0x19, 0xa0, 0x6f, 0xc3, 0x55, 0x2e, 0xb8, 0x04, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x04, 0x38,
    ]
    .to_vec();
    let reply2 = reply.clone();
    let (stream, conn) = tokio::join!(MobileStream::connect(target(), cfg), async {
        let mut conn = proxy.accept().await;
        conn.accept_no_auth().await;
        conn.request().await;
        conn.send(&reply2).await;
        conn
    });
    let mut stream = stream.expect("connect");
    let mut conn = conn;
    let expected: Vec<u8> = [
        0x05, 0x01, 0x00, // greeting: NO AUTH only
        0x05, 0x81, 0x00, 0x01, 0x7f, 0x00, 0x00, 0x01, 0x1f, 0x90, 0x01, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xf8,
    ]
    .to_vec();
    assert_eq!(conn.received, expected);

    let id = stream.id();
    assert_eq!(&id.token.0[..2], &[0x3f, 0x9a]);
    assert_eq!(id.home, "0.0.0.0:1080".parse::<SocketAddr>().expect("addr"));
    assert_eq!(
        stream.bound_addr(),
        &TargetAddr::Ip("127.0.0.1:50344".parse().expect("addr"))
    );
    let status = stream.status();
    assert_eq!(status.data_read, 0);
    assert_eq!(status.data_written, 0xFFFF_FFF8);
    assert_eq!(status.state, StreamState::Connected);

    // Eight bytes take data_written across 2^32.
    stream.write_all(b"12345678").await.expect("write");
    assert_eq!(conn.read_data(8).await, b"12345678");
    let control = stream.control();
    let s = wait_status(&control, "data_written", |s| s.data_written == 1 << 32).await;
    assert_eq!(s.data_written, 0x1_0000_0000);
}

#[tokio::test]
async fn credentials_are_sent_with_rfc1929() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.oob_inline = false; // the expected bytes below carry FLAGS = 0
    cfg.credentials = Some(Credentials::new("mobile", "s3cret"));
    let id = id_any_home(1, proxy.addr.port());
    let (stream, conn) = tokio::join!(MobileStream::connect(target(), cfg), async {
        let mut conn = proxy.accept().await;
        conn.accept_user_pass("mobile", "s3cret").await;
        conn.request().await;
        conn.send(&FakeConn::open_reply(id, target())).await;
        conn
    });
    stream.expect("connect");
    let mut expected = vec![0x05, 0x01, 0x02, 0x01, 6];
    expected.extend_from_slice(b"mobile");
    expected.push(6);
    expected.extend_from_slice(b"s3cret");
    expected.extend_from_slice(&[0x05, 0x81, 0x00, 0x01, 127, 0, 0, 1, 0x1f, 0x90, 0x01, 0x00]);
    expected.extend_from_slice(&[0; 16]);
    assert_eq!(conn.received, expected);
}

#[tokio::test]
async fn authentication_failures_are_typed() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.credentials = Some(Credentials::new("mobile", "wrong"));
    let (result, ()) = tokio::join!(MobileStream::connect(target(), cfg.clone()), async {
        let mut conn = proxy.accept().await;
        conn.send(&[0x05, 0x02, 0x01, 0x01]).await;
    });
    assert!(matches!(result, Err(Error::AuthFailed(1))), "{result:?}");

    let (result, ()) = tokio::join!(MobileStream::connect(target(), cfg), async {
        let mut conn = proxy.accept().await;
        conn.send(&[0x05, 0xff]).await;
    });
    assert!(
        matches!(result, Err(Error::NoAcceptableMethod)),
        "{result:?}"
    );
}

#[tokio::test]
async fn proxy_without_msocks_is_a_typed_error() {
    let proxy = FakeProxy::start().await;
    for (code, check) in [
        (
            0x07u8,
            (|e: &Error| matches!(e, Error::MsocksUnsupported)) as fn(&Error) -> bool,
        ),
        (0x05, |e| {
            matches!(
                e,
                Error::Refused(msocks_proto::ReplyCode::ConnectionRefused)
            )
        }),
        (0x83, |e| matches!(e, Error::MsocksVersionUnsupported)),
    ] {
        let (result, ()) = tokio::join!(
            MobileStream::connect(target(), config(proxy.path())),
            async {
                let mut conn = proxy.accept().await;
                conn.accept_no_auth().await;
                conn.request().await;
                conn.fail(code).await;
            }
        );
        let err = result.expect_err("must fail");
        assert!(check(&err), "reply {code:#04x}: {err:?}");
    }
}

#[tokio::test]
async fn counters_match_what_was_transferred() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.read_origin = 1000;
    cfg.write_origin = 5;
    let (mut stream, mut conn) = open(&proxy, cfg, id_any_home(2, proxy.addr.port())).await;
    let control = stream.control();

    let down = pattern(1, 0, 100_000);
    let up = pattern(2, 0, 70_000);
    let (got_down, ()) = tokio::join!(
        async {
            let mut buf = vec![0u8; down.len()];
            within("app read", stream.read_exact(&mut buf))
                .await
                .expect("read");
            stream.write_all(&up).await.expect("write");
            buf
        },
        conn.send(&down),
    );
    assert_eq!(got_down, down);
    assert_eq!(conn.read_data(up.len()).await, up);
    let s = wait_status(&control, "counters", |s| s.data_written == 5 + 70_000).await;
    assert_eq!(s.data_read, 1000 + 100_000);
    assert_eq!(s.moves, 0);
}

// On a multi-thread runtime, as applications mostly run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_salvages_old_bytes_and_rewrites_the_hole() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    // A small pipe so that most of what the fake sends stays in the old socket's buffer.
    cfg.pipe_capacity = 1024;
    cfg.read_origin = 77;
    cfg.write_origin = 1 << 40;
    let id = id_any_home(3, proxy.addr.port());
    let (mut stream, mut old) = open(&proxy, cfg, id).await;
    let control = stream.control();

    // Up: the application writes 20 000 bytes; the fake reads only 5 000 of them.
    let up = pattern(7, 0, 21_000);
    stream.write_all(&up[..20_000]).await.expect("write");
    wait_status(&control, "all written", |s| {
        s.data_written == (1 << 40) + 20_000
    })
    .await;
    assert_eq!(old.read_data(5_000).await, &up[..5_000]);

    // Down: 64 KiB sent, the application reads nothing yet.
    const SENT: u64 = 64 * 1024;
    let down = pattern(9, 0, 200_000);
    old.send(&down[..SENT as usize]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = control.status();
    let taken = before.data_read - 77;
    assert!(
        taken < SENT - 1000,
        "the library took {taken} bytes; the test needs some left"
    );

    // Move to a path bound to another local address.
    let new_path = proxy
        .path()
        .with_local_addr(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    const SALVAGE: u64 = 1000;
    let mover = tokio::spawn({
        let control = control.clone();
        let new_path = new_path.clone();
        async move { control.migrate(new_path).await }
    });
    let mut new = proxy.accept().await;
    assert_eq!(new.peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let rc = expect_reconnect(&mut new).await;
    assert_eq!(rc.token, id.token);
    assert_eq!(rc.data_read, 77 + taken);
    assert_eq!(rc.data_written, (1 << 40) + 20_000);
    assert_eq!(&new.received[3..], &reconnect_bytes(&rc)[..]);
    // The reply and the first bytes of the new connection arrive in one segment.
    let resume_at = taken + SALVAGE;
    let mut first = FakeConn::reconnect_reply(15_000, SALVAGE);
    first.extend_from_slice(&down[resume_at as usize..resume_at as usize + 3000]);
    new.send(&first).await;

    let report = within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    // Closed only now: the library must not depend on the proxy closing it first or last.
    drop(old);
    assert_eq!(report.data_salvage, SALVAGE);
    assert_eq!(report.data_write, 15_000);
    assert_eq!(report.new_path, new_path);
    assert_eq!(report.old_path, proxy.path());
    assert!(!report.automatic);
    assert_eq!(report.attempts, 1);

    // The rewrite comes first on the new connection, then new application data.
    assert_eq!(new.read_data(15_000).await, &up[5_000..20_000]);
    stream.write_all(&up[20_000..]).await.expect("write");
    assert_eq!(new.read_data(1_000).await, &up[20_000..21_000]);

    // The application sees every byte once: library buffers, salvage, then the new socket.
    new.send(&down[resume_at as usize + 3000..]).await;
    new.finish().await;
    let mut got = Vec::new();
    within("read to end", stream.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(got.len(), down.len());
    assert!(got == down, "stream differs from what the server sent");

    let s = control.status();
    assert_eq!(s.moves, 1);
    assert_eq!(s.path, new_path);
    assert_eq!(s.data_read, 77 + down.len() as u64);
    assert_eq!(s.data_written, (1 << 40) + 21_000);
    assert_eq!(s.last_move.as_ref().map(|m| m.data_salvage), Some(SALVAGE));
}

// On a multi-thread runtime, as applications mostly run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_covers_everything_the_proxy_did_not_receive() {
    // A writer far ahead of a proxy that does not read: at the move, the fake drains what
    // its old socket holds (as the real proxy does) and asks for the rest again. The ring
    // must hold all of it, because the library never has more unacknowledged bytes than
    // the ring's capacity.
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.send_buffer = 64 * 1024;
    let (stream, mut old) = open(&proxy, cfg, id_any_home(4, proxy.addr.port())).await;
    let control = stream.control();
    let ring_capacity = stream.ring_capacity();
    assert!(ring_capacity >= 64 * 1024);

    const TOTAL: usize = 3 * 1024 * 1024;
    let up = pattern(11, 0, TOTAL);
    let (mut app_r, mut app_w) = tokio::io::split(stream);
    let writer = tokio::spawn({
        let up = up.clone();
        async move {
            app_w.write_all(&up).await.expect("write");
            app_w.shutdown().await.expect("shutdown");
        }
    });
    // Let the socket buffers fill up.
    wait_status(&control, "buffers full", |s| s.data_written > 100_000).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    let rc = expect_reconnect(&mut new).await;
    let received = old.drain_queued().await;
    let received_len = received.len() as u64;
    assert_eq!(received, &up[..received.len()]);
    let data_write = rc.data_written - received_len;
    assert!(
        data_write as usize <= ring_capacity,
        "hole of {data_write} bytes exceeds the ring"
    );
    new.send(&FakeConn::reconnect_reply(data_write, 0)).await;
    drop(old);
    let report = within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    assert_eq!(report.data_write, data_write);
    // The fake did not read for a while, so the library's send queue was full: there was a
    // real hole to cover.
    assert!(
        data_write > 0,
        "no hole: the test did not exercise the rewrite"
    );

    let rest = within("rest of the upload", new.read_to_end()).await;
    assert_eq!(received_len as usize + rest.len(), TOTAL);
    assert!(
        rest == up[received.len()..],
        "upload differs after the move"
    );
    within("writer", writer).await.expect("writer");
    new.finish().await;
    let mut tail = Vec::new();
    app_r.read_to_end(&mut tail).await.expect("eof");
    assert!(tail.is_empty());
}

#[tokio::test]
async fn ring_capacity_is_the_kernels_send_buffer() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.send_buffer = 100_000;
    let (stream, _conn) = open(&proxy, cfg, id_any_home(5, proxy.addr.port())).await;
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    sock.set_send_buffer_size(100_000).expect("SO_SNDBUF");
    assert_eq!(
        stream.ring_capacity(),
        sock.send_buffer_size().expect("get")
    );
}

#[tokio::test]
async fn counters_near_2_32_and_2_63_and_across_2_64_are_encoded_right() {
    let cases: [(u64, u64); 4] = [
        ((1 << 32) - 8, (1 << 32) - 100),
        ((1 << 63) - 150, (1 << 63) - 1),
        (u64::MAX - 99, u64::MAX),
        (u64::MAX, u64::MAX - 50),
    ];
    for (n, (read_origin, write_origin)) in cases.into_iter().enumerate() {
        let proxy = FakeProxy::start().await;
        let mut cfg = config(proxy.path());
        cfg.oob_inline = false; // the expected bytes carry FLAGS = 0
        cfg.read_origin = read_origin;
        cfg.write_origin = write_origin;
        let id = id_any_home(10 + n as u8, proxy.addr.port());
        let (mut stream, mut old) = open(&proxy, cfg, id).await;
        // The open request's trailer carries both origins, big-endian.
        let trailer = &old.received[old.received.len() - 16..];
        assert_eq!(&trailer[..8], &read_origin.to_be_bytes());
        assert_eq!(&trailer[8..], &write_origin.to_be_bytes());

        let down = pattern(n as u8, 0, 300);
        old.send(&down).await;
        let mut buf = vec![0u8; 300];
        stream.read_exact(&mut buf).await.expect("read");
        assert_eq!(buf, down);
        stream.write_all(&[0xAB; 200]).await.expect("write");
        assert_eq!(old.read_data(200).await, vec![0xAB; 200]);
        let control = stream.control();
        wait_status(&control, "written", |s| {
            s.data_written == write_origin.wrapping_add(200)
        })
        .await;

        let mover = tokio::spawn({
            let control = control.clone();
            let path = proxy.path();
            async move { control.migrate(path).await }
        });
        let mut new = proxy.accept().await;
        let rc = expect_reconnect(&mut new).await;
        let expected = ReconnectRequest {
            oob_inline: false,
            token: id.token,
            data_read: read_origin.wrapping_add(300),
            data_written: write_origin.wrapping_add(200),
            resend_from: None,
        };
        assert_eq!(rc, expected, "case {n}");
        assert_eq!(
            &new.received[3..],
            &reconnect_bytes(&expected)[..],
            "case {n}"
        );
        new.send(&FakeConn::reconnect_reply(0, 0)).await;
        within("migrate", mover)
            .await
            .expect("join")
            .expect("migrate");
        let s = control.status();
        assert_eq!(s.data_read, read_origin.wrapping_add(300));
        assert_eq!(s.data_written, write_origin.wrapping_add(200));
    }
}

// On a multi-thread runtime, as applications mostly run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_connection_reconnects_automatically_over_the_configured_paths() {
    let proxy = FakeProxy::start().await;
    // The first path leads nowhere: nothing listens on 127.0.0.3 (the fake is on
    // 127.0.0.1). It is tried and skipped, for the first connection as for the reconnect,
    // which goes to the path's proxy IP at the identifier's home port.
    let dead = ProxyPath::new("127.0.0.3:1".parse().expect("addr"));
    let mut cfg = config(dead.clone());
    cfg.paths.push(proxy.path());
    cfg.read_origin = (1 << 63) - 10;
    let id = id_any_home(20, proxy.addr.port());
    let (mut stream, mut old) = open(&proxy, cfg, id).await;
    let control = stream.control();
    assert_eq!(control.status().path, proxy.path());

    let down = pattern(3, 0, 2000);
    old.send(&down[..1000]).await;
    let mut buf = vec![0u8; 1000];
    stream.read_exact(&mut buf).await.expect("read");
    stream.write_all(b"hello").await.expect("write");
    assert_eq!(old.read_data(5).await, b"hello");
    wait_status(&control, "written", |s| s.data_written == 5).await;
    old.reset();

    let mut new = proxy.accept().await;
    let rc = expect_reconnect(&mut new).await;
    assert_eq!(rc.token, id.token);
    assert_eq!(rc.data_read, ((1u64 << 63) - 10).wrapping_add(1000));
    assert_eq!(rc.data_written, 5);
    new.send(&FakeConn::reconnect_reply(0, 0)).await;
    new.send(&down[1000..]).await;
    new.finish().await;
    let mut rest = Vec::new();
    within("read to end", stream.read_to_end(&mut rest))
        .await
        .expect("read");
    assert!(rest == down[1000..]);

    let s = control.status();
    assert_eq!(s.moves, 1);
    let report = s.last_move.expect("a move");
    assert!(report.automatic);
    assert_eq!(report.attempts, 2, "the dead path first, then the proxy");
    assert_eq!(report.new_path, proxy.path());
}

#[tokio::test]
async fn busy_reply_is_retried() {
    let proxy = FakeProxy::start().await;
    let (stream, _old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(21, proxy.addr.port()),
    )
    .await;
    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut first = proxy.accept().await;
    expect_reconnect(&mut first).await;
    first.fail(0x82).await;
    drop(first);
    let mut second = proxy.accept().await;
    expect_reconnect(&mut second).await;
    second.send(&FakeConn::reconnect_reply(0, 0)).await;
    let report = within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    assert_eq!(report.attempts, 2);
    assert_eq!(control.status().state, StreamState::Connected);
}

async fn refused_reconnect_fails_the_stream(code: u8, check: fn(&Error) -> bool) {
    let proxy = FakeProxy::start().await;
    let (mut stream, _old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(code, proxy.addr.port()),
    )
    .await;
    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    expect_reconnect(&mut new).await;
    new.fail(code).await;
    let err = within("migrate", mover)
        .await
        .expect("join")
        .expect_err("must fail");
    assert!(check(&err), "{err:?}");

    let mut buf = [0u8; 16];
    let read_err = within("read", stream.read(&mut buf))
        .await
        .expect_err("read must fail");
    assert!(
        check(Error::from_io(&read_err).expect("typed")),
        "{read_err:?}"
    );
    assert_eq!(read_err.kind(), std::io::ErrorKind::ConnectionReset);
    let write_err = stream.write_all(b"x").await.expect_err("write must fail");
    assert!(check(Error::from_io(&write_err).expect("typed")));
    assert_eq!(control.status().state, StreamState::Failed);
    assert!(control.failure().as_ref().is_some_and(check));
    // Later moves report the same failure.
    let again = control
        .migrate(proxy.path())
        .await
        .expect_err("failed stream");
    assert!(check(&again));
}

#[tokio::test]
async fn unknown_session_fails_the_stream() {
    refused_reconnect_fails_the_stream(0x80, |e| matches!(e, Error::UnknownSession)).await;
}

#[tokio::test]
async fn impossible_counters_fail_the_stream() {
    refused_reconnect_fails_the_stream(0x81, |e| matches!(e, Error::BadCounters)).await;
}

#[tokio::test]
async fn salvage_that_the_old_socket_cannot_give_is_fatal() {
    let proxy = FakeProxy::start().await;
    let (mut stream, old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(30, proxy.addr.port()),
    )
    .await;
    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    expect_reconnect(&mut new).await;
    // The old connection ends with nothing unread, yet the proxy claims 5000 bytes there.
    drop(old);
    new.send(&FakeConn::reconnect_reply(0, 5000)).await;
    let err = within("migrate", mover)
        .await
        .expect("join")
        .expect_err("fatal");
    assert!(
        matches!(
            err,
            Error::SalvageFailed {
                expected: 5000,
                got: 0,
                ..
            }
        ),
        "{err:?}"
    );
    let mut buf = [0u8; 4];
    let read_err = stream.read(&mut buf).await.expect_err("failed");
    assert!(matches!(
        Error::from_io(&read_err),
        Some(Error::SalvageFailed { .. })
    ));
}

#[tokio::test]
async fn rewrite_larger_than_the_ring_is_fatal() {
    let proxy = FakeProxy::start().await;
    let (mut stream, mut old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(31, proxy.addr.port()),
    )
    .await;
    let control = stream.control();
    stream.write_all(&[1u8; 100]).await.expect("write");
    old.read_data(100).await;
    wait_status(&control, "written", |s| s.data_written == 100).await;
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    expect_reconnect(&mut new).await;
    new.send(&FakeConn::reconnect_reply(10_000, 0)).await;
    let err = within("migrate", mover)
        .await
        .expect("join")
        .expect_err("fatal");
    assert!(
        matches!(
            err,
            Error::RewriteTooLarge {
                requested: 10_000,
                available: 100
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn application_fin_is_repeated_after_the_rewrite() {
    let proxy = FakeProxy::start().await;
    let (mut stream, mut old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(40, proxy.addr.port()),
    )
    .await;
    let up = pattern(4, 0, 500);
    stream.write_all(&up).await.expect("write");
    stream.shutdown().await.expect("shutdown");
    assert_eq!(within("old upload", old.read_to_end()).await, up);

    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    let rc = expect_reconnect(&mut new).await;
    assert_eq!(rc.data_written, 500);
    // Pretend only 300 bytes reached the proxy: the last 200 come again, then FIN.
    new.send(&FakeConn::reconnect_reply(200, 0)).await;
    within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    assert_eq!(within("new upload", new.read_to_end()).await, &up[300..]);

    // The download still works, and ends cleanly.
    new.send(b"bye").await;
    new.finish().await;
    let mut got = Vec::new();
    within("read", stream.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(got, b"bye");
}

#[tokio::test]
async fn server_fin_before_a_move_is_delivered_once() {
    let proxy = FakeProxy::start().await;
    let (mut stream, mut old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(41, proxy.addr.port()),
    )
    .await;
    old.send(b"last words").await;
    old.finish().await;
    let mut got = Vec::new();
    within("read", stream.read_to_end(&mut got))
        .await
        .expect("read");
    assert_eq!(got, b"last words");

    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    let rc = expect_reconnect(&mut new).await;
    assert_eq!(rc.data_read, 10);
    // The proxy sends the FIN again on the new connection.
    new.send(&FakeConn::reconnect_reply(0, 0)).await;
    new.finish().await;
    within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");

    let mut buf = [0u8; 8];
    assert_eq!(stream.read(&mut buf).await.expect("still a clean EOF"), 0);
    // The other direction keeps working on the new connection.
    stream.write_all(b"ack").await.expect("write");
    assert_eq!(new.read_data(3).await, b"ack");
    stream.shutdown().await.expect("shutdown");
    assert!(within("fin", new.read_to_end()).await.is_empty());
}

#[tokio::test]
async fn failed_migration_before_reconnect_keeps_the_old_path() {
    let proxy = FakeProxy::start().await;
    let (mut stream, mut old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(50, proxy.addr.port()),
    )
    .await;
    // Nothing listens there (a RECONNECT goes to the path's IP at the home port).
    let err = stream
        .migrate(ProxyPath::new("127.0.0.3:1".parse().expect("addr")))
        .await
        .expect_err("unreachable");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    // No such interface.
    let err = stream
        .migrate(proxy.path().with_interface("msocks-none0"))
        .await
        .expect_err("no interface");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");

    old.send(b"still here").await;
    let mut buf = [0u8; 10];
    stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"still here");
    stream.write_all(b"me too").await.expect("write");
    assert_eq!(old.read_data(6).await, b"me too");
    let s = stream.status();
    assert_eq!((s.moves, s.state), (0, StreamState::Connected));
}

#[tokio::test]
async fn refused_credentials_on_the_new_connection_keep_the_old_path() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.credentials = Some(Credentials::new("u", "p"));
    let id = id_any_home(51, proxy.addr.port());
    let (stream, old) = tokio::join!(MobileStream::connect(target(), cfg), async {
        let mut conn = proxy.accept().await;
        conn.accept_user_pass("u", "p").await;
        conn.request().await;
        conn.send(&FakeConn::open_reply(id, target())).await;
        conn
    });
    let mut stream = stream.expect("connect");
    let mut old = old;
    let control = stream.control();
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = proxy.accept().await;
    new.send(&[0x05, 0x02, 0x01, 0x01]).await;
    drop(new);
    let err = within("migrate", mover)
        .await
        .expect("join")
        .expect_err("refused");
    assert!(matches!(err, Error::AuthFailed(1)), "{err:?}");

    old.send(b"abc").await;
    let mut buf = [0u8; 3];
    stream
        .read_exact(&mut buf)
        .await
        .expect("old path still works");
    assert_eq!(&buf, b"abc");
    assert_eq!(control.status().state, StreamState::Connected);
}

#[tokio::test]
async fn reconnect_goes_to_an_explicit_home() {
    let proxy = FakeProxy::start().await;
    let home = FakeProxy::start().await;
    let id = ConnectionId {
        token: token(60),
        home: home.addr,
    };
    let (mut stream, old) = open(&proxy, config(proxy.path()), id).await;
    let mover = tokio::spawn({
        let control = stream.control();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut new = home.accept().await;
    expect_reconnect(&mut new).await;
    new.send(&FakeConn::reconnect_reply(0, 0)).await;
    within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    drop(old);
    new.send(b"via home").await;
    let mut buf = [0u8; 8];
    stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"via home");
}

#[tokio::test]
async fn interface_binding_is_applied() {
    let proxy = FakeProxy::start().await;
    let (mut stream, _old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(61, proxy.addr.port()),
    )
    .await;
    let lo = proxy.path().with_interface("lo");
    let mover = tokio::spawn({
        let control = stream.control();
        async move { control.migrate(lo).await }
    });
    // SO_BINDTODEVICE needs CAP_NET_RAW on kernels before 5.7; without it the migration
    // fails before any connection, which is the documented behaviour.
    let accepted = tokio::time::timeout(Duration::from_secs(2), proxy.accept()).await;
    match accepted {
        Ok(mut new) => {
            expect_reconnect(&mut new).await;
            new.send(&FakeConn::reconnect_reply(0, 0)).await;
            let report = within("migrate", mover)
                .await
                .expect("join")
                .expect("migrate");
            assert_eq!(report.new_path.interface.as_deref(), Some("lo"));
            new.send(b"lo").await;
            let mut buf = [0u8; 2];
            stream.read_exact(&mut buf).await.expect("read");
        }
        Err(_) => {
            let err = within("migrate", mover)
                .await
                .expect("join")
                .expect_err("EPERM");
            eprintln!("interface binding not permitted here: {err}");
        }
    }
}

#[tokio::test]
async fn mobile_bind_exposes_both_replies() {
    let proxy = FakeProxy::start().await;
    let id = id_any_home(70, proxy.addr.port());
    let listen: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
    let peer: SocketAddr = "127.0.0.9:1234".parse().expect("addr");
    let cfg = config(proxy.path());
    let (bind, conn) = tokio::join!(MobileStream::bind(target(), cfg), async {
        let mut conn = proxy.accept().await;
        conn.accept_no_auth().await;
        match conn.request().await {
            Request::Open(open) => {
                assert_eq!(open.command, msocks_proto::Command::Bind);
                assert!(open.mobility.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(conn.received[4], 0x82, "MSOCKS BIND command byte");
        conn.send(&FakeConn::open_reply(id, listen)).await;
        conn
    });
    let bind = bind.expect("bind");
    let mut conn = conn;
    assert_eq!(bind.listen_addr(), &TargetAddr::Ip(listen));
    assert_eq!(bind.id(), id);
    let second = FakeConn::open_reply(id, peer);
    let (accepted, ()) = tokio::join!(bind.accept(), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut bytes = second.clone();
        bytes.extend_from_slice(b"hi");
        conn.send(&bytes).await;
    });
    let (mut stream, from) = accepted.expect("accept");
    assert_eq!(from, TargetAddr::Ip(peer));
    assert_eq!(stream.bound_addr(), &TargetAddr::Ip(peer));
    let mut buf = [0u8; 2];
    stream.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"hi");
    assert_eq!(stream.status().data_read, 2);
}

#[tokio::test]
async fn bind_with_a_different_second_identifier_is_rejected() {
    let proxy = FakeProxy::start().await;
    let (bind, conn) = tokio::join!(MobileStream::bind(target(), config(proxy.path())), async {
        let mut conn = proxy.accept().await;
        conn.accept_no_auth().await;
        conn.request().await;
        conn.send(&FakeConn::open_reply(id_any_home(71, 1), target()))
            .await;
        conn
    });
    let mut conn = conn;
    conn.send(&FakeConn::open_reply(id_any_home(72, 1), target()))
        .await;
    let err = bind.expect("bind").accept().await.expect_err("mismatch");
    assert!(matches!(err, Error::IdentifierMismatch), "{err:?}");
}

#[tokio::test]
async fn dropping_the_stream_flushes_and_closes() {
    let proxy = FakeProxy::start().await;
    let (mut stream, mut old) = open(
        &proxy,
        config(proxy.path()),
        id_any_home(80, proxy.addr.port()),
    )
    .await;
    let control = stream.control();
    let up = pattern(8, 0, 100_000);
    stream.write_all(&up).await.expect("write");
    drop(stream);
    assert!(within("flush", old.read_to_end()).await == up);
    wait_status(&control, "closed", |s| s.state == StreamState::Closed).await;
    assert!(matches!(
        control.migrate(proxy.path()).await,
        Err(Error::Closed)
    ));
}

#[tokio::test]
async fn invalid_configurations_are_rejected() {
    let proxy: SocketAddr = "127.0.0.1:1080".parse().expect("addr");
    let mut cfg = MobileConfig::new(ProxyPath::new(proxy));
    cfg.paths.clear();
    assert!(matches!(
        MobileStream::connect(target(), cfg).await,
        Err(Error::Config(_))
    ));
    let cfg = MobileConfig::new(ProxyPath::new(proxy).with_local_addr("::1".parse().expect("ip")));
    assert!(matches!(
        MobileStream::connect(target(), cfg).await,
        Err(Error::Config(_))
    ));
    let mut cfg = MobileConfig::new(ProxyPath::new(proxy));
    cfg.credentials = Some(Credentials::new("x".repeat(256), "p"));
    assert!(matches!(
        MobileStream::connect(target(), cfg).await,
        Err(Error::Config(_))
    ));
}

/// Early resend (PROTOCOL.md 3.7.1): the RECONNECT carries RESEND_FROM and the bytes the old
/// socket had not seen acknowledged follow it at once. A proxy that predates the flag
/// answers 0x83; the library then moves the plain way, rewriting after the reply, and does
/// not try early resend again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_resend_falls_back_to_the_plain_reconnect_on_0x83() {
    let proxy = FakeProxy::start().await;
    let mut cfg = config(proxy.path());
    cfg.early_resend = true;
    let (mut stream, mut old) = open(&proxy, cfg, id_any_home(31, proxy.addr.port())).await;
    stream.write_all(b"abcdef").await.expect("write");
    assert_eq!(old.read_data(6).await, b"abcdef");
    let control = stream.control();
    wait_status(&control, "written", |s| s.data_written == 6).await;
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut first = proxy.accept().await;
    let rc = expect_reconnect(&mut first).await;
    assert_eq!(rc.data_written, 6);
    let from = rc.resend_from.expect("an early resend");
    assert!(from <= 6, "RESEND_FROM {from} beyond DATA_WRITTEN");
    // Whatever the old socket had not seen acknowledged follows the request at once.
    let resent = first.read_data((6 - from) as usize).await;
    assert_eq!(resent, &b"abcdef"[from as usize..]);
    first.fail(0x83).await;
    drop(first);
    let mut second = proxy.accept().await;
    let rc = expect_reconnect(&mut second).await;
    assert_eq!((rc.data_written, rc.resend_from), (6, None));
    // The proxy had only "abcd": the plain way rewrites "ef" after the reply.
    second.send(&FakeConn::reconnect_reply(2, 0)).await;
    assert_eq!(second.read_data(2).await, b"ef");
    let report = within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
    assert_eq!(report.attempts, 2, "{report:?}");
    assert_eq!(report.first_new_written, 4);
    // The next move does not try early resend again.
    let mover = tokio::spawn({
        let control = control.clone();
        let path = proxy.path();
        async move { control.migrate(path).await }
    });
    let mut third = proxy.accept().await;
    let rc = expect_reconnect(&mut third).await;
    assert_eq!(rc.resend_from, None);
    third.send(&FakeConn::reconnect_reply(0, 0)).await;
    within("migrate", mover)
        .await
        .expect("join")
        .expect("migrate");
}
