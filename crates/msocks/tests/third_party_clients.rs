//! The msocks proxy driven by real, unmodified third-party SOCKS5 clients:
//! curl (`--socks5`, `--socks5-hostname`, username/password auth), proxychains4
//! (LD_PRELOAD wrapper around programs that know nothing about SOCKS) and
//! Python's PySocks (TCP CONNECT and UDP ASSOCIATE).
//!
//! Every download is checked byte for byte (SHA-256 of what the client got
//! against what the local HTTP server served), and the proxy's own
//! `session closed` log lines are checked for the byte counts. Only loopback
//! traffic. The tools are installed by ./scripts/test.sh; run outside CI
//! without them, a test prints a loud SKIPPED line and returns.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::thread;
use std::time::Duration;

use support::{
    assert_success, clear_proxy_env, curl, run_with_timeout, sha256_file, sha256_hex, HttpServer,
    ProxyProcess, TempDir, UdpEcho, CURL_BASE_ARGS, TOOL_TIMEOUT,
};

const MIB: usize = 1024 * 1024;
const LOG_WAIT: Duration = Duration::from_secs(10);

/// The `down=` byte count of a `session closed` line.
fn down(fields: &HashMap<String, String>) -> u64 {
    fields.get("down").and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn field_is(fields: &HashMap<String, String>, key: &str, want: &str) -> bool {
    fields.get(key).is_some_and(|v| v == want)
}

/// Runs `cmd` (a curl writing to `out`), requires success and that the file
/// matches `body` exactly.
fn run_download(what: &str, cmd: &mut Command, out: &std::path::Path, body: &[u8]) {
    let res = run_with_timeout(cmd, TOOL_TIMEOUT);
    assert_success(what, &res);
    let got = std::fs::metadata(out)
        .unwrap_or_else(|e| panic!("{what}: no output file {}: {e}", out.display()))
        .len();
    assert_eq!(got, body.len() as u64, "{what}: downloaded size");
    assert_eq!(
        sha256_file(out),
        sha256_hex(body),
        "{what}: downloaded content differs from the served body"
    );
}

// ---------------------------------------------------------------------------
// (a), (b): curl, no authentication
// ---------------------------------------------------------------------------

#[test]
fn curl_socks5_local_resolve_downloads_8mib_byte_exact() {
    if !support::require_tool("curl") {
        return;
    }
    let body = support::random_bytes(8 * MIB, 0xA);
    let http = HttpServer::start(body.clone());
    let mut proxy = ProxyProcess::start(&[]);
    let tmp = TempDir::new("curl-socks5");
    let out = tmp.join("download.bin");

    // --socks5: curl resolves the name itself and sends an IPv4 address.
    run_download(
        "curl --socks5",
        curl()
            .args(["--socks5", &proxy.socks_arg()])
            .arg(http.url("127.0.0.1", "random-8mib.bin"))
            .arg("-o")
            .arg(&out),
        &out,
        &body,
    );

    let dest = format!("127.0.0.1:{}", http.port());
    proxy.expect_session_closes(1, LOG_WAIT, &format!("dest={dest} down>=8MiB"), |f| {
        field_is(f, "dest", &dest) && down(f) >= body.len() as u64
    });

    // The proxy shuts down cleanly on SIGTERM (exit status 0).
    if proxy.is_msocks() {
        let status = proxy.terminate();
        assert!(status.success(), "msocks exited with {status} on SIGTERM");
    }
}

#[test]
fn curl_socks5_hostname_downloads_8mib_byte_exact() {
    if !support::require_tool("curl") {
        return;
    }
    let body = support::random_bytes(8 * MIB, 0xB);
    let http = HttpServer::start(body.clone());
    let proxy = ProxyProcess::start(&[]);
    let tmp = TempDir::new("curl-socks5h");
    let out = tmp.join("download.bin");

    // --socks5-hostname: the name `localhost` goes to the proxy (ATYP 3),
    // which resolves it.
    run_download(
        "curl --socks5-hostname",
        curl()
            .args(["--socks5-hostname", &proxy.socks_arg()])
            .arg(http.url("localhost", "random-8mib.bin"))
            .arg("-o")
            .arg(&out),
        &out,
        &body,
    );

    let dest = format!("localhost:{}", http.port());
    proxy.expect_session_closes(1, LOG_WAIT, &format!("dest={dest} down>=8MiB"), |f| {
        field_is(f, "dest", &dest) && down(f) >= body.len() as u64
    });
}

// ---------------------------------------------------------------------------
// (c): curl with username/password (RFC 1929)
// ---------------------------------------------------------------------------

const ALICE_PASS: &str = "wonderland";
/// Spaces and a colon: curl's `-U user:pass` splits at the first colon only,
/// and `msocks passwd` must take the whole stdin line.
const CAROL_PASS: &str = "correct horse:battery staple";

/// A proxy with a users file: `alice` in plaintext and, against msocks, `carol`
/// hashed by `msocks passwd` (argon2id). Returns whether carol exists.
fn start_auth_proxy(tmp: &TempDir) -> (ProxyProcess, bool) {
    let mut users = format!("# msocks test users\nalice:{ALICE_PASS}\n");
    let with_carol = support::standin().is_none();
    if with_carol {
        let line = support::msocks_passwd("carol", CAROL_PASS);
        users.push_str(&line);
        users.push('\n');
    }
    let users_file = tmp.write("users", users);
    let users_arg = users_file.to_str().expect("temp path is UTF-8");
    (ProxyProcess::start(&["--users", users_arg]), with_carol)
}

#[test]
fn curl_username_password_plaintext_and_argon2_users() {
    if !support::require_tool("curl") {
        return;
    }
    let body = support::random_bytes(MIB, 0xC);
    let http = HttpServer::start(body.clone());
    let tmp = TempDir::new("curl-auth");
    let (proxy, with_carol) = start_auth_proxy(&tmp);
    let size = body.len() as u64;

    // alice (plaintext in the users file), credentials in the proxy URL.
    let out = tmp.join("alice.bin");
    run_download(
        "curl -x socks5h://alice:...@",
        curl()
            .args([
                "-x",
                &format!("socks5h://alice:{ALICE_PASS}@{}", proxy.socks_arg()),
            ])
            .arg(http.url("localhost", "alice"))
            .arg("-o")
            .arg(&out),
        &out,
        &body,
    );
    proxy.expect_session_closes(1, LOG_WAIT, "user=alice down>=1MiB", |f| {
        field_is(f, "user", "alice") && down(f) >= size
    });

    // alice again with --socks5 + --proxy-user.
    let out = tmp.join("alice2.bin");
    run_download(
        "curl --socks5 --proxy-user alice:...",
        curl()
            .args(["--socks5", &proxy.socks_arg()])
            .args(["--proxy-user", &format!("alice:{ALICE_PASS}")])
            .arg(http.url("127.0.0.1", "alice2"))
            .arg("-o")
            .arg(&out),
        &out,
        &body,
    );
    proxy.expect_session_closes(2, LOG_WAIT, "user=alice down>=1MiB", |f| {
        field_is(f, "user", "alice") && down(f) >= size
    });

    if !with_carol {
        eprintln!("stand-in server: skipping the argon2 (msocks passwd) user");
        return;
    }
    // carol (argon2id hash from `msocks passwd`), -U with a password that
    // contains a space and a colon.
    let out = tmp.join("carol.bin");
    run_download(
        "curl --socks5-hostname -U carol:...",
        curl()
            .args(["--socks5-hostname", &proxy.socks_arg()])
            .args(["-U", &format!("carol:{CAROL_PASS}")])
            .arg(http.url("localhost", "carol"))
            .arg("-o")
            .arg(&out),
        &out,
        &body,
    );
    proxy.expect_session_closes(1, LOG_WAIT, "user=carol down>=1MiB", |f| {
        field_is(f, "user", "carol") && down(f) >= size
    });
    assert!(
        !proxy.logs().contains("authentication failed"),
        "no authentication should have failed; proxy logs:\n{}",
        proxy.logs()
    );
}

#[test]
fn curl_wrong_password_is_rejected() {
    if !support::require_tool("curl") {
        return;
    }
    let http = HttpServer::start(b"must not be served".to_vec());
    let tmp = TempDir::new("curl-badpass");
    let (proxy, with_carol) = start_auth_proxy(&tmp);

    let mut attempts = vec![("alice", "not-wonderland"), ("nobody", ALICE_PASS)];
    if with_carol {
        // The right password of the *other* user, and a prefix of carol's.
        attempts.push(("carol", ALICE_PASS));
        attempts.push(("carol", "correct horse"));
    }
    for (user, pass) in attempts {
        let res = run_with_timeout(
            curl()
                .args(["--socks5-hostname", &proxy.socks_arg()])
                .args(["--proxy-user", &format!("{user}:{pass}")])
                .arg(http.url("localhost", "denied"))
                .arg("-o")
                .arg(tmp.join("denied.bin")),
            TOOL_TIMEOUT,
        );
        assert!(
            !res.status.success(),
            "curl with user {user:?} and a wrong password succeeded; stderr: {}",
            String::from_utf8_lossy(&res.stderr)
        );
    }
    proxy.expect_log("authentication failed", LOG_WAIT);
    assert_eq!(
        http.requests(),
        0,
        "a client that failed authentication reached the HTTP server"
    );
}

#[test]
fn curl_without_credentials_is_refused_when_users_are_configured() {
    if !support::require_tool("curl") {
        return;
    }
    let http = HttpServer::start(b"must not be served".to_vec());
    let tmp = TempDir::new("curl-noauth");
    let (proxy, _) = start_auth_proxy(&tmp);

    // Without credentials curl offers only "no authentication" (and GSSAPI);
    // the proxy must answer "no acceptable methods" (0xFF).
    for flag in ["--socks5", "--socks5-hostname"] {
        let res = run_with_timeout(
            curl()
                .args([flag, &proxy.socks_arg()])
                .arg(http.url("127.0.0.1", "no-credentials"))
                .arg("-o")
                .arg(tmp.join("denied.bin")),
            TOOL_TIMEOUT,
        );
        assert!(
            !res.status.success(),
            "curl {flag} without credentials got through a proxy that requires them"
        );
    }
    assert_eq!(
        http.requests(),
        0,
        "a client without credentials reached the HTTP server"
    );
}

// ---------------------------------------------------------------------------
// (d): proxychains4 wrapping programs that know nothing about SOCKS
// ---------------------------------------------------------------------------

fn proxychains_conf(tmp: &TempDir, proxy: &ProxyProcess) -> std::path::PathBuf {
    let addr = proxy.addr();
    tmp.write(
        "proxychains.conf",
        format!(
            "# generated by msocks' third_party_clients test\n\
             strict_chain\n\
             quiet_mode\n\
             proxy_dns\n\
             remote_dns_subnet 224\n\
             tcp_read_time_out 15000\n\
             tcp_connect_time_out 8000\n\
             \n\
             [ProxyList]\n\
             socks5 {} {}\n",
            addr.ip(),
            addr.port()
        ),
    )
}

#[test]
fn proxychains4_wraps_plain_curl() {
    if !support::require_tool("proxychains4") || !support::require_tool("curl") {
        return;
    }
    let body = support::random_bytes(8 * MIB, 0xD);
    let http = HttpServer::start(body.clone());
    let proxy = ProxyProcess::start(&[]);
    let tmp = TempDir::new("proxychains-curl");
    let conf = proxychains_conf(&tmp, &proxy);
    let out = tmp.join("download.bin");

    // curl gets no proxy flag and no proxy environment: only proxychains'
    // LD_PRELOAD hooks send its connect() through the proxy.
    let mut cmd = Command::new("proxychains4");
    clear_proxy_env(&mut cmd)
        .arg("-q")
        .arg("-f")
        .arg(&conf)
        .arg("curl")
        .args(CURL_BASE_ARGS)
        .arg(http.url("localhost", "proxychains.bin"))
        .arg("-o")
        .arg(&out);
    run_download("proxychains4 curl", &mut cmd, &out, &body);

    proxy.expect_session_closes(1, LOG_WAIT, "down>=8MiB", |f| down(f) >= body.len() as u64);
}

#[test]
fn proxychains4_wraps_python_urllib() {
    if !support::require_tool("proxychains4") || !support::require_tool("python3") {
        return;
    }
    let body = support::random_bytes(2 * MIB, 0xE);
    let http = HttpServer::start(body.clone());
    let proxy = ProxyProcess::start(&[]);
    let tmp = TempDir::new("proxychains-python");
    let conf = proxychains_conf(&tmp, &proxy);

    let script = "import hashlib, sys, urllib.request\n\
                  data = urllib.request.urlopen(sys.argv[1], timeout=30).read()\n\
                  print(len(data), hashlib.sha256(data).hexdigest())\n";
    let mut cmd = Command::new("proxychains4");
    clear_proxy_env(&mut cmd)
        .arg("-q")
        .arg("-f")
        .arg(&conf)
        .args(["python3", "-c", script])
        .arg(http.url("127.0.0.1", "urllib.bin"));
    let res = run_with_timeout(&mut cmd, TOOL_TIMEOUT);
    assert_success("proxychains4 python3 urllib", &res);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert_eq!(
        stdout.trim(),
        format!("{} {}", body.len(), sha256_hex(&body)),
        "python urllib through proxychains4: size and sha256"
    );

    let dest = format!("127.0.0.1:{}", http.port());
    proxy.expect_session_closes(1, LOG_WAIT, &format!("dest={dest} down>=2MiB"), |f| {
        field_is(f, "dest", &dest) && down(f) >= body.len() as u64
    });
}

// ---------------------------------------------------------------------------
// (e), (f): Python PySocks
// ---------------------------------------------------------------------------

const PYSOCKS_GET: &str = r#"
import hashlib, socket, sys
import socks

proxy_port, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
# rdns=True: a name is sent to the proxy (ATYP 3); an IP literal as ATYP 1.
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True)
s.settimeout(30)
s.connect((host, port))
s.sendall(b"GET /pysocks HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
chunks = []
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    chunks.append(chunk)
s.close()
head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
status = head.split(b"\r\n")[0]
if not sep or b" 200 " not in status:
    sys.exit("bad HTTP response: %r" % head[:200])
print(len(body), hashlib.sha256(body).hexdigest())
"#;

#[test]
fn pysocks_tcp_get_byte_exact() {
    if !support::require_python_module("socks", "PySocks") {
        return;
    }
    let body = support::random_bytes(2 * MIB, 0xF);
    let http = HttpServer::start(body.clone());
    let proxy = ProxyProcess::start(&[]);
    let want = format!("{} {}", body.len(), sha256_hex(&body));

    for host in ["127.0.0.1", "localhost"] {
        let res = run_with_timeout(
            Command::new("python3")
                .args(["-c", PYSOCKS_GET])
                .arg(proxy.addr().port().to_string())
                .arg(host)
                .arg(http.port().to_string()),
            TOOL_TIMEOUT,
        );
        assert_success(&format!("PySocks GET via {host}"), &res);
        assert_eq!(
            String::from_utf8_lossy(&res.stdout).trim(),
            want,
            "PySocks GET via {host}: size and sha256"
        );
        let dest = format!("{host}:{}", http.port());
        proxy.expect_session_closes(1, LOG_WAIT, &format!("dest={dest} down>=2MiB"), |f| {
            field_is(f, "dest", &dest) && down(f) >= body.len() as u64
        });
    }
}

const PYSOCKS_UDP: &str = r#"
import socket, sys, time
import socks

proxy_port, echo_port, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dest = ("127.0.0.1", echo_port)
s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
s.settimeout(0.5)

# Distinct payloads: an index prefix and a body of varying length/content.
payloads = {}
for i in range(count):
    body = bytes((i * 7 + j * 13 + (j >> 3)) % 256 for j in range(1 + (i * 97) % 1400))
    payloads[b"msocks-udp-%03d:" % i + body] = i

answered, problems, sends = set(), [], 0
for p in payloads:
    for attempt in range(6):
        if p in answered:
            break
        s.sendto(p, dest)
        sends += 1
        deadline = time.monotonic() + 0.5 * (attempt + 1)
        while p not in answered and time.monotonic() < deadline:
            try:
                data, frm = s.recvfrom(65535)
            except socket.timeout:
                break
            except OSError as e:  # PySocks' "Packet filtered" for foreign sources
                problems.append("recvfrom error: %r" % (e,))
                continue
            if data not in payloads:
                problems.append("unexpected/corrupted datagram of %d bytes: %r" % (len(data), data[:40]))
            elif frm != dest:
                problems.append("echo for #%d reported from %r, expected %r" % (payloads[data], frm, dest))
            else:
                answered.add(data)
s.close()

missing = sorted(payloads[p] for p in payloads if p not in answered)
for problem in problems[:20]:
    print(problem, file=sys.stderr)
if missing or problems:
    print("missing echoes for %s; %d problem(s); %d sends" % (missing, len(problems), sends), file=sys.stderr)
    sys.exit(1)
print("UDP OK %d %d" % (len(answered), sends))
"#;

#[test]
fn pysocks_udp_associate_echoes_50_datagrams() {
    if !support::require_python_module("socks", "PySocks") {
        return;
    }
    let echo = UdpEcho::start();
    let proxy = ProxyProcess::start(&[]);
    let res = run_with_timeout(
        Command::new("python3")
            .args(["-c", PYSOCKS_UDP])
            .arg(proxy.addr().port().to_string())
            .arg(echo.port().to_string())
            .arg("50"),
        TOOL_TIMEOUT,
    );
    assert_success("PySocks UDP ASSOCIATE", &res);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(
        stdout.trim().starts_with("UDP OK 50 "),
        "PySocks UDP script output: {stdout:?}"
    );
    assert!(
        echo.received() >= 50,
        "the echo server saw {} datagrams, expected at least 50",
        echo.received()
    );
    // The ASSOCIATE session ends when PySocks closes its control connection.
    proxy.expect_session_closes(1, LOG_WAIT, "the UDP ASSOCIATE session", |_| true);
}

// ---------------------------------------------------------------------------
// (g): concurrent curl downloads
// ---------------------------------------------------------------------------

#[test]
fn eight_concurrent_curl_downloads_byte_exact() {
    if !support::require_tool("curl") {
        return;
    }
    const N: usize = 8;
    let body = support::random_bytes(4 * MIB, 0x10);
    let http = HttpServer::start(body.clone());
    let proxy = ProxyProcess::start(&[]);
    let tmp = TempDir::new("curl-concurrent");
    let want = sha256_hex(&body);

    thread::scope(|scope| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (proxy, http, tmp) = (&proxy, &http, &tmp);
                scope.spawn(move || {
                    let out = tmp.join(&format!("download-{i}.bin"));
                    // Alternate local and proxy-side name resolution.
                    let (flag, host) = if i % 2 == 0 {
                        ("--socks5", "127.0.0.1")
                    } else {
                        ("--socks5-hostname", "localhost")
                    };
                    let res = run_with_timeout(
                        curl()
                            .args([flag, &proxy.socks_arg()])
                            .arg(http.url(host, &format!("concurrent-{i}")))
                            .arg("-o")
                            .arg(&out),
                        TOOL_TIMEOUT,
                    );
                    assert_success(&format!("concurrent curl #{i} ({flag})"), &res);
                    sha256_file(&out)
                })
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let got = h.join().expect("a download thread panicked");
            assert_eq!(got, want, "concurrent download #{i} differs from the body");
        }
    });
    assert_eq!(http.requests(), N, "HTTP requests served");
    proxy.expect_session_closes(N, LOG_WAIT, "down>=4MiB", |f| down(f) >= body.len() as u64);
}
