//! Moving a splice to a new client connection (the mechanism the paper's
//! RECONNECT needs, without its wire format): in the testbed a client on
//! the wired link exchanges 16 MiB each way with the server through a
//! splice; after 4 MiB the wired link goes down (a hard hand-off), the
//! client connects again over the radio link and says where it is, the
//! proxy suspends the splice, answers with the resume points the datapath
//! recorded (what each side had acknowledged), and resplices the server's
//! connection to the new one. The client salvages what its old socket had
//! acknowledged, sends again what the server had not, and both ends must
//! end with exactly the other's 16 MiB (SHA-256).
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod common;
#[allow(dead_code)]
mod evidence;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use evidence::{digest, fill, recv_all};
use msocks_splice::{splice, Hook, Status};
use msocks_testbed::{Link, Testbed};
use sha2::{Digest, Sha256};

const TOTAL: u64 = 16 << 20;
const MOVE_AFTER: u64 = 4 << 20;
const UP: u64 = 1;
const DOWN: u64 = 2;

/// Writes the pattern from `from` up to `TOTAL` until `stop` is set;
/// returns the offset reached (bytes handed to the kernel).
fn send_from(s: &TcpStream, seed: u64, from: u64, stop: &AtomicBool) -> u64 {
    s.set_write_timeout(Some(Duration::from_millis(50))).ok();
    let mut buf = vec![0u8; 16 * 1024];
    let mut off = from;
    while off < TOTAL && !stop.load(Ordering::SeqCst) {
        let n = (TOTAL - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        let mut done = 0;
        while done < n && !stop.load(Ordering::SeqCst) {
            match (&*s).write(&buf[done..n]) {
                Ok(k) => done += k,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("send: {e}"),
            }
        }
        off += done as u64;
    }
    off
}

#[test]
fn a_hard_handoff_resplices_to_a_new_connection_without_loss() {
    if !msocks_testbed::require_root("a_hard_handoff_resplices_to_a_new_connection_without_loss") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dp = common::datapath_on_px(&tb, Hook::Auto);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7401);
    let px_wired = SocketAddr::new(tb.px_wired_ip.into(), 7400);
    let px_radio = SocketAddr::new(tb.px_radio_ip.into(), 7402);
    let mn_wired = SocketAddr::new(tb.mn_wired_ip.into(), 0);
    let mn_radio = SocketAddr::new(tb.mn_radio_ip.into(), 0);

    let server = tb
        .sv
        .run_in(|| {
            let l = TcpListener::bind(sv_addr).expect("bind");
            thread::spawn(move || {
                let (s, _) = l.accept().expect("accept");
                s.set_read_timeout(Some(Duration::from_secs(60))).ok();
                let s2 = s.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    let never = AtomicBool::new(false);
                    send_from(&s2, DOWN, 0, &never);
                    s2.shutdown(Shutdown::Write).expect("shutdown");
                });
                let got = recv_all(&s).expect("server read");
                sender.join().expect("server sender");
                got
            })
        })
        .expect("setns sv");

    let dp2 = Arc::clone(&dp);
    let proxy = tb
        .px
        .run_in(move || {
            let l1 = TcpListener::bind(px_wired).expect("bind wired");
            let l2 = TcpListener::bind(px_radio).expect("bind radio");
            thread::spawn(move || -> (u64, u64) {
                let (c, _) = l1.accept().expect("accept");
                let s = TcpStream::connect(sv_addr).expect("connect");
                let mut spliced = splice(&dp2, c, s, Duration::from_secs(5))
                    .unwrap_or_else(|r| panic!("splice refused: {}", r.error));
                // The move: a new connection from the client.
                let (c2, _) = l2.accept().expect("accept radio");
                let mut hello = [0u8; 8];
                (&c2).read_exact(&mut hello).expect("resume request");
                assert_eq!(&hello, b"RESUME!!");
                let (down_acked, up_acked) = spliced.suspend().expect("suspend");
                let (drained_up, drained_down) = spliced.drained();
                let down_from = drained_down + u64::from(down_acked);
                let up_from = drained_up + u64::from(up_acked);
                spliced
                    .prepare_client(&c2)
                    .expect("HOLD the new connection");
                let mut reply = down_from.to_be_bytes().to_vec();
                reply.extend_from_slice(&up_from.to_be_bytes());
                let spliced = spliced
                    .resplice_client(
                        c2,
                        msocks_splice::Resume::default(),
                        &reply,
                        false,
                        Duration::from_secs(5),
                    )
                    .unwrap_or_else(|f| panic!("resplice: {}", f.error));
                let deadline = Instant::now() + Duration::from_secs(120);
                while spliced.status().expect("status") != Status::Finished {
                    assert!(
                        Instant::now() < deadline,
                        "the resplice never finished: {:?}",
                        spliced.entries()
                    );
                    thread::sleep(Duration::from_millis(20));
                }
                thread::sleep(Duration::from_millis(300));
                spliced.teardown();
                (down_from, up_from)
            })
        })
        .expect("setns px");

    // The client, step 1: the wired connection, until MOVE_AFTER bytes came.
    let (moved_tx, moved_rx) = mpsc::channel::<()>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let client = tb
        .mn
        .run_in(move || {
            thread::spawn(move || -> (Vec<u8>, u64, u64, u64) {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                sock.bind(&mn_wired.into()).expect("bind wired");
                sock.connect(&px_wired.into()).expect("connect wired");
                let old: TcpStream = sock.into();
                old.set_read_timeout(Some(Duration::from_secs(60))).ok();
                let stop = Arc::new(AtomicBool::new(false));
                let old2 = old.try_clone().expect("clone");
                let stop2 = Arc::clone(&stop);
                let sender = thread::spawn(move || send_from(&old2, UP, 0, &stop2));
                let mut h = Sha256::new();
                let mut got = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                while got < MOVE_AFTER {
                    let k = (&old).read(&mut buf).expect("read old");
                    assert!(k > 0, "early EOF");
                    h.update(&buf[..k]);
                    got += k as u64;
                }
                // Hand-off: the test takes the wired link down.
                ready_tx.send(()).expect("signal");
                moved_rx.recv().expect("moved");
                stop.store(true, Ordering::SeqCst);
                let written = sender.join().expect("old sender");

                // Step 2: the radio connection and the resume points.
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .expect("socket");
                sock.bind(&mn_radio.into()).expect("bind radio");
                sock.connect(&px_radio.into()).expect("connect radio");
                let new: TcpStream = sock.into();
                new.set_read_timeout(Some(Duration::from_secs(60))).ok();
                (&new).write_all(b"RESUME!!").expect("request");
                let mut reply = [0u8; 16];
                (&new).read_exact(&mut reply).expect("reply");
                let down_from = u64::from_be_bytes(reply[..8].try_into().expect("8"));
                let up_from = u64::from_be_bytes(reply[8..].try_into().expect("8"));
                assert!(
                    up_from <= written,
                    "the server acknowledged bytes never sent"
                );

                // Salvage: what the old socket acknowledged is in its queue.
                while got < down_from {
                    let want = ((down_from - got) as usize).min(buf.len());
                    let k = (&old).read(&mut buf[..want]).expect("salvage");
                    assert!(k > 0, "salvage ended early");
                    h.update(&buf[..k]);
                    got += k as u64;
                }
                drop(old);
                // Send again what the server had not acknowledged.
                let new2 = new.try_clone().expect("clone");
                let sender = thread::spawn(move || {
                    let never = AtomicBool::new(false);
                    let end = send_from(&new2, UP, up_from, &never);
                    new2.shutdown(Shutdown::Write).expect("shutdown");
                    end
                });
                // The new connection carries the server's stream from
                // down_from; skip what the application already read.
                let mut skip = got - down_from;
                loop {
                    let k = (&new).read(&mut buf).expect("read new");
                    if k == 0 {
                        break;
                    }
                    let drop_n = (skip as usize).min(k);
                    skip -= drop_n as u64;
                    h.update(&buf[drop_n..k]);
                    got += (k - drop_n) as u64;
                }
                assert_eq!(sender.join().expect("new sender"), TOTAL);
                (h.finalize().to_vec(), got, down_from, up_from)
            })
        })
        .expect("setns mn");

    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("client got 4 MiB");
    tb.link_down(Link::Wired).expect("link down");
    moved_tx.send(()).expect("signal");

    let (c_sha, c_n, down_from, up_from) = client.join().expect("client");
    let (p_down, p_up) = proxy.join().expect("proxy");
    let (s_n, s_sha) = server.join().expect("server");
    let stats = dp.lock().expect("lock").stats().expect("stats");
    eprintln!("resumed at down {down_from} / up {up_from}; counters {stats:?}");
    assert_eq!((p_down, p_up), (down_from, up_from));
    assert_eq!(c_n, TOTAL, "bytes the client got");
    assert_eq!(c_sha, digest(DOWN, TOTAL), "the client's SHA-256");
    assert_eq!(s_n, TOTAL, "bytes the server got");
    assert_eq!(s_sha, digest(UP, TOTAL), "the server's SHA-256");
    let dp = Arc::try_unwrap(dp)
        .expect("owner")
        .into_inner()
        .expect("lock");
    tb.px.run_in(move || drop(dp)).expect("setns px");
}
