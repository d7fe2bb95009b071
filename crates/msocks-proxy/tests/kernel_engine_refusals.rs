//! RECONNECTs the kernel engine must refuse, on a live spliced MSOCKS session: impossible
//! counters, an impossible RESEND_FROM, an unknown token. Each gets its reply code
//! (PROTOCOL.md 3.7), and the session goes on as before on its old connection: the engine
//! stops the datapath to read the counters, so a refusal must start it again with no byte lost.
//! Then a correct RECONNECT moves the session and the stream goes on over the new connection.
//!
//! A raw client built on `msocks-proto` chooses every counter; its origins sit just below 2^64
//! and 2^63, so the checks run on counters that wrap.
//!
//! Needs root; without it the test prints SKIPPED, or fails when `CI` is set.

#![cfg(target_os = "linux")]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use msocks_proto::{
    Command, ConnectionId, Greeting, Method, MethodSelection, MobilityOptions, OpenRequest,
    ReconnectRequest, Reply, ReplyCode, ReplyContext, ReplyExtension, Request, ResumeCounters,
    SessionToken, TargetAddr,
};
use msocks_testbed::Testbed;
use support::{LogBuffer, ProxyInNamespace};

const IO_TIMEOUT: Duration = Duration::from_secs(20);
const READ_ORIGIN: u64 = u64::MAX - 4;
const WRITE_ORIGIN: u64 = (1 << 63) - 3;

fn read_reply(mut s: &TcpStream, ctx: ReplyContext) -> Reply {
    let mut buf = Vec::new();
    loop {
        if let Some((r, n)) = Reply::decode(&buf, ctx).expect("a well-formed reply") {
            assert_eq!(
                n,
                buf.len(),
                "nothing follows a reply before the client asks"
            );
            return r;
        }
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("reply byte");
        buf.push(b[0]);
    }
}

fn greet(proxy: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(proxy).expect("connect to the proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut out = Vec::new();
    Greeting {
        methods: vec![Method::NO_AUTH],
    }
    .encode(&mut out);
    (&s).write_all(&out).expect("greeting");
    let mut sel = [0u8; 2];
    (&s).read_exact(&mut sel).expect("method selection");
    let (sel, _) = MethodSelection::decode(&sel)
        .expect("selection")
        .expect("whole");
    assert_eq!(sel.method, Method::NO_AUTH);
    s
}

fn mconnect(proxy: SocketAddr, target: SocketAddr) -> (TcpStream, ConnectionId) {
    let s = greet(proxy);
    let mut out = Vec::new();
    Request::Open(OpenRequest {
        command: Command::Connect,
        target: TargetAddr::Ip(target),
        mobility: Some(MobilityOptions {
            oob_inline: true,
            read_origin: READ_ORIGIN,
            write_origin: WRITE_ORIGIN,
        }),
    })
    .encode(&mut out);
    (&s).write_all(&out).expect("request");
    let r = read_reply(&s, ReplyContext::MobileOpen);
    assert_eq!(r.code, ReplyCode::Succeeded, "{r:?}");
    let ReplyExtension::Connection(id) = r.extension else {
        panic!("no connection identifier: {r:?}")
    };
    (s, id)
}

/// Sends RECONNECT for `read`/`written` bytes of the stream (offsets from the origins), with
/// RESEND_FROM at `resend_from` when given but no bytes behind it; returns the reply.
fn reconnect(
    proxy: SocketAddr,
    id: &ConnectionId,
    token: Option<SessionToken>,
    read: u64,
    written: u64,
    resend_from: Option<u64>,
) -> (TcpStream, Reply) {
    let s = greet(SocketAddr::new(proxy.ip(), id.home.port()));
    let mut out = Vec::new();
    Request::Reconnect(ReconnectRequest {
        oob_inline: true,
        token: token.unwrap_or(id.token),
        data_read: READ_ORIGIN.wrapping_add(read),
        data_written: WRITE_ORIGIN.wrapping_add(written),
        resend_from: resend_from.map(|f| WRITE_ORIGIN.wrapping_add(f)),
    })
    .encode(&mut out);
    (&s).write_all(&out).expect("RECONNECT");
    let r = read_reply(&s, ReplyContext::Reconnect);
    (s, r)
}

/// Writes `msg` and reads the echo back.
fn echo(mut s: &TcpStream, msg: &[u8]) {
    s.write_all(msg).expect("write");
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, msg);
}

#[test]
fn kernel_engine_refuses_bad_reconnects_and_the_spliced_session_survives() {
    if !msocks_testbed::require_root(
        "kernel_engine_refuses_bad_reconnects_and_the_spliced_session_survives",
    ) {
        return;
    }
    let logs = LogBuffer::capture();
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let px_addr = SocketAddr::new(tb.px_wired_ip.into(), 1080);
    let sv_addr = SocketAddr::new(tb.sv_ip.into(), 7002);
    let config = support::kernel_config(px_addr);
    let proxy = ProxyInNamespace::start(&tb.px, config);

    // An echo server for one connection at a time, until the test ends.
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(sv_addr).expect("server bind"))
        .expect("setns sv");
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut s = s;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });

    let wait_for_log = |what: &str, n: usize| {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            let text = logs.text();
            if text.lines().filter(|l| l.contains(what)).count() >= n {
                return;
            }
            assert!(Instant::now() < deadline, "no {what:?} in the log:\n{text}");
            thread::sleep(Duration::from_millis(20));
        }
    };

    let client = tb
        .mn
        .run_in(|| {
            thread::scope(|scope| {
                scope
                    .spawn(|| {
                        let (old, id) = mconnect(px_addr, sv_addr);
                        echo(&old, b"0123456789");
                        wait_for_log("engine: spliced", 1);
                        // Spliced: these bytes cross the datapath, not the proxy process.
                        echo(&old, b"abcdefghij");
                        let (r, w) = (20u64, 20u64);

                        // data_read beyond what the proxy sent; data_written behind what
                        // the server has; data_written a TCP window ahead; data_read half
                        // the counter space ahead. Each is 0x81, and the old connection still carries the
                        // stream both ways afterwards.
                        for (read, written) in [
                            (r + 1, w),
                            (r, w - 1),
                            (r, w + (1 << 40)),
                            (r.wrapping_add(1 << 63), w),
                        ] {
                            let (_, reply) = reconnect(px_addr, &id, None, read, written, None);
                            assert_eq!(
                                reply.code,
                                ReplyCode::BadCounters,
                                "read={read} written={written}"
                            );
                            echo(&old, b"still here");
                        }
                        let (r, w) = (r + 40, w + 40);

                        // RESEND_FROM beyond what the server received (a hole).
                        let (_, reply) = reconnect(px_addr, &id, None, r, w + 10, Some(w + 5));
                        assert_eq!(reply.code, ReplyCode::BadCounters, "RESEND_FROM");
                        echo(&old, b"still here");
                        let (r, w) = (r + 10, w + 10);

                        // A token no session has.
                        let mut token = id.token;
                        token.0[0] ^= 0xff;
                        let (_, reply) = reconnect(px_addr, &id, Some(token), r, w, None);
                        assert_eq!(reply.code, ReplyCode::UnknownSession, "unknown token");
                        echo(&old, b"still here");
                        let (r, w) = (r + 10, w + 10);

                        // A correct RECONNECT moves the spliced session: nothing to resend
                        // either way, and the stream goes on over the new connection.
                        let (new, reply) = reconnect(px_addr, &id, None, r, w, None);
                        assert_eq!(reply.code, ReplyCode::Succeeded, "{reply:?}");
                        assert_eq!(
                            reply.extension,
                            ReplyExtension::Resume(ResumeCounters {
                                data_write: 0,
                                data_salvage: 0
                            })
                        );
                        new.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
                        echo(&new, b"moved on, byte for byte");
                        // The old connection is retired: nothing more arrives on it.
                        old.set_read_timeout(Some(Duration::from_millis(300)))
                            .expect("timeout");
                        let mut rest = [0u8; 64];
                        if let Ok(n) = (&old).read(&mut rest) {
                            assert_eq!(n, 0, "bytes on the retired connection");
                        }
                        echo(&new, b"and again");
                    })
                    .join()
            })
        })
        .expect("setns mn");
    let text = logs.text();
    proxy.stop();
    if let Err(panic) = client {
        eprintln!("proxy log:\n{text}");
        std::panic::resume_unwind(panic);
    }
    assert!(
        !text.contains("engine: not spliced"),
        "the session fell back to the relay engine:\n{text}"
    );
    // The move was done by the kernel engine, and every refusal left the session in place.
    assert!(
        text.contains("session resumed on a new connection (kernel splice)"),
        "the kernel engine did not move the session:\n{text}"
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("(0x81); session unchanged"))
            .count(),
        5,
        "five refusals by the kernel engine:\n{text}"
    );
}
