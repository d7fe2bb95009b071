//! How long a new session's first request/response takes through the proxy, relay engine
//! beside kernel engine: the client sends one byte the moment it has read the CONNECT
//! reply, then a second one after the echo, 12 sessions each, and prints the two round
//! trips of every session. On the kernel engine a request that meets the splice's HOLD is
//! taken without its payload and comes again only with its sender's tail loss probe (two
//! RTTs plus 200 ms for a lone segment); `[engine] relay_first` exists to avoid that.
//!
//! A measurement, not a check: `#[ignore]`d, run it by hand as root with
//! `cargo test -p msocks-proxy --test kernel_first_exchange -- --ignored --nocapture`.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use msocks_proxy::config::EngineConfig;
use msocks_proxy::ProxyConfig;
use msocks_testbed::Testbed;
use support::ProxyInNamespace;

/// Round trips (first, second) of `sessions` fresh sessions through the proxy `config`
/// describes (listening on the proxy's wired address, port 1080).
fn first_exchanges(
    config: impl Fn(SocketAddr) -> ProxyConfig,
    sessions: usize,
) -> Vec<(u128, u128)> {
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7001);
    let proxy = ProxyInNamespace::start(&tb.px, config(px_addr));
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(sv_addr).expect("echo server bind"))
        .expect("setns sv");
    thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n @ 1..) = (&s).read(&mut b) {
                    if (&s).write_all(&b[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let times = tb
        .mn
        .run_in(move || {
            (0..sessions)
                .map(|_| {
                    let s = support::socks5_connect(px_addr, sv_addr, Duration::from_secs(5));
                    s.set_nodelay(true).expect("nodelay");
                    let rtt = || {
                        let t = Instant::now();
                        (&s).write_all(b"x").expect("request");
                        let mut b = [0u8; 1];
                        (&s).read_exact(&mut b).expect("echo");
                        t.elapsed().as_micros()
                    };
                    let pair = (rtt(), rtt());
                    thread::sleep(Duration::from_millis(50));
                    pair
                })
                .collect::<Vec<_>>()
        })
        .expect("setns mn");
    proxy.stop();
    times
}

#[test]
#[ignore = "a measurement; run by hand as root"]
fn first_request_round_trips_relay_vs_kernel() {
    if !msocks_testbed::require_root("first_request_round_trips_relay_vs_kernel") {
        return;
    }
    let relay = first_exchanges(
        |listen| ProxyConfig {
            listen: vec![listen],
            ..ProxyConfig::default()
        },
        12,
    );
    eprintln!("relay engine, µs (first, second): {relay:?}");
    for relay_first in [Duration::ZERO, EngineConfig::default().relay_first] {
        let kernel = first_exchanges(
            |listen| {
                let mut c = support::kernel_config(listen);
                c.engine.relay_first = relay_first;
                c
            },
            12,
        );
        eprintln!("kernel engine, relay_first = {relay_first:?}, µs (first, second): {kernel:?}");
    }
}
