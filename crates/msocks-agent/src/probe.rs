//! Liveness probes and warm standby connections, one per configured interface.
//!
//! For every interface that is usable and has a proxy address, a task keeps a standby
//! connection (PROTOCOL.md 3.13) to that proxy address from the interface's own address and
//! pings it every `probe_interval`. Two things come of it:
//!
//! * **Silent failures are found.** A link can stay up while it loses every packet (a Wi-Fi
//!   association gone stale, a cellular bearer stalled). No rtnetlink event says so, and TCP
//!   takes minutes to give up. A probe unanswered for `probe_timeout` (default 1 s) marks the
//!   interface *failed*: placement skips it, so its streams move at once; the first answered
//!   probe afterwards makes it usable again, and streams that prefer it move back.
//! * **Moves are warm.** A stream moving onto the interface takes the ready standby
//!   connection and sends its RECONNECT on it: one round trip instead of a TCP handshake
//!   plus one. The task then opens the next standby right away.
//!
//! One standby per interface: when several streams move onto the same interface at once,
//! the first goes warm and the others make their own connections.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use msocks_client::{Credentials, MobileConfig, ProxyPath, Standby};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::agent::Inner;
use crate::policy;

/// Pause before a standby connection that could not be opened is tried again.
const REOPEN_PAUSE: Duration = Duration::from_millis(250);

/// The status error of an interface whose proxy refuses standby connections.
const UNPROBED: &str = "the proxy does not hold standby connections";

/// Pause before asking again a proxy that refused STANDBY.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// Whether opening a standby connection failed with an answer from the proxy (rather than
/// with silence or a network error).
fn proxy_answered(e: &msocks_client::Error) -> bool {
    use msocks_client::Error as E;
    matches!(
        e,
        E::MsocksUnsupported
            | E::MsocksVersionUnsupported
            | E::Refused(_)
            | E::AuthFailed(_)
            | E::NoAcceptableMethod
            | E::UnexpectedMethod(_)
    )
}

/// What the probes know about one interface.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeStatus {
    /// `Some(true)`: the last probe was answered; `Some(false)`: the interface failed its
    /// probe; `None`: not probed (link unusable, no proxy address, probing off, or starting).
    pub alive: Option<bool>,
    /// Round-trip time of the last answered probe.
    pub rtt: Option<Duration>,
    /// A standby connection is ready for the next move onto this interface.
    pub standby_ready: bool,
    /// Why the interface failed, when it did.
    pub error: Option<String>,
}

#[derive(Default)]
struct Slot {
    /// The ready standby connection, between probes.
    ready: Option<Standby>,
    status: ProbeStatus,
}

/// The probe state of every interface, shared by the probe tasks and the placers.
#[derive(Default)]
pub(crate) struct Probes {
    slots: Mutex<HashMap<String, Slot>>,
    /// Woken when a mover took a standby, so its task opens the next one at once.
    taken: Notify,
}

impl Probes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interfaces that failed their probe: placement treats them as unusable.
    pub(crate) fn failed(&self) -> HashSet<String> {
        self.lock()
            .iter()
            .filter(|(_, s)| s.status.alive == Some(false))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The probe status of each probed interface.
    pub(crate) fn statuses(&self) -> HashMap<String, ProbeStatus> {
        self.lock()
            .iter()
            .map(|(n, s)| (n.clone(), s.status.clone()))
            .collect()
    }

    /// Takes `interface`'s ready standby connection if it was opened on `path`.
    pub(crate) fn take_standby(&self, interface: &str, path: &ProxyPath) -> Option<Standby> {
        let mut slots = self.lock();
        let slot = slots.get_mut(interface)?;
        if slot.ready.as_ref().map(|s| s.path()) != Some(path) {
            return None;
        }
        let standby = slot.ready.take();
        slot.status.standby_ready = false;
        drop(slots);
        self.taken.notify_waiters();
        standby
    }

    fn put(&self, interface: &str, standby: Standby) {
        let mut slots = self.lock();
        let slot = slots.entry(interface.to_owned()).or_default();
        slot.ready = Some(standby);
        slot.status.standby_ready = true;
    }

    fn take_back(&self, interface: &str) -> Option<Standby> {
        let mut slots = self.lock();
        let slot = slots.get_mut(interface)?;
        slot.status.standby_ready = false;
        slot.ready.take()
    }

    /// Records a probe outcome; returns a reason to re-place streams when the interface's
    /// liveness changed.
    fn record(&self, interface: &str, outcome: Result<Duration, String>) -> Option<String> {
        let mut slots = self.lock();
        let slot = slots.entry(interface.to_owned()).or_default();
        let before = slot.status.alive;
        match outcome {
            Ok(rtt) => {
                slot.status.alive = Some(true);
                slot.status.rtt = Some(rtt);
                slot.status.error = None;
                (before == Some(false)).then(|| format!("{interface} answers probes again"))
            }
            Err(why) => {
                slot.status.alive = Some(false);
                slot.status.rtt = None;
                slot.status.standby_ready = false;
                slot.ready = None;
                let changed = before != Some(false);
                slot.status.error = Some(why.clone());
                changed.then(|| format!("{interface} failed its liveness probe ({why})"))
            }
        }
    }

    /// Marks the interface as not probed (the proxy refuses standby connections). Returns
    /// whether this is news (to log it once) and whether a failed verdict was lifted.
    fn record_unprobed(&self, interface: &str) -> (bool, bool) {
        let mut slots = self.lock();
        let slot = slots.entry(interface.to_owned()).or_default();
        let first = slot.status.error.as_deref() != Some(UNPROBED);
        let was_failed = slot.status.alive == Some(false);
        slot.status = ProbeStatus {
            alive: None,
            rtt: None,
            standby_ready: false,
            error: Some(UNPROBED.into()),
        };
        slot.ready = None;
        (first, was_failed)
    }

    /// Forgets what was known: the interface is not probed now.
    fn clear(&self, interface: &str) -> bool {
        let mut slots = self.lock();
        match slots.remove(interface) {
            Some(slot) => slot.status.alive == Some(false),
            None => false,
        }
    }
}

/// What a probe task is to do about its interface right now.
enum Plan {
    /// Gone from the configuration, no proxy address, or probing off: the task ends.
    Stop,
    /// Not usable (link down, no address): wait for a change.
    Idle,
    /// Probe over this path.
    Probe {
        path: ProxyPath,
        config: Box<MobileConfig>,
        interval: Duration,
        timeout: Duration,
    },
}

fn plan(inner: &Inner, interface: &str) -> Plan {
    let st = inner.lock();
    let Some(ic) = st.config.interfaces.iter().find(|i| i.name == interface) else {
        return Plan::Stop;
    };
    if !st.config.standby || ic.proxy.is_none() {
        return Plan::Stop;
    }
    // The interface's own path: its proxy address, from its own address. The raw link
    // view: a failed probe must not stop the probing that would find it working again.
    let Some(placement) = policy::pinned_placement(&st.config, interface, &st.live) else {
        return Plan::Idle;
    };
    let timeout = st.config.probe_timeout;
    let mut config = MobileConfig::new(placement.path.clone());
    config.connect_timeout = timeout;
    config.handshake_timeout = timeout;
    config.credentials = st
        .config
        .proxy_auth
        .as_ref()
        .map(|a| Credentials::new(a.username.clone(), a.password.clone()));
    Plan::Probe {
        path: placement.path,
        config: Box::new(config),
        interval: st.config.probe_interval,
        timeout,
    }
}

/// Keeps `interface` probed and its standby connection ready until the interface leaves
/// the configuration or probing is switched off.
pub(crate) async fn probe_interface(inner: Arc<Inner>, interface: String) {
    let mut gen_rx = inner.generation.subscribe();
    loop {
        let (path, config, interval, timeout) = match plan(&inner, &interface) {
            Plan::Stop => {
                if inner.probes.clear(&interface) {
                    inner.bump(format!("{interface} is no longer probed"));
                }
                debug!(%interface, "probing stopped");
                return;
            }
            Plan::Idle => {
                // Link down or without an address: the link watcher already keeps streams
                // off it, and a stale verdict must not outlive the link.
                if inner.probes.clear(&interface) {
                    inner.bump(format!("{interface} is not probed while unusable"));
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), gen_rx.changed()).await;
                continue;
            }
            Plan::Probe {
                path,
                config,
                interval,
                timeout,
            } => (path, config, interval, timeout),
        };
        let mut standby = match Standby::open(path.clone(), &config).await {
            Ok(s) => s,
            // The proxy answered, so the path works; it just will not hold standby
            // connections (mobility off, an older proxy, credentials it refuses). Probing
            // cannot work over such a proxy: say so once, keep the interface usable, and
            // look again much later.
            Err(e) if proxy_answered(&e) => {
                let (first, was_failed) = inner.probes.record_unprobed(&interface);
                if first {
                    warn!(%interface, "the proxy at {} does not hold standby connections ({e}): no liveness probe or warm moves on this interface", path.proxy);
                }
                if was_failed {
                    inner.bump(format!("{interface} answers again (unprobed)"));
                }
                tokio::time::sleep(UNSUPPORTED_RETRY).await;
                continue;
            }
            Err(e) => {
                report(
                    &inner,
                    &interface,
                    Err(format!("no standby connection: {e}")),
                );
                tokio::time::sleep(REOPEN_PAUSE.min(interval)).await;
                continue;
            }
        };
        loop {
            // A ping in flight when the interface's address goes away (`ip addr del`, a new
            // DHCP lease) is never answered: its socket is bound to the old address. That
            // says nothing about the link, so when the path changes under a ping, the ping
            // is dropped without a verdict and the standby reopened on the new path.
            let outcome = tokio::select! {
                r = tokio::time::timeout(timeout, standby.ping()) => match r {
                    Ok(Ok(rtt)) => Ok(rtt),
                    Ok(Err(e)) => Err(format!("probe failed: {e}")),
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                },
                () = path_left(&inner, &interface, &path, &mut gen_rx) => {
                    debug!(%interface, "the interface's path changed during a probe: reopening");
                    break;
                }
            };
            if outcome.is_err() {
                report(&inner, &interface, outcome);
                break;
            }
            // Registered before the standby is offered, so a take right after is not missed.
            let taken = inner.probes.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            // Offered before the verdict is announced: streams moving back because of it
            // find the standby ready.
            inner.probes.put(&interface, standby);
            report(&inner, &interface, outcome);
            // Not woken by every placement change: the agent's own "failed"/"answers again"
            // bump is what sends streams onto this standby, and taking it back for an early
            // ping right then would make their moves cold. Only a new path for this
            // interface (or the interval, or a take) ends the wait.
            let path_ok = tokio::select! {
                () = tokio::time::sleep(interval) => true,
                () = &mut taken => true,
                () = path_left(&inner, &interface, &path, &mut gen_rx) => false,
            };
            match inner.probes.take_back(&interface) {
                Some(s) if path_ok && s.path() == &path => standby = s,
                // Taken by a move (open the next one now), or the interface's addresses
                // changed (open one on the new path).
                _ => break,
            }
        }
    }
}

/// Returns once the interface's own path is no longer `path` (its address changed, it
/// became unusable, or it left the configuration); never if the agent is stopping.
async fn path_left(
    inner: &Inner,
    interface: &str,
    path: &ProxyPath,
    gen_rx: &mut watch::Receiver<(u64, Arc<str>)>,
) {
    loop {
        if gen_rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if !matches!(plan(inner, interface), Plan::Probe { path: ref p, .. } if p == path) {
            return;
        }
    }
}

fn report(inner: &Inner, interface: &str, outcome: Result<Duration, String>) {
    let failed = outcome.as_ref().err().cloned();
    if let Some(reason) = inner.probes.record(interface, outcome) {
        match failed {
            Some(_) => warn!(%interface, "{reason}: moving its streams"),
            None => info!(%interface, "{reason}"),
        }
        inner.bump(reason);
    }
}
