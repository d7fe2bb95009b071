//! The library's one error type.
//!
//! It is `Clone` (I/O errors are shared behind `Arc`) because one failure has several
//! audiences: the migration that was waiting for it, every later control call, and the
//! application's reads and writes, which get it wrapped in an [`std::io::Error`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use msocks_proto::{DecodeError, ReplyCode};
use thiserror::Error;

/// Why opening, moving or using a mobile stream failed.
#[derive(Debug, Clone, Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (no path, credentials too long, address family mismatch).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A TCP connection to the proxy could not be made (includes socket setup such as
    /// binding the local address or the interface).
    #[error("cannot connect to the proxy at {addr}: {source}")]
    Connect {
        /// The address that was tried.
        addr: SocketAddr,
        /// What the operating system said.
        #[source]
        source: Arc<io::Error>,
    },
    /// An I/O error on an established connection to the proxy.
    #[error("I/O error during {during}: {source}")]
    Io {
        /// What the library was doing.
        during: &'static str,
        /// What the operating system said.
        #[source]
        source: Arc<io::Error>,
    },
    /// A step took longer than its configured limit.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The proxy closed the connection before a whole message arrived.
    #[error("the proxy closed the connection during {0}")]
    ProxyClosed(&'static str),
    /// The proxy sent bytes that are not a valid message.
    #[error("malformed message from the proxy: {0}")]
    Malformed(#[from] DecodeError),
    /// The proxy broke the protocol in a way no decoder catches (a success reply without its
    /// trailer, a handshake message that never ends, stream data after a FIN).
    #[error("the proxy violated the protocol: {0}")]
    Protocol(&'static str),
    /// The proxy accepted none of the offered authentication methods (`0xFF`).
    #[error("the proxy accepted no offered authentication method (configure credentials?)")]
    NoAcceptableMethod,
    /// The proxy selected a method the library did not offer.
    #[error("the proxy selected authentication method {0:#04x}, which was not offered")]
    UnexpectedMethod(u8),
    /// RFC 1929 authentication failed.
    #[error("the proxy rejected the username or password (status {0:#04x})")]
    AuthFailed(u8),
    /// The proxy answered the MSOCKS command with `0x07`: it is a SOCKS5 proxy without the
    /// MSOCKS extensions.
    #[error("the proxy does not support MSOCKS (reply 0x07 to an MSOCKS command)")]
    MsocksUnsupported,
    /// The proxy refused the MSOCKS CONNECT or BIND with a standard SOCKS5 code.
    #[error("the proxy refused the request: {0}")]
    Refused(ReplyCode),
    /// The second reply of an MSOCKS BIND carried another identifier than the first.
    #[error("the two MSOCKS BIND replies carry different connection identifiers")]
    IdentifierMismatch,
    /// RECONNECT reply `0x80`: the proxy has no live session with this token (expired,
    /// closed, or never known). The session is lost.
    #[error("the proxy no longer knows this session (reply 0x80)")]
    UnknownSession,
    /// RECONNECT reply `0x81`: the proxy found the counters impossible.
    #[error("the proxy rejected the RECONNECT counters as impossible (reply 0x81)")]
    BadCounters,
    /// RECONNECT reply `0x82`: another RECONNECT of this session was being carried out.
    /// Retried until the reconnect deadline; seen by callers only inside
    /// [`Error::ReconnectDeadline`].
    #[error("another RECONNECT of this session was in progress (reply 0x82)")]
    SessionBusy,
    /// Reply `0x83`: the proxy does not speak this MSOCKS version or these flags.
    #[error("the proxy does not support this MSOCKS version or flags (reply 0x83)")]
    MsocksVersionUnsupported,
    /// RECONNECT refused with another code.
    #[error("the proxy refused the RECONNECT: {0}")]
    ReconnectRefused(ReplyCode),
    /// The proxy's resume counters cannot be right (larger than any socket buffer).
    #[error("the proxy sent impossible resume counters (data_salvage {data_salvage})")]
    ImpossibleResume {
        /// The value received.
        data_salvage: u64,
    },
    /// The old socket ended or failed before yielding the `data_salvage` bytes the proxy
    /// says it holds. Those bytes are acknowledged to the server and will never be sent
    /// again, so the stream cannot continue without a gap.
    #[error("salvage failed: the old connection yielded {got} of {expected} bytes ({reason})")]
    SalvageFailed {
        /// `data_salvage`.
        expected: u64,
        /// Bytes read before the old socket ended.
        got: u64,
        /// End of stream, an I/O error or a timeout.
        reason: String,
    },
    /// The proxy asked for more rewritten bytes than the ring buffer holds.
    #[error("the proxy asked to rewrite {requested} bytes but only the last {available} are kept")]
    RewriteTooLarge {
        /// `data_write`.
        requested: u64,
        /// Bytes in the ring buffer.
        available: u64,
    },
    /// Reconnection kept failing until the reconnect deadline.
    #[error("no reconnection within {deadline:?} after {attempts} attempts; last error: {last}")]
    ReconnectDeadline {
        /// The configured deadline.
        deadline: Duration,
        /// Connection attempts made.
        attempts: u32,
        /// The last attempt's error.
        last: Box<Error>,
    },
    /// The stream finished normally (both directions closed) or its owner dropped it.
    #[error("the stream is closed")]
    Closed,
    /// A blocking call was made from inside an asynchronous runtime, where blocking the
    /// thread would stall (or, in tokio, panic).
    #[error("blocking call from inside an asynchronous runtime; use the async API there")]
    BlockingInRuntime,
    /// The background runtime of the blocking API could not be started.
    #[error("cannot start the background runtime: {0}")]
    Runtime(Arc<io::Error>),
}

impl Error {
    pub(crate) fn io(during: &'static str, source: io::Error) -> Self {
        Error::Io {
            during,
            source: Arc::new(source),
        }
    }

    pub(crate) fn connect(addr: SocketAddr, source: io::Error) -> Self {
        Error::Connect {
            addr,
            source: Arc::new(source),
        }
    }

    /// The library error inside an [`io::Error`] returned by a stream's read or write, if
    /// that is where it came from.
    pub fn from_io(err: &io::Error) -> Option<&Error> {
        err.get_ref()?.downcast_ref::<Error>()
    }

    /// The `io::ErrorKind` an application sees for this error on a read or write: a lost
    /// session is a reset (PROTOCOL.md 3.9), a closed stream a broken pipe.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::UnknownSession | Error::BadCounters => io::ErrorKind::ConnectionReset,
            Error::Closed => io::ErrorKind::BrokenPipe,
            Error::Timeout(_) => io::ErrorKind::TimedOut,
            Error::Io { source, .. } | Error::Connect { source, .. } => source.kind(),
            _ => io::ErrorKind::ConnectionAborted,
        }
    }
}

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        io::Error::new(err.io_kind(), err)
    }
}
