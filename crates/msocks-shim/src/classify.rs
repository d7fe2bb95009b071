//! Which connects go through the agent, and which names are resolved by it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use msocks_proto::TargetAddr;

use crate::config::Config;

/// Why a connect is left to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direct {
    /// 127.0.0.0/8 or ::1: local services, and the agent itself.
    Loopback,
    /// 0.0.0.0 or :: (the kernel treats it as "this host").
    Unspecified,
    /// 169.254.0.0/16 or fe80::/10: reachable only on the local link, never through a proxy.
    LinkLocal,
    /// Multicast or broadcast: no TCP peer can be there; let the kernel say so.
    NotUnicast,
    /// The agent's own address (when it is not on loopback).
    Agent,
    /// Listed in `MSOCKS_SHIM_EXCLUDE`.
    Excluded(IpNet),
}

/// What to do with one TCP connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Call the real `connect` unchanged.
    Direct(Direct),
    /// Connect to the agent and ask it for this target.
    Proxy(TargetAddr),
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it stands for: an
/// AF_INET6 socket connecting there really talks IPv4, and must be classified as such.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Decides for a connect to `dest` (as the program gave it). `fake_name` maps a placeholder
/// address handed out by the shim's `getaddrinfo` back to its name (always `None` in local
/// DNS mode).
pub fn decide(
    dest: SocketAddr,
    config: &Config,
    fake_name: impl FnOnce(Ipv4Addr) -> Option<String>,
) -> Decision {
    let dest = unmap(dest);
    let ip = dest.ip();
    if ip.is_loopback() {
        return Decision::Direct(Direct::Loopback);
    }
    if ip.is_unspecified() {
        return Decision::Direct(Direct::Unspecified);
    }
    if dest == unmap(config.agent) {
        return Decision::Direct(Direct::Agent);
    }
    match ip {
        IpAddr::V4(v4) if v4.is_link_local() => return Decision::Direct(Direct::LinkLocal),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => {
            return Decision::Direct(Direct::LinkLocal)
        }
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => {
            return Decision::Direct(Direct::NotUnicast)
        }
        IpAddr::V6(v6) if v6.is_multicast() => return Decision::Direct(Direct::NotUnicast),
        _ => {}
    }
    if let Some(net) = config.exclude.iter().find(|n| n.contains(&ip)) {
        return Decision::Direct(Direct::Excluded(*net));
    }
    if let IpAddr::V4(v4) = ip {
        if let Some(name) = fake_name(v4) {
            return Decision::Proxy(TargetAddr::Domain(name, dest.port()));
        }
    }
    Decision::Proxy(TargetAddr::Ip(dest))
}

/// Names that must be resolved on this host even in remote mode: they name this host, so the
/// proxy would resolve them to itself or not at all.
pub fn is_local_name(name: &str, hostname: Option<&str>, hosts_file: &HashSet<String>) -> bool {
    let name = normalize_name(name);
    name == "localhost"
        || name.ends_with(".localhost")
        || name == "localhost.localdomain"
        || name.starts_with("ip6-")
        || hostname.is_some_and(|h| normalize_name(h) == name)
        || hosts_file.contains(&name)
}

/// Lower case without a trailing dot: how names are compared and sent to the agent.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The host names listed in an `/etc/hosts` text (normalized). Names there are the
/// administrator's local decisions, so the shim lets libc resolve them.
pub fn hosts_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut fields = line.split_whitespace();
        let Some(addr) = fields.next() else { continue };
        if addr.parse::<IpAddr>().is_err() {
            continue;
        }
        names.extend(fields.map(normalize_name));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config {
            exclude: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
            agent: "192.0.2.1:1080".parse().unwrap(),
            ..Config::default()
        }
    }

    fn d(dest: &str) -> Decision {
        decide(dest.parse().unwrap(), &cfg(), |ip| {
            (ip == Ipv4Addr::new(198, 18, 0, 5)).then(|| "example.org".to_string())
        })
    }

    fn proxied(dest: &str) -> Decision {
        Decision::Proxy(TargetAddr::Ip(dest.parse().unwrap()))
    }

    #[test]
    fn local_and_excluded_destinations_are_direct() {
        use Decision::Direct as D;
        assert_eq!(d("127.0.0.1:80"), D(Direct::Loopback));
        assert_eq!(d("127.3.4.5:80"), D(Direct::Loopback));
        assert_eq!(d("[::1]:80"), D(Direct::Loopback));
        assert_eq!(d("[::ffff:127.0.0.1]:80"), D(Direct::Loopback));
        assert_eq!(d("0.0.0.0:80"), D(Direct::Unspecified));
        assert_eq!(d("[::]:80"), D(Direct::Unspecified));
        assert_eq!(d("192.0.2.1:1080"), D(Direct::Agent));
        assert_eq!(d("[::ffff:192.0.2.1]:1080"), D(Direct::Agent));
        assert_eq!(d("169.254.1.1:80"), D(Direct::LinkLocal));
        assert_eq!(d("[fe80::1]:80"), D(Direct::LinkLocal));
        assert_eq!(d("224.0.0.1:80"), D(Direct::NotUnicast));
        assert_eq!(d("255.255.255.255:80"), D(Direct::NotUnicast));
        assert_eq!(d("[ff02::1]:80"), D(Direct::NotUnicast));
        assert_eq!(
            d("10.77.3.2:80"),
            D(Direct::Excluded("10.0.0.0/8".parse().unwrap()))
        );
        assert_eq!(
            d("[::ffff:10.1.1.1]:80"),
            D(Direct::Excluded("10.0.0.0/8".parse().unwrap()))
        );
        assert_eq!(
            d("[fd12::1]:80"),
            D(Direct::Excluded("fd00::/8".parse().unwrap()))
        );
    }

    #[test]
    fn remote_destinations_are_proxied_and_mapped_ones_as_ipv4() {
        assert_eq!(d("192.0.2.1:80"), proxied("192.0.2.1:80"));
        assert_eq!(d("[::ffff:203.0.113.9]:443"), proxied("203.0.113.9:443"));
        assert_eq!(d("[2001:db8::1]:443"), proxied("[2001:db8::1]:443"));
    }

    #[test]
    fn placeholder_addresses_become_names() {
        let want = Decision::Proxy(TargetAddr::Domain("example.org".into(), 8080));
        assert_eq!(d("198.18.0.5:8080"), want);
        assert_eq!(d("[::ffff:198.18.0.5]:8080"), want);
        // A placeholder this process never handed out is just an address.
        assert_eq!(d("198.18.0.6:80"), proxied("198.18.0.6:80"));
    }

    #[test]
    fn local_names() {
        let hosts = hosts_names(
            "127.0.0.1 localhost\n# 10.0.0.1 commented.example\n10.0.0.2 Box.LAN box # x\nbogus line\n",
        );
        assert_eq!(
            hosts,
            ["localhost", "box.lan", "box"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        for n in [
            "localhost",
            "LOCALHOST.",
            "a.localhost",
            "ip6-loopback",
            "box.lan",
            "mn",
        ] {
            assert!(is_local_name(n, Some("mn"), &hosts), "{n}");
        }
        for n in ["example.org", "commented.example", "localhost.example"] {
            assert!(!is_local_name(n, Some("mn"), &hosts), "{n}");
        }
    }
}
