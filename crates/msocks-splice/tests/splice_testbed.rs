//! The kernel splice on real packets: a small proxy in the testbed's `px`
//! namespace accepts a client from `mn`, connects to the server in `sv`,
//! relays a prologue, splices the two connections with the eBPF datapath,
//! and then the client and the server exchange 64 MiB each way through the
//! splice. Both ends check what they got (SHA-256), and tcpdump captures of
//! the proxy's two links are checked packet by packet (see `evidence`).
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod evidence;

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evidence::capture::Capture;
use evidence::{digest, pattern, recv_all};
use msocks_splice::{splice, splice_with, Hook, Options, Status};
use msocks_testbed::{Link, Testbed, SV_IF_ON_PX};
use sha2::{Digest, Sha256};

const BULK: u64 = 64 << 20;
const PROLOGUE: &[u8; 16] = b"msocks-prologue!";
const PROXY_PORT: u16 = 7000;
const SERVER_PORT: u16 = 7001;
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// The server starts sending only after this much of the client's data came
/// in. The proxy relays nothing but the prologue before the splice, so by
/// then the splice is active, and every byte of the down stream crosses the
/// proxy as packets it never acknowledges itself.
const SERVER_WAITS_FOR: u64 = 1 << 20;

const UP_SEED: u64 = 1;
const DOWN_SEED: u64 = 2;

fn up_byte(i: u64) -> u8 {
    if i < PROLOGUE.len() as u64 {
        PROLOGUE[i as usize]
    } else {
        pattern(UP_SEED, i - PROLOGUE.len() as u64)
    }
}

fn send_pattern(mut s: &TcpStream, seed: u64, len: u64) -> std::io::Result<Vec<u8>> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        evidence::fill(seed, off, &mut buf[..n]);
        s.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(h.finalize().to_vec())
}

struct ProxyResult {
    /// `Spliced::acked_since_splice` just before the teardown.
    acked: (u32, u32),
    basepoints: msocks_splice::splice::Basepoints,
    client_peer: SocketAddr,
    client_local: SocketAddr,
    server_local: SocketAddr,
    t_splice: Duration,
    stats: Vec<(&'static str, u64)>,
}

/// When the proxy splices.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    /// Right after relaying the prologue; the server sends only once the
    /// splice is active, so all of its stream crosses the splice.
    Immediately,
    /// After relaying in userspace for this long with both streams
    /// running: the freeze happens with data in flight both ways, so HOLD
    /// drops segments that must come back as retransmissions.
    MidStream(Duration),
}

#[test]
fn splice_ipv4_64mib_each_way_with_packet_evidence() {
    if !msocks_testbed::require_root("splice_ipv4_64mib_each_way_with_packet_evidence") {
        return;
    }
    run_until_captured(false, When::Immediately);
}

#[test]
fn splice_ipv6_64mib_each_way_with_packet_evidence() {
    if !msocks_testbed::require_root("splice_ipv6_64mib_each_way_with_packet_evidence") {
        return;
    }
    run_until_captured(true, When::Immediately);
}

#[test]
fn splice_mid_stream_with_data_in_flight_both_ways() {
    if !msocks_testbed::require_root("splice_mid_stream_with_data_in_flight_both_ways") {
        return;
    }
    run_until_captured(false, When::MidStream(Duration::from_millis(300)));
}

/// One 64 MiB-each-way run with captures at a time: two cores cannot keep
/// several of them and their four tcpdumps fed at once.
static HEAVY: Mutex<()> = Mutex::new(());

/// Evidence from a capture that lost packets proves nothing either way, so
/// such a run is repeated (at most three times). Everything else that
/// fails in `run` fails the test at once.
fn run_until_captured(v6: bool, when: When) {
    let _one_at_a_time = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    for attempt in 1..=3 {
        match run(v6, when) {
            Ok(()) => return,
            Err(dropped) => eprintln!(
                "attempt {attempt}: tcpdump lost {dropped} packets; the evidence would be \
                 incomplete, running again"
            ),
        }
    }
    panic!("three runs in a row lost captured packets: no conclusive evidence");
}

/// Copies between the two sockets in userspace until `until`, finishing
/// every write it started (so no byte is held in the proxy's hands).
fn relay_until(c: &TcpStream, s: &TcpStream, until: Instant) {
    c.set_nonblocking(true).expect("nonblocking");
    s.set_nonblocking(true).expect("nonblocking");
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < until {
        let mut moved = false;
        for (mut from, to) in [(c, s), (s, c)] {
            match from.read(&mut buf) {
                Ok(0) => panic!("peer closed during the relay phase"),
                Ok(n) => {
                    moved = true;
                    let mut off = 0;
                    while off < n {
                        match (&*to).write(&buf[off..n]) {
                            Ok(k) => off += k,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_micros(100))
                            }
                            Err(e) => panic!("relay write: {e}"),
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("relay read: {e}"),
            }
        }
        if !moved {
            thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Returns `Err(packets dropped)` when a capture was lossy (and nothing was
/// checked from it); panics on any failure of the splice itself.
fn run(v6: bool, when: When) -> Result<(), u64> {
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let family = if v6 { "v6" } else { "v4" };
    let mode = if when == When::Immediately {
        "now"
    } else {
        "mid"
    };
    let dir = std::env::temp_dir().join(format!(
        "msocks-splice-{}-{family}-{mode}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("capture dir");

    // Load and attach inside px. IPv6 runs on the clsact filter, IPv4 on whatever Auto
    // picks (a TCX link on this kernel), so both hooks are exercised.
    let hook = if v6 { Hook::Clsact } else { Hook::Auto };
    let dp = common::datapath_on_px(&tb, hook);
    eprintln!(
        "hooks: {:?}",
        dp.lock().unwrap_or_else(|p| p.into_inner()).hooks()
    );

    let cap_a = Capture::start(&tb.px, Link::Wired.px_if(), &dir.join("client-side.pcap"));
    let cap_b = Capture::start(&tb.px, SV_IF_ON_PX, &dir.join("server-side.pcap"));

    let (sv_ip, px_ip): (std::net::IpAddr, std::net::IpAddr) = if v6 {
        (tb.sv_ip6.into(), tb.px_wired_ip6.into())
    } else {
        (tb.sv_ip.into(), tb.px_wired_ip.into())
    };
    let sv_addr = SocketAddr::new(sv_ip, SERVER_PORT);
    let px_addr = SocketAddr::new(px_ip, PROXY_PORT);

    // Server: read the prologue and 1 MiB, then send 64 MiB while reading
    // the rest; close after both.
    let server = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("server bind");
            thread::spawn(move || -> (u64, Vec<u8>, Vec<u8>) {
                let (s, _) = l.accept().expect("server accept");
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                let mut p = [0u8; 16];
                (&s).read_exact(&mut p).expect("server: prologue");
                assert_eq!(&p, PROLOGUE);
                let mut h = Sha256::new();
                let waits = if when == When::Immediately {
                    SERVER_WAITS_FOR
                } else {
                    0
                };
                let mut first = vec![0u8; waits as usize];
                (&s).read_exact(&mut first).expect("server: first MiB");
                h.update(&first);
                let s2 = s.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    let d = send_pattern(&s2, DOWN_SEED, BULK).expect("server send");
                    s2.shutdown(Shutdown::Write).expect("server shutdown");
                    d
                });
                let (n, _) = {
                    // Continue the hash over the rest.
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut total = waits;
                    loop {
                        let k = (&s).read(&mut buf).expect("server read");
                        if k == 0 {
                            break;
                        }
                        h.update(&buf[..k]);
                        total += k as u64;
                    }
                    (total, ())
                };
                let sent = sender.join().expect("server sender");
                (n, h.finalize().to_vec(), sent)
            })
        })
        .expect("setns sv");

    // Proxy: accept, connect, relay the prologue, splice, wait for the end.
    let dp2 = Arc::clone(&dp);
    let proxy = tb
        .px
        .run_in(move || {
            let l = TcpListener::bind(px_addr).expect("proxy bind");
            thread::spawn(move || -> ProxyResult {
                let (c, client_peer) = l.accept().expect("proxy accept");
                c.set_nodelay(true).ok();
                let s = TcpStream::connect(sv_addr).expect("proxy connect");
                s.set_nodelay(true).ok();
                let mut p = [0u8; 16];
                (&c).read_exact(&mut p).expect("proxy: prologue");
                (&s).write_all(&p).expect("proxy: relay prologue");
                if let When::MidStream(d) = when {
                    relay_until(&c, &s, Instant::now() + d);
                }
                let client_local = c.local_addr().expect("addr");
                let server_local = s.local_addr().expect("addr");
                let options = Options {
                    drain_timeout: Duration::from_secs(5),
                    // Mid-stream: stay in HOLD long enough for the
                    // segments in flight to arrive and be dropped.
                    hold_settle: if when == When::Immediately {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(50)
                    },
                };
                let spliced = match splice_with(&dp2, c, s, &options) {
                    Ok(sp) => sp,
                    Err(r) => panic!("splice refused: {}", r.error),
                };
                let t_splice = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
                let deadline = Instant::now() + Duration::from_secs(120);
                while spliced.status().expect("status") != Status::Finished {
                    assert!(
                        Instant::now() < deadline,
                        "splice never finished: {:?} {:?}",
                        spliced.entries(),
                        dp2.lock().map(|mut d| d.stats().ok())
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                // Both streams were acknowledged whole: the bulk, the FIN,
                // and (up) the prologue bytes after the splice point (none,
                // the proxy relayed the prologue before splicing).
                let acked = spliced.acked_since_splice().expect("acked");
                let basepoints = spliced.basepoints();
                // Linger so a retransmitted last FIN/ACK still finds the entry.
                thread::sleep(Duration::from_millis(300));
                spliced.teardown();
                let stats = dp2.lock().expect("lock").stats().expect("stats");
                ProxyResult {
                    acked,
                    basepoints,
                    client_peer,
                    client_local,
                    server_local,
                    t_splice,
                    stats,
                }
            })
        })
        .expect("setns px");

    // Client: prologue, then 64 MiB each way.
    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || -> (Vec<u8>, u64, Vec<u8>) {
                let s = TcpStream::connect(px_addr).expect("client connect");
                s.set_nodelay(true).ok();
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                (&s).write_all(PROLOGUE).expect("client prologue");
                let s2 = s.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    let d = send_pattern(&s2, UP_SEED, BULK).expect("client send");
                    s2.shutdown(Shutdown::Write).expect("client shutdown");
                    d
                });
                let (n, got) = recv_all(&s).expect("client recv");
                let sent = sender.join().expect("client sender");
                (sent, n, got)
            })
        })
        .expect("setns mn");

    let (c_sent, c_n, c_got) = client.join().expect("client thread");
    let (s_n, s_got, s_sent) = server.join().expect("server thread");
    let px = proxy.join().expect("proxy thread");
    let (a_path, a_dropped) = cap_a.stop();
    let (b_path, b_dropped) = cap_b.stop();
    eprintln!("captures: {a_dropped} + {b_dropped} packets dropped by the kernel");
    // Detach in px's namespace (netlink is per namespace).
    let dp = Arc::try_unwrap(dp)
        .expect("sole owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");

    eprintln!("datapath counters: {:?}", px.stats);
    assert_eq!(c_n, BULK, "client received");
    assert_eq!(c_got, digest(DOWN_SEED, BULK), "client's SHA-256");
    assert_eq!(c_got, s_sent);
    assert_eq!(s_n, BULK, "server received");
    assert_eq!(s_got, c_sent, "server's SHA-256");
    let spliced = px
        .stats
        .iter()
        .find(|(n, _)| *n == "spliced")
        .map(|x| x.1)
        .unwrap_or(0);
    assert!(
        spliced > 1000,
        "the datapath forwarded only {spliced} segments"
    );
    let stat = |name: &str| {
        px.stats
            .iter()
            .find(|(n, _)| *n == name)
            .map(|x| x.1)
            .unwrap_or(0)
    };
    // Data met the HOLD state: dropped whole (GSO) or passed up bare.
    let held = stat("held_drop") + stat("held_chopped");
    if when != When::Immediately {
        assert!(
            held > 0,
            "no segment met the HOLD state: the mid-stream scenario did not happen"
        );
    }

    // The packet evidence, from complete captures only.
    if a_dropped != 0 || b_dropped != 0 {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(a_dropped.saturating_add(b_dropped));
    }
    let a_segs = evidence::read(&a_path).expect("client-side capture");
    let b_segs = evidence::read(&b_path).expect("server-side capture");
    let a = evidence::Conn::find(&a_segs, px.client_peer, px.client_local).expect("conn A");
    let b = evidence::Conn::find(&b_segs, px.server_local, sv_addr).expect("conn B");
    // What the datapath recorded as acknowledged since the splice (the
    // paper's snd_una_C and snd_una_D, for RECONNECT) is exactly the rest
    // of each stream after what the proxy itself sent before the splice,
    // plus the FIN.
    let pre_down = px
        .basepoints
        .client
        .snd_nxt
        .wrapping_sub(a.isn_passive.wrapping_add(1));
    let pre_up = px
        .basepoints
        .server
        .snd_nxt
        .wrapping_sub(b.isn_active.wrapping_add(1));
    let up_total = (BULK + PROLOGUE.len() as u64) as u32;
    assert_eq!(
        px.acked,
        (
            (BULK as u32).wrapping_sub(pre_down).wrapping_add(1),
            up_total.wrapping_sub(pre_up).wrapping_add(1)
        ),
        "acknowledged since the splice (pre-splice: {pre_down} down, {pre_up} up)"
    );
    let acks = evidence::check_acks_follow_client(&a_segs, &a, &b_segs, &b, 0, px.t_splice)
        .expect("(a) ACKs");
    assert!(acks > 100, "(a) checked only {acks} ACKs");
    let copies = evidence::check_nothing_originated(&a_segs, &a, &b_segs, &b, px.t_splice)
        .expect("(b) nothing originated");
    let up_len = BULK + PROLOGUE.len() as u64;
    let up_dup =
        evidence::check_stream(&b_segs, &b, b.active, &up_byte, up_len).expect("(c) up stream");
    let down_dup = evidence::check_stream(&a_segs, &a, a.passive, &|i| pattern(DOWN_SEED, i), BULK)
        .expect("(c) down stream");
    eprintln!(
        "evidence: {acks} server-bound ACKs follow the client's; {copies} segments after the splice \
         are all copies; up stream retransmitted {up_dup} bytes, down {down_dup}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A splice the control plane refuses (here: the client announced a small
/// MSS, so the server's segments would not fit its connection; it has also
/// already sent its FIN) hands both sockets back usable, with no table entry
/// left: the caller's relay carries the session to its end without losing a
/// byte.
#[test]
fn a_refused_splice_hands_back_working_sockets() {
    if !msocks_testbed::require_root("a_refused_splice_hands_back_working_sockets") {
        return;
    }
    const DOWN: u64 = 1 << 20;
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7201);
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 7200);

    let server = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let (n, _) = recv_all(&s).expect("server recv");
                let sent = send_pattern(&s, DOWN_SEED, DOWN).expect("server send");
                s.shutdown(Shutdown::Write).expect("shutdown");
                (n, sent)
            })
        })
        .expect("setns sv");
    let dp2 = Arc::clone(&dp);
    let proxy = tb
        .px
        .run_in(move || {
            let l = TcpListener::bind(px_addr).expect("bind");
            thread::spawn(move || -> String {
                let (c, _) = l.accept().expect("accept");
                let s = TcpStream::connect(sv_addr).expect("connect");
                let mut p = [0u8; 16];
                (&c).read_exact(&mut p).expect("prologue");
                (&s).write_all(&p).expect("relay prologue");
                // Wait for the client's FIN to be in.
                thread::sleep(Duration::from_millis(200));
                let refused = match splice(&dp2, c, s, Duration::from_secs(2)) {
                    Ok(_) => panic!("connections whose MSSes do not fit were spliced"),
                    Err(r) => r,
                };
                let why = refused.error.to_string();
                let (c, s) = (refused.client, refused.server);
                // The relay the proxy falls back to, in miniature.
                let mut buf = [0u8; 1];
                assert_eq!((&c).read(&mut buf).expect("client EOF"), 0);
                s.shutdown(Shutdown::Write).expect("pass the FIN on");
                std::io::copy(&mut &s, &mut &c).expect("relay down");
                c.shutdown(Shutdown::Write).expect("pass the FIN on");
                why
            })
        })
        .expect("setns px");
    let client = tb
        .mn
        .run_in(move || {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            msocks_splice::repair::set_maxseg(std::os::fd::AsFd::as_fd(&sock), 536)
                .expect("TCP_MAXSEG");
            sock.connect(&px_addr.into()).expect("connect");
            let s: TcpStream = sock.into();
            s.set_read_timeout(Some(IO_TIMEOUT)).ok();
            (&s).write_all(PROLOGUE).expect("prologue");
            s.shutdown(Shutdown::Write).expect("FIN");
            recv_all(&s).expect("client recv")
        })
        .expect("setns mn");
    let why = proxy.join().expect("proxy");
    let (s_n, s_sent) = server.join().expect("server");
    assert!(why.contains("MSS"), "refused for the wrong reason: {why}");
    assert_eq!(s_n, PROLOGUE.len() as u64);
    assert_eq!(
        client,
        (DOWN, s_sent),
        "the relay after the refusal lost nothing"
    );
    let stats = dp.lock().expect("lock").stats().expect("stats");
    let spliced = stats.iter().find(|(n, _)| *n == "spliced").map(|x| x.1);
    assert_eq!(spliced, Some(0), "nothing went through the datapath");
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");
}

/// A splice abandoned in the middle of its drain (the server reads nothing
/// for a while, so the proxy cannot hand it what the client sent) loses
/// nothing: the refusal returns the bytes the drain had read but not yet
/// written, the segments dropped in HOLD are retransmitted to the sockets,
/// which are no longer frozen, and the fallback relay delivers every byte
/// in order.
#[test]
fn a_splice_abandoned_during_the_drain_loses_nothing() {
    if !msocks_testbed::require_root("a_splice_abandoned_during_the_drain_loses_nothing") {
        return;
    }
    const UP: u64 = 8 << 20;
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7301);
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 7300);

    let server = tb
        .sv
        .run_in(|| {
            // A small receive buffer (inherited by the accepted socket):
            // the server's kernel must not swallow what the drain writes.
            let sock = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )
            .expect("socket");
            sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            sock.bind(&sv_addr.into()).expect("bind");
            sock.listen(8).expect("listen");
            let l: TcpListener = sock.into();
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let mut p = [0u8; 16];
                (&s).read_exact(&mut p).expect("prologue");
                // Read nothing for longer than the proxy's drain may take.
                thread::sleep(Duration::from_millis(2500));
                recv_all(&s).expect("server recv")
            })
        })
        .expect("setns sv");
    let dp2 = Arc::clone(&dp);
    let proxy = tb
        .px
        .run_in(move || {
            let l = TcpListener::bind(px_addr).expect("bind");
            thread::spawn(move || -> (String, usize) {
                let (c, _) = l.accept().expect("accept");
                // A small send buffer too, so the drain cannot park the
                // client's bytes in the proxy's kernel.
                let sock = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .expect("socket");
                sock.set_send_buffer_size(4096).expect("SO_SNDBUF");
                sock.connect(&sv_addr.into()).expect("connect");
                let s: TcpStream = sock.into();
                let mut p = [0u8; 16];
                (&c).read_exact(&mut p).expect("prologue");
                (&s).write_all(&p).expect("relay prologue");
                // Let the client fill the proxy's receive queue.
                thread::sleep(Duration::from_millis(300));
                let r = match splice(&dp2, c, s, Duration::from_secs(1)) {
                    Ok(_) => panic!("the drain finished although the server reads nothing"),
                    Err(r) => r,
                };
                let why = r.error.to_string();
                let pending = r.pending_to_server.len();
                let (c, s) = (r.client, r.server);
                (&s).write_all(&r.pending_to_server).expect("pending up");
                (&c).write_all(&r.pending_to_client).expect("pending down");
                // The relay the proxy falls back to, in miniature.
                std::io::copy(&mut &c, &mut &s).expect("relay up");
                s.shutdown(Shutdown::Write).expect("pass the FIN on");
                (why, pending)
            })
        })
        .expect("setns px");
    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || {
                let s = TcpStream::connect(px_addr).expect("connect");
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                (&s).write_all(PROLOGUE).expect("prologue");
                let sent = send_pattern(&s, UP_SEED, UP).expect("client send");
                s.shutdown(Shutdown::Write).expect("FIN");
                sent
            })
        })
        .expect("setns mn");
    let sent = client.join().expect("client");
    let (why, pending) = proxy.join().expect("proxy");
    let (n, got) = server.join().expect("server");
    let stats = dp.lock().expect("lock").stats().expect("stats");
    eprintln!("refused: {why}; {pending} bytes pending; counters {stats:?}");
    assert!(why.contains("drain"), "refused for the wrong reason: {why}");
    assert_eq!(n, UP, "bytes the server got");
    assert_eq!(
        got, sent,
        "the server's SHA-256: nothing lost, nothing repeated"
    );
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");
}
