//! The `relay` engine of MSOCKS sessions: the userspace copy of [`crate::relay`], plus what
//! makes a session survive the loss of its mobile-side connection (paper, section III-B,
//! adapted to what a userspace relay knows):
//!
//! * Server-to-client bytes are kept until the mobile node's TCP acknowledges them (read from
//!   `TCP_INFO`), in a retention buffer bounded by the mobile-side socket's send buffer plus
//!   one read; the server is not read while it is full (backpressure), so memory stays bounded.
//! * When the mobile side breaks, the session parks: the server connection stays open for
//!   `mobility.park_timeout`, waiting for a RECONNECT.
//! * A RECONNECT hands the new connection to this engine, which drains what the old
//!   connection still holds, computes the splice points with [`msocks_proto::resplice`], replies
//!   on the new connection, and resumes there. A RECONNECT with impossible counters is refused
//!   (0x81) and leaves the session as it was. RECONNECTs are handled one at a time, so racing
//!   ones resolve to exactly one live path: the last to be handled.
//!
//! Urgent data (paper, section III-B.6): both proxy sockets receive it inline
//! (`SO_OOBINLINE`), so an urgent byte keeps its place in the stream and in the counters. The
//! engine notes where each urgent byte lies (`SIOCATMARK` before each read) and sends that
//! byte on with `MSG_OOB`, so it arrives as urgent data on the other side too, including
//! when it is sent again after a RECONNECT.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use msocks_proto::resplice::{counter_at, inband_bytes_in, offset, stream_offset_of_inband};
use msocks_proto::{
    resplice, MobilityOptions, Reply, ReplyCode, ReplyExtension, SessionPosition, TargetAddr,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::registry::Attach;
use crate::relay::Traffic;
use crate::server::Shared;
use crate::session::{send_reply, Client};
use crate::tcp_state;

/// How often acknowledgments are polled while nothing else can wake the engine: when the
/// session waits for the last bytes to be acknowledged before it can end, and when the
/// retention buffer is full, so that only acknowledgments can make room to read the server
/// again (the kernel signals no event for an ACK).
const ACK_POLL: Duration = Duration::from_millis(10);

/// Most urgent-byte positions remembered per session (8 MiB); beyond it the counters of an
/// out-of-band client can no longer be translated exactly, which is logged.
const URGENT_HISTORY_LIMIT: usize = 1 << 20;

/// One mobile-side connection of a session.
struct MobilePath {
    stream: TcpStream,
    peer: SocketAddr,
    /// Bytes written on this socket before session data (SOCKS replies).
    preamble: u64,
    /// Server-to-client offset of the first data byte sent on this socket.
    start: u64,
    /// Data bytes written on this socket.
    written: u64,
    /// The connection failed; kept only so a RECONNECT can drain and measure it.
    broken: bool,
    /// The server's FIN was passed on over this connection.
    fin_sent: bool,
}

impl MobilePath {
    fn new(stream: TcpStream, peer: SocketAddr, start: u64) -> Self {
        let _ = stream.set_nodelay(true);
        let _ = socket2::SockRef::from(&stream).set_out_of_band_inline(true);
        let preamble = tcp_state::bytes_queued(&stream).unwrap_or(0);
        MobilePath {
            stream,
            peer,
            preamble,
            start,
            written: 0,
            broken: false,
            fin_sent: false,
        }
    }

    /// Server-to-client offset the mobile node's TCP has acknowledged on this connection.
    fn acked(&self) -> Option<u64> {
        let on_socket = tcp_state::bytes_acked(&self.stream).ok()?;
        Some(self.start + on_socket.saturating_sub(self.preamble).min(self.written))
    }
}

/// Where a session's streams stand when this engine takes it over: at the start (only the
/// client's early bytes), or where the kernel engine left them when it could not splice.
pub(crate) struct Start {
    /// Client-to-server bytes already written to the server.
    pub(crate) up_written: u64,
    /// Server-to-client bytes already written to the client (taken as acknowledged: they
    /// are not kept for a resend).
    pub(crate) down_written: u64,
    /// Client-to-server bytes received and not yet written to the server.
    pub(crate) up_pending: Vec<u8>,
    /// Server-to-client bytes received and not yet written to the client.
    pub(crate) down_pending: Vec<u8>,
}

impl Start {
    /// A session that has moved nothing yet; `early` came with the request.
    pub(crate) fn fresh(early: &[u8]) -> Start {
        Start {
            up_written: 0,
            down_written: 0,
            up_pending: early.to_vec(),
            down_pending: Vec::new(),
        }
    }
}

/// The state of one MSOCKS session's byte streams.
pub(crate) struct MobileEngine<'a> {
    shared: &'a Shared,
    client: &'a Client,
    traffic: &'a Traffic,
    options: MobilityOptions,
    server: TcpStream,
    path: Option<MobilePath>,
    /// Server-to-client bytes from `base` (acknowledged by the mobile node) to what was read
    /// from the server.
    retained: VecDeque<u8>,
    base: u64,
    down_sent: u64,
    /// The most server-to-client bytes ever sent on any mobile-side connection: a move sends
    /// again from its resume point, but the client may have read further on the old
    /// connection (it reads on while its RECONNECT is under way), and its next RECONNECT's
    /// `data_read` is checked against this.
    down_sent_max: u64,
    server_eof: bool,
    /// Server-to-client offsets of urgent bytes not yet acknowledged.
    urgent_down: VecDeque<u64>,
    /// Server-to-client offsets of every urgent byte so far (bounded by
    /// [`URGENT_HISTORY_LIMIT`]), to translate the counters of a client that reads urgent data
    /// out of band.
    urgent_history: Vec<u64>,
    /// Client-to-server offsets of urgent bytes not yet written to the server.
    urgent_up: VecDeque<u64>,
    /// Client-to-server bytes received from the mobile node, not yet written to the server.
    up_pending: Vec<u8>,
    up_pending_pos: usize,
    up_received: u64,
    /// Bytes still to discard from the front of the mobile-side stream: the part of an
    /// early resend (PROTOCOL.md 3.7.1) that the proxy had received already.
    up_skip: u64,
    client_eof: bool,
    up_fin_sent: bool,
    parked_since: Option<Instant>,
    last_activity: Instant,
    moves: u64,
    read_buf: Vec<u8>,
}

impl<'a> MobileEngine<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        client: &'a Client,
        traffic: &'a Traffic,
        options: MobilityOptions,
        stream: TcpStream,
        server: TcpStream,
        start: Start,
    ) -> Self {
        let _ = socket2::SockRef::from(&server).set_out_of_band_inline(true);
        let peer = client.peer;
        let up_received = start.up_written + start.up_pending.len() as u64;
        MobileEngine {
            shared,
            client,
            traffic,
            options,
            server,
            path: Some(MobilePath::new(stream, peer, start.down_written)),
            retained: start.down_pending.into(),
            base: start.down_written,
            down_sent: start.down_written,
            down_sent_max: start.down_written,
            server_eof: false,
            urgent_down: VecDeque::new(),
            urgent_history: Vec::new(),
            urgent_up: VecDeque::new(),
            up_pending: start.up_pending,
            up_pending_pos: 0,
            up_received,
            up_skip: 0,
            client_eof: false,
            up_fin_sent: false,
            parked_since: None,
            last_activity: Instant::now(),
            moves: 0,
            read_buf: vec![0u8; shared.config.limits.buffer_size],
        }
    }

    fn down_read(&self) -> u64 {
        self.base + self.retained.len() as u64
    }

    fn live_path(&self) -> Option<&MobilePath> {
        self.path.as_ref().filter(|p| !p.broken)
    }

    /// Drops retained bytes the mobile node has acknowledged.
    fn trim(&mut self) {
        let Some(acked) = self.path.as_ref().and_then(|p| p.acked()) else {
            return;
        };
        if acked > self.base {
            let n = (acked - self.base).min(self.retained.len() as u64);
            self.retained.drain(..n as usize);
            self.base += n;
            while self.urgent_down.front().is_some_and(|&u| u < self.base) {
                self.urgent_down.pop_front();
            }
        }
    }

    /// Offset in the client-to-server stream of the next byte to write to the server.
    fn up_written(&self) -> u64 {
        self.up_received - (self.up_pending.len() - self.up_pending_pos) as u64
    }

    /// Most bytes retained at once: what the mobile-side socket can hold unacknowledged, plus
    /// one read.
    fn retention_limit(&self) -> usize {
        let sndbuf = self
            .path
            .as_ref()
            .and_then(|p| socket2::SockRef::from(&p.stream).send_buffer_size().ok())
            .unwrap_or(256 * 1024);
        sndbuf + self.read_buf.len()
    }

    fn park(&mut self, why: &str) {
        if let Some(p) = &mut self.path {
            if !p.broken {
                p.broken = true;
                self.parked_since = Some(Instant::now());
                info!(session = self.client.id, client = %p.peer, reason = why, "mobile side lost; session parked, waiting for RECONNECT");
            }
        }
    }

    fn finished(&self) -> bool {
        self.server_eof
            && self.up_fin_sent
            && self
                .live_path()
                .is_some_and(|p| p.fin_sent && p.acked() == Some(self.down_read()))
    }

    /// Runs the session to its end; returns the reason.
    pub(crate) async fn run(mut self, attach_rx: mpsc::Receiver<Attach>) -> String {
        let reason = self.run_loop(attach_rx).await;
        if !self.finished() {
            // An abnormal end (park or idle timeout, shutdown, server failure) resets the
            // mobile side: a FIN there would read as the server's FIN to the client.
            if let Some(p) = &self.path {
                let _ = socket2::SockRef::from(&p.stream).set_linger(Some(Duration::ZERO));
            }
        }
        format!("{reason}; moves={}", self.moves)
    }

    async fn run_loop(&mut self, mut attach_rx: mpsc::Receiver<Attach>) -> String {
        let idle = self.shared.config.limits.idle_timeout;
        let park_timeout = self.shared.config.mobility.park_timeout;
        loop {
            self.trim();
            if self.finished() {
                return "closed by both ends".into();
            }
            let limit = self.retention_limit();
            let alive = self.live_path().is_some();
            let want_server_read = !self.server_eof && self.retained.len() < limit;
            let want_client_write = alive && self.down_sent < self.down_read();
            let want_client_read =
                alive && !self.client_eof && self.up_pending_pos >= self.up_pending.len();
            let want_server_write = self.up_pending_pos < self.up_pending.len();
            if alive && self.server_eof && self.down_sent == self.down_read() {
                if let Some(p) = self.path.as_mut().filter(|p| !p.fin_sent) {
                    let _ = socket2::SockRef::from(&p.stream).shutdown(std::net::Shutdown::Write);
                    p.fin_sent = true;
                }
            }
            if self.client_eof && !want_server_write && !self.up_fin_sent {
                let _ = socket2::SockRef::from(&self.server).shutdown(std::net::Shutdown::Write);
                self.up_fin_sent = true;
            }
            // Without the second case a full retention buffer whose bytes were all sent would
            // wait for an event that never comes: the server is not read (no room), nothing is
            // left to write to the client, and its ACKs wake nobody.
            let waiting_for_acks = alive
                && ((self.server_eof && self.up_fin_sent)
                    || (!self.server_eof && self.retained.len() >= limit));
            let park_deadline = self.parked_since.map(|t| t + park_timeout);
            let idle_deadline = (!idle.is_zero() && alive).then(|| self.last_activity + idle);
            let server = &self.server;
            let path = self.path.as_ref().map(|p| &p.stream);
            tokio::select! {
                r = server.readable(), if want_server_read => {
                    if let Err(e) = r { return server_failed(e); }
                    let room = (limit - self.retained.len()).min(self.read_buf.len());
                    let urgent = tcp_state::at_urgent_mark(&self.server).unwrap_or(false);
                    match self.server.try_read(&mut self.read_buf[..room]) {
                        Ok(0) => self.server_eof = true,
                        Ok(n) => {
                            if urgent {
                                let at = self.down_read();
                                self.urgent_down.push_back(at);
                                if self.urgent_history.len() < URGENT_HISTORY_LIMIT {
                                    self.urgent_history.push(at);
                                } else if self.urgent_history.len() == URGENT_HISTORY_LIMIT {
                                    warn!(session = self.client.id, "more urgent bytes than can be remembered: an out-of-band client's counters may be off after a move");
                                }
                            }
                            self.retained.extend(&self.read_buf[..n]);
                            self.last_activity = Instant::now();
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return server_failed(e),
                    }
                }
                r = async { path.expect("guarded by want_client_write").writable().await }, if want_client_write => {
                    match r {
                        Ok(()) => self.write_to_client(),
                        Err(e) => self.park(&format!("write readiness: {e}")),
                    }
                }
                r = async { path.expect("guarded by want_client_read").readable().await }, if want_client_read => {
                    match r {
                        Ok(()) => self.read_from_client(),
                        Err(e) => self.park(&format!("read readiness: {e}")),
                    }
                }
                r = server.writable(), if want_server_write => {
                    if let Err(e) = r { return server_failed(e); }
                    let written = self.up_written();
                    let next_urgent = self.urgent_up.front().copied();
                    let pending = &self.up_pending[self.up_pending_pos..];
                    let result = match next_urgent {
                        Some(u) if u == written => {
                            let sent = send_urgent(&self.server, pending[0]);
                            if sent.is_ok() {
                                self.urgent_up.pop_front();
                            }
                            sent
                        }
                        Some(u) => self.server.try_write(&pending[..((u - written) as usize).min(pending.len())]),
                        None => self.server.try_write(pending),
                    };
                    match result {
                        Ok(n) => {
                            self.up_pending_pos += n;
                            self.traffic.up.fetch_add(n as u64, Ordering::Relaxed);
                            if self.up_pending_pos == self.up_pending.len() {
                                self.up_pending.clear();
                                self.up_pending_pos = 0;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return server_failed(e),
                    }
                }
                a = attach_rx.recv() => match a {
                    Some(a) => self.attach(a).await,
                    None => return "session table closed".into(),
                },
                () = tokio::time::sleep(ACK_POLL), if waiting_for_acks => {}
                () = sleep_until_opt(park_deadline) => {
                    return format!("no RECONNECT within the park timeout ({park_timeout:?})");
                }
                () = sleep_until_opt(idle_deadline) => {
                    if Instant::now() >= self.last_activity + idle {
                        return "idle timeout".into();
                    }
                }
                () = self.shared.abort.cancelled() => return "proxy shutdown".into(),
            }
        }
    }

    fn write_to_client(&mut self) {
        let Some(p) = self.path.as_mut() else { return };
        let idx = (self.down_sent - self.base) as usize;
        let (a, b) = self.retained.as_slices();
        let chunk = if idx < a.len() {
            &a[idx..]
        } else {
            &b[idx - a.len()..]
        };
        // An urgent byte goes alone, with MSG_OOB; ordinary bytes stop just before it.
        let next_urgent = self.urgent_down.partition_point(|&u| u < self.down_sent);
        let result = match self.urgent_down.get(next_urgent) {
            Some(&u) if u == self.down_sent => send_urgent(&p.stream, chunk[0]),
            Some(&u) => {
                let before = ((u - self.down_sent) as usize).min(chunk.len());
                p.stream.try_write(&chunk[..before])
            }
            None => p.stream.try_write(chunk),
        };
        match result {
            Ok(n) => {
                self.down_sent += n as u64;
                self.down_sent_max = self.down_sent_max.max(self.down_sent);
                p.written += n as u64;
                self.traffic.down.fetch_add(n as u64, Ordering::Relaxed);
                self.last_activity = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => self.park(&format!("write failed: {e}")),
        }
    }

    fn read_from_client(&mut self) {
        let Some(p) = self.path.as_mut() else { return };
        let urgent = tcp_state::at_urgent_mark(&p.stream).unwrap_or(false);
        match p.stream.try_read(&mut self.read_buf) {
            Ok(0) => self.client_eof = true,
            Ok(n) => {
                self.last_activity = Instant::now();
                let skip = self.up_skip.min(n as u64) as usize;
                self.up_skip -= skip as u64;
                if skip == n {
                    return;
                }
                // An urgent mark on a skipped byte was recorded when the byte first came.
                if urgent && skip == 0 {
                    self.urgent_up.push_back(self.up_received);
                }
                self.up_pending.clear();
                self.up_pending.extend_from_slice(&self.read_buf[skip..n]);
                self.up_pending_pos = 0;
                self.up_received += (n - skip) as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => self.park(&format!("read failed: {e}")),
        }
    }

    /// Takes every byte the old mobile-side connection still holds (it was acknowledged to
    /// the mobile node, so it counts as received).
    fn drain_old_path(&mut self) {
        let Some(p) = self.path.as_mut() else { return };
        if self.client_eof {
            return;
        }
        loop {
            let urgent = tcp_state::at_urgent_mark(&p.stream).unwrap_or(false);
            match p.stream.try_read(&mut self.read_buf) {
                // Not taken as the client's FIN: a socket whose error was already reported
                // also reads as end-of-file. A client that had shut down its sending side
                // repeats the shutdown on the new connection (docs/PROTOCOL.md 3.7).
                Ok(0) => return,
                Ok(n) => {
                    // The rest of an early resend's duplicate prefix may still be here.
                    let skip = self.up_skip.min(n as u64) as usize;
                    self.up_skip -= skip as u64;
                    if skip == n {
                        continue;
                    }
                    if urgent && skip == 0 {
                        self.urgent_up.push_back(self.up_received);
                    }
                    if self.up_pending_pos > 0 {
                        self.up_pending.drain(..self.up_pending_pos);
                        self.up_pending_pos = 0;
                    }
                    self.up_pending.extend_from_slice(&self.read_buf[skip..n]);
                    self.up_received += (n - skip) as u64;
                }
                Err(_) => return,
            }
        }
    }

    async fn attach(&mut self, mut a: Attach) {
        self.drain_old_path();
        self.trim();
        let pos = SessionPosition {
            read_origin: self.options.read_origin,
            write_origin: self.options.write_origin,
            down_sent: self.down_sent_max,
            down_acked: self.base,
            up_received: self.up_received,
        };
        // A client reading urgent data out of band counts only in-band bytes: translate its
        // data_read into the stream, and the salvage back into in-band bytes (III-B.6).
        let out_of_band = !a.oob_inline;
        let data_read = if out_of_band {
            let inband = offset(a.data_read, self.options.read_origin);
            counter_at(
                self.options.read_origin,
                stream_offset_of_inband(inband, &self.urgent_history),
            )
        } else {
            a.data_read
        };
        let splice = match resplice(&pos, data_read, a.data_written) {
            Ok(mut s) if out_of_band => {
                let from = s.resume_down_at - s.counters.data_salvage;
                s.counters.data_salvage =
                    inband_bytes_in(from, s.resume_down_at, &self.urgent_history);
                s
            }
            Ok(s) => s,
            Err(e) => {
                let _ = send_reply(&mut a.stream, &Reply::failure(ReplyCode::BadCounters)).await;
                warn!(session = self.client.id, from = %a.peer, error = %e, position = ?pos, "RECONNECT refused: impossible counters (0x81); session unchanged");
                let _ = a.done.send(Err(format!("impossible counters: {e}")));
                return;
            }
        };
        // Early resend: the new connection's bytes start at RESEND_FROM, which must not lie
        // beyond what the proxy has (that would leave a hole) nor further back than a
        // client can keep.
        let skip = match a.resend_from {
            None => 0,
            Some(from) => {
                let from = offset(from, self.options.write_origin);
                let written = offset(a.data_written, self.options.write_origin);
                if from > self.up_received
                    || written < from
                    || written - from > msocks_proto::resplice::MAX_RESPLICE_SPAN
                {
                    let _ =
                        send_reply(&mut a.stream, &Reply::failure(ReplyCode::BadCounters)).await;
                    warn!(session = self.client.id, from = %a.peer, resend_from = from, received = self.up_received, written,
                        "RECONNECT refused: impossible RESEND_FROM (0x81); session unchanged");
                    let _ = a.done.send(Err("impossible RESEND_FROM".into()));
                    return;
                }
                self.up_received - from
            }
        };
        let bound = self
            .server
            .local_addr()
            .map(TargetAddr::Ip)
            .unwrap_or(TargetAddr::UNSPECIFIED);
        let reply = Reply {
            code: ReplyCode::Succeeded,
            bound,
            extension: ReplyExtension::Resume(splice.counters),
        };
        let sent = tokio::time::timeout(
            self.shared.config.limits.handshake_timeout,
            send_reply(&mut a.stream, &reply),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            let _ = a
                .done
                .send(Err("the new connection failed before the reply".into()));
            return;
        }
        let _ = a.stream.flush().await;
        // Bytes before the resume point are with the application already (read, or waiting
        // in the old socket to be salvaged).
        let drop_n = (splice.resume_down_at - self.base).min(self.retained.len() as u64);
        self.retained.drain(..drop_n as usize);
        self.base += drop_n;
        self.down_sent = splice.resume_down_at;
        let old = self
            .path
            .replace(MobilePath::new(a.stream, a.peer, splice.resume_down_at));
        let old_peer = old.as_ref().map(|p| p.peer.to_string()).unwrap_or_default();
        drop(old);
        self.parked_since = None;
        self.last_activity = Instant::now();
        self.moves += 1;
        // What arrived with the request is the start of the early resend.
        self.up_skip = skip;
        let early_skip = self.up_skip.min(a.early.len() as u64) as usize;
        self.up_skip -= early_skip as u64;
        if early_skip < a.early.len() {
            if self.up_pending_pos > 0 {
                self.up_pending.drain(..self.up_pending_pos);
                self.up_pending_pos = 0;
            }
            self.up_pending.extend_from_slice(&a.early[early_skip..]);
            self.up_received += (a.early.len() - early_skip) as u64;
        }
        let summary = format!(
            "resumed at {} (from {old_peer} to {}): data_salvage={} data_write={} moves={}",
            splice.resume_down_at,
            a.peer,
            splice.counters.data_salvage,
            splice.counters.data_write,
            self.moves
        );
        info!(session = self.client.id, from = %old_peer, to = %a.peer, resume_at = splice.resume_down_at,
            data_salvage = splice.counters.data_salvage, data_write = splice.counters.data_write, moves = self.moves,
            "session resumed on a new connection");
        let _ = a.done.send(Ok(summary));
    }
}

/// The server connection failed: the session cannot continue (`run` then resets the mobile
/// side, so the application sees the failure as it would on a direct connection).
fn server_failed(e: std::io::Error) -> String {
    format!("server error: {e}")
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends one urgent byte (`MSG_OOB`) through the runtime's readiness tracking, like
/// `try_write`: a `WouldBlock` clears the socket's write readiness, so the engine waits for
/// room instead of finding the socket "writable" again at once and spinning. (Seen: after a
/// link went down with an urgent byte next, the session's task spun on the full send buffer,
/// and the RECONNECT meant to move it timed out, again and again.)
fn send_urgent(stream: &TcpStream, byte: u8) -> std::io::Result<usize> {
    stream.try_io(tokio::io::Interest::WRITABLE, || {
        socket2::SockRef::from(stream).send_with_flags(&[byte], libc::MSG_OOB)
    })
}
