//! The daemon: the local SOCKS5 endpoint, one MSOCKS stream per local connection, the
//! placement of every stream by the policy, link following, SIGHUP reload and the control
//! socket.
//!
//! Placement is level-triggered: whatever changes (a link event, a reload, a manual move)
//! bumps one "generation" with a reason, and every stream's placer recomputes the path the
//! policy wants now and migrates the stream when it differs from the path it is on. So a
//! link that goes away and comes back moves streams away and back with one mechanism.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use msocks_client::{Credentials, MobileConfig, MobileStream, StreamState, TargetAddr};
use msocks_proto::ReplyCode;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::config::{AgentConfig, WhenUnavailable};
use crate::control::{InterfaceRow, Request, Response, StreamRow};
use crate::error::AgentError;
use crate::links::{self, LinkEvent};
use crate::policy::{self, LiveLinks, Placement, StreamInfo};
use crate::probe::{self, Probes};
use crate::socks::LocalRequest;
use crate::{peer, routes, socks, udp};

/// Time a local client has for its SOCKS5 greeting and request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a failed migration is tried again (while the policy still wants it).
const RETRY_MOVE: Duration = Duration::from_secs(1);
/// Longest a `msocks move` waits for its streams to move.
const MOVE_WAIT: Duration = Duration::from_secs(20);
/// Relay buffer per direction.
const RELAY_BUFFER: usize = 64 * 1024;

/// A request to a stream's placer to re-place it now, with an answer.
type PlaceRequest = oneshot::Sender<Result<(), String>>;

struct StreamEntry {
    info: StreamInfo,
    /// `connect`, `bind` or `udp`.
    kind: &'static str,
    rule: String,
    opened: Instant,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    control: Option<msocks_client::MobileControl>,
    /// For a UDP association: its path and moves.
    udp: Option<Arc<udp::UdpView>>,
    pinned: Option<String>,
    place_tx: Option<mpsc::Sender<PlaceRequest>>,
}

/// The policy, the links and the streams.
pub(crate) struct State {
    pub(crate) config: Arc<AgentConfig>,
    pub(crate) live: LiveLinks,
    streams: BTreeMap<u64, StreamEntry>,
    next_id: u64,
}

/// Everything the agent's tasks share.
pub(crate) struct Inner {
    state: Mutex<State>,
    /// Bumped, with the reason, whenever placements may have changed.
    pub(crate) generation: watch::Sender<(u64, Arc<str>)>,
    manage_routes: bool,
    /// Liveness probes and standby connections per interface.
    pub(crate) probes: Probes,
    /// Interfaces with a running probe task.
    probing: Mutex<HashSet<String>>,
}

impl Inner {
    /// The state even after a panic elsewhere: every update is a plain store, so a
    /// poisoned lock still holds consistent data.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a probe task for every configured interface that has none.
    fn start_probes(self: &Arc<Self>) {
        let names: Vec<String> = {
            let st = self.lock();
            if !st.config.standby {
                return;
            }
            st.config
                .interfaces
                .iter()
                .map(|i| i.name.clone())
                .collect()
        };
        let mut probing = self.probing.lock().unwrap_or_else(|e| e.into_inner());
        for name in names {
            if probing.insert(name.clone()) {
                let inner = self.clone();
                tokio::spawn(async move {
                    probe::probe_interface(inner.clone(), name.clone()).await;
                    inner
                        .probing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&name);
                });
            }
        }
    }

    pub(crate) fn bump(&self, reason: impl Into<Arc<str>>) {
        let reason = reason.into();
        self.generation.send_modify(|(g, r)| {
            *g += 1;
            *r = reason;
        });
    }
}

/// The mobile-node agent, bound and ready to [`run`](Agent::run).
pub struct Agent {
    inner: Arc<Inner>,
    listeners: Vec<TcpListener>,
    control: UnixListener,
    control_path: PathBuf,
    source: Option<PathBuf>,
}

impl Agent {
    /// Opens the SOCKS5 listeners and the control socket. `source` is the file the
    /// configuration came from, re-read on SIGHUP.
    pub async fn bind(config: AgentConfig, source: Option<PathBuf>) -> Result<Agent, AgentError> {
        config.validate()?;
        let mut listeners = Vec::new();
        for &addr in &config.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Listen { addr, source })?;
            listeners.push(l);
        }
        let control_path = config.control.clone();
        let control = bind_control(&control_path).map_err(|source| AgentError::Control {
            path: control_path.clone(),
            source,
        })?;
        let manage_routes = config.manage_routes_effective();
        let (generation, _) = watch::channel((0, Arc::from("start")));
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                config: Arc::new(config),
                live: LiveLinks::new(),
                streams: BTreeMap::new(),
                next_id: 1,
            }),
            generation,
            manage_routes,
            probes: Probes::default(),
            probing: Mutex::new(HashSet::new()),
        });
        Ok(Agent {
            inner,
            listeners,
            control,
            control_path,
            source,
        })
    }

    /// The addresses the SOCKS5 endpoint listens on (with the ports the kernel chose).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The control socket's path.
    pub fn control_path(&self) -> &Path {
        &self.control_path
    }

    /// Serves until `shutdown` completes: follows the links, accepts local clients, answers
    /// the control socket, reloads the policy on SIGHUP. On the way out it removes the host
    /// routes it installed and the control socket; live streams end with the runtime.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
        let Agent {
            inner,
            listeners,
            control,
            control_path,
            source,
        } = self;
        // Subscribe before the snapshot so that no change between the two is missed.
        let events = links::watch().await?;
        let snapshot = links::snapshot().await?;
        {
            let mut st = inner.lock();
            for iface in snapshot {
                st.live.insert(iface.name.clone(), iface);
            }
            let known: Vec<String> = st
                .config
                .interfaces
                .iter()
                .map(|i| format!("{} ({})", i.name, link_state(i, st.live.get(&i.name))))
                .collect();
            info!(interfaces = %known.join(", "), manage_routes = inner.manage_routes, "agent starting");
        }
        if inner.manage_routes {
            let config = inner.lock().config.clone();
            for iface in &config.interfaces {
                routes::install(iface).await;
            }
        }
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(AgentError::Signal)?;
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(follow_links(inner.clone(), events));
        for listener in listeners {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "SOCKS5 endpoint listening");
            }
            tasks.spawn(accept_loop(inner.clone(), listener));
        }
        tasks.spawn(control_loop(inner.clone(), control));
        inner.start_probes();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = hup.recv() => reload(&inner, source.as_deref()).await,
            }
        }
        info!("agent stopping");
        tasks.abort_all();
        if inner.manage_routes {
            let config = inner.lock().config.clone();
            for iface in &config.interfaces {
                routes::remove(iface).await;
            }
        }
        let _ = std::fs::remove_file(&control_path);
        Ok(())
    }
}

/// Binds the control socket owner-only. A socket file left by a dead agent is replaced; a
/// live agent's is not.
fn bind_control(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                "another agent is answering on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Control moves other users' streams: only the owner (and root) may use it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Re-reads the configuration; on success every stream is re-placed under it. The listen
/// addresses and the control socket stay as they are (they need a restart).
async fn reload(inner: &Arc<Inner>, source: Option<&Path>) {
    let Some(path) = source else {
        warn!("SIGHUP: no configuration file to reload");
        return;
    };
    let mut new = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            warn!("SIGHUP: keeping the current policy: {e}");
            return;
        }
    };
    let old = inner.lock().config.clone();
    if new.listen != old.listen || new.control != old.control {
        warn!("SIGHUP: `listen` and `control` changes take effect only after a restart");
    }
    new.listen = old.listen.clone();
    new.control = old.control.clone();
    let new = Arc::new(new);
    if inner.manage_routes {
        for iface in &old.interfaces {
            if !new.interfaces.iter().any(|n| {
                n.name == iface.name && n.proxy == iface.proxy && n.gateway == iface.gateway
            }) {
                routes::remove(iface).await;
            }
        }
        for iface in &new.interfaces {
            routes::install(iface).await;
        }
    }
    let rules = new.rules.len();
    let interfaces = new.interfaces.len();
    inner.lock().config = new;
    info!(
        rules,
        interfaces, "policy reloaded; re-placing every stream"
    );
    inner.bump("policy reloaded");
    inner.start_probes();
}

/// Applies link events to the live view and re-places streams when an interface's
/// usability or addresses changed.
async fn follow_links(inner: Arc<Inner>, mut events: mpsc::Receiver<LinkEvent>) {
    while let Some(event) = events.recv().await {
        let (reason, came_up) = {
            let mut st = inner.lock();
            match event {
                LinkEvent::Changed(iface) => {
                    let before = st
                        .live
                        .get(&iface.name)
                        .map(|i| (i.usable(), i.addrs.clone()));
                    let now = iface.usable();
                    let name = iface.name.clone();
                    let addrs = iface.addrs.clone();
                    st.live.insert(name.clone(), iface);
                    match before {
                        Some((was, _)) if was && !now => {
                            (Some(format!("{name} became unusable")), None)
                        }
                        Some((was, _)) if !was && now => {
                            (Some(format!("{name} became usable")), Some(name))
                        }
                        None if now => (Some(format!("{name} appeared")), Some(name)),
                        Some((_, old)) if old != addrs => {
                            (Some(format!("{name} changed addresses")), None)
                        }
                        _ => (None, None),
                    }
                }
                LinkEvent::Removed { name, .. } => {
                    let was = st.live.remove(&name).is_some_and(|i| i.usable());
                    (was.then(|| format!("{name} was removed")), None)
                }
                // Usability is decided by links and addresses; a route change alone does
                // not move streams (the host routes are refreshed on "became usable").
                LinkEvent::RoutesChanged => (None, None),
            }
        };
        if let Some(name) = came_up {
            if inner.manage_routes {
                let config = inner.lock().config.clone();
                if let Some(iface) = config.interfaces.iter().find(|i| i.name == name) {
                    routes::install(iface).await;
                }
            }
        }
        if let Some(reason) = reason {
            info!("link change: {reason}");
            inner.bump(reason);
        }
    }
    warn!("the link watcher stopped: streams no longer follow link changes");
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer_addr)) => {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handle_client(inner.clone(), tcp, peer_addr));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The SOCKS reply for a failure to open the MSOCKS stream.
fn reply_code(e: &msocks_client::Error) -> ReplyCode {
    match e {
        msocks_client::Error::Refused(code) => *code,
        msocks_client::Error::Connect { .. } | msocks_client::Error::Timeout(_) => {
            ReplyCode::NetworkUnreachable
        }
        _ => ReplyCode::GeneralFailure,
    }
}

/// The links placement may use: the live ones without those that failed their probe.
fn placeable<'a>(live: &'a LiveLinks, failed: &HashSet<String>) -> Cow<'a, LiveLinks> {
    if failed.is_empty() {
        return Cow::Borrowed(live);
    }
    Cow::Owned(
        live.iter()
            .filter(|(name, _)| !failed.contains(*name))
            .map(|(n, i)| (n.clone(), i.clone()))
            .collect(),
    )
}

/// What the policy wants for a stream now: its pinned interface if that is usable, else
/// every placement its rule allows, best first. Also its rule and wait/fail.
fn wanted(
    st: &State,
    failed: &HashSet<String>,
    info: &StreamInfo,
    pinned: Option<&str>,
) -> (Vec<Placement>, String, WhenUnavailable) {
    let decision = policy::decide(&st.config, info);
    let live = placeable(&st.live, failed);
    let mut list = policy::placements(&st.config, &decision, &live);
    if let Some(p) = pinned.and_then(|name| policy::pinned_placement(&st.config, name, &live)) {
        list.retain(|x| x.path != p.path);
        list.insert(0, p);
    }
    (list, decision.rule_label, decision.when_unavailable)
}

async fn handle_client(inner: Arc<Inner>, mut tcp: TcpStream, peer_addr: SocketAddr) {
    let request = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socks::read_request(&mut tcp)).await
    {
        Ok(Ok(x)) => x,
        // Nothing was asked: not worth a line at the default level.
        Ok(Err(e @ socks::SocksError::Silent)) => {
            tracing::debug!(client = %peer_addr, "local client: {e}");
            return;
        }
        Ok(Err(e)) => {
            info!(client = %peer_addr, "local client refused: {e}");
            return;
        }
        Err(_) => {
            info!(client = %peer_addr, "local client refused: handshake timed out");
            return;
        }
    };
    let (target, kind) = match &request {
        LocalRequest::Connect { target, .. } => (target.clone(), "connect"),
        LocalRequest::Bind { target } => (target.clone(), "bind"),
        LocalRequest::UdpAssociate { client } => (client.clone(), "udp"),
    };
    let find_process = inner.lock().config.identify_programs;
    let local_addr = tcp.local_addr().unwrap_or(peer_addr);
    // /proc scans block; the probe socket is a dup so the connection stays here.
    let peer_info = match tcp_dup(&tcp) {
        Some(dup) => tokio::task::spawn_blocking(move || {
            peer::identify(&dup, local_addr, peer_addr, find_process)
        })
        .await
        .unwrap_or_default(),
        None => Default::default(),
    };
    let info = StreamInfo {
        target: target.clone(),
        peer: peer_info,
    };
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let udp_view = matches!(request, LocalRequest::UdpAssociate { .. })
        .then(|| Arc::new(udp::UdpView::default()));
    let (id, mut gen_rx) = {
        let mut st = inner.lock();
        let id = st.next_id;
        st.next_id += 1;
        let (_, rule, _) = wanted(&st, &HashSet::new(), &info, None);
        st.streams.insert(
            id,
            StreamEntry {
                info: info.clone(),
                kind,
                rule,
                opened: Instant::now(),
                up: up.clone(),
                down: down.clone(),
                control: None,
                udp: udp_view.clone(),
                pinned: None,
                place_tx: None,
            },
        );
        (id, inner.generation.subscribe())
    };
    let program = info.peer.program.clone().unwrap_or_else(|| "?".into());
    let result = match (request, udp_view) {
        (LocalRequest::Connect { early, .. }, _) => {
            run_stream(
                &inner,
                id,
                &mut tcp,
                Open::Connect(early),
                &info,
                &up,
                &down,
                &mut gen_rx,
            )
            .await
        }
        (LocalRequest::Bind { .. }, _) => {
            run_stream(
                &inner,
                id,
                &mut tcp,
                Open::Bind,
                &info,
                &up,
                &down,
                &mut gen_rx,
            )
            .await
        }
        (LocalRequest::UdpAssociate { .. }, Some(view)) => {
            let local = udp::Local {
                socket: match tokio::net::UdpSocket::bind(SocketAddr::new(local_addr.ip(), 0)).await
                {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = socks::send_reply(
                            &mut tcp,
                            ReplyCode::GeneralFailure,
                            TargetAddr::UNSPECIFIED,
                        )
                        .await;
                        inner.lock().streams.remove(&id);
                        info!(
                            stream = id,
                            "UDP association refused: no local relay socket: {e}"
                        );
                        return;
                    }
                },
                peer_ip: peer_addr.ip(),
                app: None,
                up: up.clone(),
                down: down.clone(),
            };
            run_association(&inner, id, &mut tcp, local, &info, &view, &mut gen_rx)
                .await
                .map(|()| view.moves())
        }
        (LocalRequest::UdpAssociate { .. }, None) => {
            Err("internal: association without view".into())
        }
    };
    inner.lock().streams.remove(&id);
    let (up, down) = (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed));
    match result {
        Ok(moves) => {
            info!(stream = id, %program, kind, destination = %target, up, down, moves, "stream closed: both directions finished")
        }
        Err(reason) => {
            // A reset tells the local program the stream broke, where a FIN would look
            // like the end of the data.
            let _ = tcp.set_zero_linger();
            info!(stream = id, %program, kind, destination = %target, up, down, "stream closed: {reason}");
        }
    }
}

/// Runs a UDP association: its upstream association follows the policy's path, and is
/// opened anew on the new path whenever that changes or the old one breaks.
async fn run_association(
    inner: &Arc<Inner>,
    id: u64,
    tcp: &mut TcpStream,
    mut local: udp::Local,
    info: &StreamInfo,
    view: &udp::UdpView,
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
) -> Result<(), String> {
    let wait_deadline = Instant::now() + inner.lock().config.wait_timeout;
    let mut upstream: Option<udp::Upstream> = None;
    let mut replied = false;
    loop {
        // The path the policy wants now; without one, wait (or fail) as for streams.
        let (list, _when, config) = if replied {
            let failed = inner.probes.failed();
            let st = inner.lock();
            let (list, _, when) = wanted(&st, &failed, info, None);
            (list, when, st.config.clone())
        } else {
            await_placement(inner, id, tcp, info, gen_rx, wait_deadline).await?
        };
        let current = upstream.as_ref().map(|u| u.path().clone());
        if list.first().map(|p| &p.path) != current.as_ref() {
            let mut opened = None;
            let mut last = String::from("no usable interface allowed");
            for p in &list {
                match udp::Upstream::open(
                    &p.path,
                    config.proxy_auth.as_ref(),
                    config.connect_timeout,
                )
                .await
                {
                    Ok(u) => {
                        opened = Some((u, p.outbound.clone(), p.inbound.clone()));
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            match opened {
                Some((u, out_if, in_if)) => {
                    udp::note_path(view, u.path(), upstream.is_none() && !replied);
                    info!(stream = id, out = %out_if, r#in = %in_if, relay = %u.relay_addr(), "UDP association {}", if replied { "moved" } else { "opened" });
                    upstream = Some(u);
                }
                None if !replied => {
                    let _ = socks::send_reply(
                        tcp,
                        ReplyCode::NetworkUnreachable,
                        TargetAddr::UNSPECIFIED,
                    )
                    .await;
                    return Err(format!("cannot associate with the proxy: {last}"));
                }
                None => {
                    if upstream.is_none() {
                        udp::note_no_path(view);
                    }
                    warn!(stream = id, "UDP association cannot move: {last}; retrying");
                }
            }
        }
        if !replied {
            let bound = match local.socket.local_addr() {
                Ok(a) => TargetAddr::Ip(a),
                Err(e) => return Err(format!("local relay socket: {e}")),
            };
            socks::send_reply(tcp, ReplyCode::Succeeded, bound)
                .await
                .map_err(|e| format!("local client went away: {e}"))?;
            replied = true;
        }
        let have_upstream = upstream.is_some();
        let changed = async {
            if have_upstream {
                // Re-check now and then even without an event, so a failed switch is retried.
                let _ = tokio::time::timeout(Duration::from_secs(5), gen_rx.changed()).await;
            } else {
                tokio::time::sleep(RETRY_MOVE).await;
            }
        };
        match &mut upstream {
            Some(u) => match udp::relay(&mut local, tcp, u, changed).await {
                udp::RelayEvent::ProgramDone => return Ok(()),
                udp::RelayEvent::UpstreamBroken(why) => {
                    warn!(
                        stream = id,
                        "UDP association with the proxy broke: {why}; opening a new one"
                    );
                    upstream = None;
                    udp::note_no_path(view);
                }
                udp::RelayEvent::Replace => {}
            },
            None => {
                tokio::select! {
                    () = changed => {}
                    r = tcp.readable() => {
                        let mut b = [0u8; 64];
                        if r.is_err() || matches!(tcp.try_read(&mut b), Ok(0) | Err(_)) {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}

/// A second descriptor for the socket, for the blocking peer lookup.
fn tcp_dup(tcp: &TcpStream) -> Option<std::net::TcpStream> {
    use std::os::fd::AsFd;
    let fd = tcp.as_fd().try_clone_to_owned().ok()?;
    Some(std::net::TcpStream::from(fd))
}

/// A stream just opened through the proxy, or a BIND waiting for its peer.
enum Opened {
    Stream(MobileStream),
    Listening(Box<msocks_client::MobileBind>),
}

/// What a local program's stream asks the proxy for.
enum Open {
    /// CONNECT, with the bytes the program sent after its request.
    Connect(Vec<u8>),
    /// BIND: two replies, then the accepted connection is the stream.
    Bind,
}

/// Waits until the policy allows at least one usable path for `info` (holding the
/// program's reply meanwhile under `wait`), and returns them with the rule's wait/fail and
/// the configuration. On `Err` the program got its failure reply.
async fn await_placement(
    inner: &Arc<Inner>,
    id: u64,
    tcp: &mut TcpStream,
    info: &StreamInfo,
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
    wait_deadline: Instant,
) -> Result<(Vec<Placement>, WhenUnavailable, Arc<AgentConfig>), String> {
    let mut announced = false;
    loop {
        let (list, rule, when, config) = {
            let failed = inner.probes.failed();
            let st = inner.lock();
            let (list, rule, when) = wanted(&st, &failed, info, None);
            (list, rule, when, st.config.clone())
        };
        if !list.is_empty() {
            return Ok((list, when, config));
        }
        if when == WhenUnavailable::Fail {
            let _ = socks::send_reply(tcp, ReplyCode::NetworkUnreachable, TargetAddr::UNSPECIFIED)
                .await;
            return Err(format!(
                "no usable interface allowed by {rule} (when_unavailable = fail)"
            ));
        }
        if !announced {
            let why = {
                let failed = inner.probes.failed();
                let st = inner.lock();
                why_unplaceable(&st, &failed, info)
            };
            info!(stream = id, destination = %info.target, "stream waiting: no usable interface allowed by {rule} ({why})");
            announced = true;
        }
        // The SOCKS reply is held: the program's connect simply takes longer, and anything
        // it sends meanwhile waits in its socket buffer.
        match wait_while_client_waits(gen_rx, wait_deadline, None, tcp).await {
            Waited::Changed => {}
            Waited::Expired => {
                let _ =
                    socks::send_reply(tcp, ReplyCode::NetworkUnreachable, TargetAddr::UNSPECIFIED)
                        .await;
                return Err("no usable interface within wait_timeout".into());
            }
            Waited::ClientGone => return Err(CLIENT_GONE.into()),
        }
    }
}

/// Whether a failure to open a stream is the path's (so waiting for another may help).
fn path_failure(e: &msocks_client::Error) -> bool {
    matches!(
        e,
        msocks_client::Error::Connect { .. } | msocks_client::Error::Timeout(_)
    )
}

/// Opens the stream (waiting for a path if the policy says so), relays it and keeps it
/// placed. Returns the number of moves, or why it ended badly.
#[allow(clippy::too_many_arguments)]
async fn run_stream(
    inner: &Arc<Inner>,
    id: u64,
    tcp: &mut TcpStream,
    open: Open,
    info: &StreamInfo,
    up: &Arc<AtomicU64>,
    down: &Arc<AtomicU64>,
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
) -> Result<u64, String> {
    let wait_deadline = Instant::now() + inner.lock().config.wait_timeout;
    let mobile = loop {
        let (list, when, config) =
            await_placement(inner, id, tcp, info, gen_rx, wait_deadline).await?;
        let mut mc = MobileConfig::with_paths(list.iter().map(|p| p.path.clone()).collect());
        mc.connect_timeout = config.connect_timeout;
        // "wait" is the library's reconnect deadline for a stream whose links all went away.
        mc.reconnect_deadline = config.wait_timeout;
        mc.credentials = config
            .proxy_auth
            .as_ref()
            .map(|a| Credentials::new(a.username.clone(), a.password.clone()));
        // A ready standby connection on the first path saves the TCP handshake and the
        // greeting: the stream opens one round trip sooner.
        let standby = list
            .first()
            .filter(|p| matches!(open, Open::Connect(_)) && p.outbound == p.inbound)
            .and_then(|p| inner.probes.take_standby(&p.outbound, &p.path));
        let opened = match (&open, standby) {
            (Open::Connect(_), Some(standby)) => {
                match MobileStream::connect_via(standby, info.target.clone(), mc.clone()).await {
                    Ok(s) => Ok(Opened::Stream(s)),
                    // A refusal is the proxy's verdict; anything else may be a stale standby
                    // connection: open the usual way.
                    Err(e @ msocks_client::Error::Refused(_)) => Err(e),
                    Err(e) => {
                        debug!(stream = id, "opening over the standby connection failed ({e}); opening a new connection");
                        MobileStream::connect(info.target.clone(), mc)
                            .await
                            .map(Opened::Stream)
                    }
                }
            }
            (Open::Connect(_), None) => MobileStream::connect(info.target.clone(), mc)
                .await
                .map(Opened::Stream),
            (Open::Bind, _) => MobileStream::bind(info.target.clone(), mc)
                .await
                .map(|b| Opened::Listening(Box::new(b))),
        };
        match opened {
            Ok(o) => break o,
            // No path reached the proxy: the links may be changing under us (an event not
            // yet seen). Under "wait" that is one more reason to wait, not to fail.
            Err(e)
                if path_failure(&e)
                    && when == WhenUnavailable::Wait
                    && Instant::now() < wait_deadline =>
            {
                info!(stream = id, destination = %info.target, "stream waiting: the proxy is not reachable on any allowed path ({e})");
                match wait_while_client_waits(gen_rx, wait_deadline, Some(RETRY_MOVE), tcp).await {
                    Waited::Changed => {}
                    Waited::Expired => {
                        let _ =
                            socks::send_reply(tcp, reply_code(&e), TargetAddr::UNSPECIFIED).await;
                        return Err(format!("cannot open the stream through the proxy: {e}"));
                    }
                    Waited::ClientGone => return Err(CLIENT_GONE.into()),
                }
            }
            Err(e) => {
                let _ = socks::send_reply(tcp, reply_code(&e), TargetAddr::UNSPECIFIED).await;
                return Err(format!("cannot open the stream through the proxy: {e}"));
            }
        }
    };
    let mut mobile = match mobile {
        Opened::Stream(s) => {
            if let Err(e) =
                socks::send_reply(tcp, ReplyCode::Succeeded, s.bound_addr().clone()).await
            {
                return Err(format!("local client went away: {e}"));
            }
            s
        }
        Opened::Listening(bind) => {
            // First reply: where the proxy listens for the program's peer.
            if let Err(e) =
                socks::send_reply(tcp, ReplyCode::Succeeded, bind.listen_addr().clone()).await
            {
                return Err(format!("local client went away: {e}"));
            }
            info!(stream = id, listen = %bind.listen_addr(), "BIND: the proxy listens");
            match bind.accept().await {
                Ok((s, peer)) => {
                    if let Err(e) = socks::send_reply(tcp, ReplyCode::Succeeded, peer).await {
                        return Err(format!("local client went away: {e}"));
                    }
                    s
                }
                Err(e) => {
                    let _ = socks::send_reply(tcp, reply_code(&e), TargetAddr::UNSPECIFIED).await;
                    return Err(format!("BIND failed: {e}"));
                }
            }
        }
    };
    let early = match open {
        Open::Connect(early) => early,
        Open::Bind => Vec::new(),
    };
    if !early.is_empty() {
        if let Err(e) = mobile.write_all(&early).await {
            return Err(format!("stream failed: {e}"));
        }
        up.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    let control = mobile.control();
    let (place_tx, place_rx) = mpsc::channel(4);
    let (out_if, in_if, rule) = {
        let mut st = inner.lock();
        let (o, i) = policy::describe_path(&st.config, &st.live, &control.status().path);
        let rule = match st.streams.get_mut(&id) {
            Some(e) => {
                e.control = Some(control.clone());
                e.place_tx = Some(place_tx);
                e.rule.clone()
            }
            None => String::new(),
        };
        (o, i, rule)
    };
    info!(
        stream = id,
        program = info.peer.program.as_deref().unwrap_or("?"),
        destination = %info.target,
        out = %out_if,
        r#in = %in_if,
        "stream opened ({rule})"
    );
    let relay = relay(tcp, mobile, up.clone(), down.clone());
    let placer = placer(
        inner.clone(),
        id,
        info.clone(),
        control.clone(),
        gen_rx.clone(),
        place_rx,
    );
    tokio::select! {
        r = relay => r.map(|()| control.status().moves),
        reason = placer => Err(reason),
    }
}

/// Waits for the next placement change, or `retry` if given; `false` once `deadline`
/// passed first (or the agent is stopping).
async fn wait_for_change(
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
    deadline: Instant,
    retry: Option<Duration>,
) -> bool {
    let deadline = tokio::time::Instant::from(deadline);
    let until = match retry {
        Some(r) => deadline.min(tokio::time::Instant::now() + r),
        None => deadline,
    };
    match tokio::time::timeout_at(until, gen_rx.changed()).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => tokio::time::Instant::now() < deadline,
    }
}

/// Why a held stream ends when its program gives up first.
const CLIENT_GONE: &str = "the local program closed its connection while the stream waited \
for an interface";

/// How a wait for a usable path ended.
enum Waited {
    /// Something changed (or it is time to retry): look again.
    Changed,
    /// `wait_timeout` is over.
    Expired,
    /// The program closed its connection: nobody wants the stream any more.
    ClientGone,
}

/// [`wait_for_change`], ended early when the program that asked for the stream closes its
/// connection: a held stream would otherwise stay in `msocks status` and be opened through
/// the proxy for no one, until `wait_timeout` (10 minutes by default) — `msocks run` gives
/// up after 120 s, other programs after their own connect timeouts.
async fn wait_while_client_waits(
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
    deadline: Instant,
    retry: Option<Duration>,
    tcp: &TcpStream,
) -> Waited {
    tokio::select! {
        more = wait_for_change(gen_rx, deadline, retry) => {
            if more { Waited::Changed } else { Waited::Expired }
        }
        () = client_gone(tcp) => Waited::ClientGone,
    }
}

/// Returns once the local program has closed its side (FIN with nothing unread, or an
/// error). A program that wrote ahead of the reply and then half-closed still counts as
/// waiting; its bytes are relayed once the stream opens.
async fn client_gone(tcp: &TcpStream) {
    loop {
        match tcp.ready(tokio::io::Interest::READABLE).await {
            Ok(r) if r.is_read_closed() || r.is_error() => {
                let mut b = [0u8; 1];
                match tcp.peek(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
        // Readable with data pending: readiness stays set until the data is read, which
        // is the relay's job later; look again in a while instead of spinning.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps a stream where the policy wants it. Returns only to fail the stream.
async fn placer(
    inner: Arc<Inner>,
    id: u64,
    info: StreamInfo,
    control: msocks_client::MobileControl,
    mut gen_rx: watch::Receiver<(u64, Arc<str>)>,
    mut place_rx: mpsc::Receiver<PlaceRequest>,
) -> String {
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let mut answer: Option<PlaceRequest> = None;
        let reason: Arc<str> = tokio::select! {
            changed = gen_rx.changed() => match changed {
                Ok(()) => gen_rx.borrow_and_update().1.clone(),
                Err(_) => return "the agent is stopping".into(),
            },
            req = place_rx.recv() => match req {
                Some(tx) => { answer = Some(tx); Arc::from("moved by hand") }
                None => return "the agent is stopping".into(),
            },
            _ = async { match retry_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                Arc::from("retrying a failed move")
            }
        };
        retry_at = None;
        let status = control.status();
        if matches!(status.state, StreamState::Closed | StreamState::Failed) {
            // The relay notices on its own and reports why.
            std::future::pending::<()>().await;
        }
        let (want, when, config, live_ok) = {
            let failed = inner.probes.failed();
            let st = inner.lock();
            let pinned = st.streams.get(&id).and_then(|e| e.pinned.clone());
            let (list, _, when) = wanted(&st, &failed, &info, pinned.as_deref());
            // Is the current path still carried by usable interfaces?
            let (o, i) = policy::describe_path(&st.config, &st.live, &status.path);
            let ok = [&o, &i].iter().all(|n| {
                !failed.contains(n.as_str()) && st.live.get(n.as_str()).is_some_and(|l| l.usable())
            });
            (list.into_iter().next(), when, st.config.clone(), ok)
        };
        let Some(want) = want else {
            if live_ok {
                continue;
            }
            if when == WhenUnavailable::Fail {
                return format!("no usable interface allowed ({reason}; when_unavailable = fail)");
            }
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= config.wait_timeout {
                return "no usable interface within wait_timeout".into();
            }
            info!(
                stream = id,
                "stream waiting for a usable interface ({reason})"
            );
            if let Some(tx) = answer {
                let _ = tx.send(Err("no usable interface for this stream".into()));
            }
            continue;
        };
        waiting_since = None;
        if want.path == status.path {
            if let Some(tx) = answer {
                let _ = tx.send(Ok(()));
            }
            continue;
        }
        let (old_out, old_in) = {
            let st = inner.lock();
            policy::describe_path(&st.config, &st.live, &status.path)
        };
        // A ready standby connection on the interface makes the move warm.
        let standby = (want.outbound == want.inbound)
            .then(|| inner.probes.take_standby(&want.outbound, &want.path))
            .flatten();
        let warm = standby.is_some();
        let result = match standby {
            Some(s) => control.migrate_via(s).await,
            None => control.migrate(want.path.clone()).await,
        };
        match result {
            Ok(report) => {
                info!(
                    stream = id,
                    from = %format!("out {old_out} / in {old_in}"),
                    to = %format!("out {} / in {}", want.outbound, want.inbound),
                    took_ms = report.duration.as_millis() as u64,
                    salvage = report.data_salvage,
                    rewrite = report.data_write,
                    warm,
                    "stream moved: {reason}"
                );
                if let Some(tx) = answer {
                    let _ = tx.send(Ok(()));
                }
                // Something may have changed during the move: look again.
                retry_at = Some(tokio::time::Instant::now());
            }
            Err(e) => {
                warn!(stream = id, to = %format!("out {} / in {}", want.outbound, want.inbound), "stream move failed ({reason}): {e}; retrying");
                if let Some(tx) = answer {
                    let _ = tx.send(Err(format!("move failed: {e}")));
                }
                retry_at = Some(tokio::time::Instant::now() + RETRY_MOVE);
            }
        }
    }
}

/// Copies both ways with half-close: when one side ends its direction, the other side's
/// writing direction is shut down, and the other direction keeps flowing.
async fn relay(
    tcp: &mut TcpStream,
    mobile: MobileStream,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
) -> Result<(), String> {
    let (mut lr, mut lw) = tcp.split();
    let (mut mr, mut mw) = tokio::io::split(mobile);
    let upward = async {
        copy_counted(&mut lr, &mut mw, &up)
            .await
            .map_err(|e| format!("relay to the proxy: {e}"))?;
        mw.shutdown()
            .await
            .map_err(|e| format!("ending the upward direction: {e}"))
    };
    let downward = async {
        copy_counted(&mut mr, &mut lw, &down)
            .await
            .map_err(|e| format!("relay to the program: {e}"))?;
        lw.shutdown()
            .await
            .map_err(|e| format!("ending the downward direction: {e}"))
    };
    tokio::try_join!(upward, downward).map(|_| ())
}

async fn copy_counted<R, W>(r: &mut R, w: &mut W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.flush().await;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn control_loop(inner: Arc<Inner>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(serve_control(inner.clone(), conn));
            }
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_control(inner: Arc<Inner>, conn: UnixStream) {
    let (r, mut w) = conn.into_split();
    // Bounded lines: a request is a few dozen bytes.
    let mut lines = BufReader::new(r.take(1 << 20)).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => {
                let streams = status_rows(&inner);
                let interfaces = interface_rows(&inner, &streams);
                Response {
                    ok: true,
                    streams,
                    interfaces,
                    ..Default::default()
                }
            }
            Ok(Request::Move { id, interface }) => manual_move(&inner, id, &interface).await,
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                ..Default::default()
            },
        };
        let Ok(mut text) = serde_json::to_string(&response) else {
            return;
        };
        text.push('\n');
        if w.write_all(text.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn status_rows(inner: &Inner) -> Vec<StreamRow> {
    let st = inner.lock();
    st.streams
        .iter()
        .map(|(&id, e)| {
            let (outbound, inbound, moves, state) = match (&e.control, &e.udp) {
                (_, Some(view)) => match view.path() {
                    Some(path) => {
                        let (o, i) = policy::describe_path(&st.config, &st.live, &path);
                        (o, i, view.moves(), "associated")
                    }
                    None => ("-".into(), "-".into(), view.moves(), "waiting"),
                },
                (Some(c), None) => {
                    let s = c.status();
                    let (o, i) = policy::describe_path(&st.config, &st.live, &s.path);
                    let state = match s.state {
                        StreamState::Connected => "connected",
                        StreamState::Moving => "moving",
                        StreamState::Closed => "closed",
                        StreamState::Failed => "failed",
                    };
                    (o, i, s.moves, state)
                }
                (None, None) => ("-".into(), "-".into(), 0, "connecting"),
            };
            StreamRow {
                id,
                kind: e.kind.into(),
                program: e.info.peer.program.clone(),
                pid: e.info.peer.pid,
                uid: e.info.peer.uid,
                destination: e.info.target.to_string(),
                rule: e.rule.clone(),
                outbound,
                inbound,
                bytes_up: e.up.load(Ordering::Relaxed),
                bytes_down: e.down.load(Ordering::Relaxed),
                moves,
                state: state.into(),
                pinned: e.pinned.clone(),
                age_secs: e.opened.elapsed().as_secs(),
            }
        })
        .collect()
}

/// Why no path is allowed for `info` now, interface by interface, for the log: e.g.
/// `outbound wired: down; outbound radio: usable, but no inbound interface (radio) has an
/// IPv6 address`.
fn why_unplaceable(st: &State, failed: &HashSet<String>, info: &StreamInfo) -> String {
    let decision = policy::decide(&st.config, info);
    if decision.outbound.is_empty() {
        return "the rule allows no interface with a proxy address for outbound".into();
    }
    let mut parts = Vec::new();
    for &o in &decision.outbound {
        let oc = &st.config.interfaces[o];
        let state = link_state(oc, st.live.get(&oc.name));
        let part = if failed.contains(&oc.name) {
            format!("outbound {}: failed its liveness probe", oc.name)
        } else if state != "usable" {
            format!("outbound {}: {state}", oc.name)
        } else {
            let family = match oc.proxy {
                Some(p) if p.is_ipv4() => "an IPv4",
                _ => "an IPv6",
            };
            let inbound: Vec<&str> = decision
                .inbound
                .iter()
                .map(|&i| st.config.interfaces[i].name.as_str())
                .collect();
            format!(
                "outbound {}: usable, but no allowed inbound interface ({}) is usable with {family} address",
                oc.name,
                inbound.join(", ")
            )
        };
        parts.push(part);
    }
    parts.join("; ")
}

/// What the link watcher's view means for one configured interface, in words a user can
/// act on: `usable`, `down`, `no address`, `no IPv6 address` (up with an address, but none
/// of its proxy's family: e.g. an IPv6 proxy right after `ip link set down/up`, which
/// flushes global IPv6 addresses), or `absent` (no such kernel interface now).
fn link_state(
    ic: &crate::config::InterfaceConfig,
    live: Option<&links::Interface>,
) -> &'static str {
    match live {
        None => "absent",
        Some(l) if !l.up => "down",
        Some(l) if !l.usable() => "no address",
        Some(l) => match ic.proxy {
            Some(p) if l.source_addr(p.is_ipv4()).is_none() => {
                if p.is_ipv4() {
                    "no IPv4 address"
                } else {
                    "no IPv6 address"
                }
            }
            _ => "usable",
        },
    }
}

fn interface_rows(inner: &Inner, streams: &[StreamRow]) -> Vec<InterfaceRow> {
    let probes = inner.probes.statuses();
    let st = inner.lock();
    st.config
        .interfaces
        .iter()
        .map(|ic| {
            let link = link_state(ic, st.live.get(&ic.name));
            let p = probes.get(&ic.name).cloned().unwrap_or_default();
            let count = |f: fn(&StreamRow) -> &str| {
                streams.iter().filter(|r| f(r) == ic.name).count() as u64
            };
            InterfaceRow {
                name: ic.name.clone(),
                link: link.into(),
                probe: match p.alive {
                    Some(true) => "alive",
                    Some(false) => "failed",
                    None => "-",
                }
                .into(),
                rtt_us: p.rtt.map(|d| d.as_micros() as u64),
                standby_ready: p.standby_ready,
                error: p.error,
                streams_out: count(|r| r.outbound.as_str()),
                streams_in: count(|r| r.inbound.as_str()),
            }
        })
        .collect()
}

async fn manual_move(inner: &Arc<Inner>, id: Option<u64>, interface: &str) -> Response {
    let refuse = |m: String| Response {
        ok: false,
        error: Some(m),
        ..Default::default()
    };
    let auto = interface == "auto";
    let targets: Vec<(u64, mpsc::Sender<PlaceRequest>)> = {
        let failed = inner.probes.failed();
        let mut st = inner.lock();
        if !auto {
            match st.config.interfaces.iter().find(|i| i.name == interface) {
                None => {
                    let known: Vec<&str> = st
                        .config
                        .interfaces
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect();
                    return refuse(format!(
                        "interface {interface:?} is not configured (configured: {}; or `auto`)",
                        known.join(", ")
                    ));
                }
                Some(i) if i.proxy.is_none() => {
                    return refuse(format!(
                        "interface {interface:?} has no proxy address, so no data can leave by it"
                    ))
                }
                Some(_) => {}
            }
            if failed.contains(interface) {
                return refuse(format!(
                    "interface {interface:?} is not usable now: it failed its liveness probe \
                     (see `msocks status --interfaces`)"
                ));
            }
            if policy::pinned_placement(&st.config, interface, &st.live).is_none() {
                let why = st
                    .config
                    .interfaces
                    .iter()
                    .find(|i| i.name == interface)
                    .map_or("absent", |ic| link_state(ic, st.live.get(interface)));
                return refuse(format!("interface {interface:?} is not usable now ({why})"));
            }
        }
        if let Some(id) = id {
            if !st.streams.contains_key(&id) {
                return refuse(format!("no stream {id} (see `msocks status`)"));
            }
        }
        st.streams
            .iter_mut()
            .filter(|(k, _)| id.map_or(true, |want| **k == want))
            .filter_map(|(&k, e)| {
                e.pinned = (!auto).then(|| interface.to_owned());
                e.place_tx.clone().map(|tx| (k, tx))
            })
            .collect()
    };
    let mut moved = Vec::new();
    let mut errors = Vec::new();
    let waits = targets.into_iter().map(|(k, tx)| async move {
        let (reply, answer) = oneshot::channel();
        if tx.send(reply).await.is_err() {
            return (k, Err("stream closed".to_owned()));
        }
        match tokio::time::timeout(MOVE_WAIT, answer).await {
            Ok(Ok(r)) => (k, r),
            Ok(Err(_)) => (k, Err("stream closed".to_owned())),
            Err(_) => (k, Err("timed out".to_owned())),
        }
    });
    for (k, r) in futures::future::join_all(waits).await {
        match r {
            Ok(()) => moved.push(k),
            Err(e) => errors.push(format!("stream {k}: {e}")),
        }
    }
    if errors.is_empty() {
        Response {
            ok: true,
            moved,
            ..Default::default()
        }
    } else {
        refuse(errors.join("; "))
    }
}
