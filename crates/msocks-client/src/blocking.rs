//! Blocking `std::io::Read + Write` over a [`crate::MobileStream`], for programs without an
//! async runtime.
//!
//! # Which runtime runs the stream
//!
//! A mobile stream needs its task to run all the time, not only while the program is inside
//! a read or write: it must notice a failed connection and reconnect, carry out a migration
//! requested from another thread, and keep sending after `shutdown_write`. So the task runs
//! on a multi-thread tokio runtime, and the blocking calls wait on it:
//!
//! * [`MobileStream::connect`] uses a process-wide background runtime with one worker
//!   thread (`msocks-client`), started on first use and never shut down, so streams keep
//!   flushing after their owner dropped them, as a kernel socket would.
//! * [`MobileStream::connect_with`] borrows a multi-thread runtime the program already has,
//!   through its [`Handle`].
//!
//! Blocking calls must not be made from inside an async context (a runtime's worker or a
//! `block_on`): they return [`Error::BlockingInRuntime`] instead of stalling or panicking.

use std::io;
use std::sync::{Arc, OnceLock};

use msocks_proto::{ConnectionId, TargetAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::{Error, MobileConfig, MobileControl, MoveReport, ProxyPath, StreamStatus};

/// The process-wide runtime of streams opened without a handle.
fn background_runtime() -> Result<Handle, Error> {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt.handle().clone());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("msocks-client")
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(Arc::new(e)))?;
    // Two threads may race to this point; the loser's runtime is dropped here, which is
    // allowed because callers checked that they are not inside a runtime.
    Ok(RUNTIME.get_or_init(|| rt).handle().clone())
}

fn ensure_blocking_allowed() -> Result<(), Error> {
    if Handle::try_current().is_ok() {
        return Err(Error::BlockingInRuntime);
    }
    Ok(())
}

fn check_handle(handle: &Handle) -> Result<(), Error> {
    // On a current-thread runtime the stream's task would only run inside this thread's
    // block_on calls: no reconnect, no migration, no flushing in between.
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return Err(Error::Config(
            "the blocking API needs a multi-thread runtime to run the stream's task".into(),
        ));
    }
    Ok(())
}

/// A [`crate::MobileStream`] with blocking reads and writes.
#[derive(Debug)]
pub struct MobileStream {
    inner: crate::MobileStream,
    handle: Handle,
}

impl MobileStream {
    /// Opens a stream to `target` (MSOCKS CONNECT) on the background runtime.
    pub fn connect(target: impl Into<TargetAddr>, config: MobileConfig) -> Result<Self, Error> {
        ensure_blocking_allowed()?;
        Self::connect_with(background_runtime()?, target, config)
    }

    /// Opens a stream to `target` (MSOCKS CONNECT) whose task runs on `handle`'s runtime,
    /// which must be a multi-thread runtime.
    pub fn connect_with(
        handle: Handle,
        target: impl Into<TargetAddr>,
        config: MobileConfig,
    ) -> Result<Self, Error> {
        ensure_blocking_allowed()?;
        check_handle(&handle)?;
        let inner = handle.block_on(crate::MobileStream::connect(target, config))?;
        Ok(MobileStream { inner, handle })
    }

    /// Starts an MSOCKS BIND on the background runtime; see [`crate::MobileStream::bind`].
    pub fn bind(target: impl Into<TargetAddr>, config: MobileConfig) -> Result<MobileBind, Error> {
        ensure_blocking_allowed()?;
        Self::bind_with(background_runtime()?, target, config)
    }

    /// Starts an MSOCKS BIND whose stream will run on `handle`'s (multi-thread) runtime.
    pub fn bind_with(
        handle: Handle,
        target: impl Into<TargetAddr>,
        config: MobileConfig,
    ) -> Result<MobileBind, Error> {
        ensure_blocking_allowed()?;
        check_handle(&handle)?;
        let inner = handle.block_on(crate::MobileStream::bind(target, config))?;
        Ok(MobileBind { inner, handle })
    }

    /// Wraps an async stream whose task runs on `handle`'s (multi-thread) runtime.
    pub fn from_async(inner: crate::MobileStream, handle: Handle) -> Result<Self, Error> {
        check_handle(&handle)?;
        Ok(MobileStream { inner, handle })
    }

    /// The async stream inside.
    pub fn into_async(self) -> crate::MobileStream {
        self.inner
    }

    /// A handle to move the stream and read its status (usable from any thread; its
    /// `migrate` is async, see [`MobileStream::migrate`] for the blocking one).
    pub fn control(&self) -> MobileControl {
        self.inner.control()
    }

    /// Moves the stream to `path`, blocking until done; see [`MobileControl::migrate`].
    pub fn migrate(&self, path: ProxyPath) -> Result<MoveReport, Error> {
        ensure_blocking_allowed()?;
        self.handle.block_on(self.inner.migrate(path))
    }

    /// The stream's identifier, path, counters and state.
    pub fn status(&self) -> StreamStatus {
        self.inner.status()
    }

    /// The session's connection identifier.
    pub fn id(&self) -> ConnectionId {
        self.inner.id()
    }

    /// BND of the reply that opened the stream.
    pub fn bound_addr(&self) -> &TargetAddr {
        self.inner.bound_addr()
    }

    /// Capacity of the rewrite ring buffer; see [`crate::MobileStream::ring_capacity`].
    pub fn ring_capacity(&self) -> usize {
        self.inner.ring_capacity()
    }

    /// Ends the writing direction: FIN is sent after the bytes written so far.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        ensure_blocking_allowed()?;
        self.handle.block_on(self.inner.shutdown())
    }
}

impl io::Read for MobileStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        ensure_blocking_allowed()?;
        self.handle.block_on(self.inner.read(buf))
    }
}

impl io::Write for MobileStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        ensure_blocking_allowed()?;
        self.handle.block_on(self.inner.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        ensure_blocking_allowed()?;
        self.handle.block_on(self.inner.flush())
    }
}

/// An MSOCKS BIND between its two replies, blocking flavour.
#[derive(Debug)]
pub struct MobileBind {
    inner: crate::MobileBind,
    handle: Handle,
}

impl MobileBind {
    /// Where the proxy listens for the peer.
    pub fn listen_addr(&self) -> &TargetAddr {
        self.inner.listen_addr()
    }

    /// The session's connection identifier.
    pub fn id(&self) -> ConnectionId {
        self.inner.id()
    }

    /// Blocks until the peer connects; see [`crate::MobileBind::accept`].
    pub fn accept(self) -> Result<(MobileStream, TargetAddr), Error> {
        ensure_blocking_allowed()?;
        let MobileBind { inner, handle } = self;
        let (inner, peer) = handle.block_on(inner.accept())?;
        Ok((MobileStream { inner, handle }, peer))
    }
}
