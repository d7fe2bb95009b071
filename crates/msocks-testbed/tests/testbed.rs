//! Integration tests of the namespace testbed. They need root; without it
//! each test prints a SKIPPED banner and passes (or fails when CI is set).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use msocks_testbed::{require_root, Link, Netns, Testbed};
use socket2::{Domain, Socket, Type};

/// How much each transfer test sends: far more than the stray IPv6
/// neighbour-discovery and MLD packets the other link may carry meanwhile.
const PAYLOAD: usize = 256 * 1024;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Names listed by `ip netns list` (lines look like `NAME (id: 3)`).
fn netns_list() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_gone(name: &str) {
    assert!(
        !netns_list().iter().any(|n| n == name),
        "{name} still in ip netns list"
    );
    assert!(
        !Path::new("/etc/netns").join(name).exists(),
        "/etc/netns/{name} still exists"
    );
}

fn netns_id_of_current_thread() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn new_and_drop_leave_nothing_behind() {
    if !require_root("new_and_drop_leave_nothing_behind") {
        return;
    }
    let ns = Netns::new("drop").unwrap();
    let name = ns.name().to_owned();
    assert!(name.starts_with(&format!("msocks-drop-{}-", std::process::id())));
    assert!(netns_list().contains(&name));
    let resolv = std::fs::read_to_string(format!("/etc/netns/{name}/resolv.conf")).unwrap();
    assert_eq!(resolv, "nameserver 127.0.0.1\n");
    // `ip netns exec` really shows the confined resolver, and lo is up.
    let out = ns.exec(&["cat", "/etc/resolv.conf"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "nameserver 127.0.0.1\n"
    );
    let out = ns.exec(&["cat", "/sys/class/net/lo/operstate"]).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "unknown"); // lo's "up"
                                                                        // A failing command reports its stderr.
    let err = ns.exec(&["cat", "/nonexistent"]).unwrap_err().to_string();
    assert!(err.contains("No such file"), "{err}");
    drop(ns);
    assert_gone(&name);
}

#[test]
fn run_in_moves_only_the_closure_thread() {
    if !require_root("run_in_moves_only_the_closure_thread") {
        return;
    }
    let ns = Netns::new("runin").unwrap();
    let host = netns_id_of_current_thread();
    let (inside, spawned) = ns
        .run_in(|| {
            let spawned = thread::spawn(netns_id_of_current_thread).join().unwrap();
            (netns_id_of_current_thread(), spawned)
        })
        .unwrap();
    assert_ne!(inside, host);
    assert_eq!(
        spawned, inside,
        "threads spawned inside inherit the namespace"
    );
    assert_eq!(netns_id_of_current_thread(), host, "caller was moved");

    // A listener created inside lives in the namespace's own loopback: the
    // host cannot reach it, a thread inside can, from any thread later.
    let listener = ns
        .run_in(|| TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let from_host = TcpStream::connect_timeout(&addr, TIMEOUT);
    assert!(from_host.is_err(), "host reached the namespace's loopback");
    let from_inside = ns
        .run_in(|| TcpStream::connect_timeout(&addr, TIMEOUT))
        .unwrap();
    assert!(from_inside.is_ok(), "{from_inside:?}");

    // A panic inside is the caller's panic.
    let caught = std::panic::catch_unwind(|| ns.run_in(|| panic!("inside")));
    assert!(caught.is_err());
}

#[test]
fn cleanup_stale_removes_only_dead_owners() {
    if !require_root("cleanup_stale_removes_only_dead_owners") {
        return;
    }
    // A pid that surely belongs to no process any more.
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    let stale = format!("msocks-stale-{dead_pid}-0");
    // A concurrent test process's Netns::new may clean it up while `ip`
    // is still creating it (the owner is dead, after all): retry.
    let mut attempts = 0;
    loop {
        let out = Command::new("ip")
            .args(["netns", "add", &stale])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        attempts += 1;
        assert!(attempts < 5, "ip netns add {stale}: {out:?}");
    }
    std::fs::create_dir_all(format!("/etc/netns/{stale}")).unwrap();
    let live = Netns::new("live").unwrap();

    // Another test's Netns::new may clean it up first, so only check that
    // it is gone afterwards, not who removed it.
    Netns::cleanup_stale("msocks-stale-").unwrap();
    assert_gone(&stale);
    Netns::cleanup_stale("msocks-").unwrap();
    assert!(netns_list().iter().any(|n| n == live.name()));
    assert!(Netns::cleanup_stale("not-ours-").is_err());
}

/// Sends [`PAYLOAD`] bytes from the mobile node, bound to its address on
/// `link`, to a fresh listener on the server; returns the source address
/// the server saw.
fn transfer(tb: &Testbed, link: Link, v6: bool) -> io::Result<SocketAddr> {
    let (local, server): (IpAddr, IpAddr) = if v6 {
        (tb.mn_ip6(link).into(), tb.sv_ip6.into())
    } else {
        (tb.mn_ip(link).into(), tb.sv_ip.into())
    };
    let listener = tb.sv.run_in(|| TcpListener::bind((server, 0))).unwrap()?;
    let server_addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    thread::scope(|scope| {
        let client = scope.spawn(|| {
            tb.mn
                .run_in(|| -> io::Result<()> {
                    let domain = Domain::for_address(server_addr);
                    let socket = Socket::new(domain, Type::STREAM, None)?;
                    socket.bind(&SocketAddr::new(local, 0).into())?;
                    socket.connect_timeout(&server_addr.into(), TIMEOUT)?;
                    let mut stream: TcpStream = socket.into();
                    stream.set_write_timeout(Some(TIMEOUT))?;
                    stream.write_all(&vec![0x5a; PAYLOAD])?;
                    stream.shutdown(std::net::Shutdown::Write)
                })
                .unwrap()
        });
        // Accept without blocking forever: give up as soon as the client
        // has failed, so that failures are reported fast.
        let deadline = Instant::now() + TIMEOUT;
        let (mut stream, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if client.is_finished() || Instant::now() > deadline {
                        client.join().unwrap()?;
                        return Err(e);
                    }
                    thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let mut received = Vec::new();
        stream.read_to_end(&mut received)?;
        client.join().unwrap()?;
        assert_eq!(received.len(), PAYLOAD);
        Ok(peer)
    })
}

/// Transfers over `link` and checks that the mobile node's counters moved on
/// that link only.
fn transfer_and_check_counters(tb: &Testbed, link: Link, v6: bool) {
    let other = match link {
        Link::Wired => Link::Radio,
        Link::Radio => Link::Wired,
    };
    let before = tb.mn.link_stats(link.mn_if()).unwrap();
    let other_before = tb.mn.link_stats(other.mn_if()).unwrap();
    let peer = transfer(tb, link, v6).unwrap_or_else(|e| panic!("{link:?} v6={v6}: {e}"));
    let after = tb.mn.link_stats(link.mn_if()).unwrap();
    let other_after = tb.mn.link_stats(other.mn_if()).unwrap();

    let expected: IpAddr = if v6 {
        tb.mn_ip6(link).into()
    } else {
        tb.mn_ip(link).into()
    };
    assert_eq!(peer.ip(), expected, "server saw the wrong source");
    let tx = after.tx_bytes - before.tx_bytes;
    let rx = after.rx_bytes - before.rx_bytes;
    let other_tx = other_after.tx_bytes - other_before.tx_bytes;
    assert!(
        tx >= PAYLOAD as u64,
        "{link:?} v6={v6}: only {tx} bytes sent"
    );
    assert!(rx > 0, "{link:?} v6={v6}: no ACKs came back on the link");
    assert!(
        other_tx < PAYLOAD as u64 / 8,
        "{link:?} v6={v6}: {other_tx} bytes leaked onto {other:?}"
    );
}

#[test]
fn tcp_from_mobile_node_to_server_on_each_link_and_family() {
    if !require_root("tcp_from_mobile_node_to_server_on_each_link_and_family") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().unwrap();
    for link in Link::ALL {
        for v6 in [false, true] {
            transfer_and_check_counters(&tb, link, v6);
        }
    }
}

#[test]
fn link_down_then_up_restores_connectivity() {
    if !require_root("link_down_then_up_restores_connectivity") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().unwrap();
    transfer(&tb, Link::Wired, false).unwrap();

    tb.link_down(Link::Wired).unwrap();
    for v6 in [false, true] {
        let started = Instant::now();
        let err = transfer(&tb, Link::Wired, v6).unwrap_err();
        eprintln!("v6={v6} over the downed link: {err}");
        // Refused by the mobile node's routing, not a timeout: nothing
        // leaks out through the radio link with the wired source address.
        assert!(started.elapsed() < TIMEOUT, "v6={v6}: {err}");
        transfer_and_check_counters(&tb, Link::Radio, v6);
    }

    tb.link_up(Link::Wired).unwrap();
    tb.link_up(Link::Wired).unwrap(); // idempotent
    for v6 in [false, true] {
        transfer_and_check_counters(&tb, Link::Wired, v6);
    }
}

#[test]
fn panic_while_testbed_is_alive_removes_namespaces() {
    if !require_root("panic_while_testbed_is_alive_removes_namespaces") {
        return;
    }
    let names = Mutex::new(Vec::new());
    let outcome = std::panic::catch_unwind(|| {
        let tb = Testbed::mobile_proxy_server().unwrap();
        names
            .lock()
            .unwrap()
            .extend([&tb.mn, &tb.px, &tb.sv].map(|ns| ns.name().to_owned()));
        panic!("deliberate panic with a live testbed");
    });
    assert!(outcome.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 3);
    for name in &names {
        assert_gone(name);
    }
}
