//! Integration tests of the NFQUEUE delay emulator. They need root (and the
//! iptables programs); without root each test prints a SKIPPED banner and
//! passes (or fails when CI is set).

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use msocks_testbed::{
    require_root, DelayConfig, DelayEmulator, Direction, Link, LinkDelay, Netns, Testbed,
};
use socket2::{Domain, Socket, Type};

const PORT: u16 = 7000;
const SAMPLES: usize = 7;
/// One-way delay under test: a 40 ms round trip.
const ONE_WAY: Duration = Duration::from_millis(20);
/// Upper slack over the configured RTT. Generous: the handler adds well
/// under a millisecond, but the VM this runs on can stall for 100 ms and
/// more, which the median of several samples mostly hides.
const SLACK: Duration = Duration::from_millis(40);

/// A listener on `addr` inside `ns` that accepts and drops connections
/// forever (the thread ends with the process).
fn listen(ns: &Netns, addr: SocketAddr) {
    let listener = ns
        .run_in(|| TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
}

/// Time of one TCP connect from `ns`, bound to `from`, to `to`: one round
/// trip (SYN, SYN-ACK) plus the system calls.
fn connect_time(ns: &Netns, from: IpAddr, to: SocketAddr) -> Duration {
    ns.run_in(|| {
        let sock = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::new(from, 0).into()).unwrap();
        let start = Instant::now();
        sock.connect_timeout(&to.into(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {from} -> {to}: {e}"));
        start.elapsed()
    })
    .unwrap()
}

/// Sorted connect times of [`SAMPLES`] connections.
fn connect_times(ns: &Netns, from: IpAddr, to: SocketAddr) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..SAMPLES).map(|_| connect_time(ns, from, to)).collect();
    times.sort();
    times
}

fn median(times: &[Duration]) -> Duration {
    times[times.len() / 2]
}

fn assert_about(times: &[Duration], rtt: Duration, what: &str) {
    // No packet leaves the queue early, so no sample can beat the RTT.
    assert!(
        times[0] >= rtt,
        "{what}: fastest connect {:?} is below the emulated RTT {rtt:?}: {times:?}",
        times[0]
    );
    assert!(
        median(times) <= rtt + SLACK,
        "{what}: median connect {:?} is far above the emulated RTT {rtt:?}: {times:?}",
        median(times)
    );
}

fn nfqueue_rules(ns: &Netns) -> usize {
    ["iptables", "ip6tables"]
        .iter()
        .map(|program| {
            let out = ns.exec(&[program, "-w", "-t", "mangle", "-S"]).unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("NFQUEUE"))
                .count()
        })
        .sum()
}

#[test]
fn tcp_connect_across_a_delayed_link_takes_the_emulated_rtt() {
    if !require_root("tcp_connect_across_a_delayed_link_takes_the_emulated_rtt") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().unwrap();
    let px_wired = SocketAddr::new(tb.px_wired_ip.into(), PORT);
    let px_wired6 = SocketAddr::new(tb.px_wired_ip6.into(), PORT);
    let px_radio = SocketAddr::new(tb.px_radio_ip.into(), PORT);
    let sv = SocketAddr::new(tb.sv_ip.into(), PORT);
    listen(&tb.px, px_wired);
    listen(&tb.px, px_wired6);
    listen(&tb.px, px_radio);
    listen(&tb.sv, sv);
    let wired = IpAddr::from(tb.mn_ip(Link::Wired));
    let wired6 = IpAddr::from(tb.mn_ip6(Link::Wired));
    let radio = IpAddr::from(tb.mn_ip(Link::Radio));

    let before = connect_times(&tb.mn, wired, px_wired);
    assert!(median(&before) < Duration::from_millis(10), "{before:?}");

    let delay = LinkDelay::start(&tb, Link::Wired, ONE_WAY).unwrap();
    assert_eq!(nfqueue_rules(&tb.px), 2, "PREROUTING, v4 and v6");
    assert_eq!(nfqueue_rules(&tb.mn), 2, "PREROUTING, v4 and v6");
    let rtt = 2 * ONE_WAY;
    let to_proxy = connect_times(&tb.mn, wired, px_wired);
    let to_proxy6 = connect_times(&tb.mn, wired6, px_wired6);
    // Forwarded packets cross the same interfaces and are delayed too.
    let to_server = connect_times(&tb.mn, wired, sv);
    let other_link = connect_times(&tb.mn, radio, px_radio);
    eprintln!(
        "emulated RTT {rtt:?}; connect medians: proxy {:?}, proxy over IPv6 {:?}, server {:?}, undelayed radio link {:?}",
        median(&to_proxy),
        median(&to_proxy6),
        median(&to_server),
        median(&other_link)
    );
    assert_about(&to_proxy, rtt, "mn -> px over IPv4");
    assert_about(&to_proxy6, rtt, "mn -> px over IPv6");
    assert_about(&to_server, rtt, "mn -> sv through px");
    assert!(
        median(&other_link) < Duration::from_millis(10),
        "the radio link was delayed too: {other_link:?}"
    );
    let (towards_px, towards_mn) = delay.stats();
    for stats in [towards_px, towards_mn] {
        assert!(stats.delayed >= 3 * SAMPLES as u64, "{stats:?}");
        assert_eq!(stats.dropped, 0, "{stats:?}");
    }
    drop(delay);
    assert_eq!(
        nfqueue_rules(&tb.px) + nfqueue_rules(&tb.mn),
        0,
        "rules left behind"
    );

    // One emulator holding both directions at one end gives the same RTT.
    let mut config = DelayConfig::new(ONE_WAY);
    config.direction = Direction::Both;
    let both = DelayEmulator::start_with(&tb.px, Link::Wired.px_if(), config).unwrap();
    assert_eq!(nfqueue_rules(&tb.px), 4, "PRE- and POSTROUTING, v4 and v6");
    assert_about(
        &connect_times(&tb.mn, wired, px_wired),
        rtt,
        "both ways at px",
    );
    drop(both);
    assert_eq!(nfqueue_rules(&tb.px), 0, "rules left behind");

    let after = connect_times(&tb.mn, wired, px_wired);
    assert!(median(&after) < Duration::from_millis(10), "{after:?}");
}

/// Datagrams from the mobile node to a UDP socket on the proxy host, each
/// carrying its sequence number; returns the numbers received, in order of
/// arrival, waiting up to `quiet` after the last one.
fn udp_burst(tb: &Testbed, count: u32, quiet: Duration) -> Vec<u32> {
    let to = SocketAddr::new(tb.px_wired_ip.into(), PORT + 1);
    let receiver = tb.px.run_in(|| UdpSocket::bind(to)).unwrap().unwrap();
    receiver.set_read_timeout(Some(quiet)).unwrap();
    let from = SocketAddr::new(tb.mn_wired_ip.into(), 0);
    tb.mn
        .run_in(|| {
            let sender = UdpSocket::bind(from).unwrap();
            for seq in 0..count {
                sender.send_to(&seq.to_be_bytes(), to).unwrap();
            }
        })
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while let Ok(n) = receiver.recv(&mut buf) {
        assert_eq!(n, 4);
        got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
    }
    got
}

#[test]
fn delayed_packets_keep_their_order_and_the_queue_is_bounded() {
    if !require_root("delayed_packets_keep_their_order_and_the_queue_is_bounded") {
        return;
    }
    let tb = Testbed::mobile_proxy_server().unwrap();
    {
        let _emu =
            DelayEmulator::start(&tb.px, Link::Wired.px_if(), Duration::from_millis(10)).unwrap();
        let got = udp_burst(&tb, 200, Duration::from_millis(500));
        assert_eq!(got, (0..200).collect::<Vec<_>>(), "lost or reordered");
    }
    // A tiny cap and a long delay: the burst arrives far faster than the
    // delay, so everything beyond the cap is dropped (and logged).
    let mut config = DelayConfig::new(Duration::from_millis(200));
    config.max_packets = 8;
    let emu = DelayEmulator::start_with(&tb.px, Link::Wired.px_if(), config).unwrap();
    let got = udp_burst(&tb, 100, Duration::from_millis(800));
    let stats = emu.stats();
    // Stray IPv6 neighbour discovery may take a place in the queue too.
    assert!(
        !got.is_empty() && got.len() <= 8 && got.iter().copied().eq(0..got.len() as u32),
        "{got:?} {stats:?}"
    );
    assert!(stats.dropped >= 92, "{stats:?}");
    assert_eq!(stats.peak_held, 8, "{stats:?}");
}
