//! The `relay` engine of plain SOCKS5 sessions: a userspace copy between the client's and the
//! server's sockets, both directions at once, with half-close passed through.
//!
//! Buffers: a direction gets no buffer until its first byte is readable, so an idle session
//! holds none (most sessions of a busy proxy are idle; `msocks bench` measured 24 KB of proxy
//! memory per idle session with two buffers allocated up front, 5.6 KB without). The first
//! buffer is small, [`FIRST_BUFFER`]; a read
//! that fills it shows that more was waiting, and the buffer doubles, up to `buffer_size`.
//! So interactive sessions keep a few KiB, bulk ones reach full-size reads (few system calls
//! per byte) after at most a handful of reallocations, and no read allocates otherwise.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
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
    /// Close after this long without traffic; zero disables.
    pub idle_timeout: Duration,
}

/// Which side of a copy failed.
enum Side {
    Reader(io::Error),
    Writer(io::Error),
}

/// Milliseconds since `origin` of the last byte moved, shared by both directions.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

async fn copy_one_way<W>(
    from: OwnedReadHalf,
    mut to: W,
    buffer_size: usize,
    counter: &AtomicU64,
    activity: &Activity,
) -> Result<(), Side>
where
    W: AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    loop {
        // Not `AsyncReadExt::read`, which takes a short read for a drained socket and waits
        // for the next readiness edge (tokio#5866): with SO_OOBINLINE, Linux ends a read just
        // before the urgent mark while more bytes are queued, and they would wait for the
        // peer's next segment. `try_read` clears readiness only on `WouldBlock`.
        let n = loop {
            from.readable().await.map_err(Side::Reader)?;
            if buf.is_empty() {
                buf = vec![0u8; FIRST_BUFFER.min(buffer_size).max(1)];
            }
            match from.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.map_err(Side::Reader)?,
            }
        };
        if n == 0 {
            // Pass the FIN on; the other direction keeps going (half-close).
            to.shutdown().await.map_err(Side::Writer)?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await.map_err(Side::Writer)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if n == buf.len() && buf.len() < buffer_size {
            // The read filled the buffer: more was waiting. Grow for the next one.
            buf.resize((buf.len() * 2).min(buffer_size), 0);
        }
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
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let activity = Activity {
        origin: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let up = copy_one_way(
        client_read,
        server_write,
        limits.buffer_size,
        &traffic.up,
        &activity,
    );
    let down = copy_one_way(
        server_read,
        client_write,
        limits.buffer_size,
        &traffic.down,
        &activity,
    );
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let idle = limits.idle_timeout;
    let far_future = Duration::from_secs(365 * 24 * 3600);
    let idle_check = tokio::time::sleep(if idle.is_zero() { far_future } else { idle });
    tokio::pin!(idle_check);
    loop {
        if up_done && down_done {
            return RelayEnd::Completed;
        }
        tokio::select! {
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
                let due = activity.last() + idle;
                if Instant::now() >= due {
                    return RelayEnd::IdleTimeout;
                }
                idle_check.as_mut().reset(due);
            }
            () = shutdown.cancelled() => return RelayEnd::Shutdown,
        }
    }
}
