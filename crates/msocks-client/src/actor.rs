//! The task behind each [`MobileStream`]: it owns the connection(s) to the proxy, the
//! counters and the ring buffer, pumps bytes between the application's pipe and the socket,
//! and carries out moves (paper III-C).
//!
//! Everything happens in one `select!` loop over readiness, never inside a partial write:
//! socket writes are `writable()` + `try_write`, and unwritten bytes stay in a buffer. So a
//! control command or a failure can be handled at any moment, and the counters are always
//! exact: `data_read` grows by what `try_read` returned, `data_written` by what `try_write`
//! accepted.
//!
//! A move runs beside the pump as up to two futures polled by the same loop:
//!
//! 1. `connecting` (migrations only): the new TCP connection. The old connection keeps
//!    carrying data meanwhile (make-before-break).
//! 2. `resuming`: the old socket is frozen for writing (so `data_written` is final), then
//!    greeting, credentials and RECONNECT go out on the new connection and the reply comes
//!    back; for an automatic reconnect this future also makes the connections, over the
//!    configured paths with backoff, until the deadline.
//!
//! While they run the application side keeps going: buffered bytes are delivered, the old
//! socket is still read (the server's bytes the proxy sent before the RECONNECT reach the
//! application without waiting for the reply), and the application may write until the
//! pipe is full. On success the rest of the salvage is read from the old socket (the reply's
//! `data_salvage` counts from the RECONNECT's `data_read`; what was read ahead beyond it comes
//! again on the new connection and is dropped there), the rewrite is queued ahead of new
//! data, and the old socket is closed.

use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use msocks_proto::resplice::MAX_RESPLICE_SPAN;
use msocks_proto::ConnectionId;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::config::{MobileConfig, ProxyPath};
use crate::handshake::{
    self, open_socket, reconnect_on, EarlyResend, Handshake, Opened, ReconnectParams, Resumed,
    ResumedStream, SocketOptions,
};
use crate::ring::Ring;
use crate::standby::Standby;
use crate::stream::{MobileControl, MobileStream, MoveReport, Shared, StreamState, StreamStatus};
use crate::{sys, Error};

/// Bytes taken from the socket or the application per operation.
const CHUNK: usize = 16 * 1024;

/// How often a writer that has filled the ring's worth of unacknowledged bytes checks
/// whether acknowledgments arrived. Rarely needed: the kernel's own `SO_SNDBUF` limit
/// (counted with overhead) usually stops writes first.
const WINDOW_POLL: Duration = Duration::from_millis(2);

/// A request from a [`MobileControl`].
pub(crate) enum ControlCommand {
    /// Move the stream to `path`.
    Migrate {
        path: ProxyPath,
        /// A standby connection on `path` to carry the RECONNECT (a warm move).
        standby: Option<Standby>,
        requested: Instant,
        reply: oneshot::Sender<Result<MoveReport, Error>>,
    },
}

/// A connection a migration already made, for the first RECONNECT attempt.
struct FirstAttempt {
    stream: TcpStream,
    path: ProxyPath,
    connect_time: Duration,
    /// The handshake buffer of a standby connection (already authenticated); `None` for a
    /// fresh connection.
    warm: Option<Handshake>,
    /// Set by `begin_resume`: the resend to send behind the RECONNECT.
    early: Option<EarlyResend>,
}

/// An early resend under way (PROTOCOL.md 3.7.1): the RECONNECT went out with the resend
/// behind it, and new application bytes go to the new connection before the reply.
struct EarlyState {
    /// The new connection's write half, once the attempt handed it over.
    writer: Option<OwnedWriteHalf>,
    writer_rx: Option<oneshot::Receiver<OwnedWriteHalf>>,
    /// Every byte from here on is unconfirmed until the reply: the ring must keep them.
    resend_from: u64,
    /// `data_written` when the old connection was frozen.
    frozen_written: u64,
    /// A write on the new connection failed; wait for the attempt's verdict.
    broken: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Bytes waiting in one direction, consumed from the front.
#[derive(Debug, Default)]
struct Buf {
    data: Vec<u8>,
    pos: usize,
}

impl Buf {
    fn from_vec(data: Vec<u8>) -> Self {
        Buf { data, pos: 0 }
    }

    fn is_empty(&self) -> bool {
        self.pos == self.data.len()
    }

    fn chunk(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    fn advance(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.data.len());
        if self.pos == self.data.len() {
            self.clear();
        }
    }

    fn extend(&mut self, bytes: &[u8]) {
        self.data.extend_from_slice(bytes);
    }

    fn clear(&mut self) {
        self.data.clear();
        self.pos = 0;
    }
}

/// A connection to the proxy and what the task knows about it.
struct Conn {
    stream: TcpStream,
    path: ProxyPath,
    /// No more writes: a RECONNECT with this connection's final counters is (about to be)
    /// on its way, and the proxy may detach this connection at any moment, so even its FIN
    /// would be meaningless. Reads go on while the reply is awaited (see `ahead_open`).
    frozen: bool,
    /// An I/O error happened on it.
    failed: bool,
    /// A frozen connection may still be read (the server's bytes the proxy sent before
    /// the RECONNECT, delivered without waiting for the reply) until it ends or fails; then
    /// this is false, and the end is not the server's FIN (the proxy closes a detached
    /// connection).
    ahead_open: bool,
}

impl Conn {
    fn new(stream: TcpStream, path: ProxyPath) -> Self {
        Conn {
            stream,
            path,
            frozen: false,
            failed: false,
            ahead_open: true,
        }
    }

    fn active(&self) -> bool {
        !self.frozen && !self.failed
    }

    /// Frozen for a move, and still readable.
    fn reading_ahead(&self) -> bool {
        self.frozen && !self.failed && self.ahead_open
    }
}

/// The move under way.
struct PendingMove {
    target: Option<ProxyPath>,
    requested: Instant,
    reply: Option<oneshot::Sender<Result<MoveReport, Error>>>,
}

/// A RECONNECT that got its reply.
struct ResumeOk {
    resumed: Resumed,
    attempts: u32,
}

/// A move that ended without a new connection.
struct ResumeFailure {
    error: Error,
    /// The proxy refused the new connection before it could read RECONNECT, so the old
    /// connection is still attached and may be used again.
    old_intact: bool,
    /// An attempt with an early resend failed in a way worth retrying: the task retries
    /// with its current counters (bytes were written meanwhile), without early resend.
    fresh_retry: bool,
}

enum Event {
    SockReadable(io::Result<()>),
    SockWritable(io::Result<()>),
    WindowPoll,
    AppRead(io::Result<usize>),
    AppWrote(io::Result<usize>),
    AppDropped,
    Control(Option<ControlCommand>),
    Connected(Result<(TcpStream, Duration), Error>),
    Resumed(Result<ResumeOk, ResumeFailure>),
    EarlyWriter(Result<OwnedWriteHalf, oneshot::error::RecvError>),
    EarlyWritable(io::Result<()>),
}

struct Actor {
    cfg: Arc<MobileConfig>,
    opts: SocketOptions,
    id: ConnectionId,
    shared: Arc<Shared>,
    control: mpsc::Receiver<ControlCommand>,
    control_open: bool,
    app_r: ReadHalf<DuplexStream>,
    app_w: WriteHalf<DuplexStream>,
    app_alive: oneshot::Receiver<()>,
    app_buf: Box<[u8]>,
    conn: Conn,
    ring: Ring,
    data_read: u64,
    data_written: u64,
    /// Server-to-client bytes taken from sockets, not yet in the pipe.
    down: Buf,
    /// Application bytes taken from the pipe, not yet written into a socket.
    up: Buf,
    /// Bytes to write again into a new connection before `up` (not counted again).
    rewrite: Buf,
    /// The application shut down its writing direction.
    up_eof: bool,
    /// FIN was sent on the current connection.
    fin_sent: bool,
    /// The server's FIN arrived; nothing more will come from any connection.
    down_eof: bool,
    /// The FIN was passed on to the application.
    eof_delivered: bool,
    /// The application dropped the stream.
    app_gone: bool,
    /// `ring capacity` bytes are unacknowledged; wait before writing more.
    window_blocked: bool,
    moves: u64,
    pending: Option<PendingMove>,
    connecting: Option<BoxFuture<Result<(TcpStream, Duration), Error>>>,
    resuming: Option<BoxFuture<Result<ResumeOk, ResumeFailure>>>,
    early: Option<EarlyState>,
    /// `data_read` and `data_written` in the RECONNECT being carried out.
    resume_counters: (u64, u64),
    /// Bytes still to drop from the front of the new connection's stream: the application
    /// read them from the old connection while the RECONNECT was on its way.
    skip_down: u64,
    /// The proxy refused FLAGS bit 1 (an older proxy): no more early resends.
    early_unsupported: bool,
    /// Attempts of this move before an early-resend attempt was retried the plain way.
    prior_attempts: u32,
}

/// Starts the task for a freshly opened session and returns the application's end.
pub(crate) fn spawn(opened: Opened, cfg: MobileConfig) -> Result<MobileStream, Error> {
    let Opened {
        stream,
        path,
        id,
        bound,
        hs,
    } = opened;
    let ring_capacity = handshake::send_buffer_of(&stream)?;
    let leftover = hs.into_leftover();
    // Bytes that arrived with the reply were taken out of the socket: they count as read.
    let data_read = cfg.read_origin.wrapping_add(leftover.len() as u64);
    let status = StreamStatus {
        id,
        path: path.clone(),
        data_read,
        data_written: cfg.write_origin,
        moves: 0,
        state: StreamState::Connected,
        last_move: None,
    };
    let shared = Arc::new(Shared::new(status));
    let (app_end, task_end) = tokio::io::duplex(cfg.pipe_capacity);
    let (app_r, app_w) = tokio::io::split(task_end);
    let (control_tx, control_rx) = mpsc::channel(8);
    let (alive_tx, alive_rx) = oneshot::channel();
    let actor = Actor {
        opts: SocketOptions::from_config(&cfg),
        data_written: cfg.write_origin,
        cfg: Arc::new(cfg),
        id,
        shared: shared.clone(),
        control: control_rx,
        control_open: true,
        app_r,
        app_w,
        app_alive: alive_rx,
        app_buf: vec![0u8; CHUNK].into_boxed_slice(),
        conn: Conn::new(stream, path),
        ring: Ring::new(ring_capacity),
        data_read,
        down: Buf::from_vec(leftover),
        up: Buf::default(),
        rewrite: Buf::default(),
        up_eof: false,
        fin_sent: false,
        down_eof: false,
        eof_delivered: false,
        app_gone: false,
        window_blocked: false,
        moves: 0,
        pending: None,
        connecting: None,
        resuming: None,
        early: None,
        resume_counters: (0, 0),
        skip_down: 0,
        early_unsupported: false,
        prior_attempts: 0,
    };
    tokio::spawn(actor.run());
    let control = MobileControl {
        tx: control_tx,
        shared,
    };
    Ok(MobileStream::new(
        app_end,
        control,
        id,
        bound,
        ring_capacity,
        alive_tx,
    ))
}

async fn poll_slot<T>(slot: &mut Option<BoxFuture<T>>) -> T {
    match slot {
        Some(fut) => fut.await,
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(mut self) {
        let outcome = self.pump().await;
        match outcome {
            Ok(()) => {
                tracing::debug!(token = %self.id.token, "mobile stream closed");
                self.shared.lock().status.state = StreamState::Closed;
            }
            Err(err) => {
                tracing::warn!(token = %self.id.token, error = %err, "mobile stream failed");
                {
                    // Recorded before the pipe closes (when `self` drops below), so the
                    // application's next read finds the reason instead of a clean EOF.
                    let mut inner = self.shared.lock();
                    inner.failure = Some(err.clone());
                    inner.status.state = StreamState::Failed;
                }
                if let Some(reply) = self.pending.take().and_then(|p| p.reply) {
                    let _ = reply.send(Err(err));
                }
            }
        }
    }

    async fn pump(&mut self) -> Result<(), Error> {
        loop {
            self.publish_counters();
            if self.down_eof && self.down.is_empty() && !self.eof_delivered && !self.app_gone {
                self.shared.lock().clean_eof = true;
                // Shutting down a pipe end never waits; an error means the application is
                // gone, which the next write will notice.
                let _ = self.app_w.shutdown().await;
                self.eof_delivered = true;
            }
            if self.finished() {
                return Ok(());
            }
            let event = self.next_event().await;
            self.handle(event).await?;
        }
    }

    /// Both directions are done: the application's bytes and FIN went out and the server's
    /// FIN reached the application (or nobody is left to read).
    fn finished(&self) -> bool {
        self.pending.is_none()
            && self.up_eof
            && self.up.is_empty()
            && self.rewrite.is_empty()
            && self.fin_sent
            && (self.eof_delivered || self.app_gone)
    }

    fn publish_counters(&self) {
        let mut inner = self.shared.lock();
        inner.status.data_read = self.data_read;
        inner.status.data_written = self.data_written;
    }

    fn set_state(&self, state: StreamState) {
        self.shared.lock().status.state = state;
    }

    async fn next_event(&mut self) -> Event {
        let active = self.conn.active();
        let want_sock_read = (active || (self.conn.reading_ahead() && self.resuming.is_some()))
            && !self.down_eof
            && self.down.is_empty()
            && !self.app_gone;
        let has_output =
            !self.rewrite.is_empty() || !self.up.is_empty() || (self.up_eof && !self.fin_sent);
        let want_sock_write = active && has_output && !self.window_blocked;
        let want_window_poll = active && has_output && self.window_blocked;
        let want_app_read = !self.up_eof && self.up.is_empty();
        let want_app_write = !self.down.is_empty() && !self.app_gone;
        let want_control = self.control_open && self.pending.is_none();
        let want_alive = !self.app_gone;
        let want_connecting = self.connecting.is_some();
        let want_resuming = self.resuming.is_some();
        let want_early_writer = self.early.as_ref().is_some_and(|e| e.writer_rx.is_some());
        let want_early_write = !self.up.is_empty()
            && self
                .early
                .as_ref()
                .is_some_and(|e| e.writer.is_some() && !e.broken && self.early_room(e) > 0);
        let Actor {
            conn,
            app_r,
            app_w,
            app_alive,
            app_buf,
            down,
            control,
            connecting,
            resuming,
            early,
            ..
        } = self;
        let stream = &conn.stream;
        let (early_rx, early_w) = match early {
            Some(e) => (e.writer_rx.as_mut(), e.writer.as_ref()),
            None => (None, None),
        };
        tokio::select! {
            r = async { match early_rx { Some(rx) => rx.await, None => std::future::pending().await } }, if want_early_writer => Event::EarlyWriter(r),
            r = async { match early_w { Some(w) => w.writable().await, None => std::future::pending().await } }, if want_early_write => Event::EarlyWritable(r),
            r = stream.readable(), if want_sock_read => Event::SockReadable(r),
            r = stream.writable(), if want_sock_write => Event::SockWritable(r),
            () = tokio::time::sleep(WINDOW_POLL), if want_window_poll => Event::WindowPoll,
            r = app_r.read(app_buf), if want_app_read => Event::AppRead(r),
            r = app_w.write(down.chunk()), if want_app_write => Event::AppWrote(r),
            _ = app_alive, if want_alive => Event::AppDropped,
            c = control.recv(), if want_control => Event::Control(c),
            r = poll_slot(connecting), if want_connecting => Event::Connected(r),
            r = poll_slot(resuming), if want_resuming => Event::Resumed(r),
        }
    }

    async fn handle(&mut self, event: Event) -> Result<(), Error> {
        match event {
            Event::SockReadable(Ok(())) => self.read_socket(),
            Event::SockWritable(Ok(())) => self.write_socket(),
            Event::SockReadable(Err(e)) | Event::SockWritable(Err(e)) => self.conn_failed(e),
            Event::WindowPoll => {
                self.window_blocked = false;
                Ok(())
            }
            Event::AppRead(Ok(0)) | Event::AppRead(Err(_)) => {
                // End of the application's writing direction (shutdown or drop). A pipe
                // read has no other error, so one is treated the same way.
                self.up_eof = true;
                Ok(())
            }
            Event::AppRead(Ok(n)) => {
                self.up.extend(&self.app_buf[..n]);
                Ok(())
            }
            Event::AppWrote(Ok(n)) => {
                self.down.advance(n);
                Ok(())
            }
            Event::AppWrote(Err(_)) | Event::AppDropped => {
                self.app_gone();
                Ok(())
            }
            Event::Control(None) => {
                self.control_open = false;
                Ok(())
            }
            Event::Control(Some(command)) => {
                self.start_migration(command);
                Ok(())
            }
            Event::Connected(result) => {
                self.connecting = None;
                self.on_connected(result)
            }
            Event::Resumed(result) => {
                self.resuming = None;
                self.on_resumed(result).await
            }
            Event::EarlyWriter(r) => {
                if let Some(e) = self.early.as_mut() {
                    e.writer_rx = None;
                    match r {
                        Ok(w) => e.writer = Some(w),
                        Err(_) => e.broken = true,
                    }
                }
                Ok(())
            }
            Event::EarlyWritable(Ok(())) => {
                self.write_early();
                Ok(())
            }
            Event::EarlyWritable(Err(_)) => {
                if let Some(e) = self.early.as_mut() {
                    e.broken = true;
                }
                Ok(())
            }
        }
    }

    fn app_gone(&mut self) {
        if !self.app_gone {
            tracing::debug!(token = %self.id.token, "application dropped the stream");
        }
        self.app_gone = true;
        // Nobody will read these; like close() on a socket with unread data.
        self.down.clear();
    }

    fn read_socket(&mut self) -> Result<(), Error> {
        // Only called with `down` empty, so the buffer is reused from the start.
        self.down.clear();
        self.down.data.resize(CHUNK, 0);
        let result = self.conn.stream.try_read(&mut self.down.data);
        let n = *result.as_ref().unwrap_or(&0);
        self.down.data.truncate(n);
        // Bytes of this connection that the application already read from the one before.
        let skip = usize::try_from(self.skip_down).unwrap_or(usize::MAX).min(n);
        if skip > 0 {
            self.down.advance(skip);
            self.skip_down -= skip as u64;
        }
        if self.conn.frozen {
            // Reading ahead on a connection a RECONNECT is detaching: its end is the proxy
            // closing it (or the link), not the server's FIN, and its errors are for the
            // salvage to find.
            match &result {
                Ok(0) => self.conn.ahead_open = false,
                Ok(n) => self.data_read = self.data_read.wrapping_add((*n - skip) as u64),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => self.conn.ahead_open = false,
            }
            return Ok(());
        }
        match result {
            Ok(0) => {
                tracing::debug!(token = %self.id.token, "server finished its direction (FIN)");
                self.down_eof = true;
                Ok(())
            }
            Ok(n) => {
                self.data_read = self.data_read.wrapping_add((n - skip) as u64);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => self.conn_failed(e),
        }
    }

    fn write_socket(&mut self) -> Result<(), Error> {
        if self.rewrite.is_empty() && self.up.is_empty() {
            if self.up_eof && !self.fin_sent {
                // FIN goes after every byte written before it, in the kernel's queue.
                match SockRef::from(&self.conn.stream).shutdown(Shutdown::Write) {
                    Ok(()) => self.fin_sent = true,
                    Err(e) => return self.conn_failed(e),
                }
            }
            return Ok(());
        }
        // Never more than the ring's capacity unacknowledged: those are the bytes a
        // RECONNECT can ask for again, and the ring must still hold all of them.
        let unacked = match sys::unacked_bytes(&self.conn.stream) {
            Ok(n) => n,
            Err(e) => return self.conn_failed(e),
        };
        let allowed = self.ring.capacity().saturating_sub(unacked);
        if allowed == 0 {
            self.window_blocked = true;
            return Ok(());
        }
        let rewriting = !self.rewrite.is_empty();
        let pending = if rewriting {
            self.rewrite.chunk()
        } else {
            self.up.chunk()
        };
        let chunk = &pending[..pending.len().min(allowed)];
        match self.conn.stream.try_write(chunk) {
            Ok(n) => {
                if rewriting {
                    // Already counted and already in the ring: these bytes only fill the hole.
                    self.rewrite.advance(n);
                } else {
                    self.ring.push(&chunk[..n]);
                    self.data_written = self.data_written.wrapping_add(n as u64);
                    self.up.advance(n);
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => self.conn_failed(e),
        }
    }

    /// Bytes the application may still write during an early resend: every byte since
    /// RESEND_FROM is unconfirmed until the reply, and the ring must still hold them all.
    fn early_room(&self, e: &EarlyState) -> usize {
        let unconfirmed = self.data_written.wrapping_sub(e.resend_from);
        usize::try_from(unconfirmed)
            .map(|u| self.ring.capacity().saturating_sub(u))
            .unwrap_or(0)
    }

    /// Writes application bytes into the new connection before its RECONNECT reply.
    fn write_early(&mut self) {
        let room = match self.early.as_ref() {
            Some(e) => self.early_room(e),
            None => return,
        };
        let Some(e) = self.early.as_mut() else { return };
        let Some(w) = e.writer.as_ref() else { return };
        let pending = self.up.chunk();
        let chunk = &pending[..pending.len().min(room)];
        if chunk.is_empty() {
            return;
        }
        match w.try_write(chunk) {
            Ok(n) => {
                self.ring.push(&chunk[..n]);
                self.data_written = self.data_written.wrapping_add(n as u64);
                self.up.advance(n);
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            // The attempt itself will fail or succeed; either way its verdict decides.
            Err(_) => e.broken = true,
        }
    }

    /// Sets up an early resend for a RECONNECT about to go out on a new connection, if the
    /// old socket says how much of it the proxy's TCP acknowledged (Linux `SIOCOUTQ`) and the
    /// ring still holds everything after that point.
    fn prepare_early(&mut self) -> Option<EarlyResend> {
        if !self.cfg.early_resend
            || self.early_unsupported
            || !cfg!(target_os = "linux")
            || self.conn.failed
        {
            return None;
        }
        // A reset purges the send queue, which would then claim every byte acknowledged:
        // only a socket without a pending error tells the truth.
        if !matches!(SockRef::from(&self.conn.stream).take_error(), Ok(None)) {
            return None;
        }
        let outq = sys::unacked_bytes(&self.conn.stream).ok()? as u64;
        // Pending rewrite bytes are counted in `data_written` but not yet in the socket.
        let pending = self.rewrite.chunk().len() as u64;
        let old_end = self.data_written.wrapping_sub(pending);
        let resend_from = old_end.wrapping_sub(outq);
        let n = usize::try_from(self.data_written.wrapping_sub(resend_from)).ok()?;
        let bytes = self.ring.last(n)?;
        let (writer, writer_rx) = oneshot::channel();
        self.rewrite.clear();
        self.early = Some(EarlyState {
            writer: None,
            writer_rx: Some(writer_rx),
            resend_from,
            frozen_written: old_end,
            broken: false,
        });
        Some(EarlyResend {
            resend_from,
            bytes,
            writer,
        })
    }

    /// The current connection failed: reconnect automatically (or fail the stream).
    fn conn_failed(&mut self, err: io::Error) -> Result<(), Error> {
        if self.conn.failed {
            return Ok(());
        }
        tracing::warn!(
            token = %self.id.token,
            path = %self.conn.path,
            error = %err,
            "connection to the proxy failed"
        );
        self.conn.failed = true;
        if !self.cfg.auto_reconnect {
            return Err(Error::io("stream data", err));
        }
        if self.connecting.is_some() || self.resuming.is_some() {
            // A migration is under way and will carry the stream on.
            return Ok(());
        }
        self.start_auto_reconnect();
        Ok(())
    }

    /// Reconnects over the configured paths, in order, after the connection failed.
    fn start_auto_reconnect(&mut self) {
        self.prior_attempts = 0;
        self.pending = Some(PendingMove {
            target: None,
            requested: Instant::now(),
            reply: None,
        });
        let paths = self.cfg.paths.clone();
        self.begin_resume(None, paths);
    }

    fn start_migration(&mut self, command: ControlCommand) {
        let ControlCommand::Migrate {
            path,
            standby,
            requested,
            reply,
        } = command;
        tracing::debug!(token = %self.id.token, from = %self.conn.path, to = %path, warm = standby.is_some(), "migration requested");
        self.prior_attempts = 0;
        if let Some(standby) = standby {
            let home = path.reconnect_target(self.id.home);
            if standby.proxy != home {
                let _ = reply.send(Err(Error::Config(format!(
                    "the standby connection goes to {} but this session's RECONNECT must go to {home}",
                    standby.proxy
                ))));
                return;
            }
            self.pending = Some(PendingMove {
                target: Some(path.clone()),
                requested,
                reply: Some(reply),
            });
            let mut paths = vec![path.clone()];
            paths.extend(self.cfg.paths.iter().filter(|p| **p != path).cloned());
            let first = FirstAttempt {
                stream: standby.stream,
                path,
                connect_time: Duration::ZERO,
                warm: Some(standby.hs),
                early: None,
            };
            self.begin_resume(Some(first), paths);
            return;
        }
        let dest = path.reconnect_target(self.id.home);
        let opts = self.opts.clone();
        let target = path.clone();
        self.connecting = Some(Box::pin(async move {
            let started = Instant::now();
            let stream = open_socket(&target, dest, &opts).await?;
            Ok((stream, started.elapsed()))
        }));
        self.pending = Some(PendingMove {
            target: Some(path),
            requested,
            reply: Some(reply),
        });
        self.set_state(StreamState::Moving);
    }

    fn on_connected(&mut self, result: Result<(TcpStream, Duration), Error>) -> Result<(), Error> {
        let target = self.pending.as_ref().and_then(|p| p.target.clone());
        match (result, target) {
            (Ok((stream, connect_time)), Some(target)) => {
                // The requested path first, then the configured ones, should the RECONNECT
                // have to be retried.
                let mut paths = vec![target.clone()];
                paths.extend(self.cfg.paths.iter().filter(|p| **p != target).cloned());
                let first = FirstAttempt {
                    stream,
                    path: target,
                    connect_time,
                    warm: None,
                    early: None,
                };
                self.begin_resume(Some(first), paths);
                Ok(())
            }
            (result, _) => {
                let err = match result {
                    Err(e) => e,
                    Ok(_) => Error::Protocol("internal: connection without a migration"),
                };
                tracing::info!(
                    token = %self.id.token,
                    path = %self.conn.path,
                    error = %err,
                    "migration failed before RECONNECT; the stream stays on its path"
                );
                if let Some(reply) = self.pending.take().and_then(|p| p.reply) {
                    let _ = reply.send(Err(err));
                }
                if self.conn.failed {
                    // The old connection died meanwhile (`conn_failed` left it to this
                    // migration, and auto-reconnect is on, or the stream would have failed).
                    self.start_auto_reconnect();
                    return Ok(());
                }
                self.set_state(StreamState::Connected);
                Ok(())
            }
        }
    }

    /// Freezes the current connection and sends RECONNECT with the now-final counters.
    fn begin_resume(&mut self, mut first: Option<FirstAttempt>, paths: Vec<ProxyPath>) {
        self.conn.frozen = true;
        self.window_blocked = false;
        self.early = None;
        if let Some(f) = first.as_mut() {
            f.early = self.prepare_early();
        }
        let params = ReconnectParams {
            id: self.id,
            oob_inline: self.cfg.oob_inline,
            data_read: self.data_read,
            data_written: self.data_written,
        };
        self.resume_counters = (params.data_read, params.data_written);
        tracing::debug!(
            token = %self.id.token,
            data_read = params.data_read,
            data_written = params.data_written,
            "sending RECONNECT"
        );
        self.resuming = Some(Box::pin(resume(first, paths, params, self.cfg.clone())));
        self.set_state(StreamState::Moving);
    }

    async fn on_resumed(&mut self, result: Result<ResumeOk, ResumeFailure>) -> Result<(), Error> {
        match result {
            Ok(ok) => self.finish_move(ok).await,
            Err(failure) if failure.old_intact && !self.conn.failed => {
                tracing::info!(
                    token = %self.id.token,
                    error = %failure.error,
                    "the proxy refused the new connection before RECONNECT; the stream stays on its path"
                );
                if let Some(e) = self.early.take() {
                    // The old connection carries on from where it stopped: what was pending
                    // for it, and what the application wrote into the refused one, go out
                    // on it again, from the ring.
                    let n = self.data_written.wrapping_sub(e.frozen_written);
                    let bytes = usize::try_from(n)
                        .ok()
                        .and_then(|n| self.ring.last(n))
                        .ok_or(Error::RewriteTooLarge {
                            requested: n,
                            available: self.ring.len() as u64,
                        })?;
                    self.rewrite = Buf::from_vec(bytes);
                }
                self.conn.frozen = false;
                if let Some(reply) = self.pending.take().and_then(|p| p.reply) {
                    let _ = reply.send(Err(failure.error));
                }
                self.set_state(StreamState::Connected);
                Ok(())
            }
            Err(failure) if failure.fresh_retry => {
                // Bytes were written after the first attempt's counters: try again with the
                // current ones, the usual way (rewriting after the reply).
                tracing::debug!(token = %self.id.token, error = %failure.error, "early-resend attempt failed; retrying");
                self.early = None;
                self.prior_attempts += 1;
                // 0x83: the proxy does not know the flag. 0x81: it could not take the early
                // bytes (a kernel-spliced session, PROTOCOL.md 3.7.1, whose next move would
                // most likely have bytes in flight again), or RESEND_FROM was wrong. Either way
                // this stream's later moves do not try again: a refused attempt costs a
                // connection.
                if matches!(
                    failure.error,
                    Error::MsocksVersionUnsupported | Error::BadCounters
                ) {
                    self.early_unsupported = true;
                }
                let target = self.pending.as_ref().and_then(|p| p.target.clone());
                let mut paths: Vec<ProxyPath> = target.clone().into_iter().collect();
                paths.extend(
                    self.cfg
                        .paths
                        .iter()
                        .filter(|p| Some(*p) != target.as_ref())
                        .cloned(),
                );
                self.begin_resume(None, paths);
                Ok(())
            }
            Err(failure) => Err(failure.error),
        }
    }

    /// Completes a move after a successful RECONNECT reply (PROTOCOL.md 3.7, client
    /// procedure): salvage, rewrite, switch.
    async fn finish_move(&mut self, ok: ResumeOk) -> Result<(), Error> {
        let ResumeOk { resumed, attempts } = ok;
        let counters = resumed.counters;
        if counters.data_salvage > MAX_RESPLICE_SPAN {
            return Err(Error::ImpossibleResume {
                data_salvage: counters.data_salvage,
            });
        }
        // Bytes read from the old socket since the RECONNECT's counters were taken: the
        // first `data_salvage` of them were part of the salvage; any beyond it come again
        // on the new connection and are dropped there.
        let ahead = self.data_read.wrapping_sub(self.resume_counters.0);
        let salvage = counters.data_salvage.saturating_sub(ahead);
        if salvage > 0 {
            self.salvage(salvage).await?;
        }
        let skip = ahead.saturating_sub(counters.data_salvage);
        let early = self.early.take();
        let available = self.ring.len();
        let rewrite = if early.is_some() {
            // The resend went out behind the RECONNECT; the proxy skipped what it had.
            Vec::new()
        } else {
            usize::try_from(counters.data_write)
                .ok()
                .and_then(|n| self.ring.last(n))
                .ok_or(Error::RewriteTooLarge {
                    requested: counters.data_write,
                    available: available as u64,
                })?
        };
        let Resumed {
            stream,
            path,
            leftover,
            reply_time,
            connect_time,
            ..
        } = resumed;
        let stream = match stream {
            ResumedStream::Whole(s) => s,
            ResumedStream::Read(rd) => {
                let writer = early.and_then(|mut e| {
                    e.writer
                        .take()
                        .or_else(|| e.writer_rx.as_mut().and_then(|rx| rx.try_recv().ok()))
                });
                let Some(wr) = writer else {
                    return Err(Error::Protocol("internal: early resend without its writer"));
                };
                rd.reunite(wr)
                    .map_err(|_| Error::Protocol("internal: early resend halves of two sockets"))?
            }
        };
        let old = std::mem::replace(&mut self.conn, Conn::new(stream, path));
        // Closing the old socket discards whatever it still holds beyond the salvage; the
        // proxy resends those bytes on the new connection.
        drop(old.stream);
        self.rewrite = Buf::from_vec(rewrite);
        // A FIN the application sent on the old connection is repeated on the new one after
        // the rewrite (`write_socket` sends it once `rewrite` and `up` are empty).
        self.fin_sent = false;
        self.window_blocked = false;
        let dropped = usize::try_from(skip)
            .unwrap_or(usize::MAX)
            .min(leftover.len());
        let leftover = &leftover[dropped..];
        self.skip_down = skip - dropped as u64;
        if !leftover.is_empty() {
            if self.down_eof {
                tracing::warn!(
                    token = %self.id.token,
                    bytes = leftover.len(),
                    "the proxy sent data after the server's FIN; discarded"
                );
            } else {
                self.data_read = self.data_read.wrapping_add(leftover.len() as u64);
                self.down.extend(leftover);
            }
        }
        self.moves += 1;
        let pending = self.pending.take();
        let requested = pending.as_ref().map_or_else(Instant::now, |p| p.requested);
        let report = MoveReport {
            old_path: old.path,
            new_path: self.conn.path.clone(),
            automatic: pending.as_ref().map_or(true, |p| p.target.is_none()),
            data_salvage: counters.data_salvage,
            data_write: counters.data_write,
            attempts: attempts + self.prior_attempts,
            duration: requested.elapsed(),
            connect_time,
            reply_time,
            first_new_read: self
                .resume_counters
                .0
                .wrapping_add(counters.data_salvage.max(ahead)),
            first_new_written: self.resume_counters.1.wrapping_sub(counters.data_write),
        };
        tracing::info!(
            token = %self.id.token,
            from = %report.old_path,
            to = %report.new_path,
            automatic = report.automatic,
            data_salvage = report.data_salvage,
            data_write = report.data_write,
            attempts = report.attempts,
            duration_us = report.duration.as_micros() as u64,
            "mobile stream moved"
        );
        {
            let mut inner = self.shared.lock();
            inner.status.path = report.new_path.clone();
            inner.status.moves = self.moves;
            inner.status.state = StreamState::Connected;
            inner.status.last_move = Some(report.clone());
        }
        if let Some(reply) = pending.and_then(|p| p.reply) {
            let _ = reply.send(Ok(report));
        }
        Ok(())
    }

    /// Reads exactly `count` bytes from the old socket, ahead of anything from the new one.
    async fn salvage(&mut self, count: u64) -> Result<(), Error> {
        let failed = |got: u64, reason: String| Error::SalvageFailed {
            expected: count,
            got,
            reason,
        };
        if self.down_eof {
            return Err(failed(0, "the old connection had already ended".into()));
        }
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        let mut got = 0u64;
        while got < count {
            // Bounded steps: `count` comes from the proxy and is not allocated up front.
            let want = usize::try_from(count - got)
                .unwrap_or(usize::MAX)
                .min(64 * 1024);
            let start = self.down.data.len();
            self.down.data.resize(start + want, 0);
            // Not `AsyncReadExt::read`: a read that stops at an urgent mark must not clear the
            // old socket's readiness, as no new data will arrive there to set it again.
            let read = tokio::time::timeout_at(
                deadline,
                handshake::read_some(&self.conn.stream, &mut self.down.data[start..]),
            )
            .await;
            let n = match &read {
                Ok(Ok(n)) => *n,
                _ => 0,
            };
            self.down.data.truncate(start + n);
            // What the application already read from the connection before this one comes
            // first (a move before the previous one's duplicates were all dropped).
            let skip = usize::try_from(self.skip_down).unwrap_or(usize::MAX).min(n);
            self.down.data.drain(start..start + skip);
            self.skip_down -= skip as u64;
            match read {
                Ok(Ok(0)) => return Err(failed(got, "the old connection ended".into())),
                Ok(Ok(n)) => {
                    got += (n - skip) as u64;
                    self.data_read = self.data_read.wrapping_add((n - skip) as u64);
                }
                Ok(Err(e)) => return Err(failed(got, e.to_string())),
                Err(_) => return Err(failed(got, "timed out".into())),
            }
        }
        Ok(())
    }
}

/// What to do after a failed RECONNECT attempt.
enum Verdict {
    /// Try again (another path, or after a pause).
    Retry,
    /// The proxy refused before reading RECONNECT (authentication); retrying is pointless.
    Rejected,
    /// The session cannot be resumed.
    Fatal,
}

fn classify(err: &Error) -> Verdict {
    match err {
        Error::NoAcceptableMethod | Error::UnexpectedMethod(_) | Error::AuthFailed(_) => {
            Verdict::Rejected
        }
        Error::UnknownSession
        | Error::BadCounters
        | Error::MsocksVersionUnsupported
        | Error::MsocksUnsupported
        | Error::Config(_) => Verdict::Fatal,
        _ => Verdict::Retry,
    }
}

/// Sends RECONNECT until one is answered, or the deadline passes.
///
/// `first` is a connection a migration already made; after it, `paths` are tried in order,
/// in rounds separated by exponential backoff.
async fn resume(
    first: Option<FirstAttempt>,
    paths: Vec<ProxyPath>,
    params: ReconnectParams,
    cfg: Arc<MobileConfig>,
) -> Result<ResumeOk, ResumeFailure> {
    let deadline = tokio::time::Instant::now() + cfg.reconnect_deadline;
    let opts = SocketOptions::from_config(&cfg);
    let mut attempts = 0u32;
    let mut last: Option<Error> = None;
    let give_up = |attempts: u32, last: Option<Error>| ResumeFailure {
        error: Error::ReconnectDeadline {
            deadline: cfg.reconnect_deadline,
            attempts,
            last: Box::new(last.unwrap_or(Error::Timeout("reconnection"))),
        },
        old_intact: false,
        fresh_retry: false,
    };
    if let Some(FirstAttempt {
        stream,
        path,
        connect_time,
        warm,
        early,
    }) = first
    {
        attempts += 1;
        let had_early = early.is_some();
        let attempt = reconnect_on(stream, &path, &params, &cfg, connect_time, warm, early);
        let result = match tokio::time::timeout(cfg.handshake_timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout("RECONNECT")),
        };
        match result {
            Ok(resumed) => return Ok(ResumeOk { resumed, attempts }),
            Err(error) => match classify(&error) {
                // 0x81 and 0x83 leave the session as it was: should RESEND_FROM have been
                // wrong, or the proxy predate early resend, the plain RECONNECT (rewrite after
                // the reply) still works.
                _ if had_early
                    && matches!(error, Error::BadCounters | Error::MsocksVersionUnsupported) =>
                {
                    return Err(ResumeFailure {
                        error,
                        old_intact: false,
                        fresh_retry: true,
                    })
                }
                Verdict::Retry if had_early => {
                    return Err(ResumeFailure {
                        error,
                        old_intact: false,
                        fresh_retry: true,
                    })
                }
                Verdict::Retry => {
                    tracing::debug!(token = %params.id.token, %path, %error, "RECONNECT attempt failed; retrying");
                    last = Some(error);
                }
                Verdict::Rejected => {
                    return Err(ResumeFailure {
                        error,
                        old_intact: true,
                        fresh_retry: false,
                    })
                }
                Verdict::Fatal => {
                    return Err(ResumeFailure {
                        error,
                        old_intact: false,
                        fresh_retry: false,
                    })
                }
            },
        }
    }
    let mut backoff = cfg.backoff_initial;
    loop {
        for path in &paths {
            if tokio::time::Instant::now() >= deadline {
                return Err(give_up(attempts, last));
            }
            attempts += 1;
            let dest = path.reconnect_target(params.id.home);
            let attempt = async {
                let started = Instant::now();
                let stream = open_socket(path, dest, &opts).await?;
                let connect_time = started.elapsed();
                match tokio::time::timeout(
                    cfg.handshake_timeout,
                    reconnect_on(stream, path, &params, &cfg, connect_time, None, None),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(Error::Timeout("RECONNECT")),
                }
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => return Err(give_up(attempts, last)),
                Ok(Ok(resumed)) => return Ok(ResumeOk { resumed, attempts }),
                Ok(Err(error)) => match classify(&error) {
                    Verdict::Retry => {
                        tracing::debug!(token = %params.id.token, %path, %error, "RECONNECT attempt failed; retrying");
                        last = Some(error);
                    }
                    // Without a migration's untouched old connection to return to, a refusal
                    // of the credentials ends the stream like any other fatal answer.
                    Verdict::Rejected | Verdict::Fatal => {
                        return Err(ResumeFailure {
                            error,
                            old_intact: false,
                            fresh_retry: false,
                        })
                    }
                },
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(give_up(attempts, last));
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2).min(cfg.backoff_max.max(cfg.backoff_initial));
    }
}
