//! The listening side: binds the listeners, accepts clients, bounds the number of
//! handshakes and sessions, and shuts down gracefully.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::Credentials;
use crate::config::ProxyConfig;
use crate::rules::RuleSet;
use crate::session;

/// Why the proxy could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// State every session of one proxy shares.
pub(crate) struct Shared {
    pub(crate) config: ProxyConfig,
    pub(crate) rules: RuleSet,
    pub(crate) credentials: Option<Credentials>,
    pub(crate) handshakes: HandshakeSlots,
    pub(crate) active_sessions: AtomicUsize,
    /// Live MSOCKS sessions by token.
    pub(crate) registry: crate::registry::Registry,
    /// Fired when the grace period after a shutdown request is over: live sessions end.
    pub(crate) abort: CancellationToken,
    next_id: AtomicU64,
}

impl Shared {
    /// Counts a session in, unless the proxy is at `max_sessions`.
    pub(crate) fn try_open_session(self: &Arc<Self>) -> Option<SessionGuard> {
        let max = self.config.limits.max_sessions;
        self.active_sessions
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SessionGuard(self.clone()))
    }
}

/// Holds one of the `max_sessions` places until dropped.
pub(crate) struct SessionGuard(Arc<Shared>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.active_sessions.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The clients currently in their handshake, oldest first. When it is full, the oldest is
/// told to give up: real clients finish their handshake within a round trip or two, while a
/// flood of stalled connections ages quickly to the front and is evicted.
pub(crate) struct HandshakeSlots {
    max: usize,
    next: AtomicU64,
    live: Arc<Mutex<BTreeMap<u64, CancellationToken>>>,
}

/// A place in the handshake table; `evicted()` fires if a newer client needed it. Taken in
/// the accept loop, so that a handshake's age is its place in the accept order (not the
/// order in which the runtime first polls the session tasks).
pub(crate) struct HandshakeSlot {
    live: Arc<Mutex<BTreeMap<u64, CancellationToken>>>,
    key: u64,
    token: CancellationToken,
}

impl HandshakeSlots {
    fn new(max: usize) -> Self {
        HandshakeSlots {
            max,
            next: AtomicU64::new(0),
            live: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub(crate) fn enter(&self) -> HandshakeSlot {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        // A poisoned lock only means another task panicked while holding it; the map is
        // still consistent (every operation on it is a single insert or remove).
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        while live.len() >= self.max {
            match live.pop_first() {
                Some((_, oldest)) => oldest.cancel(),
                None => break,
            }
        }
        live.insert(key, token.clone());
        HandshakeSlot {
            live: self.live.clone(),
            key,
            token,
        }
    }

    /// Number of clients in their handshake now.
    pub(crate) fn len(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl HandshakeSlot {
    pub(crate) async fn evicted(&self) {
        self.token.cancelled().await
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// A bound, not yet running proxy.
pub struct Proxy {
    listeners: Vec<TcpListener>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds every listener of `config`. `credentials`, when given, makes username/password
    /// authentication mandatory.
    pub async fn bind(
        config: ProxyConfig,
        credentials: Option<Credentials>,
    ) -> Result<Proxy, StartError> {
        // The engine first: the listeners' MSS clamp depends on it being there.
        crate::kernel::preload(&config.engine).await;
        let mut listeners = Vec::with_capacity(config.listen.len());
        for &addr in &config.listen {
            let mss = crate::kernel::listener_mss(&config.engine, addr.is_ipv6());
            let listener =
                bind_listener(addr, mss).map_err(|source| StartError::Listen { addr, source })?;
            listeners.push(listener);
        }
        let shared = Arc::new(Shared {
            rules: RuleSet::new(config.rules.clone()),
            handshakes: HandshakeSlots::new(config.limits.max_handshakes),
            config,
            credentials,
            active_sessions: AtomicUsize::new(0),
            registry: crate::registry::Registry::default(),
            abort: CancellationToken::new(),
            next_id: AtomicU64::new(1),
        });
        Ok(Proxy { listeners, shared })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Serves until `shutdown` completes, then stops accepting, gives live sessions
    /// `limits.shutdown_grace` to finish, ends the rest, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let tracker = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        for listener in self.listeners {
            if let Ok(addr) = listener.local_addr() {
                info!("listening on {addr}");
            }
            tracker.spawn(accept_loop(
                listener,
                self.shared.clone(),
                tracker.clone(),
                stop_accepting.clone(),
            ));
        }
        shutdown.await;
        stop_accepting.cancel();
        let live =
            self.shared.active_sessions.load(Ordering::Acquire) + self.shared.handshakes.len();
        let grace = self.shared.config.limits.shutdown_grace;
        let mobile = self.shared.registry.len();
        info!(live, mobile, grace = ?grace, "shutting down: no new clients; waiting for live sessions");
        tracker.close();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            let left = self.shared.active_sessions.load(Ordering::Acquire);
            warn!(
                sessions = left,
                "grace period over: closing the remaining sessions"
            );
            self.shared.abort.cancel();
            // Sessions notice the abort at their next wake-up; give them a moment to log.
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
        crate::kernel::log_datapath_counters();
        info!("stopped");
    }
}

/// Binds a listener; `mss`, when given, is announced in every SYN-ACK (accepted sockets
/// inherit `TCP_MAXSEG`).
fn bind_listener(addr: SocketAddr, mss: Option<u32>) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]` serves IPv6 only, so that `0.0.0.0` can be listed beside it.
        socket.set_only_v6(true)?;
    }
    if let Some(mss) = mss {
        crate::kernel::set_maxseg(&socket, mss)?;
    }
    // Accepted sockets inherit it: a client's urgent byte that comes before its session's
    // engine starts stays in the stream (set later, the kernel may already have taken it out
    // of band, where nothing reads it).
    socket.set_out_of_band_inline(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let mut last_warning: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
                debug!(session = id, client = %peer, "accepted");
                // The slot is taken here, in accept order: a client that arrives after a
                // flood is younger than all of it, however the runtime schedules the tasks.
                let slot = shared.handshakes.enter();
                let mss = crate::kernel::connect_mss(&shared.config.engine, &stream);
                let session = session::serve(shared.clone(), stream, peer, id, slot);
                // One spawn per case: a future holding both would be twice the session's
                // size, for every session.
                match mss {
                    Some(mss) => tracker.spawn(crate::connect::with_connect_mss(mss, session)),
                    None => tracker.spawn(session),
                };
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning, and say so at
                // most once a second.
                if last_warning.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                    warn!(error = %e, "accept failed; backing off");
                    last_warning = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_receive_urgent_data_inline_from_the_start() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = l.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = l.accept().await.unwrap();
        assert!(socket2::SockRef::from(&accepted)
            .out_of_band_inline()
            .unwrap());
    }
}
