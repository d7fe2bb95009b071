//! UDP ASSOCIATE through the agent, kept working across moves.
//!
//! A local program's association gets a UDP relay socket of the agent's on loopback. The
//! agent holds its own UDP ASSOCIATE with the proxy on the path the policy wants (control
//! connection and UDP socket from the inbound interface's address, to the outbound
//! interface's proxy address), and copies datagrams between the two unchanged (the SOCKS5
//! UDP header stays as the program wrote it).
//!
//! When the path changes (a link goes away or fails its probe, a reload, `msocks move`) or
//! the upstream association breaks, the agent opens a new association on the new path and
//! switches to it; the program's association, its relay address and its control connection
//! stay as they are. UDP has no stream to resume, so datagrams in flight during the switch
//! may be lost (as on any path change), and the destination sees the datagrams come from the
//! proxy's new relay port: RFC 1928 ties a relay to its control connection. Protocols over
//! UDP that care (QUIC, DNS, RTP) take a new source port in their stride.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use msocks_client::ProxyPath;
use msocks_proto::{
    Command, Greeting, Method, MethodSelection, OpenRequest, Reply, ReplyCode, ReplyContext,
    Request, TargetAddr, UdpHeader, UserPassReply, UserPassRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::config::ProxyAuth;

/// Largest datagram relayed (the IPv4/IPv6 UDP payload limit).
const DATAGRAM: usize = 65_535;

/// What `msocks status` shows of an association: its path and how often it moved.
#[derive(Default)]
pub(crate) struct UdpView {
    path: Mutex<Option<ProxyPath>>,
    moves: AtomicU64,
}

impl UdpView {
    /// The path the association uses now, if any.
    pub(crate) fn path(&self) -> Option<ProxyPath> {
        self.path.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Switches of the upstream association to a new path.
    pub(crate) fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    fn set_path(&self, path: Option<ProxyPath>) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = path;
    }
}

/// The agent's own association with the proxy on one path.
pub(crate) struct Upstream {
    /// Kept open: the proxy ends the association when it closes.
    control: TcpStream,
    socket: UdpSocket,
    /// The proxy's relay address for this association.
    relay: SocketAddr,
    path: ProxyPath,
}

impl Upstream {
    /// Opens an association on `path`: control connection and UDP socket from the path's
    /// local address, to its proxy address.
    pub(crate) async fn open(
        path: &ProxyPath,
        auth: Option<&ProxyAuth>,
        timeout: Duration,
    ) -> Result<Upstream, String> {
        match tokio::time::timeout(timeout, Self::open_inner(path, auth)).await {
            Ok(r) => r,
            Err(_) => Err(format!("UDP ASSOCIATE with {} timed out", path.proxy)),
        }
    }

    async fn open_inner(path: &ProxyPath, auth: Option<&ProxyAuth>) -> Result<Upstream, String> {
        let proxy = path.proxy;
        let local_ip = path.local_addr.unwrap_or(match proxy {
            SocketAddr::V4(_) => IpAddr::from([0u8; 4]),
            SocketAddr::V6(_) => IpAddr::from([0u16; 8]),
        });
        let io = |what: &str, e: std::io::Error| format!("{what} ({proxy}): {e}");
        let socket = UdpSocket::bind(SocketAddr::new(local_ip, 0))
            .await
            .map_err(|e| io("binding the UDP socket", e))?;
        let tcp = if proxy.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| io("creating the control socket", e))?;
        if path.local_addr.is_some() {
            tcp.bind(SocketAddr::new(local_ip, 0))
                .map_err(|e| io("binding the control socket", e))?;
        }
        let mut control = tcp
            .connect(proxy)
            .await
            .map_err(|e| io("connecting to the proxy", e))?;
        let _ = control.set_nodelay(true);
        let udp_addr = socket
            .local_addr()
            .map_err(|e| io("reading the UDP socket's address", e))?;
        let method = if auth.is_some() {
            Method::USER_PASS
        } else {
            Method::NO_AUTH
        };
        let mut out = Vec::with_capacity(600);
        Greeting {
            methods: vec![method],
        }
        .encode(&mut out);
        if let Some(a) = auth {
            UserPassRequest {
                username: a.username.clone(),
                password: a.password.clone(),
            }
            .encode(&mut out);
        }
        Request::Open(OpenRequest {
            command: Command::UdpAssociate,
            target: TargetAddr::Ip(udp_addr),
            mobility: None,
        })
        .encode(&mut out);
        control
            .write_all(&out)
            .await
            .map_err(|e| io("sending UDP ASSOCIATE", e))?;
        let mut buf = Vec::with_capacity(64);
        let selection = read_msg(&mut control, &mut buf, MethodSelection::decode).await?;
        if selection.method != method {
            return Err(format!(
                "the proxy {proxy} chose authentication method {:#04x}",
                selection.method.0
            ));
        }
        if auth.is_some() {
            let verdict = read_msg(&mut control, &mut buf, UserPassReply::decode).await?;
            if !verdict.is_success() {
                return Err(format!("the proxy {proxy} refused the credentials"));
            }
        }
        let reply = read_msg(&mut control, &mut buf, |b| {
            Reply::decode(b, ReplyContext::Plain)
        })
        .await?;
        if reply.code != ReplyCode::Succeeded {
            return Err(format!(
                "the proxy {proxy} refused UDP ASSOCIATE: {}",
                reply.code
            ));
        }
        let relay = match reply.bound {
            // "The address you already use" (RFC 1928 leaves it open; msocks sends its own).
            TargetAddr::Ip(a) if a.ip().is_unspecified() => SocketAddr::new(proxy.ip(), a.port()),
            TargetAddr::Ip(a) => a,
            TargetAddr::Domain(..) => {
                return Err(format!("the proxy {proxy} gave its relay as a name"));
            }
        };
        Ok(Upstream {
            control,
            socket,
            relay,
            path: path.clone(),
        })
    }

    /// The path this association runs on.
    pub(crate) fn path(&self) -> &ProxyPath {
        &self.path
    }

    /// The proxy's relay address for this association.
    pub(crate) fn relay_addr(&self) -> SocketAddr {
        self.relay
    }
}

async fn read_msg<T>(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    decode: impl Fn(&[u8]) -> msocks_proto::Decoded<T>,
) -> Result<T, String> {
    loop {
        match decode(buf) {
            Ok(Some((msg, used))) => {
                buf.drain(..used);
                return Ok(msg);
            }
            Ok(None) => {}
            Err(e) => return Err(format!("bad answer from the proxy: {e}")),
        }
        if buf.len() > 1024 {
            return Err("the proxy's answer is too long".into());
        }
        let mut chunk = [0u8; 256];
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the proxy's answer: {e}"))?;
        if n == 0 {
            return Err("the proxy closed the control connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What ended an association's relay loop.
pub(crate) enum RelayEvent {
    /// The program closed its control connection: the association is over.
    ProgramDone,
    /// The upstream association broke (control connection closed or failed).
    UpstreamBroken(String),
    /// Placement may have changed.
    Replace,
}

/// The program's side of an association: its relay socket, its address once known, and the
/// byte counters.
pub(crate) struct Local {
    pub(crate) socket: UdpSocket,
    /// The program's host: datagrams from elsewhere are dropped.
    pub(crate) peer_ip: IpAddr,
    /// Where the program sends from (learned from its first datagram).
    pub(crate) app: Option<SocketAddr>,
    pub(crate) up: Arc<AtomicU64>,
    pub(crate) down: Arc<AtomicU64>,
}

/// Copies datagrams both ways over `upstream` until something needs the caller.
pub(crate) async fn relay(
    local: &mut Local,
    control: &mut TcpStream,
    upstream: &mut Upstream,
    changed: impl std::future::Future<Output = ()>,
) -> RelayEvent {
    let mut from_app = vec![0u8; DATAGRAM];
    let mut from_proxy = vec![0u8; DATAGRAM];
    tokio::pin!(changed);
    loop {
        tokio::select! {
            r = local.socket.recv_from(&mut from_app) => {
                let Ok((n, from)) = r else { continue };
                if from.ip() != local.peer_ip {
                    continue;
                }
                // Only well-formed, unfragmented datagrams go on (as RFC 1928 relays do).
                match UdpHeader::decode(&from_app[..n]) {
                    Ok(Some((h, used))) if h.frag == 0 => {
                        local.app = Some(from);
                        if upstream.socket.send_to(&from_app[..n], upstream.relay).await.is_ok() {
                            local.up.fetch_add((n - used) as u64, Ordering::Relaxed);
                        }
                    }
                    _ => continue,
                }
            }
            r = upstream.socket.recv_from(&mut from_proxy) => {
                let Ok((n, from)) = r else { continue };
                if from != upstream.relay {
                    continue;
                }
                let Some(app) = local.app else { continue };
                if let Ok(Some((_, used))) = UdpHeader::decode(&from_proxy[..n]) {
                    if local.socket.send_to(&from_proxy[..n], app).await.is_ok() {
                        local.down.fetch_add((n - used) as u64, Ordering::Relaxed);
                    }
                }
            }
            r = read_control(control) => {
                if let Err(why) = r {
                    tracing::debug!("association ended: {why}");
                }
                return RelayEvent::ProgramDone;
            }
            r = read_control(&mut upstream.control) => {
                return RelayEvent::UpstreamBroken(match r {
                    Ok(()) => "the proxy closed the association".into(),
                    Err(e) => e,
                });
            }
            () = &mut changed => return RelayEvent::Replace,
        }
    }
}

/// Waits for a control connection to end; bytes on it (none are expected) are ignored.
async fn read_control(stream: &mut TcpStream) -> Result<(), String> {
    let mut sink = [0u8; 64];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Records the association's path in its view, counting a change as a move.
pub(crate) fn note_path(view: &UdpView, path: &ProxyPath, first: bool) {
    view.set_path(Some(path.clone()));
    if !first {
        view.moves.fetch_add(1, Ordering::Relaxed);
    }
}

/// The association has no path now (waiting for one).
pub(crate) fn note_no_path(view: &UdpView) {
    view.set_path(None);
}
