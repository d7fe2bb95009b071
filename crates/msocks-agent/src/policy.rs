//! Matching streams to rules, and choosing a stream's path from the interfaces that are
//! usable right now.
//!
//! Pure functions over the configuration and a view of the links, so that every decision
//! can be unit-tested without sockets or namespaces.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use msocks_client::{ProxyPath, TargetAddr};

use crate::config::{
    parse_port_range, rule_label, AgentConfig, PortSpec, RuleConfig, WhenUnavailable,
};
use crate::links::Interface;

/// What the agent knows about the local program behind a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// The program's user id, when the kernel tells it.
    pub uid: Option<u32>,
    /// The process id, when it could be found.
    pub pid: Option<u32>,
    /// `/proc/PID/comm`.
    pub program: Option<String>,
}

/// Everything a rule can match on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The destination the local program asked for.
    pub target: TargetAddr,
    /// The local program.
    pub peer: PeerInfo,
}

/// What the policy says about one stream: the allowed interfaces in each direction, in
/// order of preference (indices into the configuration's interfaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The matching rule's index, or `None` for the default.
    pub rule: Option<usize>,
    /// `rule 2 ("bulk")` or `default`, for logs and status.
    pub rule_label: String,
    /// Interfaces data may leave by (each has a proxy address).
    pub outbound: Vec<usize>,
    /// Interfaces data may arrive on.
    pub inbound: Vec<usize>,
    /// Wait or fail while nothing is usable.
    pub when_unavailable: WhenUnavailable,
}

/// A chosen path and the interfaces it stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Interface data leaves by (its proxy address is `path.proxy`).
    pub outbound: String,
    /// Interface data arrives on (its address is `path.local_addr`).
    pub inbound: String,
    /// The path handed to the MSOCKS library.
    pub path: ProxyPath,
}

/// The live state of the interfaces by name, as the link watcher reports it.
pub type LiveLinks = HashMap<String, Interface>;

/// Whether `name` matches a host pattern: `*`, `*.suffix` (strictly below `suffix`) or an
/// exact name; case-insensitive, a trailing dot ignored.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
        None => name == pattern,
    }
}

fn port_matches(spec: &PortSpec, port: u16) -> bool {
    match spec {
        PortSpec::One(p) => *p == port,
        // Validated at load; an invalid range matches nothing rather than panicking.
        PortSpec::Range(s) => parse_port_range(s).is_ok_and(|(lo, hi)| (lo..=hi).contains(&port)),
    }
}

/// Whether `rule` matches the stream. Every criterion given must match.
pub fn rule_matches(rule: &RuleConfig, info: &StreamInfo) -> bool {
    if !rule.host.is_empty() {
        let TargetAddr::Domain(name, _) = &info.target else {
            return false;
        };
        if !rule.host.iter().any(|p| host_matches(p, name)) {
            return false;
        }
    }
    if !rule.network.is_empty() {
        let TargetAddr::Ip(sa) = &info.target else {
            return false;
        };
        if !rule.network.iter().any(|n| n.contains(&sa.ip())) {
            return false;
        }
    }
    if !rule.port.is_empty()
        && !rule
            .port
            .iter()
            .any(|p| port_matches(p, info.target.port()))
    {
        return false;
    }
    if !rule.uid.is_empty() && !info.peer.uid.is_some_and(|u| rule.uid.contains(&u)) {
        return false;
    }
    if !rule.program.is_empty()
        && !info
            .peer
            .program
            .as_deref()
            .is_some_and(|p| rule.program.iter().any(|r| r == p))
    {
        return false;
    }
    true
}

/// Expands selectors into interface indices, in selector order then config order, without
/// repeats; `None` means every interface in config order.
fn expand(config: &AgentConfig, selectors: Option<&Vec<String>>, need_proxy: bool) -> Vec<usize> {
    let mut out = Vec::new();
    let mut push = |i: usize| {
        if !out.contains(&i) && (!need_proxy || config.interfaces[i].proxy.is_some()) {
            out.push(i);
        }
    };
    match selectors {
        None => (0..config.interfaces.len()).for_each(&mut push),
        Some(list) => {
            for sel in list {
                for (i, iface) in config.interfaces.iter().enumerate() {
                    if iface.matches_selector(sel) {
                        push(i);
                    }
                }
            }
        }
    }
    out
}

/// The first matching rule's decision, or the default (every interface, config order, both
/// directions, wait).
pub fn decide(config: &AgentConfig, info: &StreamInfo) -> Decision {
    for (i, rule) in config.rules.iter().enumerate() {
        if rule_matches(rule, info) {
            return Decision {
                rule: Some(i),
                rule_label: rule_label(rule, i),
                outbound: expand(config, rule.outbound.as_ref(), true),
                inbound: expand(config, rule.inbound.as_ref(), false),
                when_unavailable: rule.when_unavailable,
            };
        }
    }
    Decision {
        rule: None,
        rule_label: "default".into(),
        outbound: expand(config, None, true),
        inbound: expand(config, None, false),
        when_unavailable: WhenUnavailable::Wait,
    }
}

/// The address of `iface` a connection to `proxy` is made from: one of the proxy's family
/// that can reach it (never a link-local IPv6 address, which would need a scope id).
fn addr_for(iface: &Interface, proxy: SocketAddr) -> Option<IpAddr> {
    iface.source_addr(proxy.is_ipv4())
}

fn usable<'a>(live: &'a LiveLinks, name: &str) -> Option<&'a Interface> {
    live.get(name).filter(|i| i.usable())
}

/// Every usable (outbound, inbound) combination the decision allows, best first: the
/// outbound preference decides first, then the inbound one. The first is the stream's
/// path; the rest are the library's fallbacks for automatic reconnects.
pub fn placements(config: &AgentConfig, decision: &Decision, live: &LiveLinks) -> Vec<Placement> {
    let mut out = Vec::new();
    for &o in &decision.outbound {
        let oc = &config.interfaces[o];
        let (Some(proxy), Some(_)) = (oc.proxy, usable(live, &oc.name)) else {
            continue;
        };
        for &i in &decision.inbound {
            let ic = &config.interfaces[i];
            let Some(local) = usable(live, &ic.name).and_then(|l| addr_for(l, proxy)) else {
                continue;
            };
            out.push(Placement {
                outbound: oc.name.clone(),
                inbound: ic.name.clone(),
                path: ProxyPath::new(proxy).with_local_addr(local),
            });
        }
    }
    out
}

/// The path for a stream moved by hand onto `name`, both directions, if that interface is
/// configured with a proxy address and usable.
pub fn pinned_placement(config: &AgentConfig, name: &str, live: &LiveLinks) -> Option<Placement> {
    let ic = config.interfaces.iter().find(|i| i.name == name)?;
    let proxy = ic.proxy?;
    let local = usable(live, name).and_then(|l| addr_for(l, proxy))?;
    Some(Placement {
        outbound: name.to_owned(),
        inbound: name.to_owned(),
        path: ProxyPath::new(proxy).with_local_addr(local),
    })
}

/// Names the interfaces a path stands for: the one whose proxy address is `path.proxy`,
/// and the one that holds `path.local_addr` (`"-"` when unknown).
pub fn describe_path(config: &AgentConfig, live: &LiveLinks, path: &ProxyPath) -> (String, String) {
    let out = config
        .interfaces
        .iter()
        .find(|i| i.proxy.is_some_and(|p| p.ip() == path.proxy.ip()))
        .map(|i| i.name.clone())
        .unwrap_or_else(|| "-".into());
    let inb = path
        .local_addr
        .and_then(|a| live.values().find(|l| l.addrs.contains(&a)))
        .map(|l| l.name.clone())
        .unwrap_or_else(|| "-".into());
    (out, inb)
}
