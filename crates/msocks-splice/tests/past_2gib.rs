//! A spliced stream longer than 2 GiB. The datapath's "below the splice point" check compares
//! 32-bit sequence numbers with the splice point; from 2 GiB past it, such a comparison calls
//! every segment "below", so the payload was chopped off every time it was sent and the
//! stream stalled there for good (or, at exactly 2 GiB, its FIN was dropped every time). Here
//! 2 GiB + 64 MiB cross one splice and must all arrive, followed by the FIN.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use msocks_splice::Hook;
use msocks_testbed::Testbed;

const BULK: u64 = (2 << 30) + (64 << 20);
/// A stalled stream fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_splice_carries_more_than_2_gib() {
    if !msocks_testbed::require_root("a_splice_carries_more_than_2_gib") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7120);
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 7121);
    let sink = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                let (mut s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return Ok(total),
                        Ok(n) => total += n as u64,
                        Err(e) => return Err(format!("after {total} bytes: {e}")),
                    }
                }
            })
        })
        .expect("setns sv");
    // Until both FINs are through, or long enough for a failure to show.
    let proxy = common::splicing_proxy(&tb, &dp, px_addr, sv_addr, Some(Duration::from_secs(60)));
    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || {
                let s = TcpStream::connect(px_addr).expect("connect px");
                s.set_write_timeout(Some(IO_TIMEOUT)).ok();
                s.set_read_timeout(Some(IO_TIMEOUT)).ok();
                // Let the splice be installed before the bulk starts.
                thread::sleep(Duration::from_millis(200));
                let buf = vec![0x5au8; 1 << 20];
                let mut left = BULK;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if let Err(e) = (&s).write_all(&buf[..n]) {
                        return Err(format!("sending, {} bytes left: {e}", left));
                    }
                    left -= n as u64;
                }
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
                // The sink closes after reading everything: wait for its FIN.
                let mut b = [0u8; 1];
                (&s).read(&mut b)
                    .map_err(|e| format!("waiting for the FIN: {e}"))?;
                Ok(())
            })
        })
        .expect("setns mn");
    let sent = client.join().expect("client");
    let received = sink.join().expect("sink");
    proxy.join().expect("proxy");
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");
    assert_eq!(sent, Ok(()), "the client's side");
    assert_eq!(received, Ok(BULK), "bytes the server received");
}
