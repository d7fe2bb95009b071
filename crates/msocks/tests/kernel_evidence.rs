//! Packet evidence for MSOCKS sessions on the kernel engine, moves included (issue 5, item 6).
//!
//! `msocks proxy --engine kernel` runs in the testbed's proxy namespace; the msocks library on
//! the mobile node opens one MSOCKS CONNECT session to a server and moves it back and forth
//! between the wired and the radio link (soft and hard moves) while 1 MiB goes up (and ends
//! early, so later moves are of a half-closed session) and 3 MiB come down.
//! tcpdump records the proxy's three links. From the captures alone, reading the SOCKS and
//! MSOCKS exchanges in them to learn where each mobile-side connection joins the streams,
//! the checker proves:
//!
//! (a) every ACK the server received acknowledged only server bytes the mobile node had
//!     already acknowledged (on any of its connections);
//! (b) after the splice, every segment the proxy put on a connection is a rewritten copy of
//!     one it received on the other side: the proxy originated no ACK (nor anything else);
//! (c) every byte of both streams went over the wire at its place, and each end got each
//!     byte exactly once, in order (SHA-256 at both ends).
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

#[path = "../../msocks-splice/tests/evidence/mod.rs"]
#[allow(dead_code)]
mod evidence;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use evidence::capture::Capture;
use evidence::{digest, fill, pattern, recv_all, Conn, Seg};
use msocks_client::{MobileConfig, MobileStream, ProxyPath};
use msocks_proto::{
    Greeting, MethodSelection, Reply, ReplyContext, ReplyExtension, Request, ResumeCounters,
};
use msocks_testbed::{Link, Testbed, SV_IF_ON_PX};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROXY_PORT: u16 = 1080;
const SERVER_PORT: u16 = 9100;
/// The mobile node's upload ends (with its FIN) early, so that later moves happen in a
/// half-closed session; the download is paced to last through all the moves.
const UP_LEN: u64 = 1 << 20;
/// The upload of the quick-upload variant, over (and acknowledged) before the first move.
const QUICK_UP_LEN: u64 = 64 << 10;
const DOWN_LEN: u64 = 3 << 20;
const UP_SEED: u64 = 11;
const DOWN_SEED: u64 = 12;
const MOVES: usize = 8;

/// `msocks proxy --engine kernel` in the proxy namespace, its log kept with the times.
struct Proxy {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// The testbed's addresses of one IP family, and how the upload goes.
#[derive(Debug, Clone, Copy)]
struct Family {
    v6: bool,
    /// The upload is written at once and over before the first move, so the moves' RECONNECTs
    /// carry early resend with nothing to resend, which the kernel engine takes. Without it,
    /// the upload is paced into the moves: the first early resend has bytes in flight and is
    /// refused (`0x81`), and the library moves with plain RECONNECTs from then on.
    quick_upload: bool,
}

impl Family {
    fn up_len(self) -> u64 {
        if self.quick_upload {
            QUICK_UP_LEN
        } else {
            UP_LEN
        }
    }

    fn px(self, tb: &Testbed, link: Link) -> IpAddr {
        if self.v6 {
            tb.px_ip6(link).into()
        } else {
            tb.px_ip(link).into()
        }
    }
    fn mn(self, tb: &Testbed, link: Link) -> IpAddr {
        if self.v6 {
            tb.mn_ip6(link).into()
        } else {
            tb.mn_ip(link).into()
        }
    }
    fn sv(self, tb: &Testbed) -> IpAddr {
        if self.v6 {
            tb.sv_ip6.into()
        } else {
            tb.sv_ip.into()
        }
    }
    /// Where the proxy listens.
    fn any(self) -> SocketAddr {
        if self.v6 {
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, PROXY_PORT))
        } else {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, PROXY_PORT))
        }
    }
}

impl Proxy {
    fn start(tb: &Testbed, fam: Family) -> Proxy {
        let mut child = tb
            .px
            .command(env!("CARGO_BIN_EXE_msocks"))
            .args([
                "proxy",
                "--listen",
                &fam.any().to_string(),
                "--engine",
                "kernel",
                "--log-level",
                "info,msocks_splice=debug",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting msocks proxy in the proxy namespace");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let at = SocketAddr::new(fam.px(tb, Link::Wired), PROXY_PORT);
        let ready = tb
            .mn
            .run_in(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if std::net::TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_ok()
                    {
                        return true;
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                false
            })
            .expect("setns mn");
        assert!(ready, "the proxy did not listen within 10 s");
        Proxy { child, log }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Times of the log lines containing `what` (and `and`, if given).
    fn times_of(&self, what: &str, and: Option<&str>) -> Vec<Duration> {
        self.lines()
            .iter()
            .filter(|l| l.contains(what) && and.map_or(true, |a| l.contains(a)))
            .filter_map(|l| log_time(l))
            .collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("---- proxy log ----\n{}", self.lines().join("\n"));
        }
    }
}

/// The time at the start of a log line (`2026-11-25T02:49:01.052361Z`, UTC), since the epoch.
fn log_time(line: &str) -> Option<Duration> {
    let t = line.split_whitespace().next()?;
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut parts = time.split(':');
    let (hh, mm) = (
        parts.next()?.parse::<u64>().ok()?,
        parts.next()?.parse::<u64>().ok()?,
    );
    let secs: f64 = parts.next()?.parse().ok()?;
    // Days from the civil date (proleptic Gregorian), H. Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(Duration::from_secs(days * 86_400 + hh * 3600 + mm * 60) + Duration::from_secs_f64(secs))
}

fn path(tb: &Testbed, fam: Family, link: Link) -> ProxyPath {
    ProxyPath::new(SocketAddr::new(fam.px(tb, link), PROXY_PORT)).with_local_addr(fam.mn(tb, link))
}

/// The server: reads everything while sending `LEN` bytes, paced so that the transfer spans
/// the moves. Returns (bytes read, their SHA-256).
fn start_server(tb: &Testbed, fam: Family) -> thread::JoinHandle<(u64, Vec<u8>)> {
    let addr = SocketAddr::new(fam.sv(tb), SERVER_PORT);
    tb.sv
        .run_in(move || {
            let l = TcpListener::bind(addr).expect("bind server");
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(60))).ok();
                let w = s.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut off = 0u64;
                    while off < DOWN_LEN {
                        let n = (DOWN_LEN - off).min(buf.len() as u64) as usize;
                        fill(DOWN_SEED, off, &mut buf[..n]);
                        (&w).write_all(&buf[..n]).expect("server write");
                        off += n as u64;
                        thread::sleep(Duration::from_millis(5));
                    }
                    w.shutdown(Shutdown::Write).expect("server shutdown");
                });
                let got = recv_all(&s).expect("server read");
                sender.join().expect("server sender");
                got
            })
        })
        .expect("setns sv")
}

/// The mobile node: one MSOCKS stream, `MOVES` moves (every third hard) while the transfers run.
/// Returns (bytes read, their SHA-256).
fn run_client(tb: &Testbed, fam: Family) -> (u64, Vec<u8>) {
    let target = SocketAddr::new(fam.sv(tb), SERVER_PORT);
    // Early resend on (the library's default): the kernel engine takes it when no early byte
    // reached the proxy before the new connection was held, and answers 0x83 otherwise (the
    // library then reconnects plainly; such a refused connection carries nothing).
    let cfg =
        MobileConfig::with_paths(vec![path(tb, fam, Link::Wired), path(tb, fam, Link::Radio)]);
    tb.mn
        .run_in(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let stream = MobileStream::connect(target, cfg)
                    .await
                    .expect("opening the MSOCKS stream");
                let control = stream.control();
                let (mut r, mut w) = tokio::io::split(stream);
                let writer = tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    let mut off = 0u64;
                    let up_len = fam.up_len();
                    while off < up_len {
                        let n = (up_len - off).min(buf.len() as u64) as usize;
                        fill(UP_SEED, off, &mut buf[..n]);
                        w.write_all(&buf[..n]).await.expect("client write");
                        off += n as u64;
                        if !fam.quick_upload {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    w.shutdown().await.expect("client shutdown");
                });
                let reader = tokio::spawn(async move {
                    let mut h = Sha256::new();
                    let mut n = 0u64;
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let k = r.read(&mut buf).await.expect("client read");
                        if k == 0 {
                            break;
                        }
                        h.update(&buf[..k]);
                        n += k as u64;
                    }
                    (n, h.finalize().to_vec())
                });
                let mut on = Link::Wired;
                if fam.quick_upload {
                    // Let the upload be acknowledged end to end first.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
                for i in 0..MOVES {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    let to = if on == Link::Wired {
                        Link::Radio
                    } else {
                        Link::Wired
                    };
                    let hard = i % 3 == 2;
                    if hard {
                        tb.link_down(on).expect("link down");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let moved = control.migrate(path(tb, fam, to)).await;
                    if hard {
                        tb.link_up(on).expect("link up");
                    }
                    let report = moved.unwrap_or_else(|e| panic!("move {i} to {to:?}: {e}"));
                    eprintln!(
                        "move {i} ({}) to {to:?}: salvage {} rewrite {}",
                        if hard { "hard" } else { "soft" },
                        report.data_salvage,
                        report.data_write
                    );
                    on = to;
                }
                writer.await.expect("writer");
                reader.await.expect("reader")
            })
        })
        .expect("setns mn")
}

/// Bytes `from` sent on `c`, at stream offsets `0..want` (as far as the capture has them).
fn prefix(segs: &[Seg], c: &Conn, from: SocketAddr, want: usize) -> Vec<u8> {
    let mut out = vec![None; want];
    for s in segs.iter().filter(|s| s.src == from && s.dst != from) {
        if s.dst
            != if from == c.active {
                c.passive
            } else {
                c.active
            }
        {
            continue;
        }
        let o = c.offset(from, s.seq);
        for (i, b) in s.payload.iter().enumerate() {
            let at = o + i as i64;
            if at >= 0 && (at as usize) < want {
                out[at as usize] = Some(*b);
            }
        }
    }
    out.into_iter().map_while(|b| b).collect()
}

/// One mobile-side connection that carried the session, and where it joins the streams.
#[derive(Debug)]
struct Leg {
    conn: Conn,
    /// Which capture it is in.
    link: Link,
    /// SOCKS bytes before the client's first stream byte, and before the proxy's.
    client_pre: i64,
    proxy_pre: i64,
    /// Stream offsets of the first byte each way on this connection.
    up_start: i64,
    down_start: i64,
    /// A RECONNECT with early resend (PROTOCOL.md 3.7.1).
    early: bool,
}

impl Leg {
    fn up(&self, seq_off: i64) -> i64 {
        self.up_start + seq_off - self.client_pre
    }
    fn down(&self, seq_off: i64) -> i64 {
        self.down_start + seq_off - self.proxy_pre
    }
}

/// Reads the SOCKS/MSOCKS exchange at the start of each connection to the proxy and keeps
/// the ones that carried the session (MSOCKS CONNECT, or an accepted RECONNECT).
fn legs(captures: &[(Link, Vec<Seg>)], proxy_port: u16) -> Vec<Leg> {
    let mut out = Vec::new();
    let mut origins = None;
    let mut found: Vec<(Link, Conn, Duration)> = Vec::new();
    for (link, segs) in captures {
        for s in segs
            .iter()
            .filter(|s| s.syn && !s.ack_flag && s.dst.port() == proxy_port)
        {
            if found.iter().any(|(_, c, _)| c.active == s.src) {
                continue;
            }
            // A SYN that was never answered (sent into a pulled link) carried nothing.
            if let Ok(c) = Conn::find(segs, s.src, s.dst) {
                found.push((*link, c, s.ts));
            }
        }
    }
    found.sort_by_key(|x| x.2);
    for (link, c, _) in found {
        let segs = &captures
            .iter()
            .find(|(l, _)| *l == link)
            .expect("capture")
            .1;
        let cs = prefix(segs, &c, c.active, 512);
        let ps = prefix(segs, &c, c.passive, 512);
        let Ok(Some((_, g))) = Greeting::decode(&cs) else {
            continue;
        };
        let Ok(Some((_, m))) = MethodSelection::decode(&ps) else {
            continue;
        };
        let Ok(Some((req, rl))) = Request::decode(&cs[g..]) else {
            continue;
        };
        let ctx = match &req {
            Request::Open(_) => ReplyContext::MobileOpen,
            Request::Reconnect(_) => ReplyContext::Reconnect,
            Request::Standby => continue,
        };
        let Ok(Some((reply, pl))) = Reply::decode(&ps[m..], ctx) else {
            continue;
        };
        if reply.code != msocks_proto::ReplyCode::Succeeded {
            continue;
        }
        let early = matches!(&req, Request::Reconnect(rc) if rc.resend_from.is_some());
        let (up_start, down_start) = match (&req, reply.extension) {
            (Request::Open(open), _) => {
                let mob = open.mobility.expect("an MSOCKS CONNECT");
                origins = Some((mob.read_origin, mob.write_origin));
                (0, 0)
            }
            (
                Request::Reconnect(rc),
                ReplyExtension::Resume(ResumeCounters {
                    data_write,
                    data_salvage,
                }),
            ) => {
                let (ro, wo) = origins.expect("the session's MSOCKS CONNECT comes first");
                let read = rc.data_read.wrapping_sub(ro);
                let written = rc.data_written.wrapping_sub(wo);
                // With early resend the client's bytes start at RESEND_FROM (PROTOCOL.md
                // 3.7.1), else where the reply's DATA_WRITE says.
                let up = match rc.resend_from {
                    Some(from) => from.wrapping_sub(wo),
                    None => written - data_write,
                };
                (up as i64, (read + data_salvage) as i64)
            }
            _ => continue,
        };
        out.push(Leg {
            conn: c,
            link,
            client_pre: (g + rl) as i64,
            proxy_pre: (m + pl) as i64,
            up_start,
            down_start,
            early,
        });
    }
    out
}

/// What identifies a segment across the splice: its stream offset, the stream offset it
/// acknowledges (0 without ACK), payload length, ACK/FIN/RST flags.
type Shape = (i64, i64, usize, bool, bool, bool);

fn shape(s: &Seg, seq_off: i64, ack_off: impl FnOnce() -> i64) -> Shape {
    let ack = if s.ack_flag { ack_off() } else { 0 };
    (seq_off, ack, s.payload.len(), s.ack_flag, s.fin, s.rst)
}

/// Segments received on one side, each to be matched by one copy sent on the other.
#[derive(Default)]
struct Pool(HashMap<Shape, usize>);

impl Pool {
    fn add(&mut self, k: Shape) {
        *self.0.entry(k).or_default() += 1;
    }

    /// Takes one segment of this shape; false if there is none left.
    fn take(&mut self, k: &Shape) -> bool {
        match self.0.get_mut(k) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[test]
fn kernel_msocks_session_with_moves_has_packet_evidence() {
    evidence_on(Family {
        v6: false,
        quick_upload: false,
    });
}

/// Over IPv6, with moves that all carry early resend.
#[test]
fn kernel_msocks_session_with_early_resend_moves_has_packet_evidence_ipv6() {
    evidence_on(Family {
        v6: true,
        quick_upload: true,
    });
}

fn evidence_on(fam: Family) {
    if !msocks_testbed::require_root(&format!(
        "kernel_msocks_session_with_moves_has_packet_evidence ({fam:?})"
    )) {
        return;
    }
    // tcpdump may drop packets on a loaded machine; the evidence needs complete captures.
    for attempt in 1..=3 {
        match run(fam) {
            Ok(()) => return,
            Err(dropped) => {
                eprintln!("attempt {attempt}: tcpdump dropped {dropped} packets; again")
            }
        }
    }
    panic!("tcpdump dropped packets in three attempts: no complete evidence");
}

fn run(fam: Family) -> Result<(), u64> {
    let tb = Testbed::mobile_proxy_server().expect("building the testbed");
    let dir = std::env::temp_dir().join(format!(
        "msocks-kernel-evidence-{}-{}",
        std::process::id(),
        if fam.v6 { "v6" } else { "v4" }
    ));
    std::fs::create_dir_all(&dir).expect("capture dir");
    let caps = [
        (
            Link::Wired,
            Capture::start(&tb.px, Link::Wired.px_if(), &dir.join("wired.pcap")),
        ),
        (
            Link::Radio,
            Capture::start(&tb.px, Link::Radio.px_if(), &dir.join("radio.pcap")),
        ),
    ];
    let cap_b = Capture::start(&tb.px, SV_IF_ON_PX, &dir.join("server.pcap"));
    let proxy = Proxy::start(&tb, fam);

    let server = start_server(&tb, fam);
    let (c_n, c_sha) = run_client(&tb, fam);
    let (s_n, s_sha) = server.join().expect("server");
    // The session's close is logged once both FINs are acknowledged (plus a linger).
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.times_of("session closed", None).is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }

    assert_eq!(c_n, DOWN_LEN, "bytes the mobile node read");
    assert_eq!(
        c_sha,
        digest(DOWN_SEED, DOWN_LEN),
        "the mobile node's SHA-256"
    );
    assert_eq!(s_n, fam.up_len(), "bytes the server read");
    assert_eq!(s_sha, digest(UP_SEED, fam.up_len()), "the server's SHA-256");
    let lines = proxy.lines();
    assert!(
        lines.iter().any(|l| l.contains("engine: spliced")),
        "the session was not spliced"
    );
    assert!(
        !lines.iter().any(|l| l.contains("engine: not spliced")),
        "the session fell back to the relay"
    );
    let closed: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("session closed"))
        .collect();
    assert!(
        closed
            .iter()
            .any(|l| l.contains("closed by both ends (kernel splice)")
                && l.contains(&format!("moves={MOVES}"))),
        "the session's end: {closed:?}"
    );

    let mut dropped = 0u64;
    let mut a_caps = Vec::new();
    for (link, cap) in caps {
        let (p, d) = cap.stop();
        dropped = dropped.saturating_add(d);
        a_caps.push((link, p));
    }
    let (b_path, d) = cap_b.stop();
    dropped = dropped.saturating_add(d);
    if dropped != 0 {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(dropped);
    }
    let a_segs: Vec<(Link, Vec<Seg>)> = a_caps
        .iter()
        .map(|(l, p)| (*l, evidence::read(p).expect("mobile-side capture")))
        .collect();
    let b_segs = evidence::read(&b_path).expect("server-side capture");
    let sv = SocketAddr::new(fam.sv(&tb), SERVER_PORT);
    let syn = b_segs
        .iter()
        .find(|s| s.syn && !s.ack_flag && s.dst == sv)
        .expect("the proxy's SYN to the server");
    let b = Conn::find(&b_segs, syn.src, sv).expect("server handshake");
    let legs = legs(&a_segs, PROXY_PORT);
    assert_eq!(
        legs.len(),
        MOVES + 1,
        "connections that carried the session: {legs:?}"
    );
    let segs_of = |leg: &Leg| -> &[Seg] {
        &a_segs
            .iter()
            .find(|(l, _)| *l == leg.link)
            .expect("capture")
            .1
    };

    // When each leg was spliced, from the proxy's log: the first at "engine: spliced", each
    // later one at its "resumed" line (logged after the new connection was frozen).
    let first_splice = proxy.times_of("engine: spliced", None)[0];
    let splice_time = |leg: &Leg, i: usize| -> Duration {
        if i == 0 {
            first_splice
        } else {
            let to = format!("to={}", leg.conn.active);
            *proxy
                .times_of(
                    "session resumed on a new connection (kernel splice)",
                    Some(&to),
                )
                .first()
                .unwrap_or_else(|| panic!("no resume logged for {to}"))
        }
    };

    // (a) The server's ACKs of the down stream follow the mobile node's.
    let mut client_acks: Vec<(Duration, i64)> = legs
        .iter()
        .flat_map(|leg| {
            segs_of(leg)
                .iter()
                .filter(|s| {
                    s.src == leg.conn.active && s.dst == leg.conn.passive && s.ack_flag && !s.syn
                })
                .map(|s| (s.ts, leg.down(leg.conn.ack_offset(leg.conn.active, s.ack))))
        })
        .collect();
    client_acks.sort_by_key(|x| x.0);
    let mut best = Vec::with_capacity(client_acks.len());
    let mut m = i64::MIN;
    for (t, o) in client_acks {
        m = m.max(o);
        best.push((t, m));
    }
    let mut acks_checked = 0;
    for s in b_segs
        .iter()
        .filter(|s| s.dst == b.passive && s.ack_flag && !s.syn && s.ts > first_splice)
    {
        let o = b.ack_offset(b.active, s.ack);
        let idx = best.partition_point(|(t, _)| *t <= s.ts);
        let had = if idx == 0 { i64::MIN } else { best[idx - 1].1 };
        assert!(
            o <= had.max(0) || o <= 0,
            "(a) the server got an ACK of down offset {o} at {:?}; the mobile node had acknowledged {had}",
            s.ts
        );
        acks_checked += 1;
    }
    assert!(
        acks_checked > 100,
        "(a) only {acks_checked} server-bound ACKs checked"
    );

    // (b) Nothing originated: every segment the proxy sent after a splice is a copy, until the
    // session ended (then its entries are gone, and a late segment of a connection the
    // client dropped, a FIN it retransmits say, finds no socket at the proxy and gets the
    // proxy kernel's RST, as for any closed connection).
    let closed_at = proxy.times_of("session closed", None)[0];
    let mut from_mobile = Pool::default();
    for leg in &legs {
        let c = &leg.conn;
        for s in segs_of(leg)
            .iter()
            .filter(|s| s.src == c.active && s.dst == c.passive && !s.syn)
        {
            from_mobile.add(shape(s, leg.up(c.offset(c.active, s.seq)), || {
                leg.down(c.ack_offset(c.active, s.ack))
            }));
        }
    }
    let mut copies = 0;
    for s in b_segs
        .iter()
        .filter(|s| s.dst == b.passive && s.ts > first_splice && s.ts < closed_at)
    {
        let k = shape(s, b.offset(b.active, s.seq), || {
            b.ack_offset(b.active, s.ack)
        });
        assert!(
            from_mobile.take(&k),
            "(b) a segment to the server at {:?} ({k:?}: up offset, ack, len, ack/fin/rst flags) \
             is no copy of one from the mobile node",
            s.ts
        );
        copies += 1;
    }
    let mut from_server = Pool::default();
    for s in b_segs
        .iter()
        .filter(|s| s.src == b.passive && s.dst == b.active && !s.syn)
    {
        from_server.add(shape(s, b.offset(b.passive, s.seq), || {
            b.ack_offset(b.passive, s.ack)
        }));
    }
    for (i, leg) in legs.iter().enumerate() {
        let c = &leg.conn;
        let after = splice_time(leg, i);
        for s in segs_of(leg)
            .iter()
            .filter(|s| s.src == c.passive && s.dst == c.active && s.ts > after && s.ts < closed_at)
        {
            let k = shape(s, leg.down(c.offset(c.passive, s.seq)), || {
                leg.up(c.ack_offset(c.passive, s.ack))
            });
            assert!(
                from_server.take(&k),
                "(b) a segment to the mobile node on {:?} (leg {i} of {}, spliced at {after:?}, \
                 session closed at {closed_at:?}) at {:?} ({k:?}: down offset, ack, len, \
                 ack/fin/rst flags) is no copy of one from the server",
                c.active,
                legs.len(),
                s.ts
            );
            copies += 1;
        }
    }

    // (c) Every byte at its place: the up stream as the server's link carried it, the down
    // stream as the mobile-side links carried it (across all legs).
    let up_dup = evidence::check_stream(
        &b_segs,
        &b,
        b.active,
        &|i| pattern(UP_SEED, i),
        fam.up_len(),
    )
    .expect("(c) the up stream on the server's link");
    let mut covered = vec![false; DOWN_LEN as usize];
    for leg in &legs {
        let c = &leg.conn;
        for s in segs_of(leg)
            .iter()
            .filter(|s| s.src == c.passive && s.dst == c.active)
        {
            let o = c.offset(c.passive, s.seq);
            for (j, byte) in s.payload.iter().enumerate() {
                let at = o + j as i64;
                if at < leg.proxy_pre {
                    continue; // the SOCKS replies
                }
                let d = leg.down(at);
                assert!(
                    (0..DOWN_LEN as i64).contains(&d),
                    "(c) down byte at offset {d} outside the stream on {:?}",
                    c.active
                );
                assert_eq!(
                    *byte,
                    pattern(DOWN_SEED, d as u64),
                    "(c) down byte at offset {d} on {:?}",
                    c.active
                );
                covered[d as usize] = true;
            }
        }
    }
    if let Some(hole) = covered.iter().position(|c| !c) {
        panic!("(c) down byte {hole} never reached the mobile node's links");
    }
    let early = legs.iter().filter(|l| l.early).count();
    if fam.quick_upload {
        assert!(early > 0, "no move used early resend: {legs:?}");
    }
    eprintln!(
        "evidence: {} legs ({early} by early-resend RECONNECTs); {acks_checked} server-bound ACKs follow the mobile node's; {copies} segments \
         after the splices are all copies; the up stream retransmitted {up_dup} bytes",
        legs.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
