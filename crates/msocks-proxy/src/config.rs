//! The proxy's configuration: a TOML file whose every key has a default, so that an empty
//! file (or none at all) gives a working proxy on 127.0.0.1:1080 with no authentication.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::rules::RuleConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, with line and column.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole proxy configuration (`msocks proxy --config FILE`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Addresses to accept SOCKS5 clients on. Default: `["127.0.0.1:1080"]`.
    pub listen: Vec<SocketAddr>,
    /// Authentication.
    pub auth: AuthConfig,
    /// Timeouts and size limits.
    pub limits: LimitsConfig,
    /// BIND options.
    pub bind: BindConfig,
    /// MSOCKS mobility (connection identifiers and RECONNECT).
    pub mobility: MobilityConfig,
    /// Which splice engine plain sessions use.
    pub engine: EngineConfig,
    /// Logging.
    pub log: LogConfig,
    /// Access rules, tried in order; the first that matches decides. With no rules at all
    /// everything is allowed; with rules, a request no rule matches is denied.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 1080))],
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            bind: BindConfig::default(),
            mobility: MobilityConfig::default(),
            engine: EngineConfig::default(),
            log: LogConfig::default(),
            rules: Vec::new(),
        }
    }
}

/// `[auth]`: who may use the proxy.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A credentials file: one `username:password` per line, the password either in clear
    /// or as an Argon2 (`$argon2id$...`) or bcrypt (`$2b$...`) hash (see `msocks passwd`).
    /// When set, every client must authenticate with RFC 1929 username/password.
    pub users_file: Option<PathBuf>,
}

/// `[limits]`: timeouts and bounds. Durations are written like `"10s"`, `"5m"`, `"250ms"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Time a client has to finish method negotiation, authentication and its request.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A session with no byte in either direction for this long is closed. `"0s"` disables.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Time to resolve a destination name.
    #[serde(with = "humantime_serde")]
    pub resolve_timeout: Duration,
    /// Time to establish the TCP connection to the destination (all its addresses together).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time a BIND waits for the incoming connection.
    #[serde(with = "humantime_serde")]
    pub bind_timeout: Duration,
    /// Time live sessions get to finish after SIGTERM/SIGINT before they are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Most sessions served at once; a request beyond it gets reply 0x01.
    pub max_sessions: usize,
    /// Most clients in the handshake at once; when full, the oldest handshake is dropped so
    /// that a flood of stalled clients cannot lock out real ones.
    pub max_handshakes: usize,
    /// Relay buffer per direction of a session, in bytes (bounded memory per session).
    pub buffer_size: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            resolve_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            bind_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            max_sessions: 10_000,
            max_handshakes: 1_024,
            buffer_size: 32 * 1024,
        }
    }
}

/// `[bind]`: where BIND listens.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BindConfig {
    /// IP address to listen on for BIND. Default: the proxy's address on the route towards
    /// the BIND request's destination (or, when that is unspecified, the address the client
    /// reached the proxy on).
    pub address: Option<std::net::IpAddr>,
}

/// `[mobility]`: MSOCKS sessions that survive moves of the mobile node.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MobilityConfig {
    /// Serve the MSOCKS commands (MSOCKS CONNECT, MSOCKS BIND, RECONNECT). When off they get
    /// reply 0x07 and clients fall back to plain SOCKS5.
    pub enabled: bool,
    /// How long a session whose mobile side broke stays parked, its server connection open,
    /// waiting for a RECONNECT.
    #[serde(with = "humantime_serde")]
    pub park_timeout: Duration,
    /// The address given to clients in connection identifiers as where to RECONNECT. Default:
    /// the unspecified address with the port of the listener the client used, meaning "any
    /// address of this proxy you already know, at this port". Set it when several proxy
    /// processes share an address behind a load balancer, to this process's own address.
    pub home: Option<SocketAddr>,
    /// How long a standby connection (STANDBY, PROTOCOL.md 3.13) may stay silent before the
    /// proxy closes it. Mobile nodes probe every few hundred milliseconds; the default leaves
    /// room for a node that stops probing while its link sleeps.
    #[serde(with = "humantime_serde")]
    pub standby_idle: Duration,
}

impl Default for MobilityConfig {
    fn default() -> Self {
        MobilityConfig {
            enabled: true,
            park_timeout: Duration::from_secs(180),
            home: None,
            standby_idle: Duration::from_secs(30),
        }
    }
}

/// `[engine]`: how a plain (non-MSOCKS) session's bytes cross the proxy.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `"relay"` (userspace copy, any OS) or `"kernel"` (Linux TCP Splice in eBPF; falls back
    /// to `relay` where it cannot load or cannot splice a session).
    pub kind: EngineKind,
    /// Interfaces the kernel engine attaches to; empty means every non-loopback interface
    /// present at the first kernel session.
    pub interfaces: Vec<String>,
    /// Longest time the kernel engine waits for the proxy's sockets to drain before it gives
    /// the session to `relay` instead.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Longest time the kernel engine relays a new plain session's first bytes in user space,
    /// until both connections are quiet (everything passed on and acknowledged), before it
    /// holds the sockets to splice them; within it, four of the client connection's RTTs
    /// (at least 5 ms). A client's first request usually follows the reply at once; held
    /// back, it would wait for its TCP to send it again (≥ 200 ms). `0s`: hold at once.
    /// MSOCKS sessions are held at once (docs/KERNEL-SPLICE.md).
    #[serde(with = "humantime_serde")]
    pub relay_first: Duration,
    /// The MSS the kernel engine clamps the proxy's TCP connections to (both legs of every
    /// session), so that segments one peer sends fit the other peer and its link: the
    /// datapath forwards segments as they are and cannot split one. Unset: the smallest MTU
    /// of `interfaces` less the IP and TCP headers. `0`: no clamping (sessions whose legs'
    /// MSSes do not fit each other are then relayed). Ignored by the `relay` engine.
    pub mss: Option<u32>,
}

/// The engine kinds of [`EngineConfig::kind`].
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Userspace copy between the two sockets.
    #[default]
    Relay,
    /// Packet-level TCP Splice (Linux, root).
    Kernel,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Relay,
            interfaces: Vec::new(),
            drain_timeout: Duration::from_secs(3),
            relay_first: Duration::from_millis(250),
            mss: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `msocks_proxy=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
        }
    }
}

impl ProxyConfig {
    /// Parses a configuration from TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: ProxyConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks what the types cannot: at least one listener, non-zero limits, valid rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid(
                "`listen` must name at least one address".into(),
            ));
        }
        let l = &self.limits;
        for (name, d) in [
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.resolve_timeout", l.resolve_timeout),
            ("limits.connect_timeout", l.connect_timeout),
            ("limits.bind_timeout", l.bind_timeout),
            ("mobility.park_timeout", self.mobility.park_timeout),
            ("mobility.standby_idle", self.mobility.standby_idle),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be greater than 0"
                )));
            }
        }
        if l.max_sessions == 0 || l.max_handshakes == 0 {
            return Err(ConfigError::Invalid(
                "limits.max_sessions and limits.max_handshakes must be at least 1".into(),
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&l.buffer_size) {
            return Err(ConfigError::Invalid(
                "limits.buffer_size must be between 1024 and 16777216 bytes".into(),
            ));
        }
        if let Some(mss) = self.engine.mss {
            // TCP_MAXSEG takes at most 32767; below 536 (the IPv4 minimum) every segment
            // is mostly headers.
            if mss != 0 && !(536..=32767).contains(&mss) {
                return Err(ConfigError::Invalid(
                    "engine.mss must be 0 (no clamping) or between 536 and 32767".into(),
                ));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate()
                .map_err(|m| ConfigError::Invalid(format!("rule #{}: {m}", i + 1)))?;
        }
        Ok(())
    }
}
