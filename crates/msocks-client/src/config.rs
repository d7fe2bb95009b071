//! What a stream is configured with: the paths it may use to reach the proxy, credentials,
//! the counter origins and the knobs of reconnection.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::Error;

/// One way of reaching the proxy: the paper's per-session choice of the mobile node's own
/// endpoint address and the proxy address (MSOCKS paper, section II).
///
/// * `proxy`: the proxy address to connect to. With a host route per proxy address, this
///   decides which interface carries the data the mobile node sends.
/// * `local_addr`: the mobile node's endpoint address (port chosen by the kernel). The proxy
///   sends to this address, so it decides which interface the session's incoming data
///   arrives on. `None` lets the kernel pick by its routing table.
/// * `interface`: bind the socket to this network interface (`SO_BINDTODEVICE`), which pins
///   the outgoing interface without a host route. Needs `CAP_NET_RAW` on kernels before 5.7.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProxyPath {
    /// The proxy address and port for new sessions (and, for RECONNECT, the proxy IP when
    /// the connection identifier's home address is unspecified).
    pub proxy: SocketAddr,
    /// The mobile node's endpoint address for this path (inbound interface).
    pub local_addr: Option<IpAddr>,
    /// The interface to bind the socket to (outbound interface), by name.
    pub interface: Option<String>,
}

impl ProxyPath {
    /// A path to `proxy` with the kernel's choice of local address and interface.
    pub fn new(proxy: SocketAddr) -> Self {
        ProxyPath {
            proxy,
            local_addr: None,
            interface: None,
        }
    }

    /// The same path, bound to the local address `addr`.
    pub fn with_local_addr(mut self, addr: IpAddr) -> Self {
        self.local_addr = Some(addr);
        self
    }

    /// The same path, bound to the interface `name` (`SO_BINDTODEVICE`).
    pub fn with_interface(mut self, name: impl Into<String>) -> Self {
        self.interface = Some(name.into());
        self
    }

    /// Where a RECONNECT for a session whose identifier names `home` goes on this path: the
    /// home itself, or, when its IP is unspecified ("any proxy address you already use"),
    /// this path's proxy IP at the home port. That keeps the paper's choice of proxy address
    /// (and so of outgoing interface) in the mobile node's hands.
    pub fn reconnect_target(&self, home: SocketAddr) -> SocketAddr {
        if home.ip().is_unspecified() {
            SocketAddr::new(self.proxy.ip(), home.port())
        } else {
            home
        }
    }

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Some(local) = self.local_addr {
            if local.is_ipv4() != self.proxy.is_ipv4() {
                return Err(Error::Config(format!(
                    "path to {}: local address {local} is not of the proxy's address family",
                    self.proxy
                )));
            }
        }
        if let Some(name) = &self.interface {
            // IFNAMSIZ is 16 including the terminating NUL; the kernel rejects longer names
            // with a less helpful EINVAL.
            if name.is_empty() || name.len() > 15 || name.as_bytes().contains(&0) {
                return Err(Error::Config(format!(
                    "path to {}: {name:?} is not a valid interface name",
                    self.proxy
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ProxyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "proxy {}", self.proxy)?;
        if let Some(local) = self.local_addr {
            write!(f, " from {local}")?;
        }
        if let Some(name) = &self.interface {
            write!(f, " via {name}")?;
        }
        Ok(())
    }
}

/// Username and password for RFC 1929 authentication. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// 1 to 255 bytes of UTF-8.
    pub username: String,
    /// 1 to 255 bytes of UTF-8.
    pub password: String,
}

impl Credentials {
    /// Credentials from a username and a password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        for (what, value) in [("username", &self.username), ("password", &self.password)] {
            // RFC 1929 carries each in a one-byte length field; the encoder would silently
            // truncate a longer one, so refuse it here instead.
            if value.is_empty() || value.len() > 255 {
                return Err(Error::Config(format!(
                    "the {what} must be 1 to 255 bytes long (RFC 1929)"
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// Default `send_buffer`: 256 KiB.
pub const DEFAULT_SEND_BUFFER: usize = 256 * 1024;
/// Default `reconnect_deadline`: 120 s.
pub const DEFAULT_RECONNECT_DEADLINE: Duration = Duration::from_secs(120);

/// Everything a [`MobileStream`](crate::MobileStream) is opened with.
///
/// Build one with [`MobileConfig::new`] and change the public fields; the type is
/// `#[non_exhaustive]` so that options can be added without breaking callers.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MobileConfig {
    /// The paths to the proxy, in order of preference. A new stream connects over the first
    /// one that accepts a TCP connection; an automatic reconnect tries them in this order.
    /// Must not be empty.
    pub paths: Vec<ProxyPath>,
    /// RFC 1929 credentials. With credentials the library offers only USERNAME/PASSWORD,
    /// without them only NO AUTHENTICATION: offering exactly one method lets it pipeline the
    /// greeting, the credentials and the request in one segment, which saves a round trip
    /// on every move.
    pub credentials: Option<Credentials>,
    /// The OOB_INLINE flag sent to the proxy. The library's sockets always receive urgent
    /// data inline (`SO_OOBINLINE`), so urgent bytes reach the application in sequence, as
    /// ordinary bytes, and are counted in `data_read`; keep this `true` (the default) so the
    /// proxy counts them the same way.
    pub oob_inline: bool,
    /// Where the `data_read` counter starts (READ_ORIGIN). Any value; arithmetic wraps.
    pub read_origin: u64,
    /// Where the `data_written` counter starts (WRITE_ORIGIN). Any value; arithmetic wraps.
    pub write_origin: u64,
    /// `SO_SNDBUF` requested for every socket to the proxy. The kernel's answer (Linux
    /// doubles the request, capped by `net.core.wmem_max`) sizes the rewrite ring buffer.
    pub send_buffer: usize,
    /// How long an automatic reconnect (or a migration whose new connection failed after
    /// RECONNECT was sent) keeps trying before the stream fails.
    pub reconnect_deadline: Duration,
    /// First pause between rounds of reconnect attempts; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    /// Longest pause between rounds of reconnect attempts.
    pub backoff_max: Duration,
    /// Limit for one TCP connection attempt to the proxy.
    pub connect_timeout: Duration,
    /// Limit for one handshake (method negotiation, authentication, request and reply), and
    /// for reading the salvage bytes out of an old socket.
    pub handshake_timeout: Duration,
    /// `TCP_USER_TIMEOUT` on sockets to the proxy: a connection whose sent data stays
    /// unacknowledged this long fails, which starts an automatic reconnect (a path that
    /// silently went away sends no RST). `None` keeps the kernel default (many minutes).
    pub tcp_user_timeout: Option<Duration>,
    /// Reconnect automatically when the connection to the proxy fails. Without it a failure
    /// fails the stream.
    pub auto_reconnect: bool,
    /// Capacity in bytes of each direction of the in-process pipe between the application
    /// and the stream's task.
    pub pipe_capacity: usize,
    /// Early resend on migrations (PROTOCOL.md 3.7.1): the bytes the proxy may lack follow
    /// the RECONNECT at once, and new bytes flow before its reply, so the direction towards
    /// the server resumes half a round trip after the RECONNECT leaves instead of one and a
    /// half. Needs Linux (the old socket's `SIOCOUTQ`); elsewhere it is not used.
    pub early_resend: bool,
}

impl MobileConfig {
    /// Defaults around one path: no credentials, origins 0, 256 KiB send buffer, 120 s
    /// reconnect deadline, backoff from 100 ms to 5 s, 10 s connect and handshake limits,
    /// 30 s `TCP_USER_TIMEOUT`, automatic reconnect on, 64 KiB pipe.
    pub fn new(path: ProxyPath) -> Self {
        MobileConfig {
            paths: vec![path],
            credentials: None,
            oob_inline: true,
            read_origin: 0,
            write_origin: 0,
            send_buffer: DEFAULT_SEND_BUFFER,
            reconnect_deadline: DEFAULT_RECONNECT_DEADLINE,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            tcp_user_timeout: Some(Duration::from_secs(30)),
            auto_reconnect: true,
            pipe_capacity: 64 * 1024,
            early_resend: true,
        }
    }

    /// Defaults around several paths, in order of preference.
    pub fn with_paths(paths: Vec<ProxyPath>) -> Self {
        let mut cfg = MobileConfig::new(ProxyPath::new(SocketAddr::from(([0, 0, 0, 0], 0))));
        cfg.paths = paths;
        cfg
    }

    /// Checks what the wire or the kernel would otherwise reject later and less clearly.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.paths.is_empty() {
            return Err(Error::Config("no path to the proxy configured".into()));
        }
        for path in &self.paths {
            path.validate()?;
        }
        if let Some(creds) = &self.credentials {
            creds.validate()?;
        }
        if self.send_buffer == 0 {
            return Err(Error::Config("send_buffer must be positive".into()));
        }
        if self.pipe_capacity == 0 {
            return Err(Error::Config("pipe_capacity must be positive".into()));
        }
        Ok(())
    }
}
