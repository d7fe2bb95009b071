//! The agent's configuration: a TOML file with the local SOCKS5 endpoint, the control socket,
//! the mobile node's interfaces (with the proxy address routed out of each) and the policy
//! rules that place streams on them.
//!
//! Every key has a default, so an empty file is valid — but without `[[interface]]` entries
//! no stream has anywhere to go. See `crates/msocks-agent/README.md` for a full example.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::error::ConfigError;

/// Default local SOCKS5 endpoint.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1080";
/// Default control socket.
pub const DEFAULT_CONTROL: &str = "/run/msocks/agent.sock";

/// The whole agent configuration (`msocks agent --config FILE`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Addresses of the local SOCKS5 endpoint. Default `["127.0.0.1:1080"]`.
    pub listen: Vec<SocketAddr>,
    /// Path of the control socket (`msocks status`, `msocks move`).
    pub control: PathBuf,
    /// Install a host route per interface's proxy address (`ip route replace PROXY/32 dev
    /// IFACE`) so that the outbound choice is honoured by the kernel. `None`: on when the
    /// agent runs as root.
    pub manage_routes: Option<bool>,
    /// How long a stream under `when_unavailable = "wait"` is held while no allowed
    /// interface is usable, before it is given up.
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// Limit for one TCP connection attempt to the proxy.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Look up the program behind each local connection (`/proc`), for `program` rules and
    /// for `msocks status`. Costs a scan of `/proc/*/fd` per connection.
    pub identify_programs: bool,
    /// Username/password for the proxy (RFC 1929), if it requires them.
    pub proxy_auth: Option<ProxyAuth>,
    /// How often each interface's path to the proxy is probed (a ping on a standby
    /// connection, PROTOCOL.md 3.13).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// An interface whose probe is not answered within this time (or whose standby
    /// connection cannot be opened within it) is taken as failed even though its link is
    /// up, and its streams move away; it is usable again once a probe is answered.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Probe every interface and keep its standby connection open, so that a move onto it
    /// costs one RECONNECT round trip instead of a TCP handshake plus one. Off: no probes,
    /// cold moves, failures found only by link events and TCP.
    pub standby: bool,
    /// The mobile node's interfaces, in default order of preference.
    #[serde(rename = "interface")]
    pub interfaces: Vec<InterfaceConfig>,
    /// Policy rules, tried in order; the first that matches places the stream.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1080))],
            control: PathBuf::from(DEFAULT_CONTROL),
            manage_routes: None,
            wait_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
            identify_programs: true,
            proxy_auth: None,
            probe_interval: Duration::from_millis(250),
            probe_timeout: Duration::from_secs(1),
            standby: true,
            interfaces: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// `[proxy_auth]`: RFC 1929 credentials for the proxy.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyAuth {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for ProxyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyAuth")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Cost class of an interface.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Cost {
    /// Flat-rate or free (a LAN).
    Free,
    /// Some cost per byte.
    Cheap,
    /// Expensive per byte (metered cellular, satellite).
    Expensive,
}

/// Bandwidth or latency class of an interface.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::Medium => "medium",
            Level::High => "high",
        }
    }
}

impl Cost {
    fn name(self) -> &'static str {
        match self {
            Cost::Free => "free",
            Cost::Cheap => "cheap",
            Cost::Expensive => "expensive",
        }
    }
}

/// `[[interface]]`: one network interface of the mobile node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// The kernel's interface name (`wlan0`, `eth0`, `wwan0`).
    pub name: String,
    /// The proxy address (and port) to use when data should LEAVE through this interface.
    /// The paper gives the proxy one address per mobile-node interface and host-routes each
    /// one out of its interface. Without it the interface can only be used inbound.
    pub proxy: Option<SocketAddr>,
    /// Next hop for the host route to `proxy` (when the proxy is not on the link itself).
    pub gateway: Option<IpAddr>,
    /// Cost class, for `cost:CLASS` selectors in rules.
    pub cost: Option<Cost>,
    /// Bandwidth class, for `bandwidth:CLASS` selectors.
    pub bandwidth: Option<Level>,
    /// Latency class, for `latency:CLASS` selectors.
    pub latency: Option<Level>,
    /// Free-form tags, for `tag:NAME` selectors.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl InterfaceConfig {
    /// Whether this interface matches a selector: its name, or `tag:T`, `cost:C`,
    /// `bandwidth:B`, `latency:L`.
    pub fn matches_selector(&self, selector: &str) -> bool {
        match selector.split_once(':') {
            None => self.name == selector,
            Some(("tag", t)) => self.tags.iter().any(|x| x == t),
            Some(("cost", c)) => self.cost.is_some_and(|x| x.name() == c),
            Some(("bandwidth", b)) => self.bandwidth.is_some_and(|x| x.name() == b),
            Some(("latency", l)) => self.latency.is_some_and(|x| x.name() == l),
            Some(_) => false,
        }
    }
}

/// What to do with a stream when none of its allowed interfaces is usable.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WhenUnavailable {
    /// Hold the stream open (bytes queue within the pipe's bounds) until an allowed
    /// interface comes up, for at most `wait_timeout`.
    #[default]
    Wait,
    /// Refuse a new stream (SOCKS reply 0x03) and close an established one.
    Fail,
}

/// A port or an inclusive range `"LOW-HIGH"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PortSpec {
    /// One port.
    One(u16),
    /// `"LOW-HIGH"` (or a single number as a string).
    Range(String),
}

/// `[[rule]]`: which streams go where. Every criterion given must match (a list matches
/// when any of its entries does); a rule with no criterion matches every stream.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A name for logs and `msocks status`.
    pub name: Option<String>,
    /// Destination name patterns: `example.com` (exactly), `*.example.com` (any name below
    /// it), `*` (any name). Matched only against names the client asked the agent to
    /// resolve (`curl --socks5-hostname`); an IP destination never matches a host pattern.
    #[serde(default)]
    pub host: Vec<String>,
    /// Destination networks (`10.0.0.0/8`, `2001:db8::/32`); matched only against IP
    /// destinations.
    #[serde(default)]
    pub network: Vec<IpNet>,
    /// Destination ports: `443` or `"8000-8100"`.
    #[serde(default)]
    pub port: Vec<PortSpec>,
    /// Local user ids of the program that opened the stream.
    #[serde(default)]
    pub uid: Vec<u32>,
    /// Program names (`/proc/PID/comm`, at most 15 characters) of the program that opened
    /// the stream.
    #[serde(default)]
    pub program: Vec<String>,
    /// Interfaces (names or selectors) data may LEAVE by, in order of preference: the
    /// stream uses the proxy address of the first usable one. Default: all, config order.
    pub outbound: Option<Vec<String>>,
    /// Interfaces data may ARRIVE on, in order of preference: the stream binds to the
    /// address of the first usable one. Default: all, config order.
    pub inbound: Option<Vec<String>>,
    /// What happens while no allowed interface is usable.
    #[serde(default)]
    pub when_unavailable: WhenUnavailable,
}

impl AgentConfig {
    /// Parses TOML text; `path` only names the source in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Name the file: the message is read in a log line after SIGHUP, or by a user
        // with several configs.
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(message) => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            e => e,
        })?;
        Ok(config)
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Whether host routes are managed: the explicit setting, else "running as root".
    pub fn manage_routes_effective(&self) -> bool {
        self.manage_routes
            .unwrap_or_else(|| nix::unistd::geteuid().is_root())
    }

    /// Checks what the types cannot: names, selectors, ranges, durations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.listen.is_empty() {
            return invalid("`listen` must name at least one address".into());
        }
        if self.wait_timeout.is_zero() || self.connect_timeout.is_zero() {
            return invalid("wait_timeout and connect_timeout must be greater than 0".into());
        }
        if self.probe_interval.is_zero() || self.probe_timeout.is_zero() {
            return invalid("probe_interval and probe_timeout must be greater than 0".into());
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            // IFNAMSIZ is 16 with the NUL; `ip` and the kernel refuse longer names.
            if iface.name.is_empty() || iface.name.len() > 15 || iface.name.contains(['/', ' ']) {
                return invalid(format!("interface {:?} is not a valid name", iface.name));
            }
            if self.interfaces[..i].iter().any(|o| o.name == iface.name) {
                return invalid(format!("interface {:?} is listed twice", iface.name));
            }
            if let (Some(gw), Some(proxy)) = (iface.gateway, iface.proxy) {
                if gw.is_ipv4() != proxy.is_ipv4() {
                    return invalid(format!(
                        "interface {}: gateway {gw} and proxy {proxy} are of different families",
                        iface.name
                    ));
                }
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let label = rule_label(rule, i);
            for p in &rule.port {
                if let PortSpec::Range(s) = p {
                    parse_port_range(s)
                        .map_err(|m| ConfigError::Invalid(format!("{label}: {m}")))?;
                }
            }
            for h in &rule.host {
                let body = h.strip_prefix("*.").unwrap_or(h);
                let ok = h == "*" || (!body.is_empty() && !body.contains('*'));
                if !ok {
                    return invalid(format!(
                        "{label}: host pattern {h:?}: `*` is allowed only as `*` or a leading `*.`"
                    ));
                }
            }
            for (what, list) in [("outbound", &rule.outbound), ("inbound", &rule.inbound)] {
                let Some(list) = list else { continue };
                if list.is_empty() {
                    return invalid(format!("{label}: `{what}` lists no interface"));
                }
                for sel in list {
                    let matched: Vec<&InterfaceConfig> = self
                        .interfaces
                        .iter()
                        .filter(|i| i.matches_selector(sel))
                        .collect();
                    if matched.is_empty() {
                        return invalid(format!(
                            "{label}: `{what}` entry {sel:?} matches no [[interface]]"
                        ));
                    }
                    if what == "outbound" && matched.iter().all(|i| i.proxy.is_none()) {
                        return invalid(format!(
                            "{label}: `outbound` entry {sel:?} names only interfaces without a `proxy` address"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// `rule 2 ("bulk")` for messages.
pub(crate) fn rule_label(rule: &RuleConfig, index: usize) -> String {
    match &rule.name {
        Some(n) => format!("rule {} ({n:?})", index + 1),
        None => format!("rule {}", index + 1),
    }
}

/// Parses `"LOW-HIGH"` or `"PORT"` into an inclusive range.
pub(crate) fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let parse = |x: &str| {
        x.trim()
            .parse::<u16>()
            .map_err(|_| format!("port {s:?} is not a port or a range LOW-HIGH"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let p = parse(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("port range {s:?} is empty"));
    }
    Ok((lo, hi))
}
