#![allow(unsafe_code)] // getsockopt(TCP_INFO) and ioctl(SIOCOUTQ) have no safe wrapper in our dependencies.
//! What the kernel knows about a TCP connection that the relay engine needs for a resplice:
//! how many bytes the peer has acknowledged (`snd_una`, as a byte count) and how many bytes
//! were ever queued on the socket (so that bytes written before the session's data, such as
//! SOCKS replies, can be subtracted).

use std::io;
use std::os::fd::AsRawFd;

/// Bytes the peer has acknowledged since the connection opened (`tcpi_bytes_acked`; after a
/// FIN is acknowledged this counts the FIN's sequence number too, so callers clamp it to the
/// bytes they wrote).
pub fn bytes_acked(socket: &impl AsRawFd) -> io::Result<u64> {
    let fd = socket.as_raw_fd();
    // SAFETY: `tcp_info` is a plain C struct of integers, for which all-zero bytes are a
    // valid value. getsockopt writes at most `len` bytes into it (`len` is its exact size)
    // and updates `len`; `fd` is a socket descriptor borrowed for the duration of the call.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: see above; the pointers are to live locals of the right types and sizes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kernels before 4.1 return a shorter struct without the field.
    let needed =
        std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + std::mem::size_of::<u64>();
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "kernel TCP_INFO lacks tcpi_bytes_acked",
        ));
    }
    Ok(info.tcpi_bytes_acked)
}

/// Bytes queued on the socket and not yet acknowledged (sent or not): `SIOCOUTQ`.
pub fn unacknowledged(socket: &impl AsRawFd) -> io::Result<u64> {
    let fd = socket.as_raw_fd();
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (== TIOCOUTQ on Linux) writes one `int` through the pointer, which
    // points to a live local `c_int`; `fd` is a borrowed socket descriptor.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut value as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Bytes ever queued on the socket: acknowledged plus still queued.
pub fn bytes_queued(socket: &impl AsRawFd) -> io::Result<u64> {
    Ok(bytes_acked(socket)? + unacknowledged(socket)?)
}

/// `SIOCATMARK` from Linux's `asm-generic/sockios.h` (the libc crate does not define it for
/// Linux).
const SIOCATMARK: libc::c_ulong = 0x8905;

/// Whether the next byte to read is the urgent byte (`SIOCATMARK`). With `SO_OOBINLINE` a
/// read stops just before the urgent byte, so when this is true the urgent byte is the first
/// byte of the next read.
pub fn at_urgent_mark(socket: &impl AsRawFd) -> io::Result<bool> {
    let fd = socket.as_raw_fd();
    let mut value: libc::c_int = 0;
    // SAFETY: SIOCATMARK writes one `int` through the pointer, which points to a live local
    // `c_int`; `fd` is a borrowed socket descriptor.
    let rc = unsafe { libc::ioctl(fd, SIOCATMARK, &mut value as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn counts_what_the_peer_acknowledged() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        // Both ends, active and passive: the counts are used relative to a starting point
        // (the kernel may count the SYN's sequence number as acknowledged).
        for (mut tx, mut rx) in [(&a, &b), (&b, &a)] {
            let start = bytes_queued(tx).unwrap();
            assert_eq!(bytes_acked(tx).unwrap(), start);
            tx.write_all(&[7u8; 10_000]).unwrap();
            let mut buf = vec![0u8; 10_000];
            rx.read_exact(&mut buf).unwrap();
            // Loopback acknowledges at once, but give the ACK a moment to be processed.
            for _ in 0..100 {
                if bytes_acked(tx).unwrap() == start + 10_000 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(bytes_acked(tx).unwrap(), start + 10_000);
            assert_eq!(unacknowledged(tx).unwrap(), 0);
            assert_eq!(bytes_queued(tx).unwrap(), start + 10_000);
        }
    }
}
