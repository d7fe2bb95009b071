//! One-byte ping-pong latency and one-stream bulk throughput through the
//! kernel splice, beside plain IP forwarding through the same proxy host:
//! the measurements the paper's claim ("competitive with IP router
//! performance") calls for.
//!
//! A measurement, not a check: `#[ignore]`d, run it by hand as root with
//! `cargo test --release -p msocks-splice --test latency -- --ignored --nocapture --test-threads 1`.

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use msocks_splice::Hook;
use msocks_testbed::Testbed;

const ROUNDS: usize = 5000;

fn ping_pong(s: &TcpStream) -> Vec<Duration> {
    let mut out = Vec::with_capacity(ROUNDS);
    let mut b = [0u8; 1];
    for i in 0..ROUNDS {
        let t = Instant::now();
        (&*s).write_all(&[i as u8]).expect("ping");
        (&*s).read_exact(&mut b).expect("pong");
        out.push(t.elapsed());
    }
    out
}

fn summary(name: &str, mut v: Vec<Duration>) -> Duration {
    v.sort();
    let median = v[v.len() / 2];
    let p99 = v[v.len() * 99 / 100];
    eprintln!(
        "{name:<16} median {median:?}  p99 {p99:?}  ({} rounds)",
        v.len()
    );
    median
}

#[test]
#[ignore = "a measurement; run by hand as root"]
fn one_byte_latency_splice_vs_ip_forwarding() {
    if !msocks_testbed::require_root("one_byte_latency_splice_vs_ip_forwarding") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7101);
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 7100);

    // Echo server for two connections.
    let server = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                for _ in 0..2 {
                    let (s, _) = l.accept().expect("accept");
                    s.set_nodelay(true).ok();
                    let mut b = [0u8; 1];
                    while (&s).read_exact(&mut b).is_ok() {
                        if (&s).write_all(&b).is_err() {
                            break;
                        }
                    }
                }
            })
        })
        .expect("setns sv");

    // IP forwarding: straight to the server, routed by px.
    let forwarded = tb
        .mn
        .run_in(|| {
            let s = TcpStream::connect(sv_addr).expect("connect sv");
            s.set_nodelay(true).ok();
            ping_pong(&s)
        })
        .expect("setns mn");

    // Through the splice.
    let proxy = common::splicing_proxy(&tb, &dp, px_addr, sv_addr, None);
    let spliced = tb
        .mn
        .run_in(|| {
            let s = TcpStream::connect(px_addr).expect("connect px");
            s.set_nodelay(true).ok();
            // Let the proxy finish the splice before timing.
            thread::sleep(Duration::from_millis(200));
            let v = ping_pong(&s);
            drop(s);
            v
        })
        .expect("setns mn");
    proxy.join().expect("proxy");
    server.join().expect("server");
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");

    let f = summary("IP forwarding", forwarded);
    let s = summary("kernel splice", spliced);
    eprintln!(
        "splice / forwarding median: {:.2}",
        s.as_secs_f64() / f.as_secs_f64()
    );
}

const BULK: u64 = 2 << 30;

/// Sends `BULK` zero bytes and returns the elapsed time once the peer
/// has read them all and closed.
fn push(s: TcpStream) -> Duration {
    let buf = vec![0u8; 256 * 1024];
    let t = Instant::now();
    let mut left = BULK;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        (&s).write_all(&buf[..n]).expect("send");
        left -= n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut b = [0u8; 1];
    // The sink closes after reading everything.
    let _ = (&s).read(&mut b);
    t.elapsed()
}

#[test]
#[ignore = "a measurement; run by hand as root"]
fn bulk_throughput_splice_vs_ip_forwarding() {
    if !msocks_testbed::require_root("bulk_throughput_splice_vs_ip_forwarding") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7111);
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 7110);
    let sink = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                for _ in 0..2 {
                    let (mut s, _) = l.accept().expect("accept");
                    std::io::copy(&mut s, &mut std::io::sink()).expect("sink");
                }
            })
        })
        .expect("setns sv");
    let forwarded = tb
        .mn
        .run_in(|| push(TcpStream::connect(sv_addr).expect("connect sv")))
        .expect("setns mn");
    let proxy = common::splicing_proxy(&tb, &dp, px_addr, sv_addr, None);
    let spliced = tb
        .mn
        .run_in(|| {
            let s = TcpStream::connect(px_addr).expect("connect px");
            thread::sleep(Duration::from_millis(200));
            push(s)
        })
        .expect("setns mn");
    proxy.join().expect("proxy");
    sink.join().expect("sink");
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");
    let rate = |d: Duration| BULK as f64 / d.as_secs_f64() / 1e9;
    eprintln!("IP forwarding    {:.2} GB/s", rate(forwarded));
    eprintln!("kernel splice    {:.2} GB/s", rate(spliced));
}
