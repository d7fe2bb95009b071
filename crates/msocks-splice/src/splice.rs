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

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::loader::Datapath;
use crate::mapping::{ConnState, DirMap};
use crate::maps::{
    addr_words, SpliceKey, SpliceVal, EV_FIN_ACKED, EV_RST, OPT_SACK, OPT_TS, STATE_ACTIVE,
    STATE_DROP, STATE_HOLD, TS_VALID,
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
    /// A client connection replaced by [`Spliced::resplice_client`]: its
    /// frozen socket and (DROP) entry, released with this splice.
    retired: Option<(SpliceKey, TcpStream)>,
}

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
    if c.state != 1 || s.state != 1 {
        return Err(Error::Incompatible(
            "a connection is not ESTABLISHED".into(),
        ));
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

fn value(
    state: u32,
    opts: u32,
    map: &DirMap,
    from: SocketAddr,
    to: SocketAddr,
    out: &ConnState,
    out_ifindex: u32,
) -> SpliceVal {
    SpliceVal {
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
    let refuse = |error: Error, client: TcpStream, server: TcpStream| {
        Box::new(Refused {
            error,
            client,
            server,
            pending_to_server: Vec::new(),
            pending_to_client: Vec::new(),
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

    // Step 2: HOLD. NOEXIST: never take over another splice's entry.
    let held = (|| -> Result<(), Error> {
        let mut dp = lock(datapath);
        let mut table = dp.table()?;
        table
            .insert(to_server, hold_value(), 1)
            .map_err(|e| Error::Map(Box::new(e)))?;
        if let Err(e) = table.insert(to_client, hold_value(), 1) {
            let _ = table.remove(&to_server);
            return Err(Error::Map(Box::new(e)));
        }
        Ok(())
    })();
    if let Err(e) = held {
        return Err(refuse(e, client, server));
    }
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
    })
}

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

/// A splice in HOLD (steps 1 and 2 done), being drained (step 3). Owns
/// the two sockets. Dropping it removes the entries and drops the sockets
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
}

impl Holding {
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
        drain_pass(client, server, &mut self.pending)
    }

    /// Steps 4 and 5, right after [`Holding::drain_step`] said
    /// [`Drain::Quiet`]: freezes both sockets and switches both directions
    /// to ACTIVE.
    pub fn finish(mut self) -> Result<Spliced, Box<Refused>> {
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
        let v_fwd = value(
            STATE_ACTIVE,
            opts,
            &fwd,
            s_local,
            s_peer,
            &s_state,
            s_ifindex,
        );
        let v_rev = value(
            STATE_ACTIVE,
            opts,
            &rev,
            c_local,
            c_peer,
            &c_state,
            c_ifindex,
        );
        let activated = (|| -> Result<(), Error> {
            let mut dp = lock(&self.datapath);
            let mut table = dp.table()?;
            table
                .insert(self.to_server, v_fwd, 0)
                .map_err(|e| Error::Map(Box::new(e)))?;
            table
                .insert(self.to_client, v_rev, 0)
                .map_err(|e| Error::Map(Box::new(e)))?;
            Ok(())
        })();
        if let Err(e) = activated {
            return Err(self.abandon(e));
        }
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
            retired: None,
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
        Box::new(Refused {
            error,
            client,
            server,
            pending_to_server: pending.to_server,
            pending_to_client: pending.to_client,
        })
    }

    fn remove_entries(&self) {
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
    // Quiet. A peer's FIN already in (before HOLD; HOLD drops FINs) makes
    // the connection half-closed, which is not spliced. Then the ACKs the
    // sockets owe go out now, not from a delayed-ACK timer after the freeze.
    for s in [client, server] {
        if peer_closed(s)? {
            return Err(Error::PeerClosed);
        }
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
    /// relative to the basepoints — what a RECONNECT on this engine would
    /// start from (not implemented yet). A caller polling more often than
    /// every 4 GiB per direction can extend them to 64 bits.
    pub fn acked_since_splice(&self) -> Result<(u32, u32), Error> {
        let (up, down) = self.entries()?;
        // `up` carries the client's ACKs (of what the proxy sent it on the
        // client connection); `down` the server's.
        let client = if up.last_ack == 0 && up.packets == 0 {
            0
        } else {
            up.last_ack.wrapping_sub(self.basepoints.client.snd_nxt)
        };
        let server = if down.last_ack == 0 && down.packets == 0 {
            0
        } else {
            down.last_ack.wrapping_sub(self.basepoints.server.snd_nxt)
        };
        Ok((client, server))
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
        {
            let mut dp = lock(&self.datapath);
            let mut table = dp.table()?;
            for key in [self.to_server, self.to_client] {
                let mut v = table.get(&key, 0).map_err(|e| Error::Map(Box::new(e)))?;
                v.state = STATE_DROP;
                table
                    .insert(key, v, 0)
                    .map_err(|e| Error::Map(Box::new(e)))?;
            }
        }
        self.acked_since_splice()
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

    /// Last step of a move: once the reply is acknowledged, freezes the
    /// new client connection and splices it to the server connection
    /// exactly where [`Spliced::suspend`] said the streams resume: the
    /// server's bytes from the first offset go to the new connection, the
    /// client's bytes from the second offset (which the client sends
    /// again) go to the server. The old client connection is retired
    /// silently. On failure the splice stays suspended and the new
    /// connection's entry is removed.
    pub fn resplice_client(
        mut self,
        client: TcpStream,
        drain_timeout: Duration,
    ) -> Result<Spliced, Box<(Error, Spliced)>> {
        let new_key = match (client.peer_addr(), client.local_addr()) {
            (Ok(p), Ok(l)) => SpliceKey::new(p, l),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Box::new((
                    Error::Socket {
                        op: "getpeername",
                        source: e,
                    },
                    self,
                )))
            }
        };
        match self.resplice_inner(&client, drain_timeout) {
            Ok((fwd, rev, basepoints)) => {
                let old_key = self.to_server;
                {
                    let mut dp = lock(&self.datapath);
                    let done = dp.table().and_then(|mut t| {
                        t.insert(new_key, fwd, 0)
                            .map_err(|e| Error::Map(Box::new(e)))?;
                        t.insert(self.to_client, rev, 0)
                            .map_err(|e| Error::Map(Box::new(e)))
                    });
                    if let Err(e) = done {
                        if let Ok(mut t) = dp.table() {
                            let _ = t.remove(&new_key);
                        }
                        drop(dp);
                        let _ = repair::set_repair(client.as_fd(), false);
                        return Err(Box::new((e, self)));
                    }
                }
                let old_client = self.client.take();
                let server = self.server.take();
                let drained = self.drained;
                // The old entry stays in DROP until this splice ends, so
                // that late segments of the old connection reach neither
                // its frozen socket nor the server.
                let retired = old_client.map(|c| (old_key, c));
                let datapath = Arc::clone(&self.datapath);
                let to_client = self.to_client;
                // `self` is spent: its sockets moved out (so its `Drop`
                // releases nothing), its keys now belong to the new splice.
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
                })
            }
            Err(e) => {
                let mut dp = lock(&self.datapath);
                if let Ok(mut t) = dp.table() {
                    let _ = t.remove(&new_key);
                }
                drop(dp);
                let _ = repair::set_repair(client.as_fd(), false);
                Err(Box::new((e, self)))
            }
        }
    }

    /// Drains and freezes the new client connection and computes the new
    /// entries: (client → server, server → client, basepoints).
    fn resplice_inner(
        &self,
        client: &TcpStream,
        timeout: Duration,
    ) -> Result<(SpliceVal, SpliceVal, Basepoints), Error> {
        let (up, down) = self.entries()?;
        if (up.events | down.events) & (EV_RST | crate::maps::EV_FIN) != 0 {
            return Err(Error::Incompatible(
                "the spliced connections are closing".into(),
            ));
        }
        let old_server = self.basepoints.server;
        let old_fwd = DirMap::new(&self.basepoints.client, &old_server);
        // Where the server's connection resumes, in its sequence space:
        // the next byte the server expects (its last ACK), and the next
        // byte of the server's the client has not acknowledged.
        let b_up = if down.packets > 0 {
            down.last_ack
        } else {
            old_server.snd_nxt
        };
        let b_down = if up.packets > 0 {
            old_fwd.ack(up.last_ack)
        } else {
            old_server.rcv_nxt
        };

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
            return Err(Error::Incompatible(
                "the new client connection is not ESTABLISHED".into(),
            ));
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
        let c_ifindex = crate::loader::ifindex_of_addr(
            client.local_addr().map_err(sock_err("getsockname"))?.ip(),
        )?;
        if !lock(&self.datapath).covers(c_ifindex) {
            return Err(Error::Incompatible(format!(
                "the datapath is not attached to interface {c_ifindex}"
            )));
        }

        // Drain: the reply must be acknowledged, and nothing may wait in
        // the receive queue (the client sends nothing before the reply;
        // what it sends after is kept out by HOLD).
        client
            .set_nonblocking(true)
            .map_err(sock_err("set_nonblocking"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if repair::inq(client.as_fd()).map_err(sock_err("SIOCINQ"))? != 0 {
                return Err(Error::Incompatible(
                    "the client sent data before the reply: the server connection cannot take it"
                        .into(),
                ));
            }
            repair::quickack(client.as_fd()).map_err(sock_err("TCP_QUICKACK"))?;
            if repair::outq(client.as_fd()).map_err(sock_err("SIOCOUTQ"))? == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::DrainTimeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        repair::keepalive_off(client.as_fd()).map_err(sock_err("SO_KEEPALIVE"))?;
        repair::set_repair(client.as_fd(), true).map_err(sock_err("TCP_REPAIR"))?;
        let c_state =
            repair::read_state(client.as_fd(), &c_info).map_err(sock_err("TCP_QUEUE_SEQ"))?;

        // The server connection as the datapath left it.
        let mut s_state = old_server;
        s_state.snd_nxt = b_up;
        s_state.rcv_nxt = b_down;
        // TSvals to the server must not fall below the last one it got:
        // move the outgoing clock up to it if needed.
        let now = repair::monotonic_ms();
        let b_now = now.wrapping_add(old_server.ts_offset);
        let floor = up.last_tsval_out.wrapping_add(1);
        let start = if up.tsval_delta & TS_VALID != 0 && crate::mapping::seq_before(b_now, floor) {
            floor
        } else {
            b_now
        };
        s_state.ts_offset = start.wrapping_sub(now);

        let c_local = client.local_addr().map_err(sock_err("getsockname"))?;
        let c_peer = client.peer_addr().map_err(sock_err("getpeername"))?;
        let s_local = s.local_addr().map_err(sock_err("getsockname"))?;
        let s_peer = s.peer_addr().map_err(sock_err("getpeername"))?;
        let fwd = DirMap::new(&c_state, &s_state);
        let rev = DirMap::new(&s_state, &c_state);
        let opts = up.opts;
        let v_fwd = value(
            STATE_ACTIVE,
            opts,
            &fwd,
            s_local,
            s_peer,
            &s_state,
            up.out_ifindex,
        );
        let v_rev = value(
            STATE_ACTIVE,
            opts,
            &rev,
            c_local,
            c_peer,
            &c_state,
            c_ifindex,
        );
        Ok((
            v_fwd,
            v_rev,
            Basepoints {
                client: c_state,
                server: s_state,
            },
        ))
    }

    /// Whether the spliced connections are over.
    pub fn status(&self) -> Result<Status, Error> {
        let (a, b) = self.entries()?;
        let fins = a.events & EV_FIN_ACKED != 0 && b.events & EV_FIN_ACKED != 0;
        let rst = (a.events | b.events) & EV_RST != 0;
        Ok(if fins || rst {
            Status::Finished
        } else {
            Status::Active
        })
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
                if let Some((key, _)) = &self.retired {
                    let _ = table.remove(key);
                }
            }
        }
        // In repair mode: dropping it sends nothing.
        self.retired.take();
        // Still in repair mode: close() ends them silently.
        self.client.take();
        self.server.take();
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if self.client.is_some() {
            self.release();
        }
    }
}
