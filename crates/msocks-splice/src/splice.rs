//! The control plane: freezing the proxy's two sockets and installing the
//! splice without losing a byte, then tearing it down silently.
//!
//! The sequence (docs/KERNEL-SPLICE.md explains why it is race-free):
//! 1. check that both connections negotiated the same options and MSSes
//!    that fit each other;
//! 2. install both directions in HOLD: from now on no new data enters the
//!    proxy's sockets (the datapath strips or drops it unacknowledged, so
//!    the senders retransmit it), while ACKs still reach them;
//! 3. drain: copy what is in either receive queue to the other socket and
//!    wait until both receive and both send queues are empty;
//! 4. flush any owed ACK (TCP_QUICKACK), freeze both sockets (TCP_REPAIR),
//!    read `snd_nxt`/`rcv_nxt`, timestamp clocks and window scales;
//! 5. switch both directions to ACTIVE with the computed basepoints.
//!
//! Any failure before step 5 removes the entries, takes the sockets out of
//! repair mode without sending anything, and hands them back for the
//! userspace relay: nothing was lost (bytes the datapath dropped in HOLD
//! are retransmitted by their senders to the unfrozen sockets).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::loader::Datapath;
use crate::mapping::{ConnState, DirMap};
use crate::maps::{
    addr_words, SpliceKey, SpliceVal, EV_FIN_ACKED, EV_RST, OPT_SACK, OPT_TS, STATE_ACTIVE,
    STATE_ARMED, STATE_DROP, STATE_HOLD,
};
use crate::repair::{self, Info, TCPI_OPT_ECN, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS};
use crate::Error;

/// A shared handle on the loaded datapath.
pub type SharedDatapath = Arc<Mutex<Datapath>>;

/// How long step 3 may take before the splice is abandoned for the relay.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// A splice that could not be installed, with the two sockets, unchanged
/// and usable, for the caller's fallback relay.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: Error,
    /// The client-side connection.
    pub client: TcpStream,
    /// The server-side connection.
    pub server: TcpStream,
    /// Bytes the drain had read from the client and not yet written to the
    /// server: write them first.
    pub pending_to_server: Vec<u8>,
    /// Bytes the drain had read from the server and not yet written to the
    /// client: write them first.
    pub pending_to_client: Vec<u8>,
    /// Bytes the drain had already copied before it gave up: (to the
    /// server, to the client). A caller that counts the streams' bytes
    /// (an MSOCKS session) adds them.
    pub drained: (u64, u64),
}

/// Where a splice is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Segments are flowing (or idle).
    Active,
    /// Both FINs were acknowledged, or a RST went through: the connections
    /// are over and the splice may be torn down.
    Finished,
}

/// How far each stream has gone through a splice since its splice point,
/// in bytes modulo 2^32 (FINs not counted), and where each FIN is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamCounts {
    /// Server → client bytes the client has acknowledged (`snd_una_C`).
    pub down_acked: u32,
    /// Server → client bytes the splice has sent the client (`snd_nxt_C`).
    pub down_sent: u32,
    /// Client → server bytes the server has acknowledged (`snd_una_D`).
    pub up_acked: u32,
    /// The server's FIN went through this splice.
    pub down_fin: bool,
    /// ... and the client acknowledged it.
    pub down_fin_acked: bool,
    /// The client's FIN went through this splice.
    pub up_fin: bool,
    /// ... and the server acknowledged it.
    pub up_fin_acked: bool,
    /// The client has acknowledged the server's FIN, through this splice or
    /// before it: a move must end the new connection's down direction.
    pub down_closed: bool,
}

/// `(fin passed after the splice point, fin acknowledged)` for one
/// direction whose outgoing splice point is `base`, as the peer's highest
/// ACK `ack` (same space) says.
fn fin_state(v: &SpliceVal, base: u32, ack: u32) -> (bool, bool) {
    let end = (v.events & crate::maps::EV_FIN != 0).then_some(v.fin_end);
    fin_at(end, base, ack)
}

/// [`fin_state`] for a FIN whose end (sequence number past it) is `end`.
fn fin_at(end: Option<u32>, base: u32, ack: u32) -> (bool, bool) {
    // A FIN at the splice point itself came before the splice (a FIN the
    // proxy sent on a new connection of a session whose server had closed).
    let fin = end.is_some_and(|e| crate::mapping::seq_before(base, e));
    let acked = fin && end.is_some_and(|e| !crate::mapping::seq_before(ack, e));
    (fin, acked)
}

/// A move that could not be completed: the splice is back as it was when
/// suspended.
#[derive(Debug)]
pub struct MoveFailed {
    /// Why.
    pub error: Error,
    /// The splice, still suspended (see [`Spliced::unsuspend`]).
    pub splice: Spliced,
    /// Whether the reply had been written to the client (it then expects to
    /// resume on that connection, which the caller should close).
    pub replied: bool,
}

/// Where a moved splice resumes, relative to what [`Spliced::suspend`]
/// returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resume {
    /// How many bytes beyond its last acknowledgement the client had
    /// already received (its ACK of them was lost or not sent yet): the
    /// server's retransmission of those falls below the new splice point
    /// and is cut off (paper III-B.4).
    pub down_ahead: u32,
    /// How many bytes before the server's last acknowledgement the client
    /// starts sending on the new connection (an early resend from the
    /// point its own socket saw acknowledged): they reach the server as
    /// duplicates, which its TCP discards.
    pub up_back: u32,
}

/// The basepoints and counters of an installed splice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Basepoints {
    /// Client connection's state when frozen.
    pub client: ConnState,
    /// Server connection's state when frozen.
    pub server: ConnState,
}

/// An installed splice. Owns the two frozen sockets; dropping it (or
/// [`Spliced::teardown`]) removes the table entries and closes the sockets
/// in repair mode, which sends nothing.
#[derive(Debug)]
pub struct Spliced {
    datapath: SharedDatapath,
    to_server: SpliceKey,
    to_client: SpliceKey,
    client: Option<TcpStream>,
    server: Option<TcpStream>,
    basepoints: Basepoints,
    /// Bytes the drain copied before the splice: (up, down).
    drained: (u64, u64),
    /// The (DROP) entries of the last client connections replaced by
    /// [`Spliced::resplice_client`], oldest first, removed with this
    /// splice; at most [`RETIRED_KEPT`].
    retired: VecDeque<SpliceKey>,
    /// This splice's `splice_ctl` word.
    slot: u32,
    /// Where the client's FIN ends in the server connection's sequence
    /// space, once a splice of this session forwarded it. The server
    /// connection outlives resplices, and the server's ACK of a FIN an
    /// earlier splice forwarded may come through a later one.
    up_fin_end: Option<u32>,
}

/// How many replaced client connections keep their DROP entry. Late
/// segments of such a connection (the client closed it after the move and
/// may still be retransmitting its FIN) are dropped while the entry lasts;
/// after it, they find no socket at the proxy and get its kernel's RST, as
/// for any closed connection. Bounded so that a session moving for days does
/// not fill the table.
const RETIRED_KEPT: usize = 8;

/// How long [`Spliced::suspend`] waits after stopping the datapath before
/// it reads the counters: a CPU that was forwarding a segment of this
/// splice when the stop was written finishes that segment (microseconds)
/// and records its ACK first.
const STOP_GRACE: Duration = Duration::from_millis(2);

fn lock(dp: &SharedDatapath) -> MutexGuard<'_, Datapath> {
    // A panic while holding the lock leaves the map itself consistent (the
    // kernel owns it), so a poisoned lock is still usable.
    dp.lock().unwrap_or_else(|p| p.into_inner())
}

fn sock_err(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Socket { op, source }
}

fn same_family(a: SocketAddr, b: SocketAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// Checks that segments of one connection are valid on the other as they
/// are: same options, and neither sender's segments too big for the other
/// receiver.
fn compatible(c: &Info, s: &Info) -> Result<(), Error> {
    let mask = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_ECN;
    if c.options & mask != s.options & mask {
        return Err(Error::Incompatible(format!(
            "TCP options differ (client {:#x}, server {:#x})",
            c.options & mask,
            s.options & mask
        )));
    }
    // ESTABLISHED, or CLOSE_WAIT on one side (its peer shut down sending;
    // the drain passes the FIN on and the other direction is spliced).
    const ESTABLISHED: u8 = 1;
    const CLOSE_WAIT: u8 = 8;
    let open = |st: u8| st == ESTABLISHED || st == CLOSE_WAIT;
    if !open(c.state) || !open(s.state) || (c.state == CLOSE_WAIT && s.state == CLOSE_WAIT) {
        return Err(Error::Incompatible(format!(
            "connection states {} (client) and {} (server): not ESTABLISHED",
            c.state, s.state
        )));
    }
    let optlen = if c.options & TCPI_OPT_TIMESTAMPS != 0 {
        12
    } else {
        0
    };
    // The client sends segments of at most (our advmss - options) bytes;
    // the server accepts at most its MSS - options = our snd_mss there.
    if c.advmss > s.snd_mss + optlen || s.advmss > c.snd_mss + optlen {
        return Err(Error::Incompatible(format!(
            "MSS: client leg announces {} / sends {}, server leg announces {} / sends {}; \
             clamp both (TCP_MAXSEG) to the smaller",
            c.advmss, c.snd_mss, s.advmss, s.snd_mss
        )));
    }
    Ok(())
}

/// One direction's entry: segments arriving on the connection whose state is `inc` leave
/// from `from` to `to` on the connection whose state is `out`.
#[allow(clippy::too_many_arguments)]
fn value(
    state: u32,
    opts: u32,
    map: &DirMap,
    from: SocketAddr,
    to: SocketAddr,
    inc: &ConnState,
    out: &ConnState,
    out_ifindex: u32,
) -> SpliceVal {
    SpliceVal {
        // The datapath only moves these forward, so they start at the splice point: the
        // sender has acknowledged everything the proxy sent it (the freeze waited for
        // that), the proxy has sent up to its `snd_nxt`, and its own TSvals on the
        // outgoing connection reached its clock now.
        last_ack: inc.snd_nxt,
        seq_max: out.snd_nxt,
        last_tsval_out: repair::monotonic_ms()
            .wrapping_add(out.ts_offset)
            .wrapping_sub(1),
        out_ifindex,
        state,
        opts,
        new_saddr: addr_words(from.ip()),
        new_daddr: addr_words(to.ip()),
        new_sport: from.port().to_be(),
        new_dport: to.port().to_be(),
        seq_delta: map.seq_delta,
        ack_delta: map.ack_delta,
        splice_seq: map.splice_seq,
        wscale_in: map.wscale_in,
        wscale_out: map.wscale_out,
        out_tsoffset: out.ts_offset,
        ..SpliceVal::default()
    }
}

fn hold_value() -> SpliceVal {
    SpliceVal {
        state: STATE_HOLD,
        ..SpliceVal::default()
    }
}

/// Splices `client` (accepted from the mobile node) and `server` (connected
/// by the proxy). Blocking; at most `drain_timeout` plus a few system calls.
///
/// The sockets may be blocking or not; on refusal they come back in
/// blocking mode.
pub fn splice(
    datapath: &SharedDatapath,
    client: TcpStream,
    server: TcpStream,
    drain_timeout: Duration,
) -> Result<Spliced, Box<Refused>> {
    splice_with(
        datapath,
        client,
        server,
        &Options {
            drain_timeout,
            hold_settle: Duration::ZERO,
        },
    )
}

/// Tuning of [`splice_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Longest time the drain may take before the splice is abandoned.
    pub drain_timeout: Duration,
    /// Time to stay in HOLD before draining. Zero in production; tests set
    /// it to make sure segments in flight meet the HOLD state (and are
    /// dropped, then retransmitted into the splice).
    pub hold_settle: Duration,
}

/// [`splice`] with all the [`Options`].
pub fn splice_with(
    datapath: &SharedDatapath,
    client: TcpStream,
    server: TcpStream,
    options: &Options,
) -> Result<Spliced, Box<Refused>> {
    // Refused sockets come back blocking, as `splice` documents.
    let blocking = |r: Box<Refused>| {
        let _ = r.client.set_nonblocking(false);
        let _ = r.server.set_nonblocking(false);
        r
    };
    let mut holding = hold(datapath, client, server).map_err(blocking)?;
    if !options.hold_settle.is_zero() {
        std::thread::sleep(options.hold_settle);
    }
    let deadline = Instant::now() + options.drain_timeout;
    loop {
        match holding.drain_step() {
            Ok(Drain::Quiet) => return holding.finish().map_err(blocking),
            Ok(step) => {
                if Instant::now() >= deadline {
                    return Err(blocking(holding.abandon(Error::DrainTimeout)));
                }
                if step == Drain::Waiting {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Err(e) => return Err(blocking(holding.abandon(e))),
        }
    }
}

/// Steps 1 and 2: checks that the two connections can be spliced and puts
/// both directions in HOLD. Non-blocking (a few system calls); the sockets
/// are left non-blocking. Drive the result with [`Holding::drain_step`]
/// until it says [`Drain::Quiet`], then [`Holding::finish`] — or give up
/// with [`Holding::abandon`]. [`splice_with`] is that loop, blocking.
///
/// A refusal hands the sockets back as they were given (blocking or not).
pub fn hold(
    datapath: &SharedDatapath,
    client: TcpStream,
    server: TcpStream,
) -> Result<Holding, Box<Refused>> {
    let mut holding = check(datapath, client, server)?;
    match holding.insert_hold() {
        Ok(()) => Ok(holding),
        Err(e) => Err(holding.abandon(e)),
    }
}

/// Step 1 like [`hold`], but HOLD waits: the drain ([`Holding::drain_step`])
/// first copies between the two sockets as a relay would, with no entry in
/// the datapath, and puts both directions in HOLD only once everything is
/// passed on and acknowledged (quiet), or after `open_for`. A new session's
/// first exchange (a request right behind the SOCKS reply, carrying the
/// acknowledgement of the reply that the drain waits for) then reaches the
/// destination at once, instead of being held back and sent again by its
/// TCP (a tail loss probe: two RTTs plus 200 ms for a lone segment).
///
/// The open time is four of the client connection's smoothed RTTs (enough
/// for the client's answer to the reply, and one exchange behind it), at
/// least [`OPEN_AT_LEAST`] and at most `open_for`: a busy session is held
/// about as soon as before, and is relayed by the drain only meanwhile.
pub fn hold_when_quiet(
    datapath: &SharedDatapath,
    client: TcpStream,
    server: TcpStream,
    open_for: Duration,
) -> Result<Holding, Box<Refused>> {
    let started = Instant::now();
    let mut holding = check(datapath, client, server)?;
    let rtts = Duration::from_micros(u64::from(holding.c_info.rtt_us) * 4);
    holding.open_until = Some(started + rtts.max(OPEN_AT_LEAST).min(open_for));
    Ok(holding)
}

/// The shortest open time of [`hold_when_quiet`] (it includes the quiet
/// time before HOLD).
pub const OPEN_AT_LEAST: Duration = Duration::from_millis(5);

/// Step 1: the checks; a [`Holding`] without entries yet.
fn check(
    datapath: &SharedDatapath,
    client: TcpStream,
    server: TcpStream,
) -> Result<Holding, Box<Refused>> {
    let refuse = |error: Error, client: TcpStream, server: TcpStream| {
        Box::new(Refused {
            error,
            client,
            server,
            pending_to_server: Vec::new(),
            pending_to_client: Vec::new(),
            drained: (0, 0),
        })
    };
    // `TCP_INFO` first: a session whose client has already closed (the
    // usual refusal) costs two system calls.
    let infos = repair::info(client.as_fd())
        .and_then(|c| Ok((c, repair::info(server.as_fd())?)))
        .map_err(sock_err("TCP_INFO"));
    let (c_info, s_info) = match infos.and_then(|(c, s)| compatible(&c, &s).map(|()| (c, s))) {
        Ok(i) => i,
        Err(e) => return Err(refuse(e, client, server)),
    };
    let addrs = (|| -> Result<_, Error> {
        Ok((
            client.local_addr().map_err(sock_err("getsockname"))?,
            client.peer_addr().map_err(sock_err("getpeername"))?,
            server.local_addr().map_err(sock_err("getsockname"))?,
            server.peer_addr().map_err(sock_err("getpeername"))?,
        ))
    })();
    let (c_local, c_peer, s_local, s_peer) = match addrs {
        Ok(a) => a,
        Err(e) => return Err(refuse(e, client, server)),
    };
    if !same_family(c_peer, s_peer) {
        return Err(refuse(
            Error::Incompatible("client and server legs are of different IP families".into()),
            client,
            server,
        ));
    }
    // Segments of each connection must reach the program: it must run on
    // the interface each one arrives by (the one holding the proxy's
    // address, with symmetric routing).
    let located = {
        let mut dp = lock(datapath);
        dp.ifindexes_of(s_local.ip(), c_local.ip())
            .and_then(|(s, c)| {
                if dp.covers(s) && dp.covers(c) {
                    Ok((s, c))
                } else {
                    Err(Error::Incompatible(format!(
                        "the datapath is not attached to interface {c} or {s}"
                    )))
                }
            })
    };
    let (s_ifindex, c_ifindex) = match located {
        Ok(i) => i,
        Err(e) => return Err(refuse(e, client, server)),
    };
    let nonblocking = client
        .set_nonblocking(true)
        .and_then(|()| server.set_nonblocking(true));
    if let Err(e) = nonblocking {
        return Err(refuse(sock_err("set_nonblocking")(e), client, server));
    }
    let to_server = SpliceKey::new(c_peer, c_local);
    let to_client = SpliceKey::new(s_peer, s_local);
    Ok(Holding {
        datapath: Arc::clone(datapath),
        sockets: Some((client, server)),
        c_info,
        s_info,
        addrs: (c_local, c_peer, s_local, s_peer),
        ifindexes: (c_ifindex, s_ifindex),
        to_server,
        to_client,
        pending: Pending::default(),
        held: false,
        open_until: None,
        quiet_since: None,
    })
}

/// How long the sockets must stay quiet before [`hold_when_quiet`]'s drain
/// puts them in HOLD.
const QUIET_BEFORE_HOLD: Duration = Duration::from_millis(2);

/// What one pass of the drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Both sockets' receive and send queues are empty: call
    /// [`Holding::finish`] now.
    Quiet,
    /// Bytes were copied: call again at once.
    Moved,
    /// Waiting for the peers to acknowledge what the sockets sent (or for
    /// a destination's window): call again a little later.
    Waiting,
}

/// A splice being drained (step 3): in HOLD (steps 1 and 2 done), or,
/// from [`hold_when_quiet`], checked and not yet held. Owns the two
/// sockets. Dropping it removes the entries and drops the sockets
/// (which then close normally).
#[derive(Debug)]
pub struct Holding {
    datapath: SharedDatapath,
    /// (client, server); taken by [`Holding::finish`] or
    /// [`Holding::abandon`].
    sockets: Option<(TcpStream, TcpStream)>,
    c_info: Info,
    s_info: Info,
    /// (client local, client peer, server local, server peer).
    addrs: (SocketAddr, SocketAddr, SocketAddr, SocketAddr),
    /// (client side, server side).
    ifindexes: (u32, u32),
    to_server: SpliceKey,
    to_client: SpliceKey,
    pending: Pending,
    /// Both directions' entries are in HOLD (step 2 done).
    held: bool,
    /// Before HOLD ([`hold_when_quiet`]): when to hold even if not quiet.
    open_until: Option<Instant>,
    /// Before HOLD: since when every drain pass found the sockets quiet.
    quiet_since: Option<Instant>,
}

impl Holding {
    /// Step 2: both directions' entries in HOLD. NOEXIST: never take over
    /// another splice's entry.
    fn insert_hold(&mut self) -> Result<(), Error> {
        let mut dp = lock(&self.datapath);
        let mut table = dp.table()?;
        table
            .insert(self.to_server, hold_value(), 1)
            .map_err(|e| Error::Map(Box::new(e)))?;
        if let Err(e) = table.insert(self.to_client, hold_value(), 1) {
            let _ = table.remove(&self.to_server);
            return Err(Error::Map(Box::new(e)));
        }
        self.held = true;
        Ok(())
    }

    /// Whether both directions are in HOLD yet (after [`hold_when_quiet`],
    /// not until the drain found the sockets quiet or its open time ended).
    pub fn is_held(&self) -> bool {
        self.held
    }

    /// The two sockets' descriptors (client, server), to wait for bytes to
    /// drain; `None` once finished or abandoned.
    pub fn fds(&self) -> Option<(std::os::fd::RawFd, std::os::fd::RawFd)> {
        use std::os::fd::AsRawFd;
        self.sockets
            .as_ref()
            .map(|(c, s)| (c.as_raw_fd(), s.as_raw_fd()))
    }

    /// Step 3, one non-blocking pass: copies what either receive queue
    /// holds to the other socket, and says whether all four queues are
    /// empty. An error (a peer's FIN, a socket error) means the splice
    /// cannot be installed: pass it to [`Holding::abandon`].
    pub fn drain_step(&mut self) -> Result<Drain, Error> {
        let Some((client, server)) = self.sockets.as_ref() else {
            return Err(Error::Incompatible(
                "the splice was already finished".into(),
            ));
        };
        let step = drain_pass(client, server, &mut self.pending)?;
        if self.held {
            return Ok(step);
        }
        // Not held yet: HOLD starts once the sockets have been quiet for
        // QUIET_BEFORE_HOLD (or the open time is up); what came in meanwhile
        // is drained under HOLD, so go on at once. The wait lets a client's
        // next request, which often comes right behind its acknowledgement
        // of the last response, arrive before HOLD rather than in it.
        let now = Instant::now();
        let time_up = self.open_until.map_or(true, |t| now >= t);
        let quiet_long_enough = match (step, self.quiet_since) {
            (Drain::Quiet, Some(since)) => now.duration_since(since) >= QUIET_BEFORE_HOLD,
            (Drain::Quiet, None) => {
                self.quiet_since = Some(now);
                false
            }
            _ => {
                self.quiet_since = None;
                false
            }
        };
        if quiet_long_enough || time_up {
            self.insert_hold()?;
            return Ok(Drain::Moved);
        }
        Ok(match step {
            Drain::Quiet => Drain::Waiting,
            other => other,
        })
    }

    /// Steps 4 and 5, right after [`Holding::drain_step`] said
    /// [`Drain::Quiet`]: freezes both sockets and switches both directions
    /// to ACTIVE.
    pub fn finish(mut self) -> Result<Spliced, Box<Refused>> {
        if !self.held {
            return Err(self.abandon(Error::Incompatible(
                "finish called before the drain put the splice in HOLD".into(),
            )));
        }
        let frozen = match self.sockets.as_ref() {
            Some((client, server)) => freeze_quiet(client, server, &self.c_info, &self.s_info),
            None => Err(Error::Incompatible(
                "the splice was already finished".into(),
            )),
        };
        let (c_state, s_state) = match frozen {
            Ok(s) => s,
            Err(e) => return Err(self.abandon(e)),
        };
        let (c_local, c_peer, s_local, s_peer) = self.addrs;
        let (c_ifindex, s_ifindex) = self.ifindexes;
        let mut opts = 0;
        if self.c_info.options & TCPI_OPT_TIMESTAMPS != 0 {
            opts |= OPT_TS;
        }
        if self.c_info.options & TCPI_OPT_SACK != 0 {
            opts |= OPT_SACK;
        }
        let fwd = DirMap::new(&c_state, &s_state);
        let rev = DirMap::new(&s_state, &c_state);
        let mut v_fwd = value(
            STATE_ACTIVE,
            opts,
            &fwd,
            s_local,
            s_peer,
            &c_state,
            &s_state,
            s_ifindex,
        );
        let mut v_rev = value(
            STATE_ACTIVE,
            opts,
            &rev,
            c_local,
            c_peer,
            &s_state,
            &c_state,
            c_ifindex,
        );
        // A direction the drain closed is over before the splice point: its
        // FIN (the proxy's own, on the outgoing connection) is recorded as
        // passed and acknowledged, so that the splice ends when the other
        // one is too.
        let fins = self.pending.fins;
        if fins.0 {
            v_fwd.events = crate::maps::EV_FIN | EV_FIN_ACKED;
            v_fwd.fin_end = s_state.snd_nxt;
        }
        if fins.1 {
            v_rev.events = crate::maps::EV_FIN | EV_FIN_ACKED;
            v_rev.fin_end = c_state.snd_nxt;
        }
        let activated = (|| -> Result<u32, Error> {
            let mut dp = lock(&self.datapath);
            let slot = dp.alloc_slot()?;
            v_fwd.ctl_slot = slot;
            v_rev.ctl_slot = slot;
            let written = dp.table().and_then(|mut table| {
                table
                    .insert(self.to_server, v_fwd, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
                table
                    .insert(self.to_client, v_rev, 0)
                    .map_err(|e| Error::Map(Box::new(e)))
            });
            if let Err(e) = written {
                dp.free_slot(slot);
                return Err(e);
            }
            Ok(slot)
        })();
        let slot = match activated {
            Ok(slot) => slot,
            Err(e) => return Err(self.abandon(e)),
        };
        tracing::debug!(?c_state, ?s_state, "splice active");
        let Some((client, server)) = self.sockets.take() else {
            unreachable!("checked at the freeze above");
        };
        Ok(Spliced {
            datapath: Arc::clone(&self.datapath),
            to_server: self.to_server,
            to_client: self.to_client,
            client: Some(client),
            server: Some(server),
            basepoints: Basepoints {
                client: c_state,
                server: s_state,
            },
            drained: self.pending.written,
            retired: VecDeque::new(),
            slot,
            up_fin_end: fins.0.then_some(s_state.snd_nxt),
        })
        // `self` drops with no sockets: its entries now belong to the
        // splice.
    }

    /// Gives up before step 5: removes the entries, takes the sockets out
    /// of repair mode (if they got that far) without sending anything, and
    /// hands them back, non-blocking, with the bytes read and not yet
    /// written.
    /// Nothing is lost: what the datapath dropped in HOLD was acknowledged
    /// by nobody, and its senders retransmit it to the unfrozen sockets.
    pub fn abandon(mut self, error: Error) -> Box<Refused> {
        self.remove_entries();
        let Some((client, server)) = self.sockets.take() else {
            // `sockets` is only taken by `finish` on success and here, both
            // of which consume `self`.
            unreachable!("a Holding owns its sockets until finish or abandon")
        };
        let _ = repair::set_repair(client.as_fd(), false);
        let _ = repair::set_repair(server.as_fd(), false);
        let pending = std::mem::take(&mut self.pending);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let stats = lock(&self.datapath).stats();
            tracing::debug!(%error, ?stats, "splice abandoned");
        }
        Box::new(Refused {
            error,
            client,
            server,
            pending_to_server: pending.to_server,
            pending_to_client: pending.to_client,
            drained: pending.written,
        })
    }

    fn remove_entries(&self) {
        if !self.held {
            return;
        }
        let mut dp = lock(&self.datapath);
        if let Ok(mut table) = dp.table() {
            let _ = table.remove(&self.to_server);
            let _ = table.remove(&self.to_client);
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        // Dropped mid-drain (its task was cancelled): the sockets close
        // normally once the entries are gone and repair mode is off.
        if let Some((client, server)) = self.sockets.take() {
            self.remove_entries();
            let _ = repair::set_repair(client.as_fd(), false);
            let _ = repair::set_repair(server.as_fd(), false);
        }
    }
}

/// Bytes the drain took from one socket and had not yet written to the
/// other when the splice was abandoned: they belong to the session.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// Bytes the drain wrote to the server, and to the client.
    written: (u64, u64),
    /// FINs the drain passed on: the client's to the server, the server's
    /// to the client (by shutting down the other socket's sending side).
    fins: (bool, bool),
}

/// One pass of step 3 on non-blocking sockets: a destination that does
/// not take bytes (its peer's window is closed) must not block the proxy,
/// and whatever was read but not written stays in `pending`.
fn drain_pass(
    client: &TcpStream,
    server: &TcpStream,
    pending: &mut Pending,
) -> Result<Drain, Error> {
    /// Most bytes read from one socket per pass.
    const CHUNK: usize = 64 * 1024;
    let mut moved = false;
    for (mut from, mut to, queue, written) in [
        (
            client,
            server,
            &mut pending.to_server,
            &mut pending.written.0,
        ),
        (
            server,
            client,
            &mut pending.to_client,
            &mut pending.written.1,
        ),
    ] {
        if queue.is_empty() {
            let n = repair::inq(from.as_fd()).map_err(sock_err("SIOCINQ"))? as usize;
            if n > 0 {
                // Read straight into the queue: no buffer unless there are
                // bytes (a fresh CONNECT usually has none).
                let want = n.min(CHUNK);
                queue.resize(want, 0);
                match from.read(&mut queue[..]) {
                    Ok(got) => queue.truncate(got),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => queue.clear(),
                    Err(e) => {
                        queue.clear();
                        return Err(Error::Socket {
                            op: "read",
                            source: e,
                        });
                    }
                }
            }
        }
        if !queue.is_empty() {
            match to.write(queue) {
                Ok(k) => {
                    queue.drain(..k);
                    *written += k as u64;
                    moved = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(Error::Socket {
                        op: "write",
                        source: e,
                    })
                }
            }
        }
    }
    if moved {
        return Ok(Drain::Moved);
    }
    if !pending.to_server.is_empty() || !pending.to_client.is_empty() {
        return Ok(Drain::Waiting);
    }
    // Both receive queues were empty above. Waiting for the peers' ACKs is
    // the usual case: check the send queues before anything else.
    for s in [client, server] {
        if repair::outq(s.as_fd()).map_err(sock_err("SIOCOUTQ"))? != 0 {
            return Ok(Drain::Waiting);
        }
    }
    // Quiet. A peer's FIN already in (before HOLD; HOLD keeps FINs out) is
    // passed on: the other socket's sending side is shut down, and the
    // next passes wait for that FIN's acknowledgement like any byte (the
    // send queue counts it); the direction still open is spliced. Both
    // closed: nothing left to splice. Then the ACKs the sockets owe go out
    // now, not from a delayed-ACK timer after the freeze.
    let mut passed_on = false;
    for (from, to, fin) in [
        (client, server, &mut pending.fins.0),
        (server, client, &mut pending.fins.1),
    ] {
        if !*fin && peer_closed(from)? {
            to.shutdown(std::net::Shutdown::Write)
                .map_err(sock_err("shutdown"))?;
            *fin = true;
            passed_on = true;
        }
    }
    if pending.fins.0 && pending.fins.1 {
        return Err(Error::PeerClosed);
    }
    if passed_on {
        return Ok(Drain::Waiting);
    }
    for s in [client, server] {
        repair::quickack(s.as_fd()).map_err(sock_err("TCP_QUICKACK"))?;
    }
    Ok(Drain::Quiet)
}

/// Step 4, on drained sockets, with the `TCP_INFO` read at the checks (the
/// window shifts and options it gives are fixed once established).
fn freeze_quiet(
    client: &TcpStream,
    server: &TcpStream,
    c_info: &Info,
    s_info: &Info,
) -> Result<(ConnState, ConnState), Error> {
    for s in [client, server] {
        repair::keepalive_off(s.as_fd()).map_err(sock_err("SO_KEEPALIVE"))?;
        repair::set_repair(s.as_fd(), true).map_err(sock_err("TCP_REPAIR"))?;
    }
    // Nothing can have arrived since (HOLD lets no payload in), but check: a
    // non-empty queue now would be a byte the splice loses.
    for s in [client, server] {
        let q = repair::inq(s.as_fd()).map_err(sock_err("SIOCINQ"))?
            + repair::outq(s.as_fd()).map_err(sock_err("SIOCOUTQ"))?;
        if q != 0 {
            return Err(Error::DrainTimeout);
        }
    }
    let c = repair::read_state(client.as_fd(), c_info).map_err(sock_err("TCP_QUEUE_SEQ"))?;
    let s = repair::read_state(server.as_fd(), s_info).map_err(sock_err("TCP_QUEUE_SEQ"))?;
    Ok((c, s))
}

/// Whether the peer's FIN is in: a half-closed connection is not spliced.
/// The socket is non-blocking (the whole drain is).
fn peer_closed(s: &TcpStream) -> Result<bool, Error> {
    let mut b = [0u8; 1];
    match s.peek(&mut b) {
        Ok(0) => Ok(true),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(Error::Socket {
            op: "peek",
            source: e,
        }),
    }
}

impl Spliced {
    /// The two connections' state when they were frozen.
    pub fn basepoints(&self) -> Basepoints {
        self.basepoints
    }

    /// Reads both directions' entries: (to server, to client).
    pub fn entries(&self) -> Result<(SpliceVal, SpliceVal), Error> {
        let mut dp = lock(&self.datapath);
        let table = dp.table()?;
        let a = table
            .get(&self.to_server, 0)
            .map_err(|e| Error::Map(Box::new(e)))?;
        let b = table
            .get(&self.to_client, 0)
            .map_err(|e| Error::Map(Box::new(e)))?;
        Ok((a, b))
    }

    /// Payload bytes forwarded (up = client to server, down), counted from
    /// the basepoints to the FIN where there was one, else (after a RST or
    /// while running) the datapath's byte counter, which includes
    /// retransmissions.
    pub fn forwarded(&self) -> Result<(u64, u64), Error> {
        let (up, down) = self.entries()?;
        let count = |v: &SpliceVal, start: u32| -> u64 {
            if v.events & crate::maps::EV_FIN != 0 {
                u64::from(v.fin_end.wrapping_sub(1).wrapping_sub(start))
            } else {
                v.bytes
            }
        };
        Ok((
            count(&up, self.basepoints.server.snd_nxt),
            count(&down, self.basepoints.client.snd_nxt),
        ))
    }

    /// How far each side has acknowledged the other's stream since the
    /// splice point, from the latest ACK numbers the datapath saw:
    /// `(client_acked_down, server_acked_up)`, in bytes modulo 2^32 (a
    /// FIN counts one). These are the paper's `snd_una_C` and `snd_una_D`
    /// relative to the basepoints — what a RECONNECT on this engine
    /// starts from. A caller polling more often than
    /// every 4 GiB per direction can extend them to 64 bits.
    pub fn acked_since_splice(&self) -> Result<(u32, u32), Error> {
        let (up, down) = self.entries()?;
        // `up` carries the client's ACKs (of what the proxy sent it on the
        // client connection); `down` the server's. Both start at the splice
        // point and only grow.
        Ok((
            up.last_ack.wrapping_sub(self.basepoints.client.snd_nxt),
            down.last_ack.wrapping_sub(self.basepoints.server.snd_nxt),
        ))
    }

    /// How far the streams have gone since the splice point, in bytes
    /// (FINs not counted), and where their FINs are: what a RECONNECT on
    /// this engine starts from. A caller polling more often than every
    /// 2 GiB per direction extends the counts to 64 bits.
    pub fn stream_counts(&self) -> Result<StreamCounts, Error> {
        let (up, down) = self.entries()?;
        Ok(self.stream_counts_of(&up, &down))
    }

    /// [`Spliced::stream_counts`] from entries already read with [`Spliced::entries`] (one
    /// map read for the counts, the status and the activity).
    pub fn stream_counts_of(&self, up: &SpliceVal, down: &SpliceVal) -> StreamCounts {
        let (up, down) = (*up, *down);
        let c_base = self.basepoints.client.snd_nxt;
        let s_base = self.basepoints.server.snd_nxt;
        // `up` carries the client's ACKs and FIN, `down` the server's.
        let (down_fin, down_fin_acked) = fin_state(&down, c_base, up.last_ack);
        let (up_fin, up_fin_acked) = fin_at(self.up_fin_end_with(&up), s_base, down.last_ack);
        let down_sent = down.seq_max.wrapping_sub(c_base);
        StreamCounts {
            down_acked: up
                .last_ack
                .wrapping_sub(c_base)
                .wrapping_sub(u32::from(down_fin_acked)),
            down_sent: down_sent.wrapping_sub(u32::from(down_fin)),
            up_acked: down
                .last_ack
                .wrapping_sub(s_base)
                .wrapping_sub(u32::from(up_fin_acked)),
            down_fin,
            down_fin_acked,
            up_fin,
            up_fin_acked,
            down_closed: down.events & EV_FIN_ACKED != 0,
        }
    }

    /// Bytes the drain copied between the sockets before the splice
    /// point: (up, down). With the bytes the proxy relayed before calling
    /// [`splice()`], they turn the offsets of
    /// [`Spliced::acked_since_splice`] into stream offsets.
    pub fn drained(&self) -> (u64, u64) {
        self.drained
    }

    /// First step of moving the client side to a new connection (the
    /// paper's RECONNECT): stops both directions (state DROP: nothing
    /// crosses, nothing reaches a socket; senders will retransmit) and
    /// returns where each stream resumes, as
    /// [`Spliced::acked_since_splice`] now says — final, since no
    /// acknowledgement is recorded any more: the client acknowledged the
    /// server's stream up to the first, the server the client's up to the
    /// second.
    pub fn suspend(&mut self) -> Result<(u32, u32), Error> {
        lock(&self.datapath).set_ctl(self.slot, STATE_DROP)?;
        std::thread::sleep(STOP_GRACE);
        self.acked_since_splice()
    }

    /// Undoes [`Spliced::suspend`] when a move is abandoned before the
    /// client was told where to resume: both directions forward again
    /// from where they stopped (what was dropped meanwhile, its senders
    /// retransmit).
    pub fn unsuspend(&self) -> Result<(), Error> {
        lock(&self.datapath).set_ctl(self.slot, 0)
    }

    /// Second step of a move: puts the new client connection's 4-tuple in
    /// HOLD, so that from now on nothing the client sends on it enters the
    /// socket. Call it after reading the client's request on `client` and
    /// before writing the reply that tells it where to resume (the
    /// offsets from [`Spliced::suspend`]); the client must send nothing
    /// between its request and that reply.
    pub fn prepare_client(&self, client: &TcpStream) -> Result<(), Error> {
        let key = SpliceKey::new(
            client.peer_addr().map_err(sock_err("getpeername"))?,
            client.local_addr().map_err(sock_err("getsockname"))?,
        );
        let mut dp = lock(&self.datapath);
        dp.table()?
            .insert(key, hold_value(), 1)
            .map_err(|e| Error::Map(Box::new(e)))
    }

    /// Abandons a move after [`Spliced::prepare_client`]: removes the new
    /// connection's HOLD entry (the connection is then an ordinary socket
    /// again).
    pub fn forget_client(&self, client: &TcpStream) {
        if let (Ok(p), Ok(l)) = (client.peer_addr(), client.local_addr()) {
            let mut dp = lock(&self.datapath);
            if let Ok(mut t) = dp.table() {
                let _ = t.remove(&SpliceKey::new(p, l));
            }
        }
    }

    /// Last step of a move, after [`Spliced::prepare_client`]: computes the
    /// new splice from the new connection's sequence numbers, installs it
    /// armed, writes `reply` on the new connection (and a FIN after it with
    /// `fin`: the client had acknowledged the server's FIN, which the server
    /// will not send again), and returns once the datapath started the
    /// splice and the new socket is frozen.
    ///
    /// The splice resumes where [`Spliced::suspend`] said, adjusted by
    /// `resume`: the server's bytes from the first offset plus
    /// `resume.down_ahead` go to the new connection, the client's bytes from
    /// the second offset minus `resume.up_back` (which the client sends
    /// again) go to the server. The datapath holds the new connection back
    /// (as in HOLD) until the client acknowledges the reply; that segment
    /// goes up to the proxy's socket without payload, and from the next one
    /// on both directions are spliced, without waiting for this thread. The
    /// old client connection is retired silently. On failure the splice
    /// stays suspended, as it was, and the new connection's entry is removed.
    pub fn resplice_client(
        mut self,
        client: TcpStream,
        resume: Resume,
        reply: &[u8],
        fin: bool,
        timeout: Duration,
    ) -> Result<Spliced, Box<MoveFailed>> {
        let fail = |error: Error, splice: Spliced, replied: bool| {
            Box::new(MoveFailed {
                error,
                splice,
                replied,
            })
        };
        let new_key = match (client.peer_addr(), client.local_addr()) {
            (Ok(p), Ok(l)) => SpliceKey::new(p, l),
            (Err(e), _) | (_, Err(e)) => return Err(fail(sock_err("getpeername")(e), self, false)),
        };
        let prepared = self.armed_entries(&client, resume, reply.len(), fin);
        let (fwd, rev, basepoints) = match prepared {
            Ok(x) => x,
            Err(e) => {
                self.forget_client(&client);
                return Err(fail(e, self, false));
            }
        };
        let old_key = self.to_server;
        // Install: the old connection's entry drops for good (its own state:
        // the shared word goes back to 0 when the splice starts), the
        // server's entry turns to the new connection (still stopped by the
        // word), and the new connection's entry is armed.
        let saved = {
            let mut dp = lock(&self.datapath);
            dp.table().and_then(|mut t| {
                let old = t.get(&old_key, 0).map_err(|e| Error::Map(Box::new(e)))?;
                let old_rev = t
                    .get(&self.to_client, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
                let mut dropped = old;
                dropped.state = STATE_DROP;
                t.insert(old_key, dropped, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
                t.insert(self.to_client, rev, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
                t.insert(new_key, fwd, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
                Ok((old, old_rev))
            })
        };
        let (old, old_rev) = match saved {
            Ok(x) => x,
            Err(e) => {
                self.forget_client(&client);
                return Err(fail(e, self, false));
            }
        };
        let restore = |sp: &Spliced| {
            let mut dp = lock(&sp.datapath);
            let _ = dp.set_ctl(sp.slot, STATE_DROP);
            if let Ok(mut t) = dp.table() {
                let _ = t.remove(&new_key);
                let _ = t.insert(old_key, old, 0);
                let _ = t.insert(sp.to_client, old_rev, 0);
            }
        };
        // The reply (and FIN). A failure here leaves the client uninformed.
        let sent = client
            .set_nonblocking(false)
            .and_then(|()| client.set_write_timeout(Some(timeout)))
            .and_then(|()| (&client).write_all(reply))
            .and_then(|()| {
                if fin {
                    client.shutdown(std::net::Shutdown::Write)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = sent {
            restore(&self);
            return Err(fail(sock_err("writing the reply")(e), self, false));
        }
        // Wait for the datapath to start the splice (the client's ACK of the
        // reply) and for that ACK to have emptied the socket's send queue.
        let started = self.wait_started(&client, new_key, timeout);
        let frozen = started.and_then(|()| {
            repair::keepalive_off(client.as_fd()).map_err(sock_err("SO_KEEPALIVE"))?;
            repair::set_repair(client.as_fd(), true).map_err(sock_err("TCP_REPAIR"))?;
            let info = repair::info(client.as_fd()).map_err(sock_err("TCP_INFO"))?;
            let actual =
                repair::read_state(client.as_fd(), &info).map_err(sock_err("TCP_QUEUE_SEQ"))?;
            let want = basepoints.client;
            if (actual.snd_nxt, actual.rcv_nxt) != (want.snd_nxt, want.rcv_nxt) {
                tracing::error!(?actual, ?want, "the new client connection's sequence state is not the one the splice was armed with");
                return Err(Error::Incompatible(
                    "the new client connection moved while the splice was armed".into(),
                ));
            }
            Ok(())
        });
        if let Err(e) = frozen {
            restore(&self);
            let _ = repair::set_repair(client.as_fd(), false);
            return Err(fail(e, self, true));
        }
        // The old socket is frozen: closing it sends nothing. Its entry stays
        // in DROP (within RETIRED_KEPT), so that late segments of the old
        // connection reach neither the proxy's stack nor the server.
        drop(self.client.take());
        let server = self.server.take();
        let drained = self.drained;
        let mut retired = std::mem::take(&mut self.retired);
        retired.push_back(old_key);
        while retired.len() > RETIRED_KEPT {
            if let Some(oldest) = retired.pop_front() {
                if let Ok(mut t) = lock(&self.datapath).table() {
                    let _ = t.remove(&oldest);
                }
            }
        }
        let datapath = Arc::clone(&self.datapath);
        let to_client = self.to_client;
        let slot = self.slot;
        // The old entries were stopped: what they said of the client's FIN is final.
        let up_fin_end = self.up_fin_end_with(&old);
        // `self` is spent: its sockets moved out (so its `Drop` releases
        // nothing), its keys now belong to the new splice.
        drop(self);
        Ok(Spliced {
            datapath,
            to_server: new_key,
            to_client,
            client: Some(client),
            server,
            basepoints,
            drained,
            retired,
            slot,
            up_fin_end,
        })
    }

    /// Waits until the datapath started the armed splice of `new_key` and the
    /// new socket has nothing left to send (its reply acknowledged).
    fn wait_started(
        &self,
        client: &TcpStream,
        new_key: SpliceKey,
        timeout: Duration,
    ) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = {
                let mut dp = lock(&self.datapath);
                let t = dp.table()?;
                t.get(&new_key, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?
                    .state
            };
            if repair::inq(client.as_fd()).map_err(sock_err("SIOCINQ"))? != 0 {
                return Err(Error::Incompatible(
                    "the client's bytes reached the proxy's socket: the server connection cannot take them"
                        .into(),
                ));
            }
            let outq = repair::outq(client.as_fd()).map_err(sock_err("SIOCOUTQ"))?;
            if state == STATE_ACTIVE && outq == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                // Stop it first: a start racing this timeout must not go on.
                lock(&self.datapath).set_ctl(self.slot, STATE_DROP)?;
                return Err(Error::DrainTimeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Checks the new client connection and computes the moved splice's
    /// entries from its sequence numbers as they will be after `reply_len`
    /// bytes of reply (and a FIN with `fin`): (client → server, armed;
    /// server → client; basepoints).
    fn armed_entries(
        &self,
        client: &TcpStream,
        resume: Resume,
        reply_len: usize,
        fin: bool,
    ) -> Result<(SpliceVal, SpliceVal, Basepoints), Error> {
        let (up, down) = self.entries()?;
        if (up.events | down.events) & EV_RST != 0 {
            return Err(Error::Incompatible(
                "the spliced connections were reset".into(),
            ));
        }
        // Whether the client's FIN is done with: the server acknowledged it
        // (through any splice of this session, or the drain's).
        let up_fin_acked = self
            .up_fin_end_with(&up)
            .is_some_and(|e| !crate::mapping::seq_before(down.last_ack, e));
        let old_server = self.basepoints.server;
        let old_fwd = DirMap::new(&self.basepoints.client, &old_server);
        // Where the server's connection resumes, in its sequence space:
        // the next byte the server expects (its highest ACK), and the next
        // byte of the server's the client has not received (its highest
        // ACK, mapped, plus what it received unacknowledged).
        // A FIN of the client's the server acknowledged: the client sends
        // it again on the new connection (PROTOCOL.md 3.7), and it must
        // land on the same sequence number.
        let b_up_acked = down.last_ack.wrapping_sub(u32::from(up_fin_acked));
        // The client's first byte on the new connection is `up_back` bytes before that
        // (an early resend from its own acknowledged point): those land below the
        // server's `rcv_nxt`, and its TCP discards them as duplicates (III-B.5).
        let b_up = b_up_acked.wrapping_sub(resume.up_back);
        // A FIN of the server's the client acknowledged is past the resume
        // point (the server will not send it again); the caller sends the
        // client a FIN of its own on the new connection (`fin`), so both
        // sides are past it.
        let b_down = old_fwd.ack(up.last_ack).wrapping_add(resume.down_ahead);

        let c_info = repair::info(client.as_fd()).map_err(sock_err("TCP_INFO"))?;
        let old_c = self
            .client
            .as_ref()
            .ok_or(Error::Incompatible("no client socket".into()))?;
        let old_info = repair::info(old_c.as_fd()).map_err(sock_err("TCP_INFO"))?;
        let mask = TCPI_OPT_TIMESTAMPS | TCPI_OPT_SACK | TCPI_OPT_ECN;
        if c_info.options & mask != old_info.options & mask {
            return Err(Error::Incompatible(
                "the new client connection negotiated other options".into(),
            ));
        }
        if c_info.state != 1 {
            return Err(Error::Incompatible(format!(
                "the new client connection is in TCP state {}, not ESTABLISHED",
                c_info.state
            )));
        }
        let optlen = if c_info.options & TCPI_OPT_TIMESTAMPS != 0 {
            12
        } else {
            0
        };
        let s = self
            .server
            .as_ref()
            .ok_or(Error::Incompatible("no server socket".into()))?;
        let s_info = repair::info(s.as_fd()).map_err(sock_err("TCP_INFO"))?;
        if c_info.advmss > s_info.snd_mss + optlen || s_info.advmss > c_info.snd_mss + optlen {
            return Err(Error::Incompatible(
                "MSS of the new client connection".into(),
            ));
        }
        let c_local = client.local_addr().map_err(sock_err("getsockname"))?;
        let c_peer = client.peer_addr().map_err(sock_err("getpeername"))?;
        let c_ifindex = crate::loader::ifindex_of_addr(c_local.ip())?;
        if !lock(&self.datapath).covers(c_ifindex) {
            return Err(Error::Incompatible(format!(
                "the datapath is not attached to interface {c_ifindex}"
            )));
        }
        // The new connection's sequence numbers now, read in repair mode and
        // left without a window probe. Nothing from the client may wait in
        // its receive queue (HOLD keeps its bytes out from now on); the send
        // queue may still hold SOCKS replies the client has not acknowledged
        // yet (a client that sent its request without waiting for the method
        // reply): the sequence number read is the next one to be written
        // either way, and the client's ACK of the RECONNECT reply covers them.
        if repair::inq(client.as_fd()).map_err(sock_err("SIOCINQ"))? != 0 {
            return Err(Error::Incompatible(
                "the client sent bytes behind its request".into(),
            ));
        }
        repair::set_repair(client.as_fd(), true).map_err(sock_err("TCP_REPAIR"))?;
        let read = repair::read_state(client.as_fd(), &c_info).map_err(sock_err("TCP_QUEUE_SEQ"));
        repair::set_repair(client.as_fd(), false).map_err(sock_err("TCP_REPAIR"))?;
        let mut c_state = read?;
        // ... and after the reply (a FIN counts one).
        let reply_len =
            u32::try_from(reply_len).map_err(|_| Error::Incompatible("reply too long".into()))?;
        c_state.snd_nxt = c_state
            .snd_nxt
            .wrapping_add(reply_len)
            .wrapping_add(u32::from(fin));

        // The server connection as the datapath left it.
        let mut s_state = old_server;
        s_state.snd_nxt = b_up;
        s_state.rcv_nxt = b_down;
        // TSvals to the server must not fall below the last one it got:
        // move the outgoing clock up to it if needed.
        let now = repair::monotonic_ms();
        let b_now = now.wrapping_add(old_server.ts_offset);
        let floor = up.last_tsval_out.wrapping_add(1);
        let start = if crate::mapping::seq_before(b_now, floor) {
            floor
        } else {
            b_now
        };
        s_state.ts_offset = start.wrapping_sub(now);

        let s_local = s.local_addr().map_err(sock_err("getsockname"))?;
        let s_peer = s.peer_addr().map_err(sock_err("getpeername"))?;
        let fwd = DirMap::new(&c_state, &s_state);
        let rev = DirMap::new(&s_state, &c_state);
        let opts = up.opts;
        let mut v_fwd = value(
            STATE_ARMED,
            opts,
            &fwd,
            s_local,
            s_peer,
            &c_state,
            &s_state,
            up.out_ifindex,
        );
        v_fwd.arm_ack = c_state.snd_nxt;
        v_fwd.ctl_slot = self.slot;
        let mut v_rev = value(
            STATE_ACTIVE,
            opts,
            &rev,
            c_local,
            c_peer,
            &s_state,
            &c_state,
            c_ifindex,
        );
        v_rev.ctl_slot = self.slot;
        if up_fin_acked {
            // The server acknowledged the client's FIN, which now lies just past the new
            // splice point (b_up): recorded as passed and acknowledged, so that the counts
            // do not take the server's ACK of it for a byte before the client's repeated
            // FIN comes through (it may have met the HOLD state and be retransmitted later).
            v_fwd.events = crate::maps::EV_FIN | EV_FIN_ACKED;
            v_fwd.fin_end = b_up_acked.wrapping_add(1);
        }
        if fin {
            // The server → client direction is over (its FIN is behind the
            // splice point, and the proxy's own FIN ends the new connection's
            // direction): recorded so that the splice ends when the client's
            // FIN is acknowledged too.
            v_rev.events = crate::maps::EV_FIN | EV_FIN_ACKED;
            v_rev.fin_end = c_state.snd_nxt;
        }
        Ok((
            v_fwd,
            v_rev,
            Basepoints {
                client: c_state,
                server: s_state,
            },
        ))
    }

    /// The end of the client's FIN in the server's sequence space, from
    /// this splice's client → server entry or an earlier splice's.
    fn up_fin_end_with(&self, up: &SpliceVal) -> Option<u32> {
        if up.events & crate::maps::EV_FIN != 0 {
            Some(up.fin_end)
        } else {
            self.up_fin_end
        }
    }

    /// Whether the spliced connections are over.
    pub fn status(&self) -> Result<Status, Error> {
        let (a, b) = self.entries()?;
        Ok(self.status_of(&a, &b))
    }

    /// [`Spliced::status`] from entries already read with [`Spliced::entries`].
    pub fn status_of(&self, a: &SpliceVal, b: &SpliceVal) -> Status {
        // The client's FIN counts as acknowledged also when an earlier splice of the session
        // forwarded it and the server's ACK of it came through this one: the client's
        // repeated FIN on the new connection is then acknowledged by that ACK (mapped) and
        // never needs to cross.
        let up_done = a.events & EV_FIN_ACKED != 0
            || self
                .up_fin_end_with(a)
                .is_some_and(|e| !crate::mapping::seq_before(b.last_ack, e));
        let fins = up_done && b.events & EV_FIN_ACKED != 0;
        let rst = (a.events | b.events) & EV_RST != 0;
        if fins || rst {
            Status::Finished
        } else {
            Status::Active
        }
    }

    /// Closes the client connection's frozen socket now (silently: it is in
    /// repair mode), keeping the entries and the server connection's socket
    /// until [`Spliced::teardown`]: for a finished splice whose entries stay a
    /// little longer, so that it holds one descriptor instead of two. The
    /// server side's socket must stay as long as its entry (it holds the
    /// local port of the proxy's connection, which a new connection of the
    /// proxy's must not take while the entry could rewrite its segments); the
    /// client side's local port is the listener's, and a new connection on
    /// the same 4-tuple meets the entry either way.
    pub fn close_client_socket(&mut self) {
        drop(self.client.take());
    }

    /// Removes the entries and closes the frozen sockets without sending
    /// anything. Call it a little after [`Status::Finished`] (a lingering
    /// retransmitted FIN or ACK then still finds the entry).
    pub fn teardown(mut self) {
        self.release();
    }

    fn release(&mut self) {
        {
            let mut dp = lock(&self.datapath);
            if let Ok(mut table) = dp.table() {
                let _ = table.remove(&self.to_server);
                let _ = table.remove(&self.to_client);
                for key in self.retired.drain(..) {
                    let _ = table.remove(&key);
                }
            }
            dp.free_slot(self.slot);
        }
        // Still in repair mode: close() ends them silently.
        self.client.take();
        self.server.take();
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        // Both taken: released already, or spent by a resplice.
        if self.client.is_some() || self.server.is_some() {
            self.release();
        }
    }
}
