//! The `relay` engine of plain SOCKS5 sessions: a userspace copy between the client's and the
//! server's sockets, both directions at once, with half-close passed through.
//!
//! Buffers: a direction gets no buffer until its first byte is readable, so an idle session
//! holds none (most sessions of a busy proxy are idle; `msocks bench` measured 24 KB of proxy
//! memory per idle session with two buffers allocated up front, 5.6 KB without). The first
//! buffer is small, [`FIRST_BUFFER`]; a read that fills it shows that more was waiting, and
//! the buffer doubles, up to `buffer_size`. So interactive sessions keep a few KiB, and no
//! read allocates otherwise.
//!
//! Bulk: once a read fills the largest buffer, the direction switches to splice(2) through a
//! pipe of its own (socket → pipe → socket in the kernel, 64 KiB per call), which spares the
//! two copies through this process; `msocks bench` measured about 40 % less proxy CPU per GB.
//! Small messages stay with read/write, which costs fewer system calls for them. Urgent
//! bytes (carried inline) stop splice(2) at their mark; a recv(2) then reads on (see
//! `fill`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::os::fd::{AsRawFd, RawFd};

use std::io::Write;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest, Ready};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes moved by a session, readable while it runs.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both sides closed their sending direction (FIN both ways).
    Completed,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client failed (for example a reset).
    ClientError(io::Error),
    /// Reading from or writing to the server failed.
    ServerError(io::Error),
    /// The proxy is shutting down and the grace period is over.
    Shutdown,
}

impl std::fmt::Display for RelayEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayEnd::Completed => f.write_str("closed by both ends"),
            RelayEnd::IdleTimeout => f.write_str("idle timeout"),
            RelayEnd::ClientError(e) => write!(f, "client error: {e}"),
            RelayEnd::ServerError(e) => write!(f, "server error: {e}"),
            RelayEnd::Shutdown => f.write_str("proxy shutdown"),
        }
    }
}

/// Buffer a direction gets with its first readable byte (or `buffer_size`, if smaller).
pub const FIRST_BUFFER: usize = 4 * 1024;

/// Size and time bounds of one relay.
#[derive(Debug, Clone, Copy)]
pub struct RelayLimits {
    /// Largest buffer per direction (it starts smaller and grows with the traffic).
    pub buffer_size: usize,
    /// Close after this long without traffic (noticed up to a quarter of it later); zero
    /// disables.
    pub idle_timeout: Duration,
}

/// Which side of a copy failed.
enum Side {
    Reader(io::Error),
    Writer(io::Error),
}

/// Parts of the idle timeout between two looks at the byte counters: a session is closed
/// after this many looks in a row found no byte moved, so between `idle_timeout` and
/// `idle_timeout` × (1 + 1/IDLE_LOOKS) after its last byte. Looking at the counters instead
/// of stamping the time of every message spares a clock read per message.
const IDLE_LOOKS: u32 = 4;

/// The system calls of the splice path, which have no safe wrapper in our dependencies.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    /// A pipe for splice(2): the bytes of one direction go socket → pipe → socket inside the
    /// kernel, without being copied to and from this process. Created only once a direction
    /// shows bulk traffic, so idle and interactive sessions hold no pipe.
    pub(super) struct Pipe {
        pub(super) read: OwnedFd,
        pub(super) write: OwnedFd,
    }

    impl Pipe {
        pub(super) fn new() -> io::Result<Pipe> {
            let mut fds = [0 as libc::c_int; 2];
            // SAFETY: `fds` has room for the two descriptors pipe2 writes.
            let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both are open descriptors nobody else owns.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            Ok(Pipe { read, write })
        }
    }

    /// splice(2) between two stream descriptors, never blocking.
    pub(super) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain descriptors and null offsets (both ends are streams); no memory passed.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// recv(2) without blocking.
    pub(super) fn recv(from: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is writable for `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

use sys::{splice, Pipe};

/// Bytes asked of one splice: the default pipe holds 64 KiB, and the kernel moves what fits.
const SPLICE_CHUNK: usize = 64 * 1024;

/// What one read of a direction produced.
enum Got {
    /// This many bytes are in the pipe (0: end of stream).
    Piped(usize),
    /// This many bytes are in the buffer.
    Buffered(usize),
}

/// Reads what `from` has into the pipe, or, where TCP's splice stops, into `buf`.
///
/// splice(2) on a TCP socket stops at an urgent mark, even with SO_OOBINLINE, and then
/// reports "try again" although bytes are queued, or end of stream if the FIN is already in
/// (which would lose the urgent byte and what follows it); a plain recv(2) reads on through
/// the mark. So when splice finds nothing, one recv into `buf` tells an urgent mark (bytes)
/// from a drained socket (`WouldBlock`, which is what clears the readiness) or the end. For
/// "try again" only if `urgent_possible` (the socket's readiness shows a pending urgent mark,
/// EPOLLPRI): otherwise splice's answer stands, which spares that recv on every drained
/// socket (with many bulk sessions each one often has little to read per wake-up). That is
/// safe even if a mark's readiness event comes in meanwhile: the clearing of the readiness is
/// then a no-op (tokio compares event ticks), and the next wait returns at once.
fn fill(
    from: RawFd,
    pipe: &Pipe,
    buf: &mut Vec<u8>,
    buffer_size: usize,
    urgent_possible: bool,
) -> io::Result<Got> {
    match splice(from, pipe.write.as_raw_fd(), SPLICE_CHUNK) {
        // End of stream, or an urgent mark right before the FIN: recv tells. Always, as
        // the end is final: a mark that arrived after `urgent_possible` was read (its
        // readiness event still to be seen) must not pass for the end. Once per direction.
        Ok(0) => {}
        Ok(n) => return Ok(Got::Piped(n)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && urgent_possible => {}
        Err(e) => return Err(e),
    }
    if buf.is_empty() {
        buf.resize(FIRST_BUFFER.min(buffer_size).max(1), 0);
    }
    match sys::recv(from, buf)? {
        0 => Ok(Got::Piped(0)),
        n => Ok(Got::Buffered(n)),
    }
}

/// A relayed socket, registered with the runtime for urgent-data readiness (`EPOLLPRI`) as
/// well as reading and writing: knowing whether an urgent mark is pending lets a short read
/// end the wait for more bytes without a second, empty read (see `copy_one_way`).
type Sock = AsyncFd<std::net::TcpStream>;

/// Re-registers a tokio stream as a [`Sock`] (tokio's `TcpStream` registers no `EPOLLPRI`).
#[allow(unsafe_code)]
fn register(s: TcpStream) -> io::Result<Sock> {
    // `into_std` deregisters the descriptor and leaves it non-blocking.
    let s = s.into_std()?;
    let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
    // SAFETY: the `AsyncFd` takes ownership of the `std::net::TcpStream`, which owns its
    // descriptor (it stays open until the stream is dropped, with the `AsyncFd`) and always
    // returns that same descriptor from `as_raw_fd`.
    Ok(unsafe { AsyncFd::register_with_interest(s, interest) }?)
}

/// Writes all of `data` to `to`.
async fn write_all(to: &Sock, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = to.writable().await?;
        match guard.try_io(|s| s.get_ref().write(data)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Moves `n` bytes from the pipe to `to`.
async fn drain(pipe: &Pipe, to: &Sock, mut n: usize) -> io::Result<()> {
    let to_fd = to.as_raw_fd();
    while n > 0 {
        let mut guard = to.writable().await?;
        match guard.try_io(|_| splice(pipe.read.as_raw_fd(), to_fd, n)) {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(m)) => n -= m.min(n),
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

async fn copy_one_way(
    from: &Sock,
    to: &Sock,
    buffer_size: usize,
    counter: &AtomicU64,
) -> Result<(), Side> {
    // Small and interactive traffic is copied through `buf` (allocated with the first byte,
    // growing as the module comment says): for a few bytes, read+write is the cheapest. Once
    // a read fills the largest buffer, the direction is a bulk transfer and moves to a pipe
    // and splice(2), which spares the copies through this process. If no pipe can be had
    // (out of descriptors), it stays with the buffer.
    let mut buf: Vec<u8> = Vec::new();
    let mut pipe: Option<Pipe> = None;
    let from_fd = from.as_raw_fd();
    loop {
        let got = loop {
            let mut guard = from
                .ready(Interest::READABLE | Interest::PRIORITY)
                .await
                .map_err(Side::Reader)?;
            if buf.is_empty() {
                buf.resize(FIRST_BUFFER.min(buffer_size).max(1), 0);
            }
            if let Some(p) = &pipe {
                let urgent_possible = guard.ready().is_priority();
                match guard.try_io(|_| fill(from_fd, p, &mut buf, buffer_size, urgent_possible)) {
                    Ok(r) => break r.map_err(Side::Reader)?,
                    Err(_would_block) => continue,
                }
            }
            // A read that returns less than the buffer holds has emptied the socket, so the
            // readiness can be cleared at once instead of by a second read failing with
            // `WouldBlock` (one system call fewer per small message). Except at an urgent
            // mark: with SO_OOBINLINE, Linux ends a read just before the mark while the
            // urgent byte and more are queued, and they would wait for the peer's next
            // segment (tokio#5866 is the same trap in `AsyncReadExt::read`). A pending mark
            // raises EPOLLPRI: while the readiness shows it, a short read clears nothing, and
            // the wait above returns at once, so reads go on until `WouldBlock` (which clears
            // both). A readiness event that arrives during the read makes the clearing a
            // no-op (tokio compares the event tick), so nothing newer is lost.
            let urgent_pending = guard.ready().is_priority();
            match sys::recv(from_fd, &mut buf) {
                Ok(n) => {
                    if n > 0 && n < buf.len() && !urgent_pending {
                        guard.clear_ready_matching(Ready::READABLE);
                    }
                    break Got::Buffered(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Side::Reader(e)),
            }
        };
        let n = match got {
            Got::Piped(0) | Got::Buffered(0) => {
                // Pass the FIN on; the other direction keeps going (half-close).
                socket2::SockRef::from(to.get_ref())
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(Side::Writer)?;
                return Ok(());
            }
            Got::Piped(n) => {
                if let Some(p) = &pipe {
                    drain(p, to, n).await.map_err(Side::Writer)?;
                }
                n
            }
            Got::Buffered(n) => {
                write_all(to, &buf[..n]).await.map_err(Side::Writer)?;
                if n == buf.len() {
                    if buf.len() < buffer_size {
                        // The read filled the buffer: more was waiting. Grow for the next.
                        buf.resize((buf.len() * 2).min(buffer_size), 0);
                    } else if pipe.is_none() {
                        // Full-size reads: a bulk transfer. Splice from now on; the buffer
                        // is then only read into at an urgent mark, so a small one does
                        // (at 1024 bulk sessions this keeps 28 MiB fewer).
                        pipe = Pipe::new().ok();
                        if pipe.is_some() {
                            buf.truncate(FIRST_BUFFER.min(buffer_size).max(1));
                            buf.shrink_to_fit();
                        }
                    }
                }
                n
            }
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Relays between `client` and `server` until both directions are closed, one side fails,
/// the session idles out, or `shutdown` fires. `early` is data the client sent before its
/// reply (optimistic data), delivered to the server first.
pub async fn relay(
    client: TcpStream,
    mut server: TcpStream,
    early: &[u8],
    limits: RelayLimits,
    traffic: &Traffic,
    shutdown: &CancellationToken,
) -> RelayEnd {
    if !early.is_empty() {
        if let Err(e) = server.write_all(early).await {
            return RelayEnd::ServerError(e);
        }
        traffic.up.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    // Urgent bytes stay in the stream (inline) instead of being taken out of band, where this
    // copy loop would never read them and they would be lost. Their urgency is not passed on
    // by this engine (the MSOCKS engine in `mobile` does that).
    let _ = socket2::SockRef::from(&client).set_out_of_band_inline(true);
    let _ = socket2::SockRef::from(&server).set_out_of_band_inline(true);
    let client = match register(client) {
        Ok(s) => s,
        Err(e) => return RelayEnd::ClientError(e),
    };
    let server = match register(server) {
        Ok(s) => s,
        Err(e) => return RelayEnd::ServerError(e),
    };
    let up = copy_one_way(&client, &server, limits.buffer_size, &traffic.up);
    let down = copy_one_way(&server, &client, limits.buffer_size, &traffic.down);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = limits.idle_timeout;
    let far_future = Duration::from_secs(365 * 24 * 3600);
    let look_every = if idle.is_zero() {
        far_future
    } else {
        (idle / IDLE_LOOKS).max(Duration::from_millis(1))
    };
    let moved = || traffic.up.load(Ordering::Relaxed) + traffic.down.load(Ordering::Relaxed);
    let (mut last_moved, mut quiet_looks) = (moved(), 0u32);
    let idle_check = tokio::time::sleep(look_every);
    tokio::pin!(idle_check);
    loop {
        if up_done && down_done {
            return RelayEnd::Completed;
        }
        // Biased: no random branch order to draw on every wake-up (this runs once per
        // message); each copy loop returns to here only when its socket is drained (or
        // tokio's cooperative budget runs out), so neither direction starves the other.
        tokio::select! {
            biased;
            r = &mut up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(Side::Reader(e)) => return RelayEnd::ClientError(e),
                Err(Side::Writer(e)) => return RelayEnd::ServerError(e),
            },
            r = &mut down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(Side::Reader(e)) => return RelayEnd::ServerError(e),
                Err(Side::Writer(e)) => return RelayEnd::ClientError(e),
            },
            () = &mut idle_check => {
                let now_moved = moved();
                if now_moved == last_moved {
                    quiet_looks += 1;
                    if quiet_looks >= IDLE_LOOKS {
                        return RelayEnd::IdleTimeout;
                    }
                } else {
                    (last_moved, quiet_looks) = (now_moved, 0);
                }
                idle_check.as_mut().reset(Instant::now() + look_every);
            }
            () = shutdown.cancelled() => return RelayEnd::Shutdown,
        }
    }
}
