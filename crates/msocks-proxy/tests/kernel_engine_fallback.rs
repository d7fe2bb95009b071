//! Where the kernel engine cannot load, the proxy says so once and serves every session on
//! the relay engine. Here it cannot attach (the configured interface does not exist); two
//! CONNECT sessions from the testbed's mobile node to an echo server must still work, with
//! one "unavailable" log line in all and one "not spliced" line per session.
//!
//! Its own test binary: the engine is loaded once per process.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use msocks_testbed::Testbed;
use support::{LogBuffer, ProxyInNamespace};

fn socks_connect(px: SocketAddr, sv: SocketAddr) -> TcpStream {
    support::socks5_connect(px, sv, Duration::from_secs(20))
}

#[test]
fn an_engine_that_cannot_load_leaves_sessions_on_the_relay() {
    if !msocks_testbed::require_root("an_engine_that_cannot_load_leaves_sessions_on_the_relay") {
        return;
    }
    let logs = LogBuffer::capture();

    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7002);

    let mut config = support::kernel_config(px_addr);
    config.engine.interfaces = vec!["nosuchif0".to_owned()];
    let proxy = ProxyInNamespace::start(&tb.px, config);

    let echo = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                for _ in 0..2 {
                    let (s, _) = l.accept().expect("accept");
                    let _ = io::copy(&mut &s, &mut &s);
                }
            })
        })
        .expect("setns sv");

    for round in 0..2u8 {
        tb.mn
            .run_in(|| {
                let s = socks_connect(px_addr, sv_addr);
                let msg = [round; 1000];
                (&s).write_all(&msg).expect("send");
                let mut back = [0u8; 1000];
                (&s).read_exact(&mut back).expect("echo");
                assert_eq!(back, msg, "echoed through the relay");
            })
            .expect("setns mn");
    }
    proxy.stop();
    echo.join().expect("echo");

    let text = logs.text();
    let unavailable = text
        .lines()
        .filter(|l| l.contains("kernel splice engine unavailable"))
        .count();
    let relayed = text
        .lines()
        .filter(|l| l.contains("engine: not spliced") && l.contains("relay"))
        .count();
    assert_eq!(
        unavailable, 1,
        "one clear line, not one per session:\n{text}"
    );
    assert_eq!(
        relayed, 2,
        "each session says which engine it uses:\n{text}"
    );
}
