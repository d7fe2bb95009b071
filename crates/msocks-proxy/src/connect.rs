//! Opening the proxy's own TCP connection to a destination, and turning what went wrong into
//! the SOCKS5 reply code a client understands.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use msocks_proto::ReplyCode;
use thiserror::Error;
use tokio::net::TcpStream;

/// Why no connection to the destination could be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Every address failed; the error of the last attempt.
    #[error("connecting to {addr} failed: {source}")]
    Failed {
        /// The last address tried.
        addr: SocketAddr,
        /// What the kernel said.
        source: io::Error,
    },
    /// The deadline passed before any address answered.
    #[error("no answer from {0} within the connect timeout")]
    Timeout(SocketAddr),
    /// No address to try (every address was refused by the access rules).
    #[error("no address to connect to")]
    NoAddress,
}

impl ConnectError {
    /// The reply code for this failure.
    pub fn reply_code(&self) -> ReplyCode {
        match self {
            ConnectError::Failed { source, .. } => io_error_reply(source),
            ConnectError::Timeout(_) => ReplyCode::HostUnreachable,
            ConnectError::NoAddress => ReplyCode::NotAllowed,
        }
    }
}

/// The SOCKS5 reply code closest to an I/O error of `connect`.
pub fn io_error_reply(e: &io::Error) -> ReplyCode {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => ReplyCode::ConnectionRefused,
        Some(libc::ENETUNREACH) | Some(libc::ENETDOWN) => ReplyCode::NetworkUnreachable,
        Some(libc::EHOSTUNREACH) | Some(libc::EHOSTDOWN) | Some(libc::ETIMEDOUT) => {
            ReplyCode::HostUnreachable
        }
        Some(libc::EADDRNOTAVAIL) | Some(libc::EAFNOSUPPORT) => ReplyCode::AddressTypeNotSupported,
        _ => match e.kind() {
            io::ErrorKind::ConnectionRefused => ReplyCode::ConnectionRefused,
            io::ErrorKind::TimedOut => ReplyCode::HostUnreachable,
            _ => ReplyCode::GeneralFailure,
        },
    }
}

tokio::task_local! {
    /// The MSS the session running in this task clamps its connections to the destination
    /// to (`TCP_MAXSEG` before `connect`, so the SYN announces it), set by the accept loop
    /// for the kernel engine: the client connection's announced MSS, so that the spliced
    /// connections' segments fit each other (docs/KERNEL-SPLICE.md, "MSS"). A task-local
    /// rather than a parameter because it belongs to the session, not to every caller.
    static CONNECT_MSS: u32;
}

/// `session`, with its connections to destinations clamped to `mss`.
pub(crate) fn with_connect_mss<F: std::future::Future>(
    mss: u32,
    session: F,
) -> tokio::task::futures::TaskLocalFuture<u32, F> {
    CONNECT_MSS.scope(mss, session)
}

async fn connect_one(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Urgent data inline from the first byte: the server may send an urgent byte as soon as
    // it accepts, before the session's engine runs. Without the flag then, the kernel takes
    // the byte out of band when the next urgent mark arrives, and it is lost to the stream.
    socket2::SockRef::from(&socket).set_out_of_band_inline(true)?;
    if let Ok(mss) = CONNECT_MSS.try_with(|m| *m) {
        crate::kernel::set_maxseg(&socket, mss)?;
    }
    socket.connect(addr).await
}

/// Connects to the first address that answers, in order, within `timeout` for all of them.
/// Nagle is turned off: the proxy forwards what it gets at once, and small records must not
/// be held back on either leg.
pub async fn connect_any(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = ConnectError::NoAddress;
    for &addr in addrs {
        match tokio::time::timeout_at(deadline, connect_one(addr)).await {
            Ok(Ok(stream)) => {
                // Failing to set NODELAY only costs latency; the connection is still good.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(source)) => last = ConnectError::Failed { addr, source },
            Err(_) => return Err(ConnectError::Timeout(addr)),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(
            io_error_reply(&e(libc::ECONNREFUSED)),
            ReplyCode::ConnectionRefused
        );
        assert_eq!(
            io_error_reply(&e(libc::ENETUNREACH)),
            ReplyCode::NetworkUnreachable
        );
        assert_eq!(
            io_error_reply(&e(libc::EHOSTUNREACH)),
            ReplyCode::HostUnreachable
        );
        assert_eq!(
            io_error_reply(&e(libc::ETIMEDOUT)),
            ReplyCode::HostUnreachable
        );
        assert_eq!(io_error_reply(&e(libc::EPERM)), ReplyCode::GeneralFailure);
    }

    #[tokio::test]
    async fn refused_on_a_closed_loopback_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let err = connect_any(&[addr], Duration::from_secs(2))
            .await
            .unwrap_err();
        assert_eq!(err.reply_code(), ReplyCode::ConnectionRefused, "{err}");
    }

    #[tokio::test]
    async fn connections_receive_urgent_data_inline_from_the_start() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = connect_any(&[addr], Duration::from_secs(2)).await.unwrap();
        assert!(socket2::SockRef::from(&s).out_of_band_inline().unwrap());
    }
}
