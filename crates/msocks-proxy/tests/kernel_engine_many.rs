//! Many short kernel-engine sessions at once, as the set-up and memory benchmarks make them:
//! 64 clients CONNECT through the proxy at the same time to an echo server and, once every
//! session is spliced while idle, each sends 1000 bytes, reads them back and closes. Every session must be spliced (the drain of each runs on its own
//! task, interleaved with the others), every echo exact, and every session must end as a
//! completed splice (both FINs through the datapath), not by an idle timeout or a relay.
//!
//! Its own test binary: the engine is loaded once per process, and the log capture is
//! global.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use msocks_testbed::Testbed;
use support::{LogBuffer, ProxyInNamespace};

const SESSIONS: usize = 64;
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn socks_connect(px: SocketAddr, sv: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(px).expect("connect proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).ok();
    let IpAddr::V4(ip) = sv.ip() else {
        unreachable!("IPv4 server")
    };
    // Greeting and request in one write, as a client that does not wait may send them.
    let mut msg = vec![5, 1, 0, 5, 1, 0, 1];
    msg.extend_from_slice(&ip.octets());
    msg.extend_from_slice(&sv.port().to_be_bytes());
    (&s).write_all(&msg).expect("greeting and request");
    let mut rep = [0u8; 12];
    (&s).read_exact(&mut rep).expect("selection and reply");
    assert_eq!(&rep[..4], &[5, 0, 5, 0], "CONNECT succeeded");
    s
}

#[test]
fn many_concurrent_short_sessions_are_all_spliced() {
    if !msocks_testbed::require_root("many_concurrent_short_sessions_are_all_spliced") {
        return;
    }
    let logs = LogBuffer::capture();
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7005);
    let config = support::kernel_config(px_addr);
    let proxy = ProxyInNamespace::start(&tb.px, config);

    let echo = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                let mut conns = Vec::new();
                for _ in 0..SESSIONS {
                    let (s, _) = l.accept().expect("accept");
                    conns.push(thread::spawn(move || {
                        s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                        // Echo until the client's FIN, then close.
                        let _ = std::io::copy(&mut &s, &mut &s);
                    }));
                }
                for c in conns {
                    c.join().expect("echo connection");
                }
            })
        })
        .expect("setns sv");

    let count = |text: &str, what: &str| text.lines().filter(|l| l.contains(what)).count();
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let logs = logs.clone();
            tb.mn
                .run_in(move || {
                    thread::spawn(move || {
                        let s = socks_connect(px_addr, sv_addr);
                        // Idle until every session is spliced (a bound for a failing run,
                        // not a measurement).
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while count(&logs.text(), "engine: spliced") < SESSIONS
                            && Instant::now() < deadline
                        {
                            thread::sleep(Duration::from_millis(20));
                        }
                        let msg: Vec<u8> = (0..1000).map(|k| (k + i) as u8).collect();
                        (&s).write_all(&msg).expect("send");
                        let mut back = vec![0u8; msg.len()];
                        (&s).read_exact(&mut back).expect("echo");
                        assert_eq!(back, msg, "echo of session {i}");
                        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                        let mut rest = Vec::new();
                        (&s).read_to_end(&mut rest).expect("server's FIN");
                        assert!(rest.is_empty(), "nothing after the echo");
                    })
                })
                .expect("setns mn")
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    echo.join().expect("echo server");

    // The sessions end once the proxy sees both FINs acknowledged; wait for their lines (a
    // bound for a failing run, not a measurement).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = logs.text();
        if count(&text, "completed (kernel splice)") >= SESSIONS || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    proxy.stop();
    let text = logs.text();
    assert_eq!(
        count(&text, "engine: spliced"),
        SESSIONS,
        "every session spliced:\n{text}"
    );
    assert_eq!(
        count(&text, "not spliced"),
        0,
        "no session relayed:\n{text}"
    );
    assert_eq!(
        count(&text, "completed (kernel splice)"),
        SESSIONS,
        "every session ended as a completed splice:\n{text}"
    );
}
