//! The `relay` engine of plain SOCKS5 sessions, end to end on loopback: bulk data both ways
//! arrives intact (the splice path), half-close passes through, and urgent bytes (which
//! splice(2) stops at) arrive inline, in place, without stalling the stream.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use msocks_proto::{Command, OpenRequest, Request, TargetAddr};
use msocks_proxy::{Proxy, ProxyConfig};
use sha2::{Digest, Sha256};

/// Starts a proxy on 127.0.0.1 in a runtime of its own thread; returns its address.
fn start_proxy() -> SocketAddr {
    start_proxy_with(|_| {})
}

/// [`start_proxy`] with the configuration changed by `adjust` first.
fn start_proxy_with(adjust: impl FnOnce(&mut ProxyConfig) + Send + 'static) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut config = ProxyConfig {
                listen: vec!["127.0.0.1:0".parse().expect("address")],
                ..ProxyConfig::default()
            };
            adjust(&mut config);
            let proxy = Proxy::bind(config, None).await.expect("proxy binds");
            tx.send(proxy.local_addrs()[0]).expect("send address");
            proxy.run(std::future::pending()).await;
        });
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("proxy address")
}

/// A plain SOCKS5 CONNECT through `proxy` to `target`.
fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s.write_all(&[5, 1, 0]).expect("greeting");
    let mut m = [0u8; 2];
    s.read_exact(&mut m).expect("method");
    assert_eq!(m, [5, 0]);
    let mut req = Vec::new();
    Request::Open(OpenRequest {
        command: Command::Connect,
        target: TargetAddr::Ip(target),
        mobility: None,
    })
    .encode(&mut req);
    s.write_all(&req).expect("request");
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..2], &[5, 0], "CONNECT refused: {reply:?}");
    s
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(seed as u32) as u8
                ^ (i >> 13) as u8
        })
        .collect()
}

/// Sends `data` on a clone of `s` and reads until EOF; returns the hash of what was read.
fn exchange(s: TcpStream, data: Vec<u8>) -> [u8; 32] {
    let mut w = s.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        for chunk in data.chunks(7_001) {
            w.write_all(chunk).expect("send");
        }
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut r = s;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 50_000];
    loop {
        let n = r.read(&mut buf).expect("receive");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    sender.join().expect("sender");
    h.finalize().into()
}

#[test]
fn bulk_both_ways_arrives_intact() {
    let proxy = start_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    let (up, down) = (pattern(1, 24 << 20), pattern(2, 24 << 20));
    let (up_hash, down_hash): ([u8; 32], [u8; 32]) =
        (Sha256::digest(&up).into(), Sha256::digest(&down).into());
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        exchange(s, down)
    });
    let at_client = exchange(socks_connect(proxy, target), up);
    let at_server = server.join().expect("server thread");
    assert_eq!(at_server, up_hash, "client-to-server bytes changed");
    assert_eq!(at_client, down_hash, "server-to-client bytes changed");
}

#[test]
fn half_close_passes_through() {
    let proxy = start_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read to the client's FIN");
        // The client's direction is closed; this one still works.
        s.write_all(b"world").expect("answer after the FIN");
        got
    });
    let mut c = socks_connect(proxy, target);
    c.write_all(b"hello").expect("send");
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::new();
    c.read_to_end(&mut back).expect("read the answer");
    assert_eq!(server.join().expect("server"), b"hello");
    assert_eq!(back, b"world");
}

#[test]
fn urgent_bytes_arrive_inline_in_place_both_ways() {
    let proxy = start_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    // Each side sends bulk data with an urgent byte after every 100 000 bytes; the relay
    // carries urgent bytes inline, so the receiver must see exactly the sent sequence.
    fn send_with_urgent(s: &TcpStream, data: &[u8]) -> Vec<u8> {
        let mut expected = Vec::new();
        let sock = socket2::SockRef::from(s);
        let mut w = s;
        for (i, chunk) in data.chunks(100_000).enumerate() {
            w.write_all(chunk).expect("send");
            expected.extend_from_slice(chunk);
            let mark = b'A' + (i % 26) as u8;
            sock.send_out_of_band(&[mark]).expect("send urgent");
            expected.push(mark);
        }
        s.shutdown(Shutdown::Write).expect("shutdown");
        expected
    }
    fn read_all(mut s: &TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .expect("read (a stall at an urgent mark times out here)");
        got
    }
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket2::SockRef::from(&s)
            .set_out_of_band_inline(true)
            .expect("oobinline");
        let reader = s.try_clone().expect("clone");
        let r = thread::spawn(move || read_all(&reader));
        let sent = send_with_urgent(&s, &pattern(4, 1_000_000));
        (sent, r.join().expect("server reader"))
    });
    let c = socks_connect(proxy, target);
    socket2::SockRef::from(&c)
        .set_out_of_band_inline(true)
        .expect("oobinline");
    let reader = c.try_clone().expect("clone");
    let r = thread::spawn(move || read_all(&reader));
    let sent_up = send_with_urgent(&c, &pattern(3, 1_000_000));
    let got_down = r.join().expect("client reader");
    let (sent_down, got_up) = server.join().expect("server");
    assert_eq!(got_up.len(), sent_up.len(), "bytes lost or added upstream");
    assert!(got_up == sent_up, "upstream bytes differ");
    assert_eq!(
        got_down.len(),
        sent_down.len(),
        "bytes lost or added downstream"
    );
    assert!(got_down == sent_down, "downstream bytes differ");
}

/// Writes `before` and the urgent `mark` as one segment: corked, `before` waits, and the
/// urgent byte (which ignores the cork) takes it along.
fn send_message(s: &TcpStream, before: &[u8], mark: u8) {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_cork(true).expect("cork");
    (&*s).write_all(before).expect("send");
    sock.send_out_of_band(&[mark]).expect("send urgent");
    sock.set_tcp_cork(false).expect("uncork");
}

/// Small messages ending in an urgent byte, each one segment: Linux ends the first read just
/// before the urgent mark although the urgent byte is queued, and no further segment comes
/// until the other side has the whole message. A relay that took the short read for an
/// emptied socket would stall here until the read timeout.
#[test]
fn urgent_byte_at_the_end_of_a_small_segment_does_not_stall() {
    let proxy = start_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    const ROUNDS: u8 = 20;
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket2::SockRef::from(&s)
            .set_out_of_band_inline(true)
            .expect("oobinline");
        let mut got = [0u8; 3];
        for i in 0..ROUNDS {
            (&s).read_exact(&mut got)
                .expect("upstream message (a stall at the urgent mark times out here)");
            assert_eq!(got, [b'a', b'b', b'A' + i]);
            send_message(&s, b"xy", b'a' + i);
        }
    });
    let c = socks_connect(proxy, target);
    socket2::SockRef::from(&c)
        .set_out_of_band_inline(true)
        .expect("oobinline");
    let mut got = [0u8; 3];
    for i in 0..ROUNDS {
        send_message(&c, b"ab", b'A' + i);
        (&c).read_exact(&mut got)
            .expect("downstream message (a stall at the urgent mark times out here)");
        assert_eq!(got, [b'x', b'y', b'a' + i]);
    }
    server.join().expect("server");
}

/// The idle timeout counts from the last byte in either direction: a session that carries a
/// message every third of the timeout stays open, one that then goes quiet is closed.
#[test]
fn idle_timeout_spares_a_busy_session_and_closes_a_quiet_one() {
    const IDLE: Duration = Duration::from_millis(900);
    let proxy = start_proxy_with(|c| c.limits.idle_timeout = IDLE);
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut b = [0u8; 1];
        // Echo until the proxy closes the session.
        while (&s).read(&mut b).map(|n| n == 1).unwrap_or(false) {
            (&s).write_all(&b).expect("echo");
        }
    });
    let c = socks_connect(proxy, target);
    let mut b = [0u8; 1];
    // Busy for three timeouts, alternately up and down.
    for i in 0..9u8 {
        (&c).write_all(&[i]).expect("send while busy");
        (&c).read_exact(&mut b)
            .expect("echo while busy (the session must not idle out)");
        assert_eq!(b[0], i);
        thread::sleep(IDLE / 3);
    }
    // Quiet: the proxy closes the session (the read timeout is 20 s).
    let n = (&c).read(&mut b).expect("end of stream from the proxy");
    assert_eq!(n, 0, "the idle session was closed");
    server.join().expect("server");
}

/// The same after bulk data, when the direction has moved to splice(2), which stops at the
/// urgent mark and then says "try again" although the urgent byte is queued: the relay must
/// read on (recv) instead of waiting for a segment that does not come.
#[test]
fn urgent_byte_after_bulk_does_not_stall() {
    const BULK: usize = 2_000_000;
    let proxy = start_proxy();
    let listener = TcpListener::bind("127.0.0.1:0").expect("server");
    let target = listener.local_addr().expect("server address");
    let server = thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket2::SockRef::from(&s)
            .set_out_of_band_inline(true)
            .expect("oobinline");
        let mut bulk = vec![0u8; BULK];
        (&s).read_exact(&mut bulk).expect("bulk");
        assert!(bulk == pattern(5, BULK), "bulk bytes differ");
        for i in 0..5u8 {
            let mut got = [0u8; 3];
            (&s).read_exact(&mut got)
                .expect("message after bulk (a stall at the urgent mark times out here)");
            assert_eq!(got, [b'a', b'b', b'A' + i]);
            (&s).write_all(&[i]).expect("answer");
        }
    });
    let c = socks_connect(proxy, target);
    socket2::SockRef::from(&c)
        .set_out_of_band_inline(true)
        .expect("oobinline");
    (&c).write_all(&pattern(5, BULK)).expect("bulk");
    let mut b = [0u8; 1];
    for i in 0..5u8 {
        send_message(&c, b"ab", b'A' + i);
        (&c).read_exact(&mut b).expect("answer");
        assert_eq!(b[0], i);
    }
    server.join().expect("server");
}
