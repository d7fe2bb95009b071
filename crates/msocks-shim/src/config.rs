//! The shim's settings, read once from the environment `msocks run` prepared.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

/// Where the agent listens when `MSOCKS_AGENT` is unset (the agent's own default).
pub const DEFAULT_AGENT: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1080);

/// How long one connect through the agent may take when `MSOCKS_SHIM_TIMEOUT` is unset: the
/// agent may hold a reply while it waits for a usable link, so this is longer than a typical
/// TCP connect, but still bounded.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// What `getaddrinfo` does with names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// Names get a placeholder address; `connect` to it sends the name to the agent, so the
    /// proxy resolves it (the default: the mobile node may have no working resolver, and the
    /// agent's host rules only see names this way).
    Remote,
    /// Names are resolved by libc as usual, and the agent is sent IP addresses.
    Local,
}

/// A setting that could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `MSOCKS_AGENT` is not `IP:PORT`.
    #[error("MSOCKS_AGENT={0:?} is not an IP:PORT address (IPv6 as [ADDR]:PORT)")]
    Agent(String),
    /// `MSOCKS_DNS` is neither `remote` nor `local`.
    #[error("MSOCKS_DNS={0:?} is neither \"remote\" nor \"local\"")]
    Dns(String),
    /// An entry of `MSOCKS_SHIM_EXCLUDE` is not an address or network.
    #[error("MSOCKS_SHIM_EXCLUDE entry {0:?} is not an IP address or ADDR/PREFIX network")]
    Exclude(String),
    /// `MSOCKS_SHIM_TIMEOUT` is not a positive number of seconds.
    #[error("MSOCKS_SHIM_TIMEOUT={0:?} is not a positive number of seconds")]
    Timeout(String),
}

/// Everything the shim needs to decide and to carry out a connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The agent's SOCKS5 address (`MSOCKS_AGENT`).
    pub agent: SocketAddr,
    /// Name handling (`MSOCKS_DNS`).
    pub dns: DnsMode,
    /// Destinations reached directly, besides loopback (`MSOCKS_SHIM_EXCLUDE`).
    pub exclude: Vec<IpNet>,
    /// One line per decision on standard error (`MSOCKS_SHIM_LOG`).
    pub log: bool,
    /// Limit for the whole connect-and-handshake with the agent (`MSOCKS_SHIM_TIMEOUT`).
    pub timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent: DEFAULT_AGENT,
            dns: DnsMode::Remote,
            exclude: Vec::new(),
            log: false,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl Config {
    /// Reads the settings through `get` (the environment in the shim, a map in tests). An
    /// unset or empty variable means the default.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let mut config = Config::default();
        if let Some(v) = get("MSOCKS_AGENT") {
            config.agent = v.trim().parse().map_err(|_| ConfigError::Agent(v))?;
        }
        if let Some(v) = get("MSOCKS_DNS") {
            config.dns = match v.trim() {
                "remote" => DnsMode::Remote,
                "local" => DnsMode::Local,
                _ => return Err(ConfigError::Dns(v)),
            };
        }
        if let Some(v) = get("MSOCKS_SHIM_EXCLUDE") {
            for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                config.exclude.push(parse_net(item)?);
            }
        }
        if let Some(v) = get("MSOCKS_SHIM_LOG") {
            config.log = !matches!(v.trim(), "0" | "false" | "no" | "off");
        }
        if let Some(v) = get("MSOCKS_SHIM_TIMEOUT") {
            let secs: f64 = v
                .trim()
                .parse()
                .map_err(|_| ConfigError::Timeout(v.clone()))?;
            if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
                return Err(ConfigError::Timeout(v));
            }
            config.timeout = Duration::from_secs_f64(secs);
        }
        Ok(config)
    }
}

/// `ADDR/PREFIX`, or a bare address meaning just that host.
fn parse_net(item: &str) -> Result<IpNet, ConfigError> {
    if let Ok(net) = item.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    item.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ConfigError::Exclude(item.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        assert_eq!(parse(&[]), Ok(Config::default()));
        assert_eq!(parse(&[("MSOCKS_AGENT", "  ")]), Ok(Config::default()));
    }

    #[test]
    fn every_setting_is_read() {
        let c = parse(&[
            ("MSOCKS_AGENT", "[::1]:9050"),
            ("MSOCKS_DNS", "local"),
            (
                "MSOCKS_SHIM_EXCLUDE",
                "10.0.0.0/8, 192.0.2.7,fd00::/8,10.1.2.3/16",
            ),
            ("MSOCKS_SHIM_LOG", "1"),
            ("MSOCKS_SHIM_TIMEOUT", "2.5"),
        ])
        .unwrap();
        assert_eq!(c.agent, "[::1]:9050".parse().unwrap());
        assert_eq!(c.dns, DnsMode::Local);
        let nets: Vec<String> = c.exclude.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            nets,
            ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "10.1.0.0/16"]
        );
        assert!(c.log);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert!(!parse(&[("MSOCKS_SHIM_LOG", "0")]).unwrap().log);
    }

    #[test]
    fn bad_values_are_errors() {
        assert_eq!(
            parse(&[("MSOCKS_AGENT", "localhost:1080")]),
            Err(ConfigError::Agent("localhost:1080".into()))
        );
        assert_eq!(
            parse(&[("MSOCKS_DNS", "proxy")]),
            Err(ConfigError::Dns("proxy".into()))
        );
        assert_eq!(
            parse(&[("MSOCKS_SHIM_EXCLUDE", "10.0.0.0/33")]),
            Err(ConfigError::Exclude("10.0.0.0/33".into()))
        );
        for t in ["0", "-1", "soon", "inf"] {
            assert_eq!(
                parse(&[("MSOCKS_SHIM_TIMEOUT", t)]),
                Err(ConfigError::Timeout(t.into()))
            );
        }
    }
}
