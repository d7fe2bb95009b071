//! `msocks proxy` as a user meets it: help texts, config validation, the zero-config default,
//! IPv6 listeners and destinations, BIND exchanges, idle timeout and graceful shutdown. Each
//! test starts the real binary and speaks SOCKS5 to it with the `msocks-proto` encoders.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use msocks_proto::{
    Command as SocksCommand, Greeting, Method, MethodSelection, OpenRequest, Reply, ReplyCode,
    ReplyContext, Request, TargetAddr,
};
use support::{run_with_timeout, ProxyProcess, TempDir, MSOCKS_BIN};

const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn msocks(args: &[&str]) -> std::process::Output {
    run_with_timeout(Command::new(MSOCKS_BIN).args(args), Duration::from_secs(30))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Reads one whole reply (plain context) from a blocking stream.
fn read_reply(s: &mut TcpStream) -> Reply {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if let Some((reply, _)) = Reply::decode(&buf, ReplyContext::Plain).expect("valid reply") {
            return reply;
        }
        let n = s.read(&mut byte).expect("reading the reply");
        assert_eq!(n, 1, "proxy closed before a whole reply; got {buf:02x?}");
        buf.push(byte[0]);
    }
}

/// Opens a no-auth SOCKS5 session and sends `request`; returns the stream and first reply.
fn socks_request(
    proxy: SocketAddr,
    command: SocksCommand,
    target: TargetAddr,
) -> (TcpStream, Reply) {
    let mut s = TcpStream::connect(proxy).expect("connect to proxy");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut out = Vec::new();
    Greeting {
        methods: vec![Method::NO_AUTH],
    }
    .encode(&mut out);
    s.write_all(&out).expect("greeting");
    let mut sel = [0u8; 2];
    s.read_exact(&mut sel).expect("method selection");
    assert_eq!(
        MethodSelection::decode(&sel)
            .expect("valid")
            .map(|x| x.0.method),
        Some(Method::NO_AUTH)
    );
    out.clear();
    Request::Open(OpenRequest {
        command,
        target,
        mobility: None,
    })
    .encode(&mut out);
    s.write_all(&out).expect("request");
    let reply = read_reply(&mut s);
    (s, reply)
}

/// A TCP echo server on `addr` for one connection at a time, forever (until the test ends).
fn echo_server(addr: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(addr).expect("echo bind");
    let local = l.local_addr().expect("addr");
    thread::spawn(move || {
        for conn in l.incoming().flatten() {
            thread::spawn(move || {
                let mut c = conn;
                let mut buf = [0u8; 16384];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    local
}

fn echo_roundtrip(s: &mut TcpStream, payload: &[u8]) {
    s.write_all(payload).expect("write");
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(back, payload);
}

#[test]
fn help_explains_every_command() {
    let top = msocks(&["--help"]);
    assert!(top.status.success());
    let t = text(&top);
    for needle in ["proxy", "passwd", "mobility", "Examples"] {
        assert!(t.contains(needle), "`msocks --help` lacks {needle:?}:\n{t}");
    }
    let proxy = text(&msocks(&["proxy", "--help"]));
    for needle in [
        "--listen",
        "--config",
        "--users",
        "--check-config",
        "--log-level",
        "127.0.0.1:1080",
        "SIGTERM",
    ] {
        assert!(
            proxy.contains(needle),
            "`msocks proxy --help` lacks {needle:?}:\n{proxy}"
        );
    }
    let passwd = text(&msocks(&["passwd", "--help"]));
    assert!(passwd.contains("argon2id"), "{passwd}");
    let bad = msocks(&["proxy", "--listen", "not-an-address"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("invalid"), "{}", text(&bad));
}

#[test]
fn check_config_accepts_good_files_and_names_the_problem_in_bad_ones() {
    let dir = TempDir::new("check-config");
    let users = dir.write("users", "alice:secret\n");
    let good = dir.write(
        "good.toml",
        format!(
            "listen = [\"127.0.0.1:0\", \"[::1]:0\"]\n[auth]\nusers_file = {users:?}\n[limits]\nidle_timeout = \"90s\"\n\
             max_sessions = 5\n[[rule]]\naction = \"deny\"\nto = [\"10.0.0.0/8\"]\nports = [22, \"6000-6010\"]\n\
             [[rule]]\naction = \"allow\"\nusers = [\"alice\"]\n"
        ),
    );
    let out = msocks(&[
        "proxy",
        "--config",
        good.to_str().unwrap(),
        "--check-config",
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("configuration OK") && t.contains("1 user(s)") && t.contains("rules: 2"),
        "{t}"
    );
    assert!(t.contains("max sessions: 5"), "{t}");
    // Flags override the file.
    let out = msocks(&[
        "proxy",
        "--config",
        good.to_str().unwrap(),
        "--max-sessions",
        "7",
        "--check-config",
    ]);
    assert!(text(&out).contains("max sessions: 7"), "{}", text(&out));

    for (name, body, needle) in [
        (
            "unknown.toml",
            "listen = [\"127.0.0.1:0\"]\nlisen = 1\n",
            "unknown field",
        ),
        (
            "type.toml",
            "[limits]\nmax_sessions = \"many\"\n",
            "max_sessions",
        ),
        (
            "duration.toml",
            "[limits]\nidle_timeout = \"soon\"\n",
            "idle_timeout",
        ),
        (
            "rule.toml",
            "[[rule]]\naction = \"allow\"\nhosts = [\"a*b\"]\n",
            "rule #1",
        ),
        (
            "port.toml",
            "[[rule]]\naction = \"allow\"\nports = [\"90-80\"]\n",
            "empty",
        ),
        (
            "zero.toml",
            "[limits]\nconnect_timeout = \"0s\"\n",
            "connect_timeout",
        ),
        (
            "nousers.toml",
            "[auth]\nusers_file = \"/nonexistent/users\"\n",
            "/nonexistent/users",
        ),
    ] {
        let path = dir.write(name, body);
        let out = msocks(&[
            "proxy",
            "--config",
            path.to_str().unwrap(),
            "--check-config",
        ]);
        assert!(!out.status.success(), "{name} was accepted");
        let t = text(&out);
        assert!(
            t.contains(needle),
            "{name}: error does not mention {needle:?}: {t}"
        );
        assert!(t.starts_with("msocks: error:"), "{name}: {t}");
    }
    let out = msocks(&["proxy", "--config", "/nonexistent/msocks.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot read config file /nonexistent/msocks.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn zero_config_serves_on_localhost_1080() {
    if TcpListener::bind("127.0.0.1:1080").is_err() {
        assert!(
            !support::in_ci(),
            "127.0.0.1:1080 is busy on the CI machine"
        );
        eprintln!("SKIPPED zero_config_serves_on_localhost_1080: 127.0.0.1:1080 is in use here");
        return;
    }
    let proxy = ProxyProcess::start_args(&["proxy"]);
    assert_eq!(proxy.addr(), SocketAddr::from(([127, 0, 0, 1], 1080)));
    let echo = echo_server("127.0.0.1:0".parse().unwrap());
    let (mut s, reply) = socks_request(proxy.addr(), SocksCommand::Connect, TargetAddr::Ip(echo));
    assert_eq!(reply.code, ReplyCode::Succeeded);
    echo_roundtrip(&mut s, b"zero config");
}

#[test]
fn ipv6_listener_and_ipv6_destination() {
    let proxy =
        ProxyProcess::start_args(&["proxy", "--listen", "[::1]:0", "--listen", "127.0.0.1:0"]);
    assert!(proxy.addrs().iter().any(|a| a.is_ipv6()) && proxy.addrs().iter().any(|a| a.is_ipv4()));
    let echo6 = echo_server("[::1]:0".parse().unwrap());
    for &listener in proxy.addrs() {
        let (mut s, reply) = socks_request(listener, SocksCommand::Connect, TargetAddr::Ip(echo6));
        assert_eq!(reply.code, ReplyCode::Succeeded, "via {listener}");
        echo_roundtrip(&mut s, format!("over {listener} to {echo6}").as_bytes());
    }
    // A name that resolves to loopback, through the IPv6 listener.
    let v6 = proxy.addrs().iter().copied().find(|a| a.is_ipv6()).unwrap();
    let echo4 = echo_server("127.0.0.1:0".parse().unwrap());
    let (mut s, reply) = socks_request(
        v6,
        SocksCommand::Connect,
        TargetAddr::Domain("localhost".into(), echo4.port()),
    );
    assert_eq!(reply.code, ReplyCode::Succeeded);
    echo_roundtrip(&mut s, b"by name");
}

#[test]
fn bind_exchange_relays_both_ways() {
    let proxy = ProxyProcess::start(&[]);
    // The "server" that will connect back is on 127.0.0.1; the client names it.
    let (mut client, first) = socks_request(
        proxy.addr(),
        SocksCommand::Bind,
        TargetAddr::Ip(SocketAddr::from(([127, 0, 0, 1], 0))),
    );
    assert_eq!(first.code, ReplyCode::Succeeded);
    let TargetAddr::Ip(listen) = first.bound else {
        panic!("BIND reply without an IP: {first:?}")
    };
    assert_ne!(listen.port(), 0);
    let mut server = TcpStream::connect(listen).expect("server connects to the BIND address");
    let second = read_reply(&mut client);
    assert_eq!(second.code, ReplyCode::Succeeded);
    assert_eq!(
        second.bound,
        TargetAddr::Ip(server.local_addr().unwrap()),
        "second reply names the peer"
    );

    let down: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let up: Vec<u8> = (0..200_000u32).map(|i| (i * 13 % 253) as u8).collect();
    let down2 = down.clone();
    let mut server2 = server.try_clone().unwrap();
    let writer = thread::spawn(move || {
        server2.write_all(&down2).unwrap();
        server2.shutdown(Shutdown::Write).unwrap();
    });
    client.write_all(&up).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got_down = Vec::new();
    client.read_to_end(&mut got_down).unwrap();
    let mut got_up = Vec::new();
    server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    server.read_to_end(&mut got_up).unwrap();
    writer.join().unwrap();
    assert!(got_down == down, "server-to-client bytes differ");
    assert!(got_up == up, "client-to-server bytes differ");
    proxy.expect_log("cmd=bind", Duration::from_secs(5));
}

#[test]
fn bind_drops_connections_from_other_hosts() {
    let proxy = ProxyProcess::start(&[]);
    let expected = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let (mut client, first) = socks_request(
        proxy.addr(),
        SocksCommand::Bind,
        TargetAddr::Ip(SocketAddr::new(expected, 0)),
    );
    assert_eq!(first.code, ReplyCode::Succeeded);
    let TargetAddr::Ip(listen) = first.bound else {
        panic!("{first:?}")
    };
    // From 127.0.0.1: not the host the client named; dropped.
    let mut stranger = TcpStream::connect(listen).expect("stranger connects");
    stranger.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(
        stranger.read(&mut b).unwrap_or(0),
        0,
        "the stranger's connection must be closed"
    );
    // From 127.0.0.2: accepted.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(expected, 0).into()).unwrap();
    sock.connect(&listen.into()).unwrap();
    let mut server: TcpStream = sock.into();
    let second = read_reply(&mut client);
    assert_eq!(second.code, ReplyCode::Succeeded);
    assert_eq!(second.bound, TargetAddr::Ip(server.local_addr().unwrap()));
    server.write_all(b"from the right host").unwrap();
    let mut got = [0u8; 19];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"from the right host");
    proxy.expect_log("unexpected address dropped", Duration::from_secs(5));
}

#[test]
fn bind_times_out_with_reply_0x06() {
    let dir = TempDir::new("bind-timeout");
    let cfg = dir.write("c.toml", "[limits]\nbind_timeout = \"1s\"\n");
    let proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()]);
    let t0 = Instant::now();
    let (mut client, first) = socks_request(
        proxy.addr(),
        SocksCommand::Bind,
        TargetAddr::Ip(SocketAddr::from(([127, 0, 0, 1], 0))),
    );
    assert_eq!(first.code, ReplyCode::Succeeded);
    let second = read_reply(&mut client);
    assert_eq!(second.code, ReplyCode::TtlExpired);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "timed out too early: {:?}",
        t0.elapsed()
    );
}

#[test]
fn idle_sessions_are_closed_after_the_idle_timeout() {
    let proxy = ProxyProcess::start(&["--idle-timeout", "1s"]);
    let echo = echo_server("127.0.0.1:0".parse().unwrap());
    let (mut s, reply) = socks_request(proxy.addr(), SocksCommand::Connect, TargetAddr::Ip(echo));
    assert_eq!(reply.code, ReplyCode::Succeeded);
    // Traffic keeps it alive past the timeout...
    for _ in 0..4 {
        echo_roundtrip(&mut s, b"keepalive");
        thread::sleep(Duration::from_millis(400));
    }
    // ...silence ends it.
    let t0 = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(
        s.read(&mut b).expect("read"),
        0,
        "expected EOF from the proxy"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
    proxy.expect_log("reason=idle timeout", Duration::from_secs(5));
}

#[test]
fn sigterm_stops_accepting_and_lets_live_sessions_finish() {
    let dir = TempDir::new("grace");
    let cfg = dir.write("c.toml", "[limits]\nshutdown_grace = \"20s\"\n");
    let mut proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()]);
    let echo = echo_server("127.0.0.1:0".parse().unwrap());
    let (mut live, reply) =
        socks_request(proxy.addr(), SocksCommand::Connect, TargetAddr::Ip(echo));
    assert_eq!(reply.code, ReplyCode::Succeeded);
    echo_roundtrip(&mut live, b"before");
    proxy.send_sigterm();
    proxy.expect_log("shutting down", Duration::from_secs(5));
    // New clients are no longer accepted...
    assert!(
        support::wait_until(Duration::from_secs(5), || TcpStream::connect(proxy.addr())
            .is_err()),
        "the listener still accepts after SIGTERM"
    );
    // ...while the live session keeps working, then ends normally.
    for i in 0..5 {
        echo_roundtrip(&mut live, format!("during shutdown {i}").as_bytes());
        thread::sleep(Duration::from_millis(100));
    }
    live.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).unwrap();
    let status = proxy.wait_exit();
    assert!(status.success(), "exit status {status:?}");
    assert!(proxy.logs().contains("session closed"), "{}", proxy.logs());
    assert!(
        !proxy.logs().contains("grace period over"),
        "{}",
        proxy.logs()
    );
}

#[test]
fn sigterm_cuts_sessions_that_outlive_the_grace_period() {
    let dir = TempDir::new("grace-over");
    let cfg = dir.write("c.toml", "[limits]\nshutdown_grace = \"1s\"\n");
    let mut proxy = ProxyProcess::start(&["--config", cfg.to_str().unwrap()]);
    let echo = echo_server("127.0.0.1:0".parse().unwrap());
    let (mut idle, reply) =
        socks_request(proxy.addr(), SocksCommand::Connect, TargetAddr::Ip(echo));
    assert_eq!(reply.code, ReplyCode::Succeeded);
    let t0 = Instant::now();
    let status = proxy.terminate();
    assert!(status.success(), "exit status {status:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "exit after {took:?}"
    );
    let mut b = [0u8; 1];
    assert_eq!(idle.read(&mut b).unwrap_or(0), 0);
    let logs = proxy.logs();
    assert!(
        logs.contains("grace period over") && logs.contains("reason=proxy shutdown"),
        "{logs}"
    );
}

#[test]
fn passwd_rejects_bad_input() {
    let out = support::run_with_input(
        Command::new(MSOCKS_BIN).args(["passwd", "a:b"]),
        Some(b"pw\n"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("no ':'"), "{}", text(&out));
    let out = support::run_with_input(
        Command::new(MSOCKS_BIN).args(["passwd", "bob"]),
        Some(b"\n"),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("1 to 255 bytes"), "{}", text(&out));
}
