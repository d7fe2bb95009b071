//! End to end: `msocks agent` in the mobile node of the namespace testbed, `msocks proxy` in
//! the proxy host, servers in the server namespace, and plain SOCKS5 clients (std sockets
//! speaking SOCKS5 through `msocks-proto`) in the mobile node.
//!
//! * Streams with different rules run at once on different interfaces, and a stream whose
//!   rule splits the directions sends over one link and receives over the other (checked
//!   with the interfaces' byte counters).
//! * The wired link is pulled mid-download and restored: the stream moves to radio and
//!   back, `msocks move` moves it by hand, and the download is byte-exact (SHA-256).
//!
//! Needs root; without it each test prints SKIPPED and returns (with `CI` set, it fails).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use msocks_agent::control::{client, InterfaceRow, StreamRow};
use msocks_proto::{
    Greeting, Method, MethodSelection, OpenRequest, Reply, ReplyCode, ReplyContext, Request,
    TargetAddr,
};
use msocks_testbed::{Link, LinkDelay, Testbed};
use sha2::{Digest, Sha256};
use support::agent_testbed::{
    interfaces, run_cli, setup, setup_with, Setup, AGENT_PORT, PROXY_PORT,
};

const MIB: u64 = 1 << 20;

/// The deterministic bytes servers send (xorshift), so both ends can hash them.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a server saw: bytes received and their hash, bytes sent and their hash.
type ServerResult = (u64, String, u64, String);

/// A server in `sv` on `port` for one connection: reads until the client's FIN, then
/// sends `parts` (bytes, pace in bytes per second or 0), waiting for a signal on `gates`
/// before every part after the first, and closes.
fn server(
    tb: &Testbed,
    port: u16,
    parts: Vec<(u64, u64)>,
    gates: Option<mpsc::Receiver<()>>,
) -> JoinHandle<ServerResult> {
    server_on(tb, tb.sv_ip.into(), port, parts, gates)
}

/// [`server`] listening on one of the server's addresses (`tb.sv_ip6` for IPv6).
fn server_on(
    tb: &Testbed,
    ip: IpAddr,
    port: u16,
    parts: Vec<(u64, u64)>,
    gates: Option<mpsc::Receiver<()>>,
) -> JoinHandle<ServerResult> {
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(SocketAddr::from((ip, port))))
        .unwrap()
        .expect("server bind");
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        // The client announces its upload's length: see the note on `client`.
        let mut len = [0u8; 8];
        conn.read_exact(&mut len).expect("server read length");
        let upload = u64::from_be_bytes(len);
        let mut got = 0u64;
        while got < upload {
            let want = (upload - got).min(buf.len() as u64) as usize;
            let n = conn.read(&mut buf[..want]).expect("server read");
            assert!(n > 0, "client closed during its upload");
            hash.update(&buf[..n]);
            got += n as u64;
        }
        let recv_sha = hex::encode(hash.finalize());
        let mut pattern = Pattern(0x9E37_79B9_7F4A_7C15 ^ u64::from(port));
        let mut hash = Sha256::new();
        let mut sent = 0u64;
        for (i, (bytes, rate)) in parts.into_iter().enumerate() {
            if i > 0 {
                if let Some(g) = &gates {
                    g.recv().expect("gate");
                }
            }
            let start = Instant::now();
            let mut part_sent = 0u64;
            while part_sent < bytes {
                let n = (bytes - part_sent).min(buf.len() as u64) as usize;
                pattern.fill(&mut buf[..n]);
                conn.write_all(&buf[..n]).expect("server write");
                hash.update(&buf[..n]);
                part_sent += n as u64;
                if rate > 0 {
                    let due = Duration::from_secs_f64(part_sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            }
            sent += part_sent;
        }
        conn.shutdown(Shutdown::Write).ok();
        (got, recv_sha, sent, hex::encode(hash.finalize()))
    })
}

/// A plain SOCKS5 client in `mn`: CONNECT through the agent to `sv:port`.
fn socks_connect(tb: &Testbed, port: u16) -> TcpStream {
    let target = TargetAddr::Ip(SocketAddr::from((tb.sv_ip, port)));
    let (s, reply) = socks_request(tb, msocks_proto::Command::Connect, target);
    assert_eq!(
        reply.code,
        ReplyCode::Succeeded,
        "agent refused CONNECT to port {port}"
    );
    s
}

/// A plain SOCKS5 request to the agent from `mn`; returns the connection and the (first)
/// reply.
fn socks_request(
    tb: &Testbed,
    command: msocks_proto::Command,
    target: TargetAddr,
) -> (TcpStream, Reply) {
    tb.mn
        .run_in(move || {
            let mut s =
                TcpStream::connect(("127.0.0.1", AGENT_PORT)).expect("connect to the agent");
            let mut out = Vec::new();
            Greeting {
                methods: vec![Method::NO_AUTH],
            }
            .encode(&mut out);
            s.write_all(&out).unwrap();
            let mut sel = [0u8; 2];
            s.read_exact(&mut sel).unwrap();
            let (sel, _) = MethodSelection::decode(&sel).unwrap().unwrap();
            assert_eq!(sel.method, Method::NO_AUTH);
            out.clear();
            Request::Open(OpenRequest {
                command,
                target,
                mobility: None,
            })
            .encode(&mut out);
            s.write_all(&out).unwrap();
            let reply = read_reply(&mut s);
            (s, reply)
        })
        .unwrap()
}

/// Reads one SOCKS5 reply, byte by byte: nothing may be consumed past it.
fn read_reply(s: &mut TcpStream) -> Reply {
    let mut reply = Vec::new();
    loop {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("reply from the agent");
        reply.push(b[0]);
        if let Some((r, _)) = Reply::decode(&reply, ReplyContext::Plain).unwrap() {
            return r;
        }
    }
}

/// A paced download from `sv:port` through the agent, in parts released by the returned
/// sender (see [`server`]); returns the server, the gate, the client's byte counter and the
/// client.
#[allow(clippy::type_complexity)]
fn start_download(
    tb: &Testbed,
    port: u16,
    parts: Vec<(u64, u64)>,
) -> (
    JoinHandle<ServerResult>,
    mpsc::Sender<()>,
    Arc<AtomicU64>,
    JoinHandle<(u64, String)>,
) {
    let (go, gates) = mpsc::channel();
    let sv = server(tb, port, parts, Some(gates));
    let conn = socks_connect(tb, port);
    let progress = Arc::new(AtomicU64::new(0));
    let cl = client(conn, 0, progress.clone());
    (sv, go, progress, cl)
}

/// Client side of one transfer: sends the upload's length and `upload` bytes, reads to the
/// server's FIN, then closes. Returns (bytes received, their SHA-256); `progress` counts
/// received bytes live.
///
/// The upload's length is announced (rather than ended by a FIN before the download) so the
/// download starts while the upward direction is still open, as with curl; the agent's
/// half-close is exercised at the end (the server's FIN, then the client's).
fn client(mut s: TcpStream, upload: u64, progress: Arc<AtomicU64>) -> JoinHandle<(u64, String)> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pattern = Pattern(42);
        s.write_all(&upload.to_be_bytes())
            .expect("client write length");
        let mut sent = 0u64;
        while sent < upload {
            let n = (upload - sent).min(buf.len() as u64) as usize;
            pattern.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).expect("client write");
            sent += n as u64;
        }
        let mut hash = Sha256::new();
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).expect("client read");
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            got += n as u64;
            progress.store(got, Ordering::Relaxed);
        }
        s.shutdown(Shutdown::Write)
            .expect("close after the download");
        (got, hex::encode(hash.finalize()))
    })
}

fn upload_sha(bytes: u64) -> String {
    let mut pattern = Pattern(42);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < bytes {
        let n = (bytes - done).min(buf.len() as u64) as usize;
        pattern.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        done += n as u64;
    }
    hex::encode(hash.finalize())
}

#[test]
fn agent_places_streams_by_rule_and_splits_directions() {
    if !msocks_testbed::require_root("agent_places_streams_by_rule_and_splits_directions") {
        return;
    }
    let s = setup("rules", |tb| {
        format!(
            r#"
[[rule]]
name = "wired only"
port = [5001]
outbound = ["wired0"]
inbound = ["wired0"]

[[rule]]
name = "radio"
network = ["{svnet}"]
port = ["5002-5002"]
outbound = ["tag:wan"]
inbound = ["cost:expensive"]

[[rule]]
name = "split"
port = [5003]
outbound = ["wired0"]
inbound = ["radio0"]
"#,
            svnet = tb.sv_net
        )
    });
    let tb = &s.tb;
    // Small: the hashing on both ends runs unoptimised in a debug build.
    let size = 4 * MIB;

    // Two streams at once: port 5001 wired only, port 5002 radio only.
    let sa = server(tb, 5001, vec![(size, 0)], None);
    let sb = server(tb, 5002, vec![(size, 0)], None);
    let ca = socks_connect(tb, 5001);
    let cb = socks_connect(tb, 5002);
    let a = s.wait_stream(5001, "on wired0", |r| {
        r.outbound == "wired0" && r.inbound == "wired0"
    });
    let b = s.wait_stream(5002, "on radio0", |r| {
        r.outbound == "radio0" && r.inbound == "radio0"
    });
    assert_eq!(
        (a.rule.as_str(), b.rule.as_str()),
        ("rule 1 (\"wired only\")", "rule 2 (\"radio\")")
    );
    let table = run_cli(tb, &s.control(), &["status"]);
    assert!(
        table.contains("wired only") && table.contains("radio0"),
        "{table}"
    );

    let w0 = tb.mn.link_stats("wired0").unwrap();
    let r0 = tb.mn.link_stats("radio0").unwrap();
    let ta = client(ca, 0, Arc::default());
    let tbb = client(cb, 0, Arc::default());
    let (ga, sha_a) = ta.join().unwrap();
    let (gb, sha_b) = tbb.join().unwrap();
    let (_, _, sent_a, want_a) = sa.join().unwrap();
    let (_, _, sent_b, want_b) = sb.join().unwrap();
    assert_eq!((ga, sha_a), (sent_a, want_a));
    assert_eq!((gb, sha_b), (sent_b, want_b));
    let w1 = tb.mn.link_stats("wired0").unwrap();
    let r1 = tb.mn.link_stats("radio0").unwrap();
    let (w_rx, r_rx) = (w1.rx_bytes - w0.rx_bytes, r1.rx_bytes - r0.rx_bytes);
    eprintln!("two rules: wired0 rx {w_rx}, radio0 rx {r_rx}");
    assert!(
        w_rx >= size && w_rx < size + size / 2,
        "wired0 received {w_rx}"
    );
    assert!(
        r_rx >= size && r_rx < size + size / 2,
        "radio0 received {r_rx}"
    );

    // The paper's split: data leaves by wired0 (its proxy address), arrives on radio0 (the
    // local address).
    let sc = server(tb, 5003, vec![(size, 0)], None);
    let cc = socks_connect(tb, 5003);
    s.wait_stream(5003, "out wired0, in radio0", |r| {
        r.outbound == "wired0" && r.inbound == "radio0"
    });
    let w0 = tb.mn.link_stats("wired0").unwrap();
    let r0 = tb.mn.link_stats("radio0").unwrap();
    let (gc, sha_c) = client(cc, size, Arc::default()).join().unwrap();
    let (got_up, up_sha, sent_c, want_c) = sc.join().unwrap();
    assert_eq!(
        (got_up, up_sha),
        (size, upload_sha(size)),
        "upload through the split stream"
    );
    assert_eq!(
        (gc, sha_c),
        (sent_c, want_c),
        "download through the split stream"
    );
    let w1 = tb.mn.link_stats("wired0").unwrap();
    let r1 = tb.mn.link_stats("radio0").unwrap();
    let (w_tx, w_rx) = (w1.tx_bytes - w0.tx_bytes, w1.rx_bytes - w0.rx_bytes);
    let (r_tx, r_rx) = (r1.tx_bytes - r0.tx_bytes, r1.rx_bytes - r0.rx_bytes);
    eprintln!("split: wired0 tx {w_tx} rx {w_rx}; radio0 tx {r_tx} rx {r_rx}");
    assert!(
        w_tx >= size && r_tx < size / 2,
        "upload should leave by wired0: wired tx {w_tx}, radio tx {r_tx}"
    );
    assert!(
        r_rx >= size && w_rx < size / 2,
        "download should arrive on radio0: radio rx {r_rx}, wired rx {w_rx}"
    );
}

#[test]
fn agent_follows_links_and_moves_by_hand() {
    if !msocks_testbed::require_root("agent_follows_links_and_moves_by_hand") {
        return;
    }
    let s = setup("links", |_| String::new());
    let tb = &s.tb;
    const PORT: u16 = 5004;
    let (part1, part2, part3) = (MIB, 8 * MIB, MIB);
    // Part 2 is paced so that the link is pulled while it flows.
    let (sv, go, progress, cl) =
        start_download(tb, PORT, vec![(part1, 0), (part2, 4 * MIB), (part3, 0)]);
    let wait_bytes = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "download stalled at {}",
                progress.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    wait_bytes(part1);
    let row = s.wait_stream(PORT, "on wired0 (default order)", |r| {
        r.outbound == "wired0" && r.inbound == "wired0"
    });
    assert_eq!(row.rule, "default");

    // Pull the wired link mid-download: the stream moves to radio at once.
    go.send(()).unwrap();
    wait_bytes(part1 + MIB / 2);
    tb.link_down(Link::Wired).unwrap();
    let moved = s.wait_stream(PORT, "moved to radio0", |r| {
        r.outbound == "radio0" && r.inbound == "radio0" && r.moves >= 1
    });
    wait_bytes(part1 + part2);
    // Restore it: the stream goes back to its preferred interface.
    tb.link_up(Link::Wired).unwrap();
    let back = s.wait_stream(PORT, "back on wired0", |r| {
        r.outbound == "wired0" && r.inbound == "wired0" && r.moves > moved.moves
    });

    // By hand, through the CLI: onto radio0, then back to the policy.
    let out = run_cli(tb, &s.control(), &["move", &back.id.to_string(), "radio0"]);
    assert!(out.contains("moved to radio0"), "{out}");
    let pinned = s.wait_stream(PORT, "pinned on radio0", |r| {
        r.outbound == "radio0" && r.pinned.as_deref() == Some("radio0")
    });
    let out = run_cli(tb, &s.control(), &["move", "--all", "auto"]);
    assert!(out.contains("moved to auto"), "{out}");
    let json = run_cli(tb, &s.control(), &["status", "--json"]);
    let rows: Vec<StreamRow> = serde_json::from_str(&json).unwrap();
    let last = rows
        .iter()
        .find(|r| r.id == back.id)
        .expect("stream in status --json");
    assert_eq!(
        (last.outbound.as_str(), last.pinned.as_ref()),
        ("wired0", None)
    );
    assert!(last.moves > pinned.moves, "{last:?}");

    go.send(()).unwrap();
    let (got, sha) = cl.join().unwrap();
    let (_, _, sent, want) = sv.join().unwrap();
    assert_eq!(
        (got, sha),
        (sent, want),
        "download through link changes must be byte-exact"
    );
    eprintln!("moves: {}", last.moves);
}

/// Waits until `progress` has counted `n` bytes.
fn wait_progress(progress: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "download stalled at {}",
            progress.load(Ordering::Relaxed)
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until some stream satisfies `f`.
fn wait_row(s: &Setup, what: &str, f: impl Fn(&StreamRow) -> bool) -> StreamRow {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = s.status();
        if let Some(r) = rows.iter().find(|r| f(r)) {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "{what}; streams: {rows:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn interface(s: &Setup, name: &str) -> InterfaceRow {
    client::interfaces(&s.control())
        .expect("msocks status --interfaces")
        .into_iter()
        .find(|r| r.name == name)
        .expect("interface in status")
}

fn wait_interface(s: &Setup, name: &str, what: &str, f: impl Fn(&InterfaceRow) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = interface(s, name);
        if f(&row) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {what}; last: {row:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A silent failure: the wired link stays up but drops every packet. No link event says
/// so; the agent's liveness probe finds it within its timeout (1 s by default) and the
/// stream moves to radio over the standby connection waiting there (a warm move). When
/// the link carries packets again, the probe says so and the stream moves back. The
/// download is byte-exact.
#[test]
fn agent_leaves_a_silent_link_found_by_its_probe_and_returns() {
    if !msocks_testbed::require_root("agent_leaves_a_silent_link_found_by_its_probe_and_returns") {
        return;
    }
    let s = setup("silent", |_| String::new());
    let tb = &s.tb;
    const PORT: u16 = 5006;
    let (part1, part2, part3) = (MIB, 8 * MIB, MIB);
    let (sv, go, progress, cl) =
        start_download(tb, PORT, vec![(part1, 0), (part2, 2 * MIB), (part3, 0)]);
    wait_progress(&progress, part1);
    s.wait_stream(PORT, "on wired0", |r| r.outbound == "wired0");
    for name in ["wired0", "radio0"] {
        wait_interface(&s, name, "probed, standby ready", |r| {
            r.probe == "alive" && r.standby_ready && r.rtt_us.is_some()
        });
    }
    let table = run_cli(tb, &s.control(), &["status", "--interfaces"]);
    assert!(
        table.contains("INTERFACE") && table.contains("alive"),
        "{table}"
    );

    go.send(()).unwrap();
    wait_progress(&progress, part1 + MIB / 2);
    let cut = Instant::now();
    tb.link_blackhole(Link::Wired, true).unwrap();
    s.wait_stream(PORT, "moved to radio0", |r| {
        r.outbound == "radio0" && r.inbound == "radio0" && r.moves >= 1
    });
    let took = cut.elapsed();
    eprintln!("silent failure: stream on radio0 {took:?} after the wired link went silent");
    // TCP alone would keep retransmitting for minutes; the probe bounds it.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    wait_interface(&s, "wired0", "failed", |r| r.probe == "failed");

    tb.link_blackhole(Link::Wired, false).unwrap();
    s.wait_stream(PORT, "back on wired0", |r| {
        r.outbound == "wired0" && r.moves >= 2
    });
    wait_interface(&s, "wired0", "alive again", |r| r.probe == "alive");

    go.send(()).unwrap();
    let (got, sha) = cl.join().unwrap();
    let (_, _, sent, want) = sv.join().unwrap();
    assert_eq!((got, sha), (sent, want), "download across a silent failure");
    let log = std::fs::read_to_string(s.dir.join("agent.log")).unwrap();
    assert!(
        log.contains("failed its liveness probe") && log.contains("warm=true"),
        "the agent's log should show the probe verdict and a warm move:\n{log}"
    );
}

/// SIGHUP mid-transfer with a changed rule re-places the stream (wired → radio) without
/// dropping it. Then the only allowed link is pulled: the stream is held open (the rule
/// says `wait`), a new stream's SOCKS reply is held too, and both resume when the link
/// returns. Every byte arrives exactly once.
#[test]
fn agent_reloads_policy_mid_transfer_and_holds_streams_without_a_link() {
    if !msocks_testbed::require_root(
        "agent_reloads_policy_mid_transfer_and_holds_streams_without_a_link",
    ) {
        return;
    }
    let s = setup("reload", |_| {
        r#"
[[rule]]
name = "wired only"
port = [5001]
outbound = ["wired0"]
inbound = ["wired0"]
"#
        .to_owned()
    });
    let tb = &s.tb;
    const PORT: u16 = 5001; // the "wired only" rule
    let (part1, part2, part3) = (MIB, 4 * MIB, MIB);
    let (sv, go, progress, cl) = start_download(
        tb,
        PORT,
        vec![(part1, 0), (part2, 2 * MIB), (part3, 2 * MIB)],
    );
    wait_progress(&progress, part1);
    s.wait_stream(PORT, "on wired0", |r| r.outbound == "wired0");

    // Reload mid-transfer: the rule now names radio0 only.
    go.send(()).unwrap();
    wait_progress(&progress, part1 + MIB);
    let path = s.dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let new = text.replacen(
        "port = [5001]\noutbound = [\"wired0\"]\ninbound = [\"wired0\"]",
        "port = [5001, 5011]\noutbound = [\"radio0\"]\ninbound = [\"radio0\"]",
        1,
    );
    assert_ne!(new, text, "the test's rule text changed");
    std::fs::write(&path, new).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &s.agent_pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let moved = s.wait_stream(PORT, "re-placed on radio0", |r| {
        r.outbound == "radio0" && r.inbound == "radio0" && r.moves >= 1
    });

    // No allowed link: the stream is held, and so is a new stream's reply.
    wait_progress(&progress, part1 + part2);
    tb.link_down(Link::Radio).unwrap();
    go.send(()).unwrap(); // part 3 queues while the link is gone
                          // The reloaded rule covers port 5011 too.
    const PORT2: u16 = 5011;
    let sv2 = server(tb, PORT2, vec![(64 * 1024, 0)], None);
    let (held_tx, held_rx) = mpsc::channel();
    let tb_ref: &Testbed = tb;
    thread::scope(|scope| {
        let second = scope.spawn(|| {
            let c = socks_connect(tb_ref, PORT2);
            held_tx.send(Instant::now()).unwrap();
            client(c, 0, Arc::default()).join().unwrap()
        });
        thread::sleep(Duration::from_millis(1500));
        assert!(
            held_rx.try_recv().is_err(),
            "a new stream was answered while no allowed link existed"
        );
        let row = s.stream(PORT).expect("the first stream is still there");
        assert!(row.state != "failed" && row.state != "closed", "{row:?}");
        let before = progress.load(Ordering::Relaxed);
        thread::sleep(Duration::from_millis(500));
        assert_eq!(
            progress.load(Ordering::Relaxed),
            before,
            "bytes arrived with no link"
        );
        let up = Instant::now();
        tb.link_up(Link::Radio).unwrap();
        let answered = held_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the held stream's reply after the link came back");
        eprintln!(
            "held stream answered {:?} after the link came back",
            answered.saturating_duration_since(up)
        );
        let (got, sha) = second.join().unwrap();
        let (_, _, sent, want) = sv2.join().unwrap();
        assert_eq!((got, sha), (sent, want), "the held stream's download");
    });
    let (got, sha) = cl.join().unwrap();
    let (_, _, sent, want) = sv.join().unwrap();
    assert_eq!(
        (got, sha),
        (sent, want),
        "download across a reload and a time with no link"
    );
    eprintln!("moves after the reload: {}", moved.moves);
}

/// UDP through the agent: a program's association keeps working when the wired link is
/// pulled (the agent re-associates over radio) and when it comes back.
#[test]
fn agent_udp_association_survives_moves() {
    if !msocks_testbed::require_root("agent_udp_association_survives_moves") {
        return;
    }
    let s = setup("udp", |_| String::new());
    let tb = &s.tb;
    const PORT: u16 = 5300;
    // A UDP echo server in sv.
    let echo = tb
        .sv
        .run_in(|| UdpSocket::bind(SocketAddr::from((tb.sv_ip, PORT))))
        .unwrap()
        .expect("echo bind");
    let echo_thread = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        echo.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            if &buf[..n] == b"stop" {
                return;
            }
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let (control, reply) = socks_request(
        tb,
        msocks_proto::Command::UdpAssociate,
        TargetAddr::UNSPECIFIED,
    );
    assert_eq!(reply.code, ReplyCode::Succeeded, "{reply:?}");
    let TargetAddr::Ip(relay) = reply.bound else {
        panic!("relay given as a name: {reply:?}")
    };
    let sock = tb
        .mn
        .run_in(|| UdpSocket::bind("127.0.0.1:0"))
        .unwrap()
        .expect("client UDP socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let dest = TargetAddr::Ip(SocketAddr::from((tb.sv_ip, PORT)));
    // Sends datagram `n` and waits for its echo; `true` when it came back.
    let round = |n: u32| -> bool {
        let mut out = Vec::new();
        msocks_proto::UdpHeader {
            frag: 0,
            target: dest.clone(),
        }
        .encode(&mut out);
        let payload = format!("datagram {n}");
        out.extend_from_slice(payload.as_bytes());
        sock.send_to(&out, relay).unwrap();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_millis(400);
        while Instant::now() < deadline {
            if let Ok((len, _)) = sock.recv_from(&mut buf) {
                if let Ok(Some((h, used))) = msocks_proto::UdpHeader::decode(&buf[..len]) {
                    if h.target == dest && &buf[used..len] == payload.as_bytes() {
                        return true;
                    }
                }
            }
        }
        false
    };
    // Echoes until `count` consecutive ones came back (the switch may lose a few).
    let steady = |from: u32, count: u32| -> u32 {
        let mut n = from;
        let mut ok = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while ok < count {
            assert!(Instant::now() < deadline, "UDP echoes did not resume");
            if round(n) {
                ok += 1;
            } else {
                ok = 0;
            }
            n += 1;
        }
        n
    };
    let n = steady(0, 10);
    let row = wait_row(&s, "associated", |r| r.kind == "udp");
    assert_eq!(row.outbound, "wired0", "{row:?}");
    let w0 = tb.mn.link_stats("wired0").unwrap();

    tb.link_down(Link::Wired).unwrap();
    let n = steady(n, 10);
    let moved = wait_row(&s, "associated on radio0", |r| {
        r.kind == "udp" && r.outbound == "radio0" && r.moves >= 1
    });
    tb.link_up(Link::Wired).unwrap();
    wait_row(&s, "back on wired0", |r| {
        r.kind == "udp" && r.outbound == "wired0" && r.moves > moved.moves
    });
    let n = steady(n, 10);
    let w1 = tb.mn.link_stats("wired0").unwrap();
    assert!(w1.rx_bytes > w0.rx_bytes, "echoes arrive on wired0 again");
    eprintln!("UDP: {n} datagrams sent, moves {}", moved.moves);
    drop(control);
    // The association ends with its control connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.status().iter().any(|r| r.kind == "udp") {
        assert!(Instant::now() < deadline, "association still listed");
        thread::sleep(Duration::from_millis(50));
    }
    let stop = tb
        .mn
        .run_in(|| UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    let _ = tb
        .mn
        .run_in(|| stop.send_to(b"stop", SocketAddr::from((tb.sv_ip, PORT))));
    let _ = echo_thread.join();
}

/// BIND through the agent: the proxy listens for the program's peer (first reply), the
/// peer in sv connects (second reply), and the accepted stream is an MSOCKS stream that
/// `msocks move` moves like any other.
#[test]
fn agent_bind_accepts_and_moves() {
    if !msocks_testbed::require_root("agent_bind_accepts_and_moves") {
        return;
    }
    let s = setup("bind", |_| String::new());
    let tb = &s.tb;
    let (mut ctl, first) = socks_request(
        tb,
        msocks_proto::Command::Bind,
        TargetAddr::Ip(SocketAddr::from((tb.sv_ip, 0))),
    );
    assert_eq!(first.code, ReplyCode::Succeeded, "{first:?}");
    let TargetAddr::Ip(listen) = first.bound else {
        panic!("BIND address as a name: {first:?}")
    };
    // The peer in sv connects to where the proxy listens (its sv-side address).
    let listen = SocketAddr::new(tb.px_sv_ip.into(), listen.port());
    let mut peer = tb
        .sv
        .run_in(|| TcpStream::connect(listen))
        .unwrap()
        .expect("peer connects to the BIND address");
    let second = read_reply(&mut ctl);
    assert_eq!(second.code, ReplyCode::Succeeded, "{second:?}");
    let echo = |ctl: &mut TcpStream, peer: &mut TcpStream, msg: &[u8]| {
        ctl.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
        peer.write_all(msg).unwrap();
        ctl.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    echo(&mut ctl, &mut peer, b"before the move");
    let row = wait_row(&s, "bind stream", |r| {
        r.kind == "bind" && r.state == "connected"
    });
    let out = run_cli(tb, &s.control(), &["move", &row.id.to_string(), "radio0"]);
    assert!(out.contains("moved to radio0"), "{out}");
    wait_row(&s, "on radio0", |r| {
        r.kind == "bind" && r.outbound == "radio0" && r.moves >= 1
    });
    echo(&mut ctl, &mut peer, b"after the move");
}

/// A plain HTTP/1.0 server in `sv` on `port` for `conns` connections: each gets a
/// `len`-byte body paced at `rate` bytes per second, so the streams stay open while the
/// test looks at them.
fn http_server(tb: &Testbed, port: u16, conns: usize, len: usize, rate: u64) -> JoinHandle<()> {
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(SocketAddr::from((tb.sv_ip, port))))
        .unwrap()
        .expect("http server bind");
    thread::spawn(move || {
        let mut served = Vec::new();
        for _ in 0..conns {
            let (mut conn, _) = listener.accept().expect("http accept");
            served.push(thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if conn.read(&mut b).expect("http read") == 0 {
                        return;
                    }
                    req.push(b[0]);
                }
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {len}\r\n\r\n");
                conn.write_all(head.as_bytes()).expect("http head");
                let chunk = vec![b'x'; 16 * 1024];
                let start = Instant::now();
                let mut sent = 0usize;
                while sent < len {
                    let n = (len - sent).min(chunk.len());
                    if conn.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    sent += n;
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        thread::sleep(wait);
                    }
                }
            }));
        }
        for t in served {
            let _ = t.join();
        }
    })
}

/// Rules by program: `curl`'s streams go by radio0, `python3`'s by wired0, both started
/// at once through the agent to the same server. The agent finds each local program in
/// /proc (no cooperation from the programs), and `msocks status` shows them on their
/// links.
#[test]
fn agent_places_streams_by_program() {
    if !msocks_testbed::require_root("agent_places_streams_by_program") {
        return;
    }
    // The name the kernel gives this host's python3 (pyenv and distributions may exec a
    // versioned binary): the rule must name /proc/PID/comm.
    let comm = std::process::Command::new("python3")
        .args(["-c", "print(open('/proc/self/comm').read().strip())"])
        .output()
        .expect("python3 is needed for this test");
    let py_comm = String::from_utf8_lossy(&comm.stdout).trim().to_owned();
    assert!(!py_comm.is_empty(), "python3 did not say its name");
    let rules = format!(
        r#"
[[rule]]
name = "curl by radio"
program = ["curl"]
outbound = ["radio0"]
inbound = ["radio0"]
when_unavailable = "fail"

[[rule]]
name = "python by wire"
program = ["{py_comm}"]
outbound = ["wired0"]
inbound = ["wired0"]
when_unavailable = "fail"
"#
    );
    let s = setup("program", move |_| rules);
    let tb = &s.tb;
    const PORT: u16 = 5010;
    let len = 3 * MIB as usize;
    let http = http_server(tb, PORT, 2, len, MIB);
    let url = format!("http://{}:{PORT}/file", tb.sv_ip);
    let proxy = format!("127.0.0.1:{AGENT_PORT}");
    let curl = tb
        .mn
        .command("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{size_download}"])
        .args(["--socks5", &proxy, &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start curl");
    let script = format!(
        "import socket\n\
         s = socket.create_connection(('127.0.0.1', {AGENT_PORT}))\n\
         s.sendall(b'\\x05\\x01\\x00'); assert s.recv(2) == b'\\x05\\x00'\n\
         s.sendall(b'\\x05\\x01\\x00\\x01' + socket.inet_aton('{sv}') + ({PORT}).to_bytes(2, 'big'))\n\
         r = b''\n\
         while len(r) < 10: r += s.recv(10 - len(r))\n\
         assert r[1] == 0, r\n\
         s.sendall(b'GET /file HTTP/1.0\\r\\n\\r\\n')\n\
         n = 0\n\
         while True:\n\
         \x20   d = s.recv(65536)\n\
         \x20   if not d: break\n\
         \x20   n += len(d)\n\
         print(n)\n",
        sv = tb.sv_ip,
    );
    let python = tb
        .mn
        .command("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python3");

    // Placed once connected: a row still "connecting" has no interfaces yet.
    let c = wait_row(&s, "curl's stream, connected", |r| {
        r.program.as_deref() == Some("curl") && r.state != "connecting"
    });
    let p = wait_row(&s, "python's stream, connected", |r| {
        r.program.as_deref() == Some(py_comm.as_str()) && r.state != "connecting"
    });
    assert_eq!(
        (c.outbound.as_str(), c.inbound.as_str(), c.rule.as_str()),
        ("radio0", "radio0", "rule 1 (\"curl by radio\")"),
        "{c:?}"
    );
    assert_eq!(
        (p.outbound.as_str(), p.inbound.as_str(), p.rule.as_str()),
        ("wired0", "wired0", "rule 2 (\"python by wire\")"),
        "{p:?}"
    );
    assert_eq!(c.pid, Some(curl.id()), "curl's pid in status");
    let table = run_cli(tb, &s.control(), &["status"]);
    assert!(
        table.contains(&format!("curl[{}]", curl.id())),
        "status names the program and its pid:\n{table}"
    );

    let out = curl.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = "HTTP/1.0 200 OK\r\nContent-Length: \r\n\r\n".len() + len.to_string().len();
    assert_eq!(String::from_utf8_lossy(&out.stdout), len.to_string());
    let out = python.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (len + header).to_string()
    );
    http.join().unwrap();
}

/// An interface whose proxy address is IPv6 (wired0) and one whose is IPv4 (radio0); a
/// stream to an IPv6 destination through the agent starts on wired0 (from the mobile
/// node's IPv6 address), moves to radio0 when the wired link is pulled, and stays there
/// while wired0 is back up with only its IPv4 and link-local IPv6 addresses (the kernel
/// flushed its global IPv6 address on link down; `status --interfaces` says `no IPv6
/// address`), then returns when the address does. Byte-exact both ways.
#[test]
fn agent_carries_ipv6_through_an_ipv6_proxy_address_and_moves() {
    if !msocks_testbed::require_root("agent_carries_ipv6_through_an_ipv6_proxy_address_and_moves") {
        return;
    }
    let s = setup_with("ipv6", |tb| {
        format!(
            r#"
[[interface]]
name = "wired0"
proxy = "[{pw}]:{PROXY_PORT}"
tags = ["lan"]

[[interface]]
name = "radio0"
proxy = "{pr}:{PROXY_PORT}"
tags = ["wan"]
"#,
            pw = tb.px_wired_ip6,
            pr = tb.px_radio_ip,
        )
    });
    let tb = &s.tb;
    const PORT: u16 = 5011;
    let (part1, part2, part3) = (MIB, 6 * MIB, MIB);
    let (go, gates) = mpsc::channel();
    let sv = server_on(
        tb,
        tb.sv_ip6.into(),
        PORT,
        vec![(part1, 0), (part2, 3 * MIB), (part3, 0)],
        Some(gates),
    );
    wait_interface(&s, "wired0", "usable and probed over IPv6", |r| {
        r.link == "usable" && r.probe == "alive"
    });
    let target = TargetAddr::Ip(SocketAddr::from((tb.sv_ip6, PORT)));
    let (conn, reply) = socks_request(tb, msocks_proto::Command::Connect, target);
    assert_eq!(
        reply.code,
        ReplyCode::Succeeded,
        "CONNECT to [{}]",
        tb.sv_ip6
    );
    let progress = Arc::new(AtomicU64::new(0));
    let cl = client(conn, 256 * 1024, progress.clone());
    wait_progress(&progress, part1);
    let row = s.wait_stream(PORT, "on wired0", |r| r.outbound == "wired0");
    assert_eq!(row.destination, format!("[{}]:{PORT}", tb.sv_ip6));
    assert!(
        s.agent_log().contains(&format!(
            "path=proxy [{}]:{PROXY_PORT} from {}",
            tb.px_wired_ip6, tb.mn_wired_ip6
        )),
        "the stream should leave from the wired IPv6 address:\n{}",
        s.agent_log()
    );

    go.send(()).unwrap();
    wait_progress(&progress, part1 + MIB / 2);
    tb.link_down(Link::Wired).unwrap();
    let moved = s.wait_stream(PORT, "moved to radio0", |r| {
        r.outbound == "radio0" && r.moves >= 1
    });
    // Up again at both ends, but without the global IPv6 address the kernel flushed.
    tb.mn.link_set(Link::Wired.mn_if(), true).unwrap();
    tb.px.link_set(Link::Wired.px_if(), true).unwrap();
    wait_interface(&s, "wired0", "up without an IPv6 address", |r| {
        r.link == "no IPv6 address"
    });
    thread::sleep(Duration::from_millis(1500));
    let row = s.stream(PORT).expect("stream");
    assert_eq!(
        (row.outbound.as_str(), row.moves),
        ("radio0", moved.moves),
        "no move onto wired0 while it has no IPv6 address to reach its proxy from"
    );
    assert!(
        !s.agent_log().contains("Invalid argument"),
        "nothing may try a link-local source:\n{}",
        s.agent_log()
    );
    tb.link_up(Link::Wired).unwrap();
    s.wait_stream(PORT, "back on wired0", |r| {
        r.outbound == "wired0" && r.moves > moved.moves
    });

    go.send(()).unwrap();
    let (got, sha) = cl.join().unwrap();
    let (up, up_sha, sent, want) = sv.join().unwrap();
    assert_eq!((got, sha), (sent, want), "download over IPv6, byte-exact");
    assert_eq!((up, up_sha), (256 * 1024, upload_sha(256 * 1024)), "upload");
}

/// The wired interface is renumbered under a live stream, as a new DHCP lease does: a
/// second address is added (`ip addr add`), then the old one deleted. The stream moves to
/// the new address on the same interface (it does not fall back to radio0), and the
/// liveness probe — whose standby connection was bound to the old address — is not taken
/// for a failed link. The wired link has a 100 ms RTT and probes run every 50 ms, so a
/// probe is nearly always in flight when an address goes.
#[test]
fn agent_follows_an_address_change_on_an_interface() {
    if !msocks_testbed::require_root("agent_follows_an_address_change_on_an_interface") {
        return;
    }
    let s = setup_with("renumber", |tb| {
        format!("probe_interval = \"50ms\"\n{}", interfaces(tb))
    });
    let tb = &s.tb;
    let _delay = LinkDelay::start(tb, Link::Wired, Duration::from_millis(50)).expect("delay");
    // Deleting an interface's primary IPv4 address deletes its secondaries too, unless
    // they are promoted (what a DHCP client's renumbering relies on).
    tb.mn
        .exec(&[
            "sysctl",
            "-qw",
            &format!(
                "net.ipv4.conf.{}.promote_secondaries=1",
                Link::Wired.mn_if()
            ),
        ])
        .unwrap();
    const PORT: u16 = 5012;
    let (part1, part2, part3) = (MIB, 6 * MIB, MIB);
    let (go, gates) = mpsc::channel();
    let sv = server(
        tb,
        PORT,
        vec![(part1, 0), (part2, MIB), (part3, 0)],
        Some(gates),
    );
    let conn = socks_connect(tb, PORT);
    let progress = Arc::new(AtomicU64::new(0));
    let cl = client(conn, 0, progress.clone());
    wait_progress(&progress, part1);
    s.wait_stream(PORT, "on wired0", |r| r.outbound == "wired0");
    wait_interface(&s, "wired0", "probed", |r| r.probe == "alive");
    go.send(()).unwrap();

    let [a, b, c, _] = tb.mn_wired_ip.octets();
    let mut old = tb.mn_wired_ip;
    let wired = Link::Wired.mn_if();
    for host in [50u8, 51, 52] {
        let new = std::net::Ipv4Addr::new(a, b, c, host);
        let moves = s.stream(PORT).expect("stream").moves;
        tb.mn.addr_add(wired, &format!("{new}/24")).unwrap();
        thread::sleep(Duration::from_millis(300));
        tb.mn
            .ip(&["addr", "del", &format!("{old}/24"), "dev", wired])
            .unwrap();
        s.wait_stream(PORT, "moved to the new address", |r| {
            r.moves > moves && r.outbound == "wired0" && r.inbound == "wired0"
        });
        let log = s.agent_log();
        assert!(
            log.contains(&format!("from {new}")),
            "the stream should now come from {new}:\n{log}"
        );
        // Longer than probe_timeout: a probe lost with the old address would be reported.
        thread::sleep(Duration::from_millis(1500));
        old = new;
    }
    let log = s.agent_log();
    assert!(
        !log.contains("failed its liveness probe"),
        "an address change is not a failed link:\n{log}"
    );
    let row = s.stream(PORT).expect("stream");
    assert_eq!(row.outbound, "wired0", "{row:?}");
    assert_eq!(row.moves, 3, "one move per renumbering: {row:?}");
    wait_interface(&s, "wired0", "probed from the new address", |r| {
        r.probe == "alive" && r.standby_ready
    });

    go.send(()).unwrap();
    let (got, sha) = cl.join().unwrap();
    let (_, _, sent, want) = sv.join().unwrap();
    assert_eq!((got, sha), (sent, want), "download across renumbering");
}

/// An interface named in the config that does not exist when the agent starts (a USB
/// modem not yet plugged in): it shows as `absent`, streams use the others; when it
/// appears with an address its host route is installed and the stream moves onto it (it
/// is preferred); when it is deleted (`ip link del`) the stream moves back at once.
#[test]
fn agent_uses_an_interface_that_appears_later_and_leaves_one_deleted() {
    if !msocks_testbed::require_root(
        "agent_uses_an_interface_that_appears_later_and_leaves_one_deleted",
    ) {
        return;
    }
    // 10.99.0.0/24 is a subnet of its own between the mobile node and the proxy host.
    let (usb_mn, usb_px) = ("10.99.0.2", "10.99.0.1");
    let s = setup_with("appears", |tb| {
        format!(
            r#"
[[interface]]
name = "usb0"
proxy = "{usb_px}:{PROXY_PORT}"
tags = ["usb"]
{}"#,
            interfaces(tb)
        )
    });
    let tb = &s.tb;
    let log = s.agent_log();
    assert!(
        !log.contains("WARN"),
        "an absent interface is not worth a warning:\n{log}"
    );
    assert_eq!(interface(&s, "usb0").link, "absent");
    const PORT: u16 = 5013;
    let (part1, part2, part3) = (MIB, 6 * MIB, MIB);
    let (go, gates) = mpsc::channel();
    let sv = server(
        tb,
        PORT,
        vec![(part1, 0), (part2, 3 * MIB), (part3, 0)],
        Some(gates),
    );
    let conn = socks_connect(tb, PORT);
    let progress = Arc::new(AtomicU64::new(0));
    let cl = client(conn, 0, progress.clone());
    wait_progress(&progress, part1);
    s.wait_stream(PORT, "on wired0 while usb0 is absent", |r| {
        r.outbound == "wired0"
    });
    go.send(()).unwrap();
    wait_progress(&progress, part1 + MIB / 2);

    msocks_testbed::veth_pair(&tb.mn, "usb0", &tb.px, "usb1").unwrap();
    tb.px.addr_add("usb1", &format!("{usb_px}/24")).unwrap();
    tb.px.link_set("usb1", true).unwrap();
    tb.mn.addr_add("usb0", &format!("{usb_mn}/24")).unwrap();
    tb.mn.link_set("usb0", true).unwrap();
    let on_usb = s.wait_stream(PORT, "moved onto usb0 when it appeared", |r| {
        r.outbound == "usb0" && r.inbound == "usb0"
    });
    wait_interface(&s, "usb0", "usable and probed", |r| {
        r.link == "usable" && r.probe == "alive"
    });
    let routes = tb.mn.ip(&["route", "show", "dev", "usb0"]).unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains(&format!("{usb_px} ")),
        "host route to usb0's proxy address: {}",
        String::from_utf8_lossy(&routes.stdout)
    );

    tb.mn.ip(&["link", "del", "usb0"]).unwrap();
    s.wait_stream(PORT, "back on wired0 after usb0 was deleted", |r| {
        r.outbound == "wired0" && r.moves > on_usb.moves
    });
    wait_interface(&s, "usb0", "absent again", |r| r.link == "absent");

    go.send(()).unwrap();
    let (got, sha) = cl.join().unwrap();
    let (_, _, sent, want) = sv.join().unwrap();
    assert_eq!(
        (got, sha),
        (sent, want),
        "download across usb0 coming and going"
    );
}

/// A stream held under `wait` (its only allowed interface is down) says why in the log, and
/// is dropped as soon as its program gives up and closes — not kept in `msocks status` and
/// opened for nobody when the link returns, up to `wait_timeout` later.
#[test]
fn agent_drops_a_held_stream_when_its_program_gives_up() {
    if !msocks_testbed::require_root("agent_drops_a_held_stream_when_its_program_gives_up") {
        return;
    }
    const PORT: u16 = 5014;
    let s = setup("giveup", |_| {
        format!(
            r#"
[[rule]]
name = "radio only"
port = [{PORT}]
outbound = ["radio0"]
inbound = ["radio0"]
"#
        )
    });
    let tb = &s.tb;
    tb.link_down(Link::Radio).unwrap();
    wait_interface(&s, "radio0", "down", |r| r.link == "down");
    // A SOCKS5 client that sends its request and then waits for the reply, as programs do.
    let sv = SocketAddr::from((tb.sv_ip, PORT));
    let conn = tb
        .mn
        .run_in(move || {
            let mut c = TcpStream::connect(("127.0.0.1", AGENT_PORT)).expect("connect to agent");
            let mut out = Vec::new();
            Greeting {
                methods: vec![Method::NO_AUTH],
            }
            .encode(&mut out);
            Request::Open(OpenRequest {
                command: msocks_proto::Command::Connect,
                target: TargetAddr::Ip(sv),
                mobility: None,
            })
            .encode(&mut out);
            c.write_all(&out).expect("request");
            c
        })
        .unwrap();
    let row = wait_row(&s, "the held stream", |r| {
        r.destination.ends_with(&format!(":{PORT}"))
    });
    assert_eq!(row.state, "connecting", "{row:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.agent_log().contains("outbound radio0: down") {
        assert!(
            Instant::now() < deadline,
            "the log should say why the stream waits:\n{}",
            s.agent_log()
        );
        thread::sleep(Duration::from_millis(50));
    }

    drop(conn);
    let gone = Instant::now();
    while s.stream(PORT).is_some() {
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "the stream of a program that gave up is still held: {:?}",
            s.stream(PORT)
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        s.agent_log()
            .contains("closed its connection while the stream waited"),
        "{}",
        s.agent_log()
    );
}
