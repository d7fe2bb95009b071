//! `msocks run` and the LD_PRELOAD shim on loopback, no root needed: unmodified programs
//! (curl, python3) with no proxy setting, a SOCKS5 server in the test standing in for the
//! agent (it records every request and relays to a local HTTP server whatever the
//! destination, so names and addresses that exist nowhere can be used; no packet leaves
//! loopback).
//!
//! The end-to-end test with the real agent moving the stream between links is in
//! `shim_testbed.rs`.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use msocks_proto::{MethodSelection, Reply, ReplyCode, Request, TargetAddr};
use support::{
    assert_success, clear_proxy_env, random_bytes, require_tool, run_with_timeout, sha256_file,
    sha256_hex, HttpServer, TempDir, CURL_BASE_ARGS, MSOCKS_BIN, TOOL_TIMEOUT,
};

/// Destination port the stub answers with 0x05 (connection refused).
const REFUSED_PORT: u16 = 9;
/// Destination port the stub answers with 0x02 (not allowed).
const FORBIDDEN_PORT: u16 = 7;

/// A SOCKS5 server (no authentication, CONNECT) that records the requested destinations and
/// connects every one of them to `backend`.
struct SocksStub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl SocksStub {
    fn start(backend: SocketAddr) -> SocksStub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the SOCKS5 stub");
        let addr = listener.local_addr().expect("stub address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        // The acceptor ends with the test process; each connection has its own thread.
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = log.clone();
                thread::spawn(move || {
                    let _ = serve_socks(conn, backend, &log);
                });
            }
        });
        SocksStub { addr, seen }
    }

    /// The destinations asked for so far, as `TargetAddr` displays them.
    fn seen(&self) -> Vec<String> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

fn serve_socks(
    mut c: TcpStream,
    backend: SocketAddr,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut g = [0u8; 2];
    c.read_exact(&mut g)?;
    let mut methods = vec![0u8; usize::from(g[1])];
    c.read_exact(&mut methods)?;
    let mut out = Vec::new();
    MethodSelection {
        method: msocks_proto::Method::NO_AUTH,
    }
    .encode(&mut out);
    c.write_all(&out)?;
    // Byte by byte: nothing past the request may be consumed.
    let mut buf = Vec::new();
    let req = loop {
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        buf.push(b[0]);
        match Request::decode(&buf) {
            Ok(Some((r, _))) => break r,
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    };
    let Request::Open(open) = req else {
        return Ok(());
    };
    log.lock()
        .map_err(|_| std::io::Error::other("poisoned"))?
        .push(open.target.to_string());
    let code = match open.target.port() {
        REFUSED_PORT => Some(ReplyCode::ConnectionRefused),
        FORBIDDEN_PORT => Some(ReplyCode::NotAllowed),
        _ => None,
    };
    let mut out = Vec::new();
    if let Some(code) = code {
        Reply::failure(code).encode(&mut out);
        c.write_all(&out)?;
        return Ok(());
    }
    let up = TcpStream::connect(backend)?;
    Reply::success(TargetAddr::Ip(up.local_addr()?)).encode(&mut out);
    c.write_all(&out)?;
    c.set_read_timeout(None)?;
    let (mut c2, mut up2) = (c.try_clone()?, up.try_clone()?);
    let t = thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut up2);
        let _ = up2.shutdown(Shutdown::Write);
    });
    let (mut c, mut up) = (c, up);
    let _ = std::io::copy(&mut up, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = t.join();
    Ok(())
}

/// `msocks run --agent AGENT ARGS -- PROGRAM...` with the caller's proxy variables removed.
fn msocks_run(agent: SocketAddr, run_args: &[&str], program: &[&str]) -> Command {
    let mut cmd = Command::new(MSOCKS_BIN);
    clear_proxy_env(&mut cmd);
    cmd.env_remove("LD_PRELOAD")
        .env_remove("MSOCKS_SHIM")
        .arg("run")
        .arg("--agent")
        .arg(agent.to_string())
        .args(run_args)
        .arg("--")
        .args(program);
    cmd
}

fn curl_args(url: &str, out: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = vec!["curl".into()];
    v.extend(CURL_BASE_ARGS.iter().map(|s| s.to_string()));
    v.extend(["-o".into(), out.display().to_string(), url.into()]);
    v
}

#[test]
fn curl_without_proxy_flags_goes_through_the_agent_by_name_and_by_address() {
    if !require_tool("curl") {
        return;
    }
    let body = random_bytes(3 << 20, 61);
    let http = HttpServer::start(body.clone());
    let stub = SocksStub::start(http.addr());
    let dir = TempDir::new("shim-curl");

    // A name: resolved by the agent (the stub sees DOMAINNAME), curl sees a placeholder.
    let out = dir.join("by-name");
    let args = curl_args("http://files.msocks-test.invalid:8080/big", &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_with_timeout(&mut msocks_run(stub.addr, &["--log"], &args), TOOL_TIMEOUT);
    assert_success("curl by name under msocks run", &r);
    assert_eq!(sha256_file(&out), sha256_hex(&body), "download by name");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("placeholder 198.18.") && stderr.contains("via agent"),
        "{stderr}"
    );

    // An address (TEST-NET-1: the stub relays it to the local server; nothing leaves).
    let out = dir.join("by-address");
    let args = curl_args("http://192.0.2.10:8081/big", &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_with_timeout(&mut msocks_run(stub.addr, &[], &args), TOOL_TIMEOUT);
    assert_success("curl by address under msocks run", &r);
    assert_eq!(sha256_file(&out), sha256_hex(&body), "download by address");
    assert!(r.stderr.is_empty(), "no log without --log: {r:?}");

    // Loopback is left alone: straight to the server, the stub sees nothing new.
    let out = dir.join("loopback");
    let args = curl_args(&http.url("127.0.0.1", "big"), &out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_with_timeout(&mut msocks_run(stub.addr, &[], &args), TOOL_TIMEOUT);
    assert_success("curl to loopback under msocks run", &r);
    assert_eq!(
        sha256_file(&out),
        sha256_hex(&body),
        "download from loopback"
    );

    assert_eq!(
        stub.seen(),
        ["files.msocks-test.invalid:8080", "192.0.2.10:8081"],
        "requests the agent received"
    );
    assert_eq!(http.requests(), 3);
}

/// The python3 program: one line `name=value` per check, all of them exercised through the
/// interposed libc calls of an unmodified interpreter.
const PY_CHECKS: &str = r#"
import errno, json, os, select, selectors, socket, sys, tempfile

results = {}
def http_get(s):
    s.setblocking(True)
    s.settimeout(20)
    s.sendall(b"GET /x HTTP/1.0\r\nHost: t\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return len(body)

# Blocking IPv4 connect.
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("192.0.2.10", 80))
results["peer_v4"] = list(s.getpeername())
results["v4_blocking"] = http_get(s)

# An IPv6 socket to an IPv6 address, and to an IPv4-mapped one.
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.connect(("2001:db8::10", 80))
results["peer_v6"] = list(s.getpeername())
results["v6_blocking"] = http_get(s)
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.connect(("::ffff:192.0.2.11", 81))
results["peer_mapped"] = list(s.getpeername())
results["v6_mapped"] = http_get(s)

# Non-blocking connects waited for with epoll (selectors' default), select and poll.
def nonblocking(port, wait):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    rc = s.connect_ex(("192.0.2.12", port))
    if rc not in (0, errno.EINPROGRESS):
        return "connect_ex=%d" % rc
    if not wait(s):
        return "not writable"
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        return "SO_ERROR=%d" % err
    return http_get(s)

def by_epoll(s):
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_WRITE)
    ok = bool(sel.select(10))
    sel.close()
    return ok
def by_select(s):
    return bool(select.select([], [s], [], 10)[1])
def by_poll(s):
    p = select.poll()
    p.register(s, select.POLLOUT)
    return bool(p.poll(10000))
results["selector_kind"] = selectors.DefaultSelector.__name__
results["nb_epoll"] = nonblocking(82, by_epoll)
results["nb_select"] = nonblocking(83, by_select)
results["nb_poll"] = nonblocking(84, by_poll)

# Names: a placeholder address, connected to by name.
infos = socket.getaddrinfo("app.msocks-test.invalid", "http", 0, socket.SOCK_STREAM)
results["gai_addr"] = infos[0][4][0]
infos6 = socket.getaddrinfo("app.msocks-test.invalid", 85, socket.AF_INET6, socket.SOCK_STREAM)
results["gai6_addr"] = infos6[0][4][0]
s = socket.create_connection(("app.msocks-test.invalid", 86), timeout=20)
results["peer_name"] = list(s.getpeername())
results["by_name"] = http_get(s)
results["localhost"] = socket.getaddrinfo("localhost", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]

# Refusals come back as the errno a direct connect would give.
for port, key in ((9, "refused"), (7, "forbidden")):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.connect(("192.0.2.13", port))
        results[key] = "connected"
    except OSError as e:
        results[key] = errno.errorcode.get(e.errno, str(e.errno))
    s.close()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setblocking(False)
results["refused_nb"] = errno.errorcode.get(s.connect_ex(("192.0.2.13", 9)), "?")
s.close()

# Loopback goes straight to the server.
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
results["peer_loopback"] = list(s.getpeername())
results["loopback"] = http_get(s)

# Unix sockets and UDP are not touched.
d = tempfile.mkdtemp()
path = os.path.join(d, "u.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(1)
cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
cli.connect(path)
conn, _ = srv.accept()
cli.sendall(b"unix ok")
results["unix"] = conn.recv(100).decode()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.connect(("192.0.2.14", 53))
results["udp_peer"] = u.getpeername()[0]
print(json.dumps(results))
"#;

fn python_checks(stub: &SocksStub, http: &HttpServer, run_args: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("shim-py");
    let script = dir.write("checks.py", PY_CHECKS);
    let port = http.port().to_string();
    let script = script.display().to_string();
    let r = run_with_timeout(
        &mut msocks_run(stub.addr, run_args, &["python3", &script, &port]),
        TOOL_TIMEOUT,
    );
    assert_success("python3 checks under msocks run", &r);
    let stdout = String::from_utf8_lossy(&r.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn python_sockets_blocking_nonblocking_ipv6_names_and_errors() {
    if !require_tool("python3") {
        return;
    }
    let body = random_bytes(200_000, 62);
    let n = body.len() as u64;
    let http = HttpServer::start(body);
    let stub = SocksStub::start(http.addr());
    let v = python_checks(&stub, &http, &[]);
    for key in [
        "v4_blocking",
        "v6_blocking",
        "v6_mapped",
        "nb_epoll",
        "nb_select",
        "nb_poll",
        "by_name",
        "loopback",
    ] {
        assert_eq!(v[key].as_u64(), Some(n), "{key}: {v}");
    }
    assert_eq!(v["selector_kind"], "EpollSelector", "{v}");
    let placeholder = v["gai_addr"].as_str().unwrap_or_default();
    assert!(placeholder.starts_with("198.18."), "{v}");
    assert_eq!(v["gai6_addr"], format!("::ffff:{placeholder}"), "{v}");
    assert_eq!(v["localhost"], "127.0.0.1", "{v}");
    // getpeername shows the destination, as a direct connection would.
    assert_eq!(v["peer_v4"], serde_json::json!(["192.0.2.10", 80]), "{v}");
    assert_eq!(
        v["peer_v6"],
        serde_json::json!(["2001:db8::10", 80, 0, 0]),
        "{v}"
    );
    assert_eq!(
        v["peer_mapped"],
        serde_json::json!(["::ffff:192.0.2.11", 81, 0, 0]),
        "{v}"
    );
    assert_eq!(v["peer_name"], serde_json::json!([placeholder, 86]), "{v}");
    assert_eq!(
        v["peer_loopback"],
        serde_json::json!(["127.0.0.1", http.port()]),
        "{v}"
    );
    assert_eq!(v["refused"], "ECONNREFUSED", "{v}");
    assert_eq!(v["forbidden"], "EACCES", "{v}");
    assert_eq!(v["refused_nb"], "ECONNREFUSED", "{v}");
    assert_eq!(v["unix"], "unix ok", "{v}");
    assert_eq!(v["udp_peer"], "192.0.2.14", "{v}");
    assert_eq!(
        stub.seen(),
        [
            "192.0.2.10:80",
            "[2001:db8::10]:80",
            "192.0.2.11:81",
            "192.0.2.12:82",
            "192.0.2.12:83",
            "192.0.2.12:84",
            "app.msocks-test.invalid:86",
            "192.0.2.13:9",
            "192.0.2.13:7",
            "192.0.2.13:9",
        ],
        "requests the agent received (loopback, Unix and UDP absent)"
    );
}

#[test]
fn local_dns_mode_and_exclusions() {
    if !require_tool("python3") {
        return;
    }
    let http = HttpServer::start(b"hello".to_vec());
    let stub = SocksStub::start(http.addr());
    let dir = TempDir::new("shim-local");
    let script = dir.write(
        "local.py",
        r#"
import socket, sys
# In local mode the placeholder range is an ordinary address, sent as such.
s = socket.create_connection(("198.18.0.1", 80), timeout=20)
s.close()
# Excluded: connected directly (the address is refused at once by the kernel: nobody there).
s = socket.socket()
s.settimeout(5)
try:
    s.connect(("127.0.0.1", 1))
except OSError as e:
    print("direct", e.errno)
"#,
    );
    let script = script.display().to_string();
    let r = run_with_timeout(
        &mut msocks_run(
            stub.addr,
            &["--dns", "local", "--exclude", "192.0.2.0/24", "--log"],
            &["python3", &script],
        ),
        TOOL_TIMEOUT,
    );
    assert_success("python3 under msocks run --dns local", &r);
    assert_eq!(stub.seen(), ["198.18.0.1:80"]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("direct (Loopback)"), "{stderr}");

    // An excluded destination is never offered to the agent.
    let r = run_with_timeout(
        &mut msocks_run(
            stub.addr,
            &["--exclude", "192.0.2.0/24", "--log"],
            &[
                "python3",
                "-c",
                "import socket\ns=socket.socket()\ns.setblocking(False)\nprint(s.connect_ex(('192.0.2.1', 80)))",
            ],
        ),
        TOOL_TIMEOUT,
    );
    assert_success("python3 with --exclude", &r);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("direct (Excluded(192.0.2.0/24))"),
        "{stderr}"
    );
    assert_eq!(stub.seen(), ["198.18.0.1:80"]);
}

#[test]
fn unreachable_agent_fails_closed_and_run_reports_problems() {
    if !require_tool("curl") {
        return;
    }
    // A port nobody listens on.
    let gone = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = TempDir::new("shim-closed");
    let args = curl_args("http://192.0.2.10/", &dir.join("x"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_with_timeout(&mut msocks_run(gone, &[], &args), TOOL_TIMEOUT);
    assert_eq!(r.status.code(), Some(7), "curl: couldn't connect; {r:?}");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(
        stderr.contains("nothing answers at") && stderr.contains("no stream through the agent"),
        "{stderr}"
    );

    // Exit status and arguments pass through exec unchanged.
    let r = run_with_timeout(
        &mut msocks_run(gone, &[], &["sh", "-c", "exit 42", "--not-an-option"]),
        TOOL_TIMEOUT,
    );
    assert_eq!(r.status.code(), Some(42), "{r:?}");
    let r = run_with_timeout(
        &mut msocks_run(gone, &[], &["sh", "-c", "printf %s \"$LD_PRELOAD\""]),
        TOOL_TIMEOUT,
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).ends_with("libmsocks_shim.so"),
        "{r:?}"
    );
    let r = run_with_timeout(
        &mut msocks_run(gone, &[], &["no-such-program-msocks-test"]),
        TOOL_TIMEOUT,
    );
    assert_eq!(r.status.code(), Some(127), "{r:?}");

    // A static program cannot load the library: refused, not run.
    if std::path::Path::new("/sbin/ldconfig").exists() {
        let r = run_with_timeout(
            &mut msocks_run(gone, &[], &["/sbin/ldconfig", "--version"]),
            TOOL_TIMEOUT,
        );
        assert_eq!(r.status.code(), Some(1), "{r:?}");
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("statically linked"),
            "{r:?}"
        );
    }

    // A missing library is reported, not silently skipped.
    let r = run_with_timeout(
        msocks_run(gone, &[], &["true"]).env("MSOCKS_SHIM", "/nonexistent/libmsocks_shim.so"),
        TOOL_TIMEOUT,
    );
    assert_eq!(r.status.code(), Some(1), "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("was not found"),
        "{r:?}"
    );
}
