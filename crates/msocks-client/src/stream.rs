//! The application's side: [`MobileStream`] (an `AsyncRead + AsyncWrite` byte stream),
//! [`MobileControl`] (move it, ask where it is) and [`MobileBind`] (MSOCKS BIND).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use msocks_proto::{Command, ConnectionId, TargetAddr};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::actor::{self, ControlCommand};
use crate::config::{MobileConfig, ProxyPath};
use crate::handshake::{self, Opened};
use crate::standby::Standby;
use crate::Error;

/// Where a stream is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamState {
    /// Carrying data over its current path.
    Connected,
    /// A migration or automatic reconnect is under way.
    Moving,
    /// Both directions finished, or the application dropped the stream.
    Closed,
    /// The stream failed; [`MobileControl::failure`] says why.
    Failed,
}

/// A snapshot of a stream's position and path.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStatus {
    /// The session's connection identifier.
    pub id: ConnectionId,
    /// The path the stream currently uses (the old one until a move completes).
    pub path: ProxyPath,
    /// `data_read`: READ_ORIGIN plus every byte taken out of the stream's sockets, including
    /// bytes still waiting in the library's buffers for the application (they survive a
    /// move, so from the proxy's point of view they are read). Wraps modulo 2^64.
    pub data_read: u64,
    /// `data_written`: WRITE_ORIGIN plus every byte written into the stream's sockets (not
    /// bytes still in the library's buffers). Wraps modulo 2^64.
    pub data_written: u64,
    /// Completed moves (migrations and automatic reconnects).
    pub moves: u64,
    /// Whether the stream is connected, moving, closed or failed.
    pub state: StreamState,
    /// The most recent completed move.
    pub last_move: Option<MoveReport>,
}

/// What a completed move did and how long it took.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MoveReport {
    /// The path before the move.
    pub old_path: ProxyPath,
    /// The path after the move.
    pub new_path: ProxyPath,
    /// `true` for a reconnect after a connection failure, `false` for a migration.
    pub automatic: bool,
    /// Bytes read out of the old socket after the RECONNECT reply (`data_salvage`).
    pub data_salvage: u64,
    /// Bytes written again into the new connection (`data_write`).
    pub data_write: u64,
    /// Connection attempts, including failed ones (a busy proxy, a dead path).
    pub attempts: u32,
    /// From the request (the `migrate` call, or the detection of the failure) until the new
    /// connection was attached: the reply was read, the salvage bytes were taken and the
    /// rewrite was queued as the first bytes to send. Data flows on the new path from then
    /// on. With nothing queued before it, a migration takes about two round trips of the
    /// new path: the TCP handshake, then greeting, credentials and RECONNECT in one segment
    /// and the reply (the paper's 2.5 RTT count adds the first data reaching the mobile).
    pub duration: Duration,
    /// The successful attempt's TCP connection establishment.
    pub connect_time: Duration,
    /// From sending greeting and RECONNECT to having the reply, in the successful attempt.
    pub reply_time: Duration,
    /// `data_read` position of the first server byte that comes over the new path: the
    /// RECONNECT's DATA_READ plus `data_salvage` (everything before it came out of the old
    /// socket).
    pub first_new_read: u64,
    /// `data_written` position of the first byte the proxy takes from the new path: the
    /// RECONNECT's DATA_WRITTEN minus `data_write` (with an early resend, the bytes before
    /// it were sent again but skipped by the proxy).
    pub first_new_written: u64,
}

/// State shared between a stream's task and its handles.
pub(crate) struct Shared {
    inner: Mutex<SharedInner>,
}

pub(crate) struct SharedInner {
    pub(crate) status: StreamStatus,
    pub(crate) failure: Option<Error>,
    /// Set before the task delivers the server's FIN to the application, so that an end of
    /// stream is known to be clean and not the task's death.
    pub(crate) clean_eof: bool,
}

impl Shared {
    pub(crate) fn new(status: StreamStatus) -> Self {
        Shared {
            inner: Mutex::new(SharedInner {
                status,
                failure: None,
                clean_eof: false,
            }),
        }
    }

    /// The state, even if a thread panicked while holding the lock: every update leaves it
    /// consistent (plain field stores), so a poisoned lock holds usable data.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SharedInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why the stream can no longer be used.
    pub(crate) fn terminal_error(&self) -> Error {
        self.lock().failure.clone().unwrap_or(Error::Closed)
    }

    /// The error for an end of stream from the pipe, or `None` when it is the server's FIN.
    fn eof_error(&self) -> Option<Error> {
        let inner = self.lock();
        if inner.clean_eof {
            return None;
        }
        // The task ended without a clean FIN: it failed, or it died (a panic), which the
        // application must not mistake for the end of the data.
        Some(inner.failure.clone().unwrap_or(Error::Closed))
    }

    fn failure(&self) -> Option<Error> {
        self.lock().failure.clone()
    }
}

/// A handle to move a stream and read its status. Cheap to clone; every clone controls the
/// same stream, and outlives it harmlessly (calls then return the stream's final error or
/// [`Error::Closed`]).
#[derive(Clone)]
pub struct MobileControl {
    pub(crate) tx: mpsc::Sender<ControlCommand>,
    pub(crate) shared: Arc<Shared>,
}

impl MobileControl {
    /// Moves the stream to `path` (a soft hand-off) and returns when the new path carries
    /// the stream.
    ///
    /// The old connection keeps carrying data while the new TCP connection is made; the
    /// library stops using the old socket only just before sending RECONNECT
    /// (make-before-break), and closes it after the reply and the salvage. If the new
    /// connection cannot be made, or the proxy refuses it before reading RECONNECT, the
    /// stream stays on its old path and this returns the error. Once RECONNECT was sent the
    /// move only goes forward: after a busy reply (`0x82`) or a lost connection it is
    /// retried, this path first and then the configured ones, until the reconnect deadline;
    /// an unknown session (`0x80`) or impossible counters (`0x81`) fail the stream.
    ///
    /// Migrations are carried out one at a time, in the order requested; one requested
    /// during an automatic reconnect waits for it to end.
    pub async fn migrate(&self, path: ProxyPath) -> Result<MoveReport, Error> {
        path.validate()?;
        self.send_migrate(path, None).await
    }

    /// Moves the stream onto a standby connection (a warm move, PROTOCOL.md 3.13): the
    /// RECONNECT goes out at once on the already authenticated connection, so the move
    /// costs one round trip of the new path instead of two. Otherwise as
    /// [`migrate`](MobileControl::migrate), with `standby.path()` as the new path; should
    /// the standby connection turn out dead, the move is retried on fresh connections.
    ///
    /// The standby must be connected to where this session's RECONNECT goes (its home,
    /// or the path's proxy address when the home address is unspecified); else this fails
    /// with [`Error::Config`] and the stream stays where it is.
    pub async fn migrate_via(&self, standby: Standby) -> Result<MoveReport, Error> {
        let path = standby.path().clone();
        self.send_migrate(path, Some(standby)).await
    }

    async fn send_migrate(
        &self,
        path: ProxyPath,
        standby: Option<Standby>,
    ) -> Result<MoveReport, Error> {
        let (reply, answer) = oneshot::channel();
        let command = ControlCommand::Migrate {
            path,
            standby,
            requested: Instant::now(),
            reply,
        };
        if self.tx.send(command).await.is_err() {
            return Err(self.shared.terminal_error());
        }
        match answer.await {
            Ok(result) => result,
            // The task ended before answering; its final error says why.
            Err(_) => Err(self.shared.terminal_error()),
        }
    }

    /// The stream's identifier, path, counters and state right now.
    pub fn status(&self) -> StreamStatus {
        self.shared.lock().status.clone()
    }

    /// The error that failed the stream, if it failed.
    pub fn failure(&self) -> Option<Error> {
        self.shared.failure()
    }
}

impl fmt::Debug for MobileControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.shared.lock();
        f.debug_struct("MobileControl")
            .field("token", &inner.status.id.token)
            .field("state", &inner.status.state)
            .finish()
    }
}

/// A TCP stream to a destination through an msocks proxy that survives moves between
/// addresses and interfaces (the paper's "Msocket").
///
/// Reads and writes go through an in-process pipe to a task that owns the connection to
/// the proxy, counts bytes, keeps the copy for rewriting and carries out moves. So:
///
/// * a write completes when the bytes are in the pipe, like a write into a kernel socket
///   buffer; `flush` does not wait for the proxy;
/// * `shutdown` ends the writing direction: the task sends FIN after the bytes written
///   before it (and sends it again on a new connection after a move);
/// * a read returns 0 only at the server's FIN (delivered once, even across moves); if the
///   stream failed, reads and writes return an `io::Error` wrapping the [`Error`] (see
///   [`Error::from_io`]), with kind `ConnectionReset` for a session the proxy lost;
/// * dropping the stream closes it like `close()`: buffered writes are still sent, then
///   FIN.
///
/// Must be created inside a tokio runtime (the task is spawned on it).
pub struct MobileStream {
    io: DuplexStream,
    control: MobileControl,
    id: ConnectionId,
    bound: TargetAddr,
    ring_capacity: usize,
    /// Dropped with the stream: tells the task the application is gone even while it has
    /// nothing to deliver (a closed pipe is otherwise only noticed when writing into it).
    _alive: oneshot::Sender<()>,
}

impl MobileStream {
    /// Opens a stream to `target` through the proxy with MSOCKS CONNECT (`0x81`), over the
    /// first configured path that accepts a TCP connection.
    ///
    /// A proxy without MSOCKS answers `0x07`, returned as [`Error::MsocksUnsupported`].
    pub async fn connect(
        target: impl Into<TargetAddr>,
        config: MobileConfig,
    ) -> Result<MobileStream, Error> {
        config.validate()?;
        let target = target.into();
        let opened = handshake::open_session(Command::Connect, &target, &config).await?;
        tracing::info!(
            token = %opened.id.token,
            %target,
            path = %opened.path,
            "mobile stream connected"
        );
        actor::spawn(opened, config)
    }

    /// Like [`connect`](MobileStream::connect), over a [`Standby`] connection: the MSOCKS
    /// CONNECT goes out at once on the already authenticated connection, so the stream is
    /// open one round trip sooner (no TCP handshake, no greeting). The standby's path is the
    /// stream's first path; `config.paths` are the fallbacks for later reconnects.
    pub async fn connect_via(
        standby: Standby,
        target: impl Into<TargetAddr>,
        config: MobileConfig,
    ) -> Result<MobileStream, Error> {
        config.validate()?;
        let target = target.into();
        let opened =
            handshake::open_on_standby(standby, Command::Connect, &target, &config).await?;
        tracing::info!(
            token = %opened.id.token,
            %target,
            path = %opened.path,
            "mobile stream connected over a standby connection"
        );
        actor::spawn(opened, config)
    }

    /// Asks the proxy to accept one connection from `target` with MSOCKS BIND (`0x82`),
    /// for protocols where the server connects back (an FTP data connection). The returned
    /// [`MobileBind`] tells the address the proxy listens on; pass it to the server, then
    /// call [`MobileBind::accept`].
    pub async fn bind(
        target: impl Into<TargetAddr>,
        config: MobileConfig,
    ) -> Result<MobileBind, Error> {
        config.validate()?;
        let target = target.into();
        let opened = handshake::open_session(Command::Bind, &target, &config).await?;
        tracing::info!(
            token = %opened.id.token,
            %target,
            listen = %opened.bound,
            path = %opened.path,
            "mobile bind listening"
        );
        Ok(MobileBind { opened, config })
    }

    /// A handle to move this stream and read its status from anywhere.
    pub fn control(&self) -> MobileControl {
        self.control.clone()
    }

    /// Shorthand for [`MobileControl::migrate`].
    pub async fn migrate(&self, path: ProxyPath) -> Result<MoveReport, Error> {
        self.control.migrate(path).await
    }

    /// Shorthand for [`MobileControl::status`].
    pub fn status(&self) -> StreamStatus {
        self.control.status()
    }

    /// The session's connection identifier (its token is the capability to reconnect it).
    pub fn id(&self) -> ConnectionId {
        self.id
    }

    /// BND of the reply that opened the stream: the proxy's address on its connection to
    /// the destination (CONNECT), or the address of the peer that connected (BIND).
    pub fn bound_addr(&self) -> &TargetAddr {
        &self.bound
    }

    /// Capacity of the rewrite ring buffer: the `SO_SNDBUF` the kernel reported for the
    /// first socket. At most this many written bytes are ever unacknowledged by the
    /// proxy's TCP, so a RECONNECT never needs more.
    pub fn ring_capacity(&self) -> usize {
        self.ring_capacity
    }

    pub(crate) fn new(
        io: DuplexStream,
        control: MobileControl,
        id: ConnectionId,
        bound: TargetAddr,
        ring_capacity: usize,
        alive: oneshot::Sender<()>,
    ) -> Self {
        MobileStream {
            io,
            control,
            id,
            bound,
            ring_capacity,
            _alive: alive,
        }
    }

    /// The error a failed write reports: the stream's own failure if there is one.
    fn write_error(&self, err: io::Error) -> io::Error {
        match self.control.shared.failure() {
            Some(failure) => failure.into(),
            None if err.kind() == io::ErrorKind::BrokenPipe => Error::Closed.into(),
            None => err,
        }
    }
}

impl fmt::Debug for MobileStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MobileStream")
            .field("token", &self.id.token)
            .field("bound", &self.bound)
            .finish()
    }
}

impl AsyncRead for MobileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                match this.control.shared.eof_error() {
                    None => Poll::Ready(Ok(())),
                    Some(err) => Poll::Ready(Err(err.into())),
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for MobileStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_shutdown(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            other => other,
        }
    }
}

/// An MSOCKS BIND between its two replies: the proxy listens for the peer.
pub struct MobileBind {
    opened: Opened,
    config: MobileConfig,
}

impl MobileBind {
    /// Where the proxy listens for the peer (BND of the first reply): give this to the
    /// server.
    pub fn listen_addr(&self) -> &TargetAddr {
        &self.opened.bound
    }

    /// The session's connection identifier (the same in both replies).
    pub fn id(&self) -> ConnectionId {
        self.opened.id
    }

    /// Waits for the second reply, sent when the peer connects, and returns the stream and
    /// the peer's address. No client-side limit: the proxy ends the wait with `0x06` after
    /// its own bind timeout, returned as [`Error::Refused`].
    ///
    /// The session cannot move before this returns: its streams start with the second
    /// reply (PROTOCOL.md 3.2).
    pub async fn accept(self) -> Result<(MobileStream, TargetAddr), Error> {
        let MobileBind { mut opened, config } = self;
        let (id, peer) = handshake::read_open_reply(&mut opened.hs, &mut opened.stream).await?;
        if id != opened.id {
            return Err(Error::IdentifierMismatch);
        }
        tracing::info!(token = %id.token, %peer, "mobile bind accepted a connection");
        opened.bound = peer.clone();
        Ok((actor::spawn(opened, config)?, peer))
    }
}

impl fmt::Debug for MobileBind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MobileBind")
            .field("token", &self.opened.id.token)
            .field("listen_addr", &self.opened.bound)
            .finish()
    }
}
