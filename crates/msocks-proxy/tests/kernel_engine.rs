//! The proxy with `[engine] kind = "kernel"` on real packets: a SOCKS5 client in the
//! testbed's `mn` namespace CONNECTs through the proxy in `px` to a server in `sv`, and the
//! two exchange 16 MiB each way (SHA-256 checked). A capture of the proxy's server-side
//! link proves the session was spliced: every ACK the server received acknowledges only
//! bytes the client had already acknowledged, which the relay engine never does.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

// The capture checker of the splice crate's own test; this test uses part of it.
#[allow(dead_code)]
#[path = "../../msocks-splice/tests/evidence/mod.rs"]
mod evidence;

use evidence::capture::Capture;

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use msocks_proxy::config::EngineKind;
use msocks_proxy::ProxyConfig;
use msocks_testbed::{Link, Testbed, SV_IF_ON_PX};
use sha2::{Digest, Sha256};
use support::{LogBuffer, ProxyInNamespace};

const BULK: u64 = 16 << 20;
const SERVER_WAITS_FOR: u64 = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes the proxy sends the client before the server's first byte: the method selection
/// (2) and the CONNECT reply with an IPv4 address (10).
const SOCKS_DOWN: i64 = 12;

fn pattern(seed: u64, i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.to_le_bytes()[(i % 8) as usize]
}

fn send(mut s: &TcpStream, seed: u64) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < BULK {
        let n = (BULK - off).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = pattern(seed, off + i as u64);
        }
        s.write_all(&buf[..n]).expect("send");
        h.update(&buf[..n]);
        off += n as u64;
    }
    s.shutdown(Shutdown::Write).expect("shutdown");
    h.finalize().to_vec()
}

fn recv(mut s: &TcpStream, mut h: Sha256, mut total: u64) -> (u64, Vec<u8>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf).expect("recv");
        if n == 0 {
            return (total, h.finalize().to_vec());
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

#[test]
fn engine_section_parses_and_defaults_to_relay() {
    let c = ProxyConfig::from_toml(
        "[engine]\nkind = \"kernel\"\ninterfaces = [\"eth0\"]\ndrain_timeout = \"500ms\"\n",
        std::path::Path::new("test"),
    )
    .expect("valid [engine]");
    assert_eq!(c.engine.kind, EngineKind::Kernel);
    assert_eq!(c.engine.interfaces, vec!["eth0".to_owned()]);
    assert_eq!(c.engine.drain_timeout, Duration::from_millis(500));
    assert_eq!(ProxyConfig::default().engine.kind, EngineKind::Relay);
    assert!(
        ProxyConfig::from_toml("[engine]\nkind = \"dpdk\"\n", std::path::Path::new("t")).is_err()
    );
    assert_eq!(c.engine.mss, None, "derived from the interfaces by default");
    let mss = |v: &str| {
        ProxyConfig::from_toml(&format!("[engine]\nmss = {v}\n"), std::path::Path::new("t"))
            .map(|c| c.engine.mss)
    };
    assert_eq!(mss("1360").ok(), Some(Some(1360)));
    assert_eq!(mss("0").ok(), Some(Some(0)), "0 turns clamping off");
    assert!(mss("100").is_err(), "too small to be useful");
    assert!(mss("40000").is_err(), "above what TCP_MAXSEG takes");
}

#[test]
fn kernel_engine_splices_a_connect_session() {
    if !msocks_testbed::require_root("kernel_engine_splices_a_connect_session") {
        return;
    }
    // The proxy's log says which engine each session used.
    let logs = LogBuffer::capture();
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dir = std::env::temp_dir().join(format!("msocks-kernel-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cap_a_path = dir.join("client-side.pcap");
    let cap_b_path = dir.join("server-side.pcap");
    let cap_a = Capture::start(&tb.px, Link::Wired.px_if(), &cap_a_path);
    let cap_b = Capture::start(&tb.px, SV_IF_ON_PX, &cap_b_path);

    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7001);

    // The proxy, on its own runtime in px, until `stop` fires.
    let config = support::kernel_config(px_addr);
    let proxy = ProxyInNamespace::start(&tb.px, config);

    let server = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("server bind");
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let mut h = Sha256::new();
                let mut first = vec![0u8; SERVER_WAITS_FOR as usize];
                (&s).read_exact(&mut first).expect("first MiB");
                h.update(&first);
                let s2 = s.try_clone().expect("clone");
                let sender = thread::spawn(move || send(&s2, 2));
                let (n, got) = recv(&s, h, SERVER_WAITS_FOR);
                (n, got, sender.join().expect("server sender"))
            })
        })
        .expect("setns sv");

    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || {
                let s = support::socks5_connect(px_addr, sv_addr, IO_TIMEOUT);
                let s2 = s.try_clone().expect("clone");
                let sender = thread::spawn(move || send(&s2, 1));
                let (n, got) = recv(&s, Sha256::new(), 0);
                (
                    s.local_addr().expect("addr"),
                    n,
                    got,
                    sender.join().expect("client sender"),
                )
            })
        })
        .expect("setns mn");

    let (c_addr, c_n, c_got, c_sent) = client.join().expect("client");
    let (s_n, s_got, s_sent) = server.join().expect("server");
    // Give the proxy time to see both FINs acknowledged and tear down.
    thread::sleep(Duration::from_secs(3));
    proxy.stop();
    let dropped = cap_a.stop().1.saturating_add(cap_b.stop().1);

    assert_eq!((c_n, s_n), (BULK, BULK), "bytes received by client, server");
    assert_eq!(c_got, s_sent, "client's SHA-256");
    assert_eq!(s_got, c_sent, "server's SHA-256");

    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("engine: spliced") && l.contains("kernel")),
        "the session was not spliced:\n{text}"
    );
    // At its end the proxy logs what the datapath did: segments rewritten, at least.
    assert!(
        text.lines()
            .any(|l| l.contains("kernel splice datapath counters") && l.contains("spliced=")),
        "no datapath counters at the end:\n{text}"
    );
    if dropped != 0 {
        // Evidence from a lossy capture proves nothing either way.
        eprintln!("WARNING: tcpdump lost {dropped} packets; the packet check is skipped this run");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let a_segs = evidence::read(&cap_a_path).expect("client-side capture");
    let b_segs = evidence::read(&cap_b_path).expect("server-side capture");
    let a = evidence::Conn::find(&a_segs, c_addr, px_addr).expect("conn A");
    let px_side = b_segs
        .iter()
        .find(|s| s.syn && s.dst == sv_addr)
        .map(|s| s.src)
        .expect("proxy's SYN to the server");
    let b = evidence::Conn::find(&b_segs, px_side, sv_addr).expect("conn B");
    let acks =
        evidence::check_acks_follow_client(&a_segs, &a, &b_segs, &b, SOCKS_DOWN, Duration::ZERO)
            .expect("ACKs to the server follow the client's: the session was spliced");
    assert!(acks > 100, "only {acks} ACKs checked");
    let _ = std::fs::remove_dir_all(&dir);
}
