//! Reading and freezing the proxy's TCP sockets: `TCP_REPAIR` and friends,
//! `TCP_INFO`, the queue-size ioctls.
//!
//! Every call here is a plain `setsockopt`/`getsockopt`/`ioctl` on a
//! descriptor the caller owns (borrowed as [`BorrowedFd`], so it is open for
//! the duration of the call) with a buffer that lives on our stack and whose
//! length we pass exactly; none keeps a pointer after returning.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use crate::mapping::ConnState;

// From <linux/tcp.h>; spelled out because not every libc target has them.
const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_TIMESTAMP: libc::c_int = 24;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// `TCPI_OPT_TIMESTAMPS` in `tcpi_options`.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `TCPI_OPT_SACK` in `tcpi_options`.
pub const TCPI_OPT_SACK: u8 = 2;
/// `TCPI_OPT_WSCALE` in `tcpi_options`.
pub const TCPI_OPT_WSCALE: u8 = 4;
/// `TCPI_OPT_ECN` in `tcpi_options`.
pub const TCPI_OPT_ECN: u8 = 8;
// SIOCINQ / SIOCOUTQ are FIONREAD / TIOCOUTQ on sockets.
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;

fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `fd` is a live descriptor for the whole call (BorrowedFd);
    // `val` is a c_int on our stack and we pass its exact size; the kernel
    // only reads it during the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_bytes(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `buf` is writable for `len` bytes (we pass at most its
    // length), `len` is a valid in/out length on our stack, `fd` is live;
    // the kernel writes at most `len` bytes and nothing after returning.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_u32(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> io::Result<u32> {
    let mut b = [0u8; 4];
    let n = get_bytes(fd, level, opt, &mut b)?;
    if n != 4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short getsockopt",
        ));
    }
    Ok(u32::from_ne_bytes(b))
}

fn ioctl_int(fd: BorrowedFd<'_>, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: SIOCINQ/SIOCOUTQ write one c_int through the pointer, which
    // points at `v` on our stack; `fd` is live for the call. The request
    // type differs between libcs (c_ulong vs c_int), hence `as _`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    if rc == 0 {
        Ok(u32::try_from(v).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Bytes in the socket's send queue not yet acknowledged by the peer, plus
/// bytes not yet sent (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCOUTQ)
}

/// Bytes in the socket's receive queue not yet read (`SIOCINQ`).
pub fn inq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    ioctl_int(fd, SIOCINQ)
}

/// Sends any ACK the socket still owes at once (`TCP_QUICKACK`), so that no
/// delayed-ACK timer can fire after the socket is frozen.
pub fn quickack(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1)
}

/// Turns `SO_KEEPALIVE` off: a keepalive probe is the one thing a socket
/// with empty queues could still send by itself once frozen.
pub fn keepalive_off(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0)
}

/// Caps the MSS the socket announces and uses (`TCP_MAXSEG`); on a
/// listener, accepted sockets inherit it. Call before `connect`/`listen`.
pub fn set_maxseg(fd: BorrowedFd<'_>, mss: u32) -> io::Result<()> {
    let v = libc::c_int::try_from(mss).unwrap_or(libc::c_int::MAX);
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, v)
}

/// `TCP_REPAIR_OFF_NO_WP`: leave repair mode without the window probe the
/// kernel otherwise sends.
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

/// Puts the socket in repair mode (`on`), or takes it out without sending
/// anything. In repair mode `close` drops the connection without FIN or
/// RST. Needs `CAP_NET_ADMIN`.
pub fn set_repair(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let v = if on { 1 } else { TCP_REPAIR_OFF_NO_WP };
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, v)
}

/// The parts of `TCP_INFO` the splice needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Info {
    /// `tcpi_state` (1 = ESTABLISHED).
    pub state: u8,
    /// `tcpi_options`: `TCPI_OPT_*` bits.
    pub options: u8,
    /// Peer's window shift.
    pub snd_wscale: u8,
    /// Our window shift.
    pub rcv_wscale: u8,
    /// Current send MSS (options already subtracted).
    pub snd_mss: u32,
    /// MSS we announced.
    pub advmss: u32,
    /// Smoothed round-trip time, microseconds (`tcpi_rtt`).
    pub rtt_us: u32,
}

/// Reads `TCP_INFO`. The struct is parsed from its documented byte layout
/// rather than through a Rust mirror of its C bitfields.
pub fn info(fd: BorrowedFd<'_>) -> io::Result<Info> {
    let mut b = [0u8; 232];
    let n = get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut b)?;
    if n < 88 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "short TCP_INFO"));
    }
    let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;` — the first
    // bitfield sits in the low nibble on little-endian ABIs, the high one
    // on big-endian.
    let (snd_wscale, rcv_wscale) = if cfg!(target_endian = "little") {
        (b[6] & 0xf, b[6] >> 4)
    } else {
        (b[6] >> 4, b[6] & 0xf)
    };
    Ok(Info {
        state: b[0],
        options: b[5],
        snd_wscale,
        rcv_wscale,
        snd_mss: u32_at(16),
        advmss: u32_at(84),
        rtt_us: u32_at(68),
    })
}

/// The proxy's current TCP timestamp on this connection (`TCP_TIMESTAMP`):
/// its millisecond clock plus the connection's random offset.
pub fn timestamp(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_u32(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP)
}

/// `CLOCK_MONOTONIC` in milliseconds, truncated to 32 bits: the clock the
/// kernel's TCP timestamps and the datapath's `bpf_ktime_get_ns` count.
pub fn monotonic_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, which
    // points at `ts` on our stack; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ms = (ts.tv_sec as u64).wrapping_mul(1000) + (ts.tv_nsec as u64) / 1_000_000;
    ms as u32
}

/// Reads a socket's sequence state. The socket must be in repair mode
/// (`set_repair(fd, true)`). `snd_nxt` is the next sequence number to be
/// written (`write_seq`): the socket's `snd_nxt` once its send queue is
/// empty, as it is when a splice freezes it.
pub fn read_state(fd: BorrowedFd<'_>, info: &Info) -> io::Result<ConnState> {
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let snd_nxt = get_u32(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let rcv_nxt = get_u32(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    // Read the monotonic clock first: the offset computed is then never
    // below the true one, so mapped TSvals can only err upwards, which PAWS
    // accepts.
    let before = monotonic_ms();
    let ts = timestamp(fd)?;
    // Since Linux 6.7 the low bit flags a microsecond clock (and is
    // cleared for the millisecond one); the datapath counts milliseconds.
    if ts & 1 == 1 && info.options & TCPI_OPT_TIMESTAMPS != 0 {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "connection uses microsecond TCP timestamps",
        ));
    }
    Ok(ConnState {
        snd_nxt,
        rcv_nxt,
        snd_wscale: info.snd_wscale,
        rcv_wscale: info.rcv_wscale,
        // +1: the kernel cleared the clock's low bit; erring upwards is
        // safe (PAWS wants TSvals not to go back), downwards is not.
        ts_offset: ts.wrapping_sub(before).wrapping_add(1),
    })
}
