//! End to end: an unmodified curl, with no proxy option, run by `msocks run` in the mobile
//! node of the namespace testbed, downloads 64 MiB from an HTTP server in the server
//! namespace while its stream is moved between the wired and the radio link — by hand with
//! `msocks move` and by pulling the wired link — and the file is byte-exact (SHA-256), from a
//! single TCP connection at the server.
//!
//! Needs root; without it the test prints SKIPPED and returns (with `CI` set, it fails).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use msocks_testbed::{Link, Testbed};
use support::agent_testbed::{run_cli, setup};
use support::{random_bytes, require_tool, sha256_file, sha256_hex, CURL_BASE_ARGS, MSOCKS_BIN};

const PORT: u16 = 8080;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
/// Slow enough that the moves happen mid-download (about 8 s in all).
const RATE: u64 = 8 * MIB;

/// An HTTP server in `sv` for one request: answers it with `body` at `rate` bytes per second,
/// then reports how many more connections were waiting (there should be none: the moves
/// must not show at the server).
fn paced_http(tb: &Testbed, body: Arc<Vec<u8>>, rate: u64) -> JoinHandle<usize> {
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(SocketAddr::from((tb.sv_ip, PORT))))
        .expect("enter sv")
        .expect("bind the HTTP server");
    thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        serve(conn, &body, rate);
        listener.set_nonblocking(true).expect("nonblocking");
        let mut extra = 0;
        while listener.accept().is_ok() {
            extra += 1;
        }
        extra
    })
}

fn serve(mut conn: TcpStream, body: &[u8], rate: u64) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read the request");
        assert!(n > 0, "the client closed before its request ended");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"GET /big "), "request: {head:?}");
    let header = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(header.as_bytes()).expect("write the header");
    let start = Instant::now();
    let mut sent = 0u64;
    for chunk in body.chunks(64 * 1024) {
        conn.write_all(chunk).expect("write the body");
        sent += chunk.len() as u64;
        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
    // Until the client closes: an orderly end, no reset.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

#[test]
fn unmodified_curl_under_msocks_run_survives_moves_mid_download() {
    if !msocks_testbed::require_root("unmodified_curl_under_msocks_run_survives_moves_mid_download")
    {
        return;
    }
    if !require_tool("curl") {
        return;
    }
    let s = setup("shim", |_| String::new());
    let tb = &s.tb;
    let body = Arc::new(random_bytes(SIZE as usize, 0x5eed));
    let want = sha256_hex(&body);
    let server = paced_http(tb, body, RATE);

    let out = s.dir.join("big.download");
    let curl_log = s.dir.join("curl.log");
    let url = format!("http://{}:{PORT}/big", tb.sv_ip);
    let mut cmd = tb.mn.command(MSOCKS_BIN);
    support::clear_proxy_env(&mut cmd);
    let mut child = cmd
        .env_remove("LD_PRELOAD")
        .args(["run", "--log", "--", "curl"])
        .args(CURL_BASE_ARGS)
        .arg("-o")
        .arg(&out)
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&curl_log).expect("curl log"))
        .spawn()
        .expect("start msocks run -- curl");
    let log = || std::fs::read_to_string(&curl_log).unwrap_or_default();

    let have = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let wait_bytes = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while have() < n {
            assert!(
                Instant::now() < deadline,
                "download stalled at {} bytes; curl log:\n{}",
                have(),
                log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    };

    wait_bytes(8 * MIB);
    let row = s.wait_stream(PORT, "on wired0 (default order)", |r| {
        r.outbound == "wired0" && r.inbound == "wired0"
    });
    // The agent's client is curl itself, not a helper.
    assert_eq!(row.program.as_deref(), Some("curl"), "{row:?}");
    assert_eq!(row.destination, format!("{}:{PORT}", tb.sv_ip));

    // By hand: onto the radio link, then back to the policy.
    let out_cli = run_cli(tb, &s.control(), &["move", "--all", "radio0"]);
    assert!(out_cli.contains("moved to radio0"), "{out_cli}");
    let r1 = s.wait_stream(PORT, "pinned on radio0", |r| {
        r.outbound == "radio0" && r.inbound == "radio0" && r.moves >= 1
    });
    wait_bytes(24 * MIB);
    run_cli(tb, &s.control(), &["move", "--all", "auto"]);
    let r2 = s.wait_stream(PORT, "back on wired0", |r| {
        r.outbound == "wired0" && r.moves > r1.moves
    });

    // Hard: the wired link is pulled under the stream, then restored.
    wait_bytes(36 * MIB);
    assert!(
        have() < SIZE,
        "the download ended before the link was pulled"
    );
    tb.link_down(Link::Wired).expect("wired link down");
    let r3 = s.wait_stream(PORT, "moved to radio0 by the link going down", |r| {
        r.outbound == "radio0" && r.moves > r2.moves
    });
    wait_bytes(48 * MIB);
    tb.link_up(Link::Wired).expect("wired link up");
    let r4 = s.wait_stream(PORT, "back on wired0 when it returned", |r| {
        r.outbound == "wired0" && r.moves > r3.moves
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for curl") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("curl did not finish; log:\n{}", log());
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "curl: {status}; log:\n{}", log());
    assert_eq!(have(), SIZE, "bytes on disk");
    assert_eq!(
        sha256_file(&out),
        want,
        "download through 4 moves must be byte-exact"
    );
    assert_eq!(
        server.join().expect("server thread"),
        0,
        "the server saw more than one connection"
    );
    let log = log();
    assert!(
        log.contains(&format!("via agent 127.0.0.1:1080 as {}:{PORT}", tb.sv_ip)),
        "{log}"
    );
    eprintln!(
        "curl under msocks run: {SIZE} bytes, moves {}, sha256 {want}",
        r4.moves
    );
}
