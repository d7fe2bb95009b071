//! MSS clamping of the kernel engine: the proxy–server link has a smaller MTU (1400) than
//! the mobile node's link (1500). Unclamped, the proxy would tell the client "MSS 1460" and
//! the server "MSS 1360": the client's full-sized segments could not cross to the server
//! (the datapath cannot split a segment), so the session could only be relayed. With the
//! default `[engine] mss` (derived from the smallest MTU of the attached interfaces) both
//! legs announce 1360 and the session is spliced; 4 MiB each way arrive byte-exact.
//!
//! Its own test binary: the engine is loaded once per process, and the log capture is
//! global.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use msocks_proxy::config::{EngineConfig, EngineKind};
use msocks_proxy::ProxyConfig;
use msocks_testbed::{Testbed, SV_IF_ON_PX, SV_IF_ON_SV};
use sha2::{Digest, Sha256};
use support::{LogBuffer, ProxyInNamespace};

const BULK: usize = 4 << 20;
const SMALL_MTU: u32 = 1400;
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ u64::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data`, half-closes, and returns everything the peer sent until its FIN.
fn exchange(s: TcpStream, data: Vec<u8>) -> Vec<u8> {
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    let w = s.try_clone().expect("clone");
    let sender = thread::spawn(move || {
        (&w).write_all(&data).expect("send");
        w.shutdown(Shutdown::Write).expect("shutdown");
    });
    let mut got = Vec::new();
    (&s).read_to_end(&mut got).expect("receive");
    sender.join().expect("sender");
    got
}

/// The MSS the kernel currently sends with on `s` (`TCP_MAXSEG` on a connected socket).
fn send_mss(s: &TcpStream) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` live on this stack frame for the call, `len` is v's exact size,
    // and `s` keeps the descriptor open.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt TCP_MAXSEG");
    u32::try_from(v).expect("non-negative MSS")
}

/// One SOCKS5 CONNECT session from `mn` through the proxy at `px_addr` to a new server at
/// `sv_addr`, 4 MiB each way, checked byte for byte. Returns the send MSS of the client's and
/// the server's socket.
fn session(tb: &Testbed, px_addr: SocketAddr, sv_addr: SocketAddr) -> (u32, u32) {
    let up = pattern(1, BULK);
    let down = pattern(2, BULK);
    let down_sent = down.clone();
    let server = tb
        .sv
        .run_in(move || {
            let l = TcpListener::bind(sv_addr).expect("server bind");
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                let mss = send_mss(&s);
                (mss, exchange(s, down_sent))
            })
        })
        .expect("setns sv");
    let up_sent = up.clone();
    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || {
                let s = support::socks5_connect(px_addr, sv_addr, IO_TIMEOUT);
                let mss = send_mss(&s);
                (mss, exchange(s, up_sent))
            })
        })
        .expect("setns mn");

    let (client_mss, client_got) = client.join().expect("client");
    let (server_mss, server_got) = server.join().expect("server");
    assert_eq!(client_got.len(), BULK, "bytes the client received");
    assert_eq!(server_got.len(), BULK, "bytes the server received");
    assert!(
        Sha256::digest(&client_got) == Sha256::digest(&down),
        "the client received the server's bytes exactly"
    );
    assert!(
        Sha256::digest(&server_got) == Sha256::digest(&up),
        "the server received the client's bytes exactly"
    );
    (client_mss, server_mss)
}

fn kernel_proxy(tb: &Testbed, px_addr: SocketAddr, mss: Option<u32>) -> ProxyInNamespace {
    let config = ProxyConfig {
        listen: vec![px_addr],
        engine: EngineConfig {
            kind: EngineKind::Kernel,
            mss,
            // Held at once: a 4 MiB exchange could end within the first relayed
            // milliseconds, and this test is about the MSS of spliced sessions.
            relay_first: Duration::ZERO,
            ..EngineConfig::default()
        },
        ..ProxyConfig::default()
    };
    ProxyInNamespace::start(&tb.px, config)
}

#[test]
fn a_smaller_mtu_on_the_server_side_is_still_spliced() {
    if !msocks_testbed::require_root("a_smaller_mtu_on_the_server_side_is_still_spliced") {
        return;
    }
    let logs = LogBuffer::capture();
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let mtu = SMALL_MTU.to_string();
    tb.px
        .ip(&["link", "set", SV_IF_ON_PX, "mtu", &mtu])
        .expect("mtu px");
    tb.sv
        .ip(&["link", "set", SV_IF_ON_SV, "mtu", &mtu])
        .expect("mtu sv");

    // Without clamping (`mss = 0`) the legs' MSSes do not fit: relayed, for that reason.
    let px_plain = SocketAddr::new(tb.px_wired_ip.into(), 1081);
    let proxy = kernel_proxy(&tb, px_plain, Some(0));
    let (c_mss, s_mss) = session(&tb, px_plain, SocketAddr::new(tb.sv_ip.into(), 7003));
    // Give the proxy time to end the relayed session and log it.
    thread::sleep(Duration::from_secs(1));
    proxy.stop();
    assert!(
        c_mss > SMALL_MTU - 40,
        "unclamped, the client sends segments too big for the server's link (MSS {c_mss}, \
         server's {s_mss})"
    );
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("engine: not spliced") && l.contains("MSS")),
        "unclamped, the session is relayed because of the MSS:\n{text}"
    );
    assert!(
        !text.contains("engine: spliced"),
        "unclamped, nothing is spliced:\n{text}"
    );

    // With the default clamp (the smallest MTU of the attached interfaces): spliced.
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let proxy = kernel_proxy(&tb, px_addr, None);
    let (client_mss, server_mss) = session(&tb, px_addr, SocketAddr::new(tb.sv_ip.into(), 7004));
    // Give the proxy time to see both FINs acknowledged and tear down.
    thread::sleep(Duration::from_secs(3));
    proxy.stop();
    // Both ends were told an MSS that fits the smaller link: MTU - 40 (IPv4 and TCP
    // headers); the kernel reports it less the timestamp option.
    let fits = SMALL_MTU - 40;
    assert!(
        client_mss <= fits && server_mss <= fits,
        "send MSS client {client_mss}, server {server_mss}; both must be <= {fits}"
    );
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("engine: spliced") && l.contains("kernel")),
        "the clamped session was not spliced:\n{text}"
    );
}
