//! The one socket query neither tokio nor socket2 offers: how many bytes written into a TCP
//! socket the peer has not acknowledged yet.

use std::io;
use std::os::fd::AsRawFd;

/// Bytes in the socket's send queue: written by the application but not yet acknowledged by
/// the peer (sent or not). On Linux `SIOCOUTQ` returns `write_seq - snd_una` for TCP.
///
/// These are exactly the bytes a RECONNECT may ask the library to write again, so the
/// library keeps this below its ring buffer's capacity.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn unacked_bytes(sock: &impl AsRawFd) -> io::Result<usize> {
    let fd = sock.as_raw_fd();
    let mut value: libc::c_int = 0;
    // SAFETY: `fd` belongs to `sock`, which the caller borrows for the whole call, so it is
    // an open socket descriptor and cannot be closed or reused meanwhile. SIOCOUTQ
    // (= TIOCOUTQ) on a socket writes exactly one `int` through its third argument, and
    // `&mut value` is a valid, aligned, writable pointer to a live local `c_int`. The call
    // has no other memory effects. An invalid fd or socket state only yields -1 and errno.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // The kernel never reports a negative queue length; treat one as empty rather than
    // wrapping it into a huge usize.
    Ok(usize::try_from(value).unwrap_or(0))
}

/// Elsewhere the send queue cannot be queried; the kernel's own `SO_SNDBUF` limit (which the
/// ring buffer is sized by) is the only bound.
#[cfg(not(target_os = "linux"))]
pub(crate) fn unacked_bytes(_sock: &impl AsRawFd) -> io::Result<usize> {
    Ok(0)
}
