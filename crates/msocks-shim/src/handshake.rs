//! Connecting the program's own socket to the agent and running the SOCKS5 CONNECT on it.
//!
//! The socket is switched to non-blocking for the exchange (whatever the program chose) so
//! every wait is a `poll` bounded by the time limit, then its flags are put back as they were.
//! A program that asked for a non-blocking connect therefore gets an already connected socket
//! (`connect` returns 0, which POSIX allows): a following poll/select/epoll for writability
//! fires at once and `SO_ERROR` reads 0.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::time::{Duration, Instant};

use libc::{c_int, sockaddr, socklen_t};
use msocks_proto::TargetAddr;

use crate::socks::{self, HandshakeError, REPLY_HEAD};

/// The signature of `connect`: the real one is passed in, since the shim's own exported
/// `connect` must not be called from here.
pub type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;

/// The errno of the last failed libc call on this thread.
fn last_errno() -> c_int {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Reads a socket address of family AF_INET or AF_INET6 from C memory; `None` for any other
/// family or a too short length.
///
/// # Safety
/// `addr` must be null or point to at least `len` readable bytes.
pub unsafe fn from_raw(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < mem::size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: the caller guarantees `len` readable bytes, at least the family field (checked
    // above); read_unaligned because the program's buffer may have any alignment.
    let family = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) };
    match c_int::from(family) {
        libc::AF_INET if len as usize >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: `len` covers a whole sockaddr_in (checked just above).
            let sin = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: `len` covers a whole sockaddr_in6 (checked just above).
            let sin6 = unsafe { std::ptr::read_unaligned(addr.cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A socket address in C layout, and its length.
pub fn to_raw(addr: SocketAddr) -> (libc::sockaddr_storage, socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_in is plain old data; all-zero is valid.
            let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin) };
            (storage, mem::size_of::<libc::sockaddr_in>() as socklen_t)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_in6 is plain old data; all-zero is valid.
            let mut sin6: libc::sockaddr_in6 = unsafe { mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_flowinfo = v6.flowinfo().to_be();
            sin6.sin6_scope_id = v6.scope_id();
            // SAFETY: as above.
            unsafe { std::ptr::write(std::ptr::addr_of_mut!(storage).cast(), sin6) };
            (storage, mem::size_of::<libc::sockaddr_in6>() as socklen_t)
        }
    }
}

/// Stores `addr` the way getpeername(2) and getsockname(2) return addresses: at most `*len`
/// bytes are written (a smaller buffer gets a truncated address), and `*len` becomes the full
/// length.
///
/// # Safety
/// `len` must be valid for reads and writes, and `out` valid for `*len` bytes of writes.
pub unsafe fn write_raw(addr: SocketAddr, out: *mut sockaddr, len: *mut socklen_t) {
    let (raw, raw_len) = to_raw(addr);
    // SAFETY: the caller guarantees `len` is valid.
    let room = unsafe { *len } as usize;
    let n = room.min(raw_len as usize);
    // SAFETY: `raw` holds `raw_len` >= n bytes; the caller guarantees `out` has room for
    // `*len` >= n bytes; the two cannot overlap (`raw` is our local).
    unsafe {
        std::ptr::copy_nonoverlapping(std::ptr::addr_of!(raw).cast::<u8>(), out.cast::<u8>(), n);
        *len = raw_len;
    }
}

/// The local address of socket `fd`, if it has an IPv4 or IPv6 one.
pub fn local_addr(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `storage`, and the length into `len`.
    let rc = unsafe { libc::getsockname(fd, std::ptr::addr_of_mut!(storage).cast(), &mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` (<= the size of storage) valid bytes.
    unsafe { from_raw(std::ptr::addr_of!(storage).cast(), len) }
}

/// The agent's address as a socket of `domain` can reach it: an IPv4 agent from an AF_INET6
/// socket through its IPv4-mapped address; an IPv6 agent cannot be reached from AF_INET.
pub fn agent_for_domain(agent: SocketAddr, domain: c_int) -> Result<SocketAddr, HandshakeError> {
    let agent = crate::classify::unmap(agent);
    match (domain, agent.ip()) {
        (libc::AF_INET, IpAddr::V4(_)) | (libc::AF_INET6, IpAddr::V6(_)) => Ok(agent),
        (libc::AF_INET6, IpAddr::V4(v4)) => Ok(SocketAddr::new(
            IpAddr::V6(v4.to_ipv6_mapped()),
            agent.port(),
        )),
        _ => Err(HandshakeError::Io {
            what: "an IPv4 socket cannot reach an IPv6 agent address",
            errno: libc::EAFNOSUPPORT,
        }),
    }
}

/// Puts the file status flags back when dropped.
struct RestoreFlags {
    fd: c_int,
    flags: c_int,
}

impl Drop for RestoreFlags {
    fn drop(&mut self) {
        // SAFETY: F_SETFL with an int argument on a descriptor the program handed us; at worst
        // it fails with EBADF, which changes nothing.
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.flags) };
    }
}

/// Waits until `fd` is ready for `events` or the deadline passes.
fn wait(fd: c_int, events: libc::c_short, deadline: Instant) -> Result<(), HandshakeError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout);
        }
        let ms = left.as_millis().clamp(1, c_int::MAX as u128) as c_int;
        let mut pfd = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = last_errno();
            if e != libc::EINTR {
                return Err(HandshakeError::Io {
                    what: "waiting for the agent",
                    errno: e,
                });
            }
        }
    }
}

fn send_all(fd: c_int, mut buf: &[u8], deadline: Instant) -> Result<(), HandshakeError> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid slice for its length; MSG_NOSIGNAL so a closed agent
        // connection is an EPIPE here rather than a SIGPIPE killing the program.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            buf = buf.get(n as usize..).unwrap_or_default();
            continue;
        }
        match last_errno() {
            libc::EINTR => {}
            libc::EAGAIN => wait(fd, libc::POLLOUT, deadline)?,
            errno => {
                return Err(HandshakeError::Io {
                    what: "sending to the agent",
                    errno,
                })
            }
        }
    }
    Ok(())
}

fn recv_exact(fd: c_int, buf: &mut [u8], deadline: Instant) -> Result<(), HandshakeError> {
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        // SAFETY: `rest` is a valid, writable slice for its length.
        let n = unsafe { libc::recv(fd, rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            got += n as usize;
            continue;
        }
        if n == 0 {
            return Err(HandshakeError::Closed);
        }
        match last_errno() {
            libc::EINTR => {}
            libc::EAGAIN => wait(fd, libc::POLLIN, deadline)?,
            errno => {
                return Err(HandshakeError::Io {
                    what: "reading from the agent",
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// Connects `fd` (a TCP socket of family `domain`) to the agent and asks it for `target`.
/// On success `fd` is a stream to the target, with its flags as before.
///
/// # Safety
/// `connect` must be the real libc `connect` (or a function with its contract).
pub unsafe fn via_agent(
    fd: c_int,
    domain: c_int,
    connect: ConnectFn,
    agent: SocketAddr,
    target: &TargetAddr,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let agent = agent_for_domain(agent, domain)?;
    // SAFETY: F_GETFL takes no argument; a bad fd just returns -1.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(HandshakeError::Io {
            what: "reading the socket's flags",
            errno: last_errno(),
        });
    }
    let _restore = RestoreFlags { fd, flags };
    // SAFETY: F_SETFL with an int argument.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(HandshakeError::Io {
            what: "making the socket non-blocking",
            errno: last_errno(),
        });
    }
    let (sa, len) = to_raw(agent);
    // SAFETY: `sa` is a valid sockaddr of length `len` on our stack; the caller guarantees
    // `connect` behaves as libc's.
    let rc = unsafe { connect(fd, std::ptr::addr_of!(sa).cast(), len) };
    if rc != 0 {
        match last_errno() {
            // Both mean the connection is under way; its outcome shows in SO_ERROR.
            libc::EINPROGRESS | libc::EINTR => {
                wait(fd, libc::POLLOUT, deadline)?;
                let mut err: c_int = 0;
                let mut err_len = mem::size_of::<c_int>() as socklen_t;
                // SAFETY: SO_ERROR writes one int into `err`, whose size is in `err_len`.
                let rc = unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        std::ptr::addr_of_mut!(err).cast(),
                        &mut err_len,
                    )
                };
                if rc < 0 {
                    err = last_errno();
                }
                if err != 0 {
                    return Err(HandshakeError::Io {
                        what: "connecting to the agent",
                        errno: err,
                    });
                }
            }
            errno => {
                return Err(HandshakeError::Io {
                    what: "connecting to the agent",
                    errno,
                })
            }
        }
    }
    send_all(fd, &socks::greeting(), deadline)?;
    let mut sel = [0u8; 2];
    recv_exact(fd, &mut sel, deadline)?;
    socks::check_selection(&sel)?;
    send_all(fd, &socks::connect_request(target), deadline)?;
    let mut reply = [0u8; 4 + 1 + 255 + 2];
    let (head, _) = reply.split_at_mut(REPLY_HEAD);
    recv_exact(fd, head, deadline)?;
    let mut first = [0u8; REPLY_HEAD];
    first.copy_from_slice(head);
    let total = socks::reply_len(&first)?;
    recv_exact(fd, &mut reply[REPLY_HEAD..total], deadline)?;
    socks::check_reply(&reply[..total])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::fd::AsRawFd;
    use std::thread;

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "192.0.2.1:80",
            "[2001:db8::1]:443",
            "[::ffff:10.0.0.1]:1",
            "[fe80::1%3]:22",
        ] {
            let a: SocketAddr = a.parse().unwrap();
            let (raw, len) = to_raw(a);
            // SAFETY: `raw` holds `len` valid bytes.
            let back = unsafe { from_raw(std::ptr::addr_of!(raw).cast(), len) };
            assert_eq!(back, Some(a));
            // SAFETY: as above; a shorter length must be refused, not read past.
            let short = unsafe { from_raw(std::ptr::addr_of!(raw).cast(), len - 1) };
            assert_eq!(short, None);
        }
        // SAFETY: null is allowed.
        assert_eq!(unsafe { from_raw(std::ptr::null(), 16) }, None);
    }

    #[test]
    fn written_addresses_are_truncated_like_the_kernel_does() {
        let a: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        // SAFETY: all-zero sockaddr_storage is valid; the buffer has `len` bytes.
        let mut out: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_storage>() as socklen_t;
        // SAFETY: `out` has room for `len` bytes.
        unsafe { write_raw(a, std::ptr::addr_of_mut!(out).cast(), &mut len) };
        assert_eq!(len as usize, mem::size_of::<libc::sockaddr_in6>());
        // SAFETY: `len` valid bytes.
        assert_eq!(
            unsafe { from_raw(std::ptr::addr_of!(out).cast(), len) },
            Some(a)
        );
        let mut small = [0xAAu8; 8];
        let mut len = 4 as socklen_t;
        // SAFETY: `small` has room for 4 (and more) bytes.
        unsafe { write_raw(a, small.as_mut_ptr().cast(), &mut len) };
        assert_eq!(len as usize, mem::size_of::<libc::sockaddr_in6>());
        assert_eq!(
            &small[4..],
            &[0xAA; 4],
            "nothing written past the room given"
        );
    }

    #[test]
    fn agent_address_per_socket_family() {
        let v4: SocketAddr = "127.0.0.1:1080".parse().unwrap();
        let v6: SocketAddr = "[::1]:1080".parse().unwrap();
        assert_eq!(agent_for_domain(v4, libc::AF_INET), Ok(v4));
        assert_eq!(
            agent_for_domain(v4, libc::AF_INET6),
            Ok("[::ffff:127.0.0.1]:1080".parse().unwrap())
        );
        assert_eq!(agent_for_domain(v6, libc::AF_INET6), Ok(v6));
        assert_eq!(
            agent_for_domain(v6, libc::AF_INET).map_err(|e| e.errno()),
            Err(libc::EAFNOSUPPORT)
        );
    }

    /// A one-shot SOCKS5 server on loopback answering `reply_code`, then echoing a line.
    fn agent(reply_code: u8) -> (SocketAddr, thread::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut g = [0u8; 3];
            c.read_exact(&mut g).unwrap();
            c.write_all(&[5, 0]).unwrap();
            let mut req = [0u8; 10];
            c.read_exact(&mut req).unwrap();
            // Reply and the first stream bytes in one write: the shim must not eat them.
            let mut out = vec![5, reply_code, 0, 1, 0, 0, 0, 0, 0, 0];
            out.extend_from_slice(b"hello");
            c.write_all(&out).unwrap();
            req.to_vec()
        });
        (addr, h)
    }

    fn tcp_socket(nonblocking: bool) -> std::os::fd::OwnedFd {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(nonblocking).unwrap();
        s.into()
    }

    #[test]
    fn handshake_leaves_stream_bytes_and_flags_alone() {
        for nonblocking in [false, true] {
            let (addr, server) = agent(0);
            let fd = tcp_socket(nonblocking);
            let target = TargetAddr::Ip("192.0.2.9:80".parse().unwrap());
            // SAFETY: libc's connect is the real one here (tests build no exports).
            let r = unsafe {
                via_agent(
                    fd.as_raw_fd(),
                    libc::AF_INET,
                    libc::connect,
                    addr,
                    &target,
                    Duration::from_secs(5),
                )
            };
            assert_eq!(r, Ok(()));
            assert_eq!(server.join().unwrap(), [5, 1, 0, 1, 192, 0, 2, 9, 0, 80]);
            let s = socket2::Socket::from(fd);
            assert_eq!(s.nonblocking().unwrap(), nonblocking);
            s.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 5];
            (&s).read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
        }
    }

    #[test]
    fn refusals_and_a_missing_agent_become_errnos() {
        let (addr, server) = agent(5);
        let fd = tcp_socket(false);
        let target = TargetAddr::Domain("x.example".into(), 80);
        // SAFETY: as above.
        let r = unsafe {
            via_agent(
                fd.as_raw_fd(),
                libc::AF_INET,
                libc::connect,
                addr,
                &target,
                Duration::from_secs(5),
            )
        };
        let _ = server.join();
        assert_eq!(r.map_err(|e| e.errno()), Err(libc::ECONNREFUSED));

        // Nobody listens: the agent is unreachable.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = l.local_addr().unwrap();
        drop(l);
        let fd = tcp_socket(true);
        // SAFETY: as above.
        let r = unsafe {
            via_agent(
                fd.as_raw_fd(),
                libc::AF_INET,
                libc::connect,
                gone,
                &target,
                Duration::from_secs(5),
            )
        };
        assert_eq!(r.map_err(|e| e.errno()), Err(libc::ECONNREFUSED));
    }

    #[test]
    fn a_silent_agent_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = tcp_socket(false);
        let target = TargetAddr::Domain("x.example".into(), 80);
        let start = Instant::now();
        // SAFETY: as above.
        let r = unsafe {
            via_agent(
                fd.as_raw_fd(),
                libc::AF_INET,
                libc::connect,
                l.local_addr().unwrap(),
                &target,
                Duration::from_millis(300),
            )
        };
        assert_eq!(r, Err(HandshakeError::Timeout));
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
