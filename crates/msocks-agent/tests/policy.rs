//! Policy parsing and matching: host patterns, networks, ports, uid and program, first
//! match wins, the outbound and inbound choice from the usable interfaces, wait and fail.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use msocks_agent::config::{AgentConfig, WhenUnavailable};
use msocks_agent::links::Interface;
use msocks_agent::policy::{self, host_matches, LiveLinks, PeerInfo, StreamInfo};
use msocks_client::TargetAddr;

const CONFIG: &str = r#"
[[interface]]
name = "eth0"
proxy = "192.0.2.1:1080"
cost = "free"
bandwidth = "high"
tags = ["lan"]

[[interface]]
name = "wlan0"
proxy = "192.0.2.2:1080"
cost = "cheap"
tags = ["wifi"]

[[interface]]
name = "wwan0"
proxy = "192.0.2.3:1080"
cost = "expensive"
latency = "high"

[[rule]]
name = "video"
host = ["*.video.example"]
outbound = ["bandwidth:high", "wlan0"]
inbound = ["tag:lan", "tag:wifi"]
when_unavailable = "fail"

[[rule]]
name = "intranet"
network = ["10.0.0.0/8"]
port = [22, "8000-8100"]
outbound = ["eth0"]
inbound = ["wwan0"]

[[rule]]
name = "builds"
uid = [1000]
program = ["cargo"]
outbound = ["cost:expensive"]

[[rule]]
name = "catch-all video"
host = ["*"]
port = [443]
outbound = ["wwan0"]
"#;

fn config() -> AgentConfig {
    AgentConfig::from_toml(CONFIG, Path::new("test.toml")).expect("valid config")
}

fn iface(name: &str, index: u32, up: bool, addrs: &[&str]) -> Interface {
    Interface {
        name: name.into(),
        index,
        up,
        addrs: addrs.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect(),
    }
}

fn live(up: &[&str]) -> LiveLinks {
    let all = [
        iface("eth0", 2, up.contains(&"eth0"), &["198.51.100.10"]),
        iface("wlan0", 3, up.contains(&"wlan0"), &["198.51.100.20"]),
        iface("wwan0", 4, up.contains(&"wwan0"), &["198.51.100.30"]),
    ];
    all.into_iter().map(|i| (i.name.clone(), i)).collect()
}

fn domain(name: &str, port: u16) -> StreamInfo {
    StreamInfo {
        target: TargetAddr::Domain(name.into(), port),
        peer: PeerInfo::default(),
    }
}

fn ip(addr: &str) -> StreamInfo {
    StreamInfo {
        target: TargetAddr::Ip(addr.parse::<SocketAddr>().unwrap()),
        peer: PeerInfo::default(),
    }
}

#[test]
fn host_patterns() {
    assert!(host_matches("*.example.com", "a.example.com"));
    assert!(host_matches("*.example.com", "a.b.EXAMPLE.com."));
    assert!(!host_matches("*.example.com", "example.com"));
    assert!(!host_matches("*.example.com", "badexample.com"));
    assert!(host_matches("example.com", "Example.COM"));
    assert!(!host_matches("example.com", "www.example.com"));
    assert!(host_matches("*", "anything"));
}

#[test]
fn rules_match_by_destination_port_and_program_first_match_wins() {
    let c = config();
    let d = policy::decide(&c, &domain("cdn.video.example", 443));
    assert_eq!(
        d.rule,
        Some(0),
        "video rule comes before the port-443 catch-all"
    );
    assert_eq!(d.when_unavailable, WhenUnavailable::Fail);
    assert_eq!(
        policy::decide(&c, &domain("other.example", 443)).rule,
        Some(3)
    );
    // Host patterns never match IP destinations; networks never match names.
    assert_eq!(policy::decide(&c, &ip("10.1.2.3:22")).rule, Some(1));
    assert_eq!(policy::decide(&c, &ip("10.1.2.3:8050")).rule, Some(1));
    assert_eq!(policy::decide(&c, &ip("10.1.2.3:8101")).rule, None);
    assert_eq!(policy::decide(&c, &ip("11.1.2.3:22")).rule, None);
    assert_eq!(policy::decide(&c, &domain("10.1.2.3", 22)).rule, None);

    let mut s = ip("203.0.113.1:80");
    assert_eq!(
        policy::decide(&c, &s).rule,
        None,
        "unknown program: no uid rule matches"
    );
    s.peer = PeerInfo {
        uid: Some(1000),
        pid: Some(7),
        program: Some("cargo".into()),
    };
    assert_eq!(policy::decide(&c, &s).rule, Some(2));
    s.peer.uid = Some(0);
    assert_eq!(
        policy::decide(&c, &s).rule,
        None,
        "both uid and program must match"
    );

    let default = policy::decide(&c, &ip("203.0.113.1:80"));
    assert_eq!(default.rule_label, "default");
    assert_eq!(
        (default.outbound.as_slice(), default.inbound.as_slice()),
        (&[0, 1, 2][..], &[0, 1, 2][..])
    );
    assert_eq!(default.when_unavailable, WhenUnavailable::Wait);
}

#[test]
fn outbound_and_inbound_are_chosen_separately_from_usable_interfaces() {
    let c = config();
    let d = policy::decide(&c, &ip("10.0.0.5:22"));
    let p = policy::placements(&c, &d, &live(&["eth0", "wlan0", "wwan0"]));
    assert_eq!(
        (p[0].outbound.as_str(), p[0].inbound.as_str()),
        ("eth0", "wwan0")
    );
    assert_eq!(p[0].path.proxy, "192.0.2.1:1080".parse().unwrap());
    assert_eq!(p[0].path.local_addr, Some("198.51.100.30".parse().unwrap()));
    // Its only inbound interface is down: nothing allowed, and the rule waits.
    assert!(policy::placements(&c, &d, &live(&["eth0", "wlan0"])).is_empty());
    assert_eq!(d.when_unavailable, WhenUnavailable::Wait);

    // Selectors expand in order: bandwidth:high (eth0) then wlan0.
    let v = policy::decide(&c, &domain("a.video.example", 443));
    let names = |l: &LiveLinks| {
        policy::placements(&c, &v, l)
            .first()
            .map(|p| (p.outbound.clone(), p.inbound.clone()))
    };
    assert_eq!(
        names(&live(&["eth0", "wlan0"])),
        Some(("eth0".into(), "eth0".into()))
    );
    assert_eq!(
        names(&live(&["wlan0", "wwan0"])),
        Some(("wlan0".into(), "wlan0".into()))
    );
    assert_eq!(
        names(&live(&["wwan0"])),
        None,
        "video may not use wwan0; the rule fails"
    );

    // An interface that is up without an address of the proxy's family is not usable for
    // that path.
    let mut l = live(&["eth0"]);
    l.insert("eth0".into(), iface("eth0", 2, true, &["2001:db8::1"]));
    assert!(policy::placements(&c, &policy::decide(&c, &ip("10.0.0.5:22")), &l).is_empty());
}

#[test]
fn an_ipv6_proxy_is_never_reached_from_a_link_local_address() {
    // After `ip link set dev down/up` the kernel has flushed an interface's global IPv6
    // addresses; it is back with its IPv4 address and a link-local fe80:: one. A path from
    // fe80:: (no scope id) to a global proxy address fails to connect with EINVAL, so the
    // interface must not be offered for its IPv6 proxy until a global address returns.
    let c = AgentConfig::from_toml(
        "[[interface]]\nname = \"eth0\"\nproxy = \"[2001:db8::1]:1080\"\n",
        Path::new("test.toml"),
    )
    .expect("valid config");
    let d = policy::decide(&c, &ip("10.0.0.5:22"));
    let with = |addrs: &[&str]| -> LiveLinks {
        [("eth0".to_string(), iface("eth0", 2, true, addrs))]
            .into_iter()
            .collect()
    };
    let l = with(&["198.51.100.10", "fe80::1"]);
    assert!(policy::placements(&c, &d, &l).is_empty());
    assert_eq!(policy::pinned_placement(&c, "eth0", &l), None);
    let l = with(&["198.51.100.10", "fe80::1", "2001:db8::10"]);
    let p = policy::placements(&c, &d, &l);
    assert_eq!(p[0].path.local_addr, Some("2001:db8::10".parse().unwrap()));
}

#[test]
fn invalid_configs_are_refused_with_a_reason() {
    let bad = [
        (
            "[[rule]]\noutbound = [\"eth9\"]",
            "matches no [[interface]]",
        ),
        (
            "[[interface]]\nname = \"eth0\"\n[[rule]]\noutbound = [\"eth0\"]",
            "without a `proxy`",
        ),
        ("[[rule]]\nport = [\"90-80\"]", "empty"),
        ("[[rule]]\nhost = [\"a.*.com\"]", "leading"),
        (
            "[[interface]]\nname = \"eth0\"\n[[interface]]\nname = \"eth0\"",
            "twice",
        ),
        ("[[rule]]\nwhen_unavailable = \"later\"", "unknown variant"),
        ("bogus = 1", "unknown field"),
    ];
    for (text, want) in bad {
        let e = AgentConfig::from_toml(text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text:?}: {e}");
        assert!(e.contains("x.toml"), "the error names the file: {e}");
    }
    let empty = AgentConfig::from_toml("", Path::new("x.toml")).unwrap();
    assert_eq!(empty.listen, vec!["127.0.0.1:1080".parse().unwrap()]);
}
