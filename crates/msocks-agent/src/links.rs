//! Follows the kernel's network interfaces, addresses and routes.
//!
//! The mobile-node agent moves streams off an interface that goes away and
//! back when it returns. This module tells it when that happens, over route
//! netlink (the interface `ip monitor` uses):
//!
//! * [`snapshot`] lists the current [`Interface`]s.
//! * [`watch`] subscribes to link, address and route changes and delivers
//!   them as [`LinkEvent`]s. Events are coalesced: after a burst of kernel
//!   messages about an interface has been quiet for [`DEBOUNCE`], the watcher
//!   re-reads the interface (link and addresses) and reports its complete new
//!   state, so a consumer never has to assemble partial state and never sees
//!   an intermediate state that was already gone again.
//!
//! Both work in the network namespace of the thread that first polls them
//! (the netlink sockets are opened there, before their first `.await`), which
//! lets tests run them inside throw-away namespaces.
//!
//! Facts of Linux that a consumer should know: setting a link down deletes
//! every route through it and (with the default `keep_addr_on_down=0`) its
//! IPv6 addresses; setting it up again restores neither. So after a link
//! returns, expect a [`LinkEvent::Changed`] with `up: true` and possibly no
//! usable address yet, followed by more `Changed` events as addresses come
//! back (DHCP, SLAAC, or whoever configures them), and
//! [`LinkEvent::RoutesChanged`] when routes do.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage, State};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::AsyncSocket as _;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long the kernel must have been quiet about an interface before the
/// watcher re-reads it and reports its state.
pub const DEBOUNCE: Duration = Duration::from_millis(20);

/// Upper bound on how long a continuous stream of kernel messages can delay
/// a report: the watcher re-reads the interfaces at the latest this long
/// after the first message of a burst, even if messages keep coming.
pub const MAX_DELAY: Duration = Duration::from_millis(200);

/// Capacity of the channel [`watch`] returns. When the consumer falls
/// behind, the watcher waits for it; kernel messages are buffered meanwhile
/// and coalesced into fewer, up-to-date events.
pub const CHANNEL_CAPACITY: usize = 64;

/// Receive buffer asked for the event socket, so that a burst of kernel
/// messages (many interfaces or routes at once) does not overflow it. If it
/// overflows anyway, the watcher re-reads everything (see [`watch`]).
const EVENT_RCVBUF: i32 = 1 << 20;

/// Pause before retrying after a failed re-read.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Consecutive failed re-reads after which the watcher gives up.
const MAX_FAILURES: u32 = 5;

/// `ENODEV`: the kernel's answer to a request for an interface that does
/// not exist (any more).
const ENODEV: i32 = 19;

/// One network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name, e.g. `wlan0`.
    pub name: String,
    /// Kernel interface index; stable for the interface's lifetime, and what
    /// [`LinkEvent::Removed`] refers to after the name is gone.
    pub index: u32,
    /// `IFF_UP` is set and the operational state is not one that cannot
    /// carry traffic (`down`, `lowerlayerdown`, `notpresent`, `dormant`).
    /// Interfaces that report no operational state (`unknown`, as loopback,
    /// tun and dummy devices do) count as up when `IFF_UP` is set.
    pub up: bool,
    /// The interface's IPv4 and IPv6 addresses in the kernel's order
    /// (IPv4 first, primary before secondary). IPv6 addresses that cannot be
    /// used yet or at all — tentative (duplicate address detection still
    /// running, unless optimistic) or DAD-failed — are left out; they appear
    /// in a later [`LinkEvent::Changed`] once they become usable.
    pub addrs: Vec<IpAddr>,
}

impl Interface {
    /// Up and with an address usable for a TCP connection to a remote peer,
    /// i.e. [`Interface::up`] and [`Interface::preferred_addr`] is `Some`.
    ///
    /// Loopback, multicast and unspecified addresses never count, and
    /// neither do link-local IPv6 addresses (`fe80::/10`): without a scope id
    /// they cannot address a peer, and the proxy is not on-link. So `lo` is
    /// never usable, and neither is an interface that has only its
    /// link-local IPv6 address, e.g. right after it came back up.
    pub fn usable(&self) -> bool {
        self.up && self.preferred_addr().is_some()
    }

    /// The preferred source address: the first IPv4 address, else the first
    /// global IPv6 address (unique local `fc00::/7` counts as global).
    ///
    /// Loopback, multicast, broadcast, unspecified and link-local IPv6
    /// addresses are never chosen. An IPv4 link-local address
    /// (`169.254.0.0/16`, what a host configures when DHCP failed) is chosen
    /// only when there is neither another IPv4 nor a global IPv6 address.
    pub fn preferred_addr(&self) -> Option<IpAddr> {
        let v4 = |link_local_ok: bool| {
            self.addrs.iter().copied().find(|addr| match addr {
                IpAddr::V4(v4) => usable_v4(v4) && (link_local_ok || !v4.is_link_local()),
                IpAddr::V6(_) => false,
            })
        };
        let v6 = || {
            self.addrs.iter().copied().find(|addr| match addr {
                IpAddr::V4(_) => false,
                IpAddr::V6(v6) => global_v6(v6),
            })
        };
        v4(false).or_else(v6).or_else(|| v4(true))
    }

    /// The source address for a connection to a peer of one family (`ipv4`): the first
    /// IPv4 address (a link-local one only when there is no other), or the first global
    /// IPv6 address. Never a link-local IPv6 address: bound without a scope id, a
    /// connection from it to a global address fails with `EINVAL`, and an interface that
    /// just came back up has only that one until its global address returns.
    pub fn source_addr(&self, ipv4: bool) -> Option<IpAddr> {
        if ipv4 {
            let v4 = |link_local_ok: bool| {
                self.addrs.iter().copied().find(|addr| match addr {
                    IpAddr::V4(v4) => usable_v4(v4) && (link_local_ok || !v4.is_link_local()),
                    IpAddr::V6(_) => false,
                })
            };
            v4(false).or_else(|| v4(true))
        } else {
            self.addrs.iter().copied().find(|addr| match addr {
                IpAddr::V4(_) => false,
                IpAddr::V6(v6) => global_v6(v6),
            })
        }
    }
}

/// IPv4 addresses that can be the source of a connection to a peer.
fn usable_v4(addr: &Ipv4Addr) -> bool {
    !(addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast())
}

/// IPv6 addresses that can be the source of a connection to a non-local peer
/// without a scope id.
fn global_v6(addr: &Ipv6Addr) -> bool {
    // fe80::/10 by hand: `Ipv6Addr::is_unicast_link_local` needs Rust 1.84.
    let link_local = addr.segments()[0] & 0xffc0 == 0xfe80;
    !(addr.is_loopback() || addr.is_unspecified() || addr.is_multicast() || link_local)
}

/// A change the agent may have to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface appeared, or its link state or addresses changed; this
    /// is its complete new state. Reported only when it differs from the
    /// last state reported (or, for the first event, from the state when
    /// [`watch`] started), so kernel chatter that changes nothing visible
    /// here (IPv6 address lifetime refreshes, statistics) is not reported.
    Changed(Interface),
    /// The interface no longer exists (deleted, or moved to another network
    /// namespace).
    Removed {
        /// Its last known name.
        name: String,
        /// Its kernel index.
        index: u32,
    },
    /// Routes were added or removed (in any table, for any interface);
    /// re-evaluate which interfaces can reach the proxy. Sent after the
    /// `Changed`/`Removed` events of the same burst.
    RoutesChanged,
}

/// Errors of [`snapshot`] and [`watch`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Not called from within a tokio runtime.
    #[error("the link watcher must run within a tokio runtime")]
    NoRuntime,
    /// A route netlink socket could not be opened or set up.
    #[error("could not open a route netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A netlink request failed: the kernel answered with an error, or the
    /// netlink connection closed.
    #[error("netlink {what} failed: {source}")]
    Request {
        /// What was asked ("link dump", "link query", "address dump").
        what: &'static str,
        /// The error from rtnetlink.
        #[source]
        source: rtnetlink::Error,
    },
}

/// Lists the current interfaces, sorted by index.
///
/// Must be called from within a tokio runtime; it reads the network
/// namespace of the thread that first polls it.
pub async fn snapshot() -> Result<Vec<Interface>, LinkError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
    let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
    let _connection = AbortOnDrop(runtime.spawn(connection));
    Ok(read_all(&handle).await?.into_values().collect())
}

/// Starts watching the kernel's links (`RTMGRP_LINK`), addresses
/// (`RTMGRP_IPV4_IFADDR`, `RTMGRP_IPV6_IFADDR`) and routes
/// (`RTMGRP_IPV4_ROUTE`, `RTMGRP_IPV6_ROUTE`); events arrive on the returned
/// receiver.
///
/// Must be called from within a tokio runtime with the time driver enabled
/// (`enable_time`/`enable_all`); it watches the network namespace of the
/// thread that first polls it. It returns once the subscription is in place
/// and the current state is read: that state is the baseline of the first
/// [`LinkEvent::Changed`] of each interface, and is not itself sent. To
/// follow the interfaces without a gap, call `watch` first and
/// [`snapshot`] after it; a change between the two may then show up in both.
///
/// The watcher task ends, closing its netlink sockets, when the receiver is
/// dropped. The receiver returns `None` if the watcher stopped by itself,
/// which only happens when the netlink connection closed or re-reading the
/// interfaces failed several times in a row (logged with `tracing` at error
/// level); call `watch` again to start over. If the kernel had to drop messages because the
/// watcher fell behind (socket buffer overrun), the watcher re-reads every
/// interface, reports the differences and sends [`LinkEvent::RoutesChanged`],
/// so the final state is still right.
pub async fn watch() -> Result<mpsc::Receiver<LinkEvent>, LinkError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| LinkError::NoRuntime)?;
    let groups = [
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ];
    // Both sockets are opened here, before the first `.await`, so in the
    // caller's namespace. Requests go over their own socket so that an
    // overrun of the event socket cannot touch their answers.
    let (mut events_connection, _, events) =
        rtnetlink::new_multicast_connection(&groups).map_err(LinkError::Socket)?;
    if let Err(e) = events_connection
        .socket_mut()
        .socket_mut()
        .set_rx_buf_sz(EVENT_RCVBUF)
    {
        tracing::warn!("could not enlarge the netlink event socket's buffer: {e}");
    }
    let (query_connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Socket)?;
    let events_task = AbortOnDrop(runtime.spawn(events_connection));
    let query_task = AbortOnDrop(runtime.spawn(query_connection));

    let known = read_all(&handle).await?;
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let watcher = Watcher {
        handle,
        tx,
        known,
        pending: Pending::default(),
        failures: 0,
        _tasks: [events_task, query_task],
    };
    runtime.spawn(watcher.run(events));
    Ok(rx)
}

/// Aborts a spawned task when dropped, so that the netlink connections die
/// with the watcher (or with a cancelled [`watch`]/[`snapshot`]).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What kernel messages since the last report asked for.
#[derive(Debug, Default)]
struct Pending {
    /// Indexes of interfaces to re-read.
    interfaces: BTreeSet<u32>,
    /// A route was added or removed.
    routes: bool,
    /// Messages were lost: re-read everything.
    resync: bool,
    /// When the first message of this burst arrived.
    first: Option<Instant>,
    /// When the latest message arrived.
    last: Option<Instant>,
    /// After a failed re-read: not before this.
    retry_at: Option<Instant>,
}

impl Pending {
    fn note(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When to re-read: [`DEBOUNCE`] after the last message, but no later
    /// than [`MAX_DELAY`] after the first; after a failure, not before the
    /// retry time.
    fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        let due = (last + DEBOUNCE).min(first + MAX_DELAY);
        Some(self.retry_at.map_or(due, |retry_at| due.max(retry_at)))
    }
}

/// Why the watcher stops.
enum Stop {
    /// The receiver was dropped.
    Closed,
    /// The netlink connection failed for good.
    Failed,
}

/// The state of the task [`watch`] spawns.
struct Watcher {
    handle: Handle,
    tx: mpsc::Sender<LinkEvent>,
    /// The last state reported (or read at the start) of every interface.
    known: BTreeMap<u32, Interface>,
    pending: Pending,
    /// Consecutive failed re-reads.
    failures: u32,
    /// The netlink connections, aborted when the watcher ends.
    _tasks: [AbortOnDrop; 2],
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

impl Watcher {
    async fn run(mut self, mut events: Events) {
        loop {
            let deadline = self.pending.deadline();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.tx.closed() => {
                    tracing::debug!("link watcher: receiver dropped, stopping");
                    return;
                }
                message = events.next() => match message {
                    Some((message, _)) => self.note(message),
                    None => {
                        tracing::error!("link watcher: the netlink event connection closed");
                        return;
                    }
                },
                () = timer => match self.report().await {
                    Ok(()) => {}
                    Err(Stop::Closed) => return,
                    Err(Stop::Failed) => {
                        tracing::error!("link watcher: giving up after {MAX_FAILURES} failed re-reads");
                        return;
                    }
                },
            }
        }
    }

    /// Records what one kernel message asks to re-read.
    fn note(&mut self, message: NetlinkMessage<RouteNetlinkMessage>) {
        let pending = &mut self.pending;
        match message.payload {
            NetlinkPayload::InnerMessage(inner) => match inner {
                RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link) => {
                    pending.interfaces.insert(link.header.index);
                }
                RouteNetlinkMessage::NewAddress(addr) | RouteNetlinkMessage::DelAddress(addr) => {
                    pending.interfaces.insert(addr.header.index);
                }
                RouteNetlinkMessage::NewRoute(_) | RouteNetlinkMessage::DelRoute(_) => {
                    pending.routes = true;
                }
                _ => return,
            },
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("link watcher: netlink socket overrun, re-reading everything");
                pending.resync = true;
                pending.routes = true;
            }
            _ => return,
        }
        pending.note(Instant::now());
    }

    /// Re-reads what the pending messages asked for and sends the events.
    /// On a failed re-read the work stays pending and is retried after
    /// [`RETRY_DELAY`].
    async fn report(&mut self) -> Result<(), Stop> {
        let pending = std::mem::take(&mut self.pending);
        let events = if pending.resync {
            self.reread_all().await
        } else {
            self.reread(&pending.interfaces).await
        };
        let mut events = match events {
            Ok(events) => {
                self.failures = 0;
                events
            }
            Err(e) => {
                self.failures += 1;
                tracing::warn!("link watcher: re-reading interfaces failed: {e}");
                if self.failures >= MAX_FAILURES {
                    return Err(Stop::Failed);
                }
                // Keep the work for a retry. Nothing can have been noted
                // meanwhile: messages are only read between reports.
                self.pending = Pending {
                    retry_at: Some(Instant::now() + RETRY_DELAY),
                    ..pending
                };
                return Ok(());
            }
        };
        if pending.routes {
            events.push(LinkEvent::RoutesChanged);
        }
        for event in events {
            tracing::debug!("link watcher: {event:?}");
            self.tx.send(event).await.map_err(|_| Stop::Closed)?;
        }
        Ok(())
    }

    /// Re-reads the interfaces with these indexes; returns the events and
    /// updates `known`.
    async fn reread(&mut self, indexes: &BTreeSet<u32>) -> Result<Vec<LinkEvent>, LinkError> {
        if indexes.is_empty() {
            return Ok(Vec::new());
        }
        let mut links = Vec::with_capacity(indexes.len());
        for &index in indexes {
            links.push((index, read_link(&self.handle, index).await?));
        }
        let mut addrs = read_addrs(&self.handle).await?;
        let mut events = Vec::new();
        for (index, link) in links {
            match link {
                Some(link) => {
                    let iface = interface(&link, addrs.remove(&index).unwrap_or_default());
                    self.update(iface, &mut events);
                }
                None => self.remove(index, &mut events),
            }
        }
        Ok(events)
    }

    /// Re-reads every interface; returns the events and updates `known`.
    async fn reread_all(&mut self) -> Result<Vec<LinkEvent>, LinkError> {
        let now = read_all(&self.handle).await?;
        let mut events = Vec::new();
        let gone: Vec<u32> = self
            .known
            .keys()
            .filter(|index| !now.contains_key(index))
            .copied()
            .collect();
        for index in gone {
            self.remove(index, &mut events);
        }
        for iface in now.into_values() {
            self.update(iface, &mut events);
        }
        Ok(events)
    }

    fn update(&mut self, iface: Interface, events: &mut Vec<LinkEvent>) {
        if self.known.get(&iface.index) != Some(&iface) {
            self.known.insert(iface.index, iface.clone());
            events.push(LinkEvent::Changed(iface));
        }
    }

    fn remove(&mut self, index: u32, events: &mut Vec<LinkEvent>) {
        // An interface that came and went between two reports was never
        // reported, so its removal is not either.
        if let Some(iface) = self.known.remove(&index) {
            events.push(LinkEvent::Removed {
                name: iface.name,
                index,
            });
        }
    }
}

/// Every interface with its addresses, by index.
async fn read_all(handle: &Handle) -> Result<BTreeMap<u32, Interface>, LinkError> {
    let links: Vec<LinkMessage> =
        handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Request {
                what: "link dump",
                source,
            })?;
    let mut addrs = read_addrs(handle).await?;
    Ok(links
        .iter()
        .map(|link| {
            let index = link.header.index;
            (
                index,
                interface(link, addrs.remove(&index).unwrap_or_default()),
            )
        })
        .collect())
}

/// The link with this index, or `None` if there is none.
async fn read_link(handle: &Handle, index: u32) -> Result<Option<LinkMessage>, LinkError> {
    match handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -ENODEV => Ok(None),
        Err(source) => Err(LinkError::Request {
            what: "link query",
            source,
        }),
    }
}

/// The usable addresses of every interface, by interface index.
async fn read_addrs(handle: &Handle) -> Result<BTreeMap<u32, Vec<IpAddr>>, LinkError> {
    let mut messages = handle.address().get().execute();
    let mut addrs: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    while let Some(message) = messages
        .try_next()
        .await
        .map_err(|source| LinkError::Request {
            what: "address dump",
            source,
        })?
    {
        if let Some(addr) = usable_addr(&message) {
            addrs.entry(message.header.index).or_default().push(addr);
        }
    }
    Ok(addrs)
}

/// The local address of an address message, unless it is tentative (and not
/// optimistic) or failed duplicate address detection.
fn usable_addr(message: &AddressMessage) -> Option<IpAddr> {
    let mut local = None;
    let mut address = None;
    let mut flags = AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()));
    for attribute in &message.attributes {
        match attribute {
            // IFA_LOCAL is the local end where IFA_ADDRESS is a peer's
            // (point-to-point links); otherwise they are equal, and IPv6
            // sends only IFA_ADDRESS.
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            // IFA_FLAGS, the full 32 bits, when the kernel sends it.
            AddressAttribute::Flags(all) => flags |= *all,
            _ => {}
        }
    }
    let tentative =
        flags.contains(AddressFlags::Tentative) && !flags.contains(AddressFlags::Optimistic);
    if tentative || flags.contains(AddressFlags::Dadfailed) {
        return None;
    }
    local.or(address)
}

/// Builds an [`Interface`] from a link message and its addresses.
fn interface(link: &LinkMessage, addrs: Vec<IpAddr>) -> Interface {
    let mut name = String::new();
    let mut oper = State::Unknown;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::OperState(state) => oper = *state,
            _ => {}
        }
    }
    let admin_up = link.header.flags.contains(LinkFlags::Up);
    let oper_down = matches!(
        oper,
        State::Down | State::LowerLayerDown | State::NotPresent | State::Dormant
    );
    Interface {
        name,
        index: link.header.index,
        up: admin_up && !oper_down,
        addrs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(up: bool, addrs: &[&str]) -> Interface {
        Interface {
            name: "t0".to_owned(),
            index: 7,
            up,
            addrs: addrs
                .iter()
                .map(|a| a.parse().expect("test address"))
                .collect(),
        }
    }

    #[test]
    fn preferred_address_order() {
        let pick = |addrs: &[&str]| iface(true, addrs).preferred_addr().map(|a| a.to_string());
        assert_eq!(
            pick(&["fe80::1", "fd77::1", "10.0.0.1"]).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(pick(&["fe80::1", "fd77::1"]).as_deref(), Some("fd77::1"));
        assert_eq!(pick(&["fe80::1"]), None);
        assert_eq!(pick(&["127.0.0.1", "::1"]), None);
        assert_eq!(
            pick(&["169.254.3.4", "2001:db8::1"]).as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            pick(&["169.254.3.4", "fe80::1"]).as_deref(),
            Some("169.254.3.4")
        );
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn usable_needs_up_and_an_address() {
        assert!(iface(true, &["10.0.0.1"]).usable());
        assert!(!iface(false, &["10.0.0.1"]).usable());
        assert!(!iface(true, &["fe80::1"]).usable());
        assert!(!iface(true, &["127.0.0.1"]).usable());
    }

    #[test]
    fn debounce_deadline() {
        let t0 = Instant::now();
        let mut pending = Pending::default();
        assert_eq!(pending.deadline(), None);
        pending.note(t0);
        assert_eq!(pending.deadline(), Some(t0 + DEBOUNCE));
        pending.note(t0 + Duration::from_millis(10));
        assert_eq!(
            pending.deadline(),
            Some(t0 + Duration::from_millis(10) + DEBOUNCE)
        );
        pending.note(t0 + MAX_DELAY);
        assert_eq!(pending.deadline(), Some(t0 + MAX_DELAY));
    }
}
