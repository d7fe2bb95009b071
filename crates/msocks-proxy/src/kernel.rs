//! The `kernel` engine for plain sessions: after the SOCKS exchange the two sockets go to
//! [`msocks_splice`], which splices them at packet level (Linux, root). Wherever that
//! cannot happen — another OS, no privilege, no BPF, a session whose connections cannot be
//! spliced — the session runs on the `relay` engine instead, and the log says why.

#[cfg(target_os = "linux")]
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::info;

use crate::config::{EngineConfig, EngineKind};
use crate::relay::Traffic;
use crate::server::Shared;

/// What the caller does next.
pub(crate) enum KernelRun {
    /// The session ran spliced and is over, for this reason.
    Ended(String),
    /// Run the relay on these sockets; `early_sent` says whether the client's early bytes
    /// were already written to the server.
    Relay {
        client: TcpStream,
        server: TcpStream,
        early_sent: bool,
    },
}

/// When a live splice is first checked for its end (both FINs acknowledged, or a RST); the
/// interval then doubles up to [`POLL_MAX`].
#[cfg(target_os = "linux")]
const POLL_FIRST: Duration = Duration::from_millis(25);
/// Longest interval between two checks of a live splice.
#[cfg(target_os = "linux")]
const POLL_MAX: Duration = Duration::from_secs(1);
/// How long the drain first waits before looking again at queues that are waiting for a
/// peer's ACK; the wait doubles up to [`DRAIN_RETRY_MAX`].
#[cfg(target_os = "linux")]
const DRAIN_RETRY: Duration = Duration::from_millis(1);
/// Longest wait between two looks at the queues in the drain.
#[cfg(target_os = "linux")]
const DRAIN_RETRY_MAX: Duration = Duration::from_millis(32);
/// The interval between checks of a splice that has seen a FIN, for [`CLOSING_WATCH`] after
/// the first: its end is likely near, and a session that ends is seen to end (and gives back
/// its two descriptors) within this, not up to a doubled interval later.
#[cfg(target_os = "linux")]
const POLL_CLOSING: Duration = Duration::from_millis(10);
/// How long after its first FIN a splice is checked every [`POLL_CLOSING`]; then the
/// intervals double again (a half-closed session can stream on for hours).
#[cfg(target_os = "linux")]
const CLOSING_WATCH: Duration = Duration::from_secs(1);
/// How long a finished splice's entries stay, so a retransmitted last FIN or ACK is still
/// rewritten rather than answered with a RST by the proxy's own stack: a peer that missed the
/// last ACK sends its FIN again after one retransmission timeout (at least 200 ms on Linux).
/// The two frozen sockets stay as long (they keep the ports, which a new connection must not
/// take while the entries are there), so this bounds the descriptors a stream of short
/// sessions holds: with 2 s, the set-up benchmark's sessions ran a 20,000-descriptor limit out.
#[cfg(target_os = "linux")]
const LINGER: Duration = Duration::from_secs(1);

/// The MSS a listener at an IPv6 (`ipv6`) or IPv4 address announces under `engine`: none
/// for the relay engine, an engine that could not load, or `mss = 0`, else `mss`, else the smallest MTU of the attached
/// interfaces less the headers. Announced once in the SYN-ACK and never changeable later,
/// it must already fit every path a session may be spliced to (docs/KERNEL-SPLICE.md).
pub(crate) fn listener_mss(engine: &EngineConfig, ipv6: bool) -> Option<u32> {
    if engine.kind != EngineKind::Kernel || unavailable() {
        return None;
    }
    match engine.mss {
        Some(0) => None,
        Some(mss) => Some(mss),
        None => auto_mss(&engine.interfaces, ipv6),
    }
}

#[cfg(target_os = "linux")]
fn auto_mss(interfaces: &[String], ipv6: bool) -> Option<u32> {
    let names = if interfaces.is_empty() {
        msocks_splice::loader::default_interfaces()
    } else {
        Ok(interfaces.to_vec())
    };
    match names.and_then(|n| msocks_splice::loader::mss_for_interfaces(&n, ipv6)) {
        Ok(Some(mss)) => {
            info!(
                mss,
                "kernel engine: clamping the MSS to the attached interfaces' MTU"
            );
            Some(mss)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(
                "kernel engine: cannot read the interfaces' MTU ({e}); MSS not clamped, \
                 sessions over a smaller-MTU link will be relayed"
            );
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn auto_mss(_interfaces: &[String], _ipv6: bool) -> Option<u32> {
    None
}

/// Sets `TCP_MAXSEG` on a socket before `listen` or `connect`.
#[cfg(target_os = "linux")]
pub(crate) fn set_maxseg(socket: &impl std::os::fd::AsFd, mss: u32) -> std::io::Result<()> {
    msocks_splice::repair::set_maxseg(socket.as_fd(), mss)
}

/// Sets `TCP_MAXSEG` on a socket before `listen` or `connect` (only Linux clamps).
#[cfg(not(target_os = "linux"))]
pub(crate) fn set_maxseg<T>(_socket: &T, _mss: u32) -> std::io::Result<()> {
    Ok(())
}

/// The MSS the session accepted on `client` clamps its connection to the destination to,
/// under the kernel engine: the MSS the proxy announced to the client. The server is then
/// told no more than the client was (what the server sends fits the client's leg as far as
/// the proxy promised it), and the proxy sends the server no more than the client may send
/// (so the client's segments fit the server). `None` for the relay engine, an engine that
/// could not load, `mss = 0`, or when the announced MSS cannot be read.
pub(crate) fn connect_mss(engine: &EngineConfig, client: &TcpStream) -> Option<u32> {
    if engine.kind != EngineKind::Kernel || engine.mss == Some(0) || unavailable() {
        return None;
    }
    announced_mss(client)
}

#[cfg(target_os = "linux")]
fn announced_mss(client: &TcpStream) -> Option<u32> {
    use std::os::fd::AsFd;
    msocks_splice::repair::info(client.as_fd())
        .ok()
        .map(|i| i.advmss)
        .filter(|&m| m > 0)
}

#[cfg(not(target_os = "linux"))]
fn announced_mss(_client: &TcpStream) -> Option<u32> {
    None
}

/// Whether the engine was tried and could not load: then every session is relayed and
/// nothing is clamped.
fn unavailable() -> bool {
    #[cfg(target_os = "linux")]
    return matches!(ENGINE.get(), Some(None));
    #[cfg(not(target_os = "linux"))]
    return true;
}

/// Loads the engine now, when `engine` asks for the kernel one, rather than at the first
/// session: that session does not wait for the verifier, and the memory the load leaves is
/// the idle proxy's, not charged to the first sessions. Off the reactor (it blocks).
pub(crate) async fn preload(engine: &EngineConfig) {
    #[cfg(target_os = "linux")]
    if engine.kind == EngineKind::Kernel && ENGINE.get().is_none() {
        let interfaces = engine.interfaces.clone();
        let _ = tokio::task::spawn_blocking(move || {
            self::engine(&interfaces);
        })
        .await;
    }
    #[cfg(not(target_os = "linux"))]
    let _ = engine;
}

/// Runs the session on the kernel engine when it is configured and possible.
pub(crate) async fn run(
    shared: &Shared,
    session: u64,
    client: TcpStream,
    mut server: TcpStream,
    early: &[u8],
    traffic: &Traffic,
) -> KernelRun {
    if shared.config.engine.kind != EngineKind::Kernel {
        info!(session, engine = "relay", "engine");
        return KernelRun::Relay {
            client,
            server,
            early_sent: false,
        };
    }
    if !early.is_empty() {
        if let Err(e) = server.write_all(early).await {
            return KernelRun::Ended(format!("writing the client's early data: {e}"));
        }
        traffic
            .up
            .fetch_add(early.len() as u64, std::sync::atomic::Ordering::Relaxed);
    }
    spliced(shared, session, client, server, traffic).await
}

#[cfg(not(target_os = "linux"))]
async fn spliced(
    _shared: &Shared,
    session: u64,
    client: TcpStream,
    server: TcpStream,
    _traffic: &Traffic,
) -> KernelRun {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "kernel splice engine unavailable (it needs Linux); sessions use the relay engine"
        )
    });
    info!(session, engine = "relay", "engine");
    KernelRun::Relay {
        client,
        server,
        early_sent: true,
    }
}

#[cfg(target_os = "linux")]
static ENGINE: std::sync::OnceLock<Option<msocks_splice::Engine>> = std::sync::OnceLock::new();

/// Logs the datapath's non-zero counters (at the proxy's end: what the engine dropped,
/// stripped and rewrote, for whoever looks into a run), if the engine was loaded.
#[cfg(target_os = "linux")]
pub(crate) fn log_datapath_counters() {
    let Some(Some(engine)) = ENGINE.get() else {
        return;
    };
    match engine.stats() {
        Ok(stats) => {
            let counters: Vec<String> = stats
                .iter()
                .filter(|(_, n)| *n != 0)
                .map(|(name, n)| format!("{name}={n}"))
                .collect();
            info!(counters = %counters.join(" "), "kernel splice datapath counters");
        }
        Err(e) => tracing::debug!(error = %e, "reading the datapath counters"),
    }
}

/// Nothing to log off Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) fn log_datapath_counters() {}

/// The process's engine, loaded at the first kernel session; `None` (logged once) where
/// it cannot load.
#[cfg(target_os = "linux")]
pub(crate) fn engine(interfaces: &[String]) -> Option<&'static msocks_splice::Engine> {
    ENGINE
        .get_or_init(|| match msocks_splice::Engine::start(interfaces) {
            Ok(e) => {
                info!("kernel splice engine loaded");
                Some(e)
            }
            Err(e) => {
                tracing::warn!(
                    "kernel splice engine unavailable ({e}); sessions use the relay engine"
                );
                None
            }
        })
        .as_ref()
}

/// What [`msocks_splice::Spliced::status`] calls `Finished`, from entries already read: both
/// FINs acknowledged, or a RST went through.
#[cfg(target_os = "linux")]
fn finished_entries(
    up: &msocks_splice::maps::SpliceVal,
    down: &msocks_splice::maps::SpliceVal,
) -> bool {
    use msocks_splice::maps::{EV_FIN_ACKED, EV_RST};
    let fins = up.events & EV_FIN_ACKED != 0 && down.events & EV_FIN_ACKED != 0;
    fins || (up.events | down.events) & EV_RST != 0
}

/// A session the kernel engine did not splice.
#[cfg(target_os = "linux")]
pub(crate) enum NotSpliced {
    /// The sockets are gone, for this reason.
    Lost(String),
    /// Refused: the sockets, back on the reactor, and what the abandoned drain did.
    Refused(Box<Refused>),
}

/// A refused splice's sockets and bytes ([`msocks_splice::Refused`] on the reactor).
#[cfg(target_os = "linux")]
pub(crate) struct Refused {
    /// Why.
    pub(crate) reason: msocks_splice::Error,
    pub(crate) client: TcpStream,
    pub(crate) server: TcpStream,
    /// Bytes the drain read and did not write: they go first.
    pub(crate) pending_to_server: Vec<u8>,
    pub(crate) pending_to_client: Vec<u8>,
    /// Bytes the drain had copied (to the server, to the client).
    pub(crate) drained: (u64, u64),
}

/// A socket descriptor owned elsewhere (a [`msocks_splice::Holding`]'s), registered with
/// the reactor for read readiness while the drain relays a session before HOLD.
#[cfg(target_os = "linux")]
struct ReadinessFd(tokio::io::unix::AsyncFd<BorrowedRaw>);

/// A raw descriptor that the reactor may poll; it does not close it.
#[cfg(target_os = "linux")]
struct BorrowedRaw(std::os::fd::RawFd);

#[cfg(target_os = "linux")]
impl std::os::fd::AsRawFd for BorrowedRaw {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

#[cfg(target_os = "linux")]
impl ReadinessFd {
    /// Registers `fd`, which must stay open until this is dropped (the drain loop drops it
    /// before the `Holding` that owns the socket is finished or abandoned).
    #[allow(unsafe_code)]
    fn register(fd: std::os::fd::RawFd) -> std::io::Result<ReadinessFd> {
        // SAFETY: `fd` is a socket a `Holding` owns, taken from `Holding::fds` in
        // `splice_streams`; the only `ReadinessFd`s are locals of that function's drain loop,
        // dropped (deregistering the descriptor) before the `Holding` is finished or
        // abandoned, so the descriptor stays open, and the same socket, while registered.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                BorrowedRaw(fd),
                tokio::io::Interest::READABLE,
            )
        }
        .map(ReadinessFd)
        .map_err(std::io::Error::from)
    }

    /// Waits until the socket has bytes (or an end) to read, and clears that readiness:
    /// the drain reads with its own system calls, and the next wait must wait for new
    /// bytes (edge-triggered).
    async fn readable(&self) {
        if let Ok(mut guard) = self.0.readable().await {
            guard.clear_ready();
        }
    }
}

/// Splices a session's two sockets with the kernel engine (loading it if the proxy has not
/// yet): the checks and HOLD are a few non-blocking system calls, and the drain is driven
/// on the session's task, waiting on the runtime's timer rather than in a thread of its own.
///
/// With a non-zero `relay_first`, the drain relays until the connections are quiet before
/// HOLD (`Engine::hold_when_quiet`); zero holds at once.
#[cfg(target_os = "linux")]
pub(crate) async fn splice_streams(
    shared: &Shared,
    client: TcpStream,
    server: TcpStream,
    relay_first: Duration,
) -> Result<msocks_splice::Spliced, NotSpliced> {
    use msocks_splice::Drain;

    let (c, s) = match (client.into_std(), server.into_std()) {
        (Ok(c), Ok(s)) => (c, s),
        // into_std only fails when deregistering from the reactor fails; the sockets are
        // then gone with the error.
        (Err(e), _) | (_, Err(e)) => return Err(NotSpliced::Lost(format!("kernel engine: {e}"))),
    };
    // Loading (the verifier) blocks, once per process: off the reactor. Every later session
    // finds the engine loaded.
    let engine = match ENGINE.get() {
        Some(e) => e.as_ref(),
        None => {
            let interfaces = shared.config.engine.interfaces.clone();
            match tokio::task::spawn_blocking(move || engine(&interfaces)).await {
                Ok(e) => e,
                Err(e) => return Err(NotSpliced::Lost(format!("kernel engine task: {e}"))),
            }
        }
    };
    let attempt = match engine {
        Some(e) if relay_first.is_zero() => e.hold(c, s),
        Some(e) => e.hold_when_quiet(c, s, relay_first),
        None => Err(Box::new(msocks_splice::Refused {
            error: msocks_splice::Error::Unavailable,
            client: c,
            server: s,
            pending_to_server: Vec::new(),
            pending_to_client: Vec::new(),
            drained: (0, 0),
        })),
    };
    let attempt = match attempt {
        Ok(mut holding) => {
            let deadline =
                tokio::time::Instant::now() + relay_first + shared.config.engine.drain_timeout;
            let mut retry = DRAIN_RETRY;
            // Before HOLD the drain is the session's relay: bytes that arrive are passed on
            // at once, on their readiness. Registered for the drain only: the descriptors
            // go back to the reactor as streams if the splice is refused.
            let readiness = match holding.fds() {
                Some((c, s)) if !holding.is_held() => {
                    match (ReadinessFd::register(c), ReadinessFd::register(s)) {
                        (Ok(c), Ok(s)) => Some((c, s)),
                        _ => None,
                    }
                }
                _ => None,
            };
            let result = loop {
                match holding.drain_step() {
                    Ok(Drain::Quiet) => break Ok(()),
                    Ok(step) => {
                        if tokio::time::Instant::now() >= deadline {
                            break Err(msocks_splice::Error::DrainTimeout);
                        }
                        if step == Drain::Moved {
                            // Before HOLD a busy session moves bytes pass after pass: let the
                            // worker's other tasks run between them.
                            retry = DRAIN_RETRY;
                            tokio::task::yield_now().await;
                            continue;
                        }
                        // An ACK from a peer has no readiness event: look again soon, then
                        // less often; bytes that come in meanwhile (before HOLD) end the wait.
                        match &readiness {
                            Some((c, s)) if !holding.is_held() => {
                                tokio::select! {
                                    () = tokio::time::sleep(retry) => {}
                                    () = c.readable() => {}
                                    () = s.readable() => {}
                                }
                            }
                            _ => tokio::time::sleep(retry).await,
                        }
                        retry = (retry * 2).min(DRAIN_RETRY_MAX);
                    }
                    Err(e) => break Err(e),
                }
            };
            drop(readiness);
            match result {
                Ok(()) => holding.finish(),
                Err(e) => Err(holding.abandon(e)),
            }
        }
        Err(refused) => Err(refused),
    };
    match attempt {
        Ok(sp) => Ok(sp),
        Err(refused) => {
            let r = *refused;
            // `hold` hands refused sockets back as given and `abandon` non-blocking: they
            // are non-blocking, as the reactor needs.
            let back =
                TcpStream::from_std(r.client).and_then(|c| Ok((c, TcpStream::from_std(r.server)?)));
            match back {
                Ok((client, server)) => Err(NotSpliced::Refused(Box::new(Refused {
                    reason: r.error,
                    client,
                    server,
                    pending_to_server: r.pending_to_server,
                    pending_to_client: r.pending_to_client,
                    drained: r.drained,
                }))),
                Err(e) => Err(NotSpliced::Lost(format!("kernel engine fallback: {e}"))),
            }
        }
    }
}

#[cfg(target_os = "linux")]
async fn spliced(
    shared: &Shared,
    session: u64,
    client: TcpStream,
    server: TcpStream,
    traffic: &Traffic,
) -> KernelRun {
    use std::sync::atomic::Ordering;

    let spliced =
        match splice_streams(shared, client, server, shared.config.engine.relay_first).await {
            Ok(sp) => sp,
            Err(NotSpliced::Lost(why)) => return KernelRun::Ended(why),
            Err(NotSpliced::Refused(r)) => {
                info!(session, engine = "relay", reason = %r.reason, "engine: not spliced");
                let Refused {
                    mut client,
                    mut server,
                    pending_to_server,
                    pending_to_client,
                    drained,
                    ..
                } = *r;
                // What the drain passed on (all of a short session relayed before HOLD).
                traffic.up.fetch_add(drained.0, Ordering::Relaxed);
                traffic.down.fetch_add(drained.1, Ordering::Relaxed);
                // Bytes the abandoned drain had already taken from one side go first.
                if let Err(e) = server.write_all(&pending_to_server).await {
                    return KernelRun::Ended(format!("kernel engine fallback: {e}"));
                }
                if let Err(e) = client.write_all(&pending_to_client).await {
                    return KernelRun::Ended(format!("kernel engine fallback: {e}"));
                }
                traffic
                    .up
                    .fetch_add(pending_to_server.len() as u64, Ordering::Relaxed);
                traffic
                    .down
                    .fetch_add(pending_to_client.len() as u64, Ordering::Relaxed);
                return KernelRun::Relay {
                    client,
                    server,
                    early_sent: true,
                };
            }
        };
    info!(session, engine = "kernel", "engine: spliced");
    // `idle_timeout` as the relay applies it: no segment either way for that long ends the
    // session (silently: the peers' next segments find no socket and get a RST).
    let idle_timeout = shared.config.limits.idle_timeout;
    let mut last_packets = 0u64;
    let mut last_move = tokio::time::Instant::now();
    let mut poll = POLL_FIRST;
    let mut closing_since: Option<tokio::time::Instant> = None;
    let (end, finished) = loop {
        tokio::select! {
            () = shared.abort.cancelled() => break ("shut down".to_owned(), false),
            // One read of both entries per check gives the end and the activity.
            () = tokio::time::sleep(poll) => match spliced.entries() {
                Ok((up, down)) if finished_entries(&up, &down) => {
                    break ("completed (kernel splice)".to_owned(), true)
                }
                Ok((up, down)) => {
                    // Short sessions are seen to end soon; a long one costs a map read
                    // per POLL_MAX at most, and one that is closing is watched closely
                    // for a while.
                    use msocks_splice::maps::{EV_FIN, EV_FIN_ACKED};
                    if closing_since.is_none() && (up.events | down.events) & (EV_FIN | EV_FIN_ACKED) != 0 {
                        closing_since = Some(tokio::time::Instant::now());
                    }
                    poll = match closing_since {
                        Some(t) if t.elapsed() < CLOSING_WATCH => POLL_CLOSING,
                        _ => (poll * 2).min(POLL_MAX),
                    };
                    let packets = up.packets.wrapping_add(down.packets);
                    if packets != last_packets {
                        last_packets = packets;
                        last_move = tokio::time::Instant::now();
                    } else if !idle_timeout.is_zero() && last_move.elapsed() >= idle_timeout {
                        break ("idle timeout (kernel splice)".to_owned(), false);
                    }
                }
                Err(e) => break (format!("kernel splice: {e}"), false),
            },
        }
    };
    // What the drain copied before the splice, then what crossed it (final once both FINs
    // are acknowledged).
    let (drained_up, drained_down) = spliced.drained();
    traffic.up.fetch_add(drained_up, Ordering::Relaxed);
    traffic.down.fetch_add(drained_down, Ordering::Relaxed);
    if let Ok((up, down)) = spliced.forwarded() {
        traffic.up.fetch_add(up, Ordering::Relaxed);
        traffic.down.fetch_add(down, Ordering::Relaxed);
    }
    if finished {
        // The session is over; its entries stay a little longer on a task of their own so
        // that a retransmitted last FIN or ACK is still rewritten, without holding the
        // session's slot, and with one descriptor instead of two. Dropped with the runtime
        // at shutdown, which tears down at once.
        let mut spliced = spliced;
        spliced.close_client_socket();
        tokio::spawn(async move {
            tokio::time::sleep(LINGER).await;
            spliced.teardown();
        });
    } else {
        spliced.teardown();
    }
    KernelRun::Ended(end)
}
