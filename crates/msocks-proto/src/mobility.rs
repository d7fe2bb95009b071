//! The MSOCKS extensions to SOCKS5: the options a mobility-aware client sends with its
//! request, the connection identifier the proxy returns, and RECONNECT with its counters.
//!
//! Plain SOCKS5 clients never see any of this: the extensions are only spoken after a client
//! used one of the MSOCKS command codes (see [`crate::Command`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::addr::{ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6};
use crate::{need, DecodeError, Decoded, Reader};

/// The version of the MSOCKS extension this crate speaks; every MSOCKS trailer starts with it.
pub const MSOCKS_VERSION: u8 = 0x01;

/// Flag bit: the mobile application receives urgent data inline (`SO_OOBINLINE`), so urgent
/// bytes are counted in `data_read` like any other byte (paper, section III-B.6).
pub const FLAG_OOB_INLINE: u8 = 0x01;

/// RECONNECT FLAGS bit 1: the client sends its resend right after the request, without
/// waiting for the reply, starting at RESEND_FROM (a field that then ends the body). Only
/// RECONNECT may carry it (PROTOCOL.md 3.7.1).
pub const FLAG_EARLY_RESEND: u8 = 0x02;

/// Every flag bit version 1 defines for MSOCKS CONNECT and BIND.
const KNOWN_FLAGS: u8 = FLAG_OOB_INLINE;

/// Size of the [`MobilityOptions`] trailer of an MSOCKS CONNECT or BIND request.
pub const MAX_REQUEST_TRAILER: usize = 1 + 1 + 8 + 8;

/// Number of random bytes in a session token.
pub const TOKEN_LEN: usize = 16;

fn check_version(v: u8) -> Result<(), DecodeError> {
    if v == MSOCKS_VERSION {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedMsocksVersion(v))
    }
}

fn check_flags(f: u8) -> Result<(), DecodeError> {
    if f & !KNOWN_FLAGS == 0 {
        Ok(())
    } else {
        Err(DecodeError::ReservedFlags(f & !KNOWN_FLAGS))
    }
}

/// What a mobility-aware client asks for with an MSOCKS CONNECT or BIND:
/// `MVER | FLAGS | READ_ORIGIN (u64) | WRITE_ORIGIN (u64)`.
///
/// The origins are where the client's `data_read` and `data_written` counters start, the way
/// a TCP initial sequence number starts a sequence space. All counter arithmetic is modulo
/// 2^64, so a client may start anywhere (tests start near 2^32 and 2^63 to exercise wrap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MobilityOptions {
    /// Urgent data is received inline ([`FLAG_OOB_INLINE`]).
    pub oob_inline: bool,
    /// Initial value of the client's `data_read` counter (server-to-client bytes).
    pub read_origin: u64,
    /// Initial value of the client's `data_written` counter (client-to-server bytes).
    pub write_origin: u64,
}

impl MobilityOptions {
    /// Appends the trailer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(MSOCKS_VERSION);
        out.push(if self.oob_inline { FLAG_OOB_INLINE } else { 0 });
        out.extend_from_slice(&self.read_origin.to_be_bytes());
        out.extend_from_slice(&self.write_origin.to_be_bytes());
    }

    /// Reads the trailer from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let v = need!(Self::read(&mut r)?);
        Ok(Some((v, r.consumed())))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        check_version(need!(r.u8()))?;
        let flags = need!(r.u8());
        check_flags(flags)?;
        let read_origin = need!(r.u64());
        let write_origin = need!(r.u64());
        Ok(Some(MobilityOptions {
            oob_inline: flags & FLAG_OOB_INLINE != 0,
            read_origin,
            write_origin,
        }))
    }
}

/// The unguessable part of a connection identifier: 128 bits from the operating system's
/// random source. Its `Display` shows only the first four bytes, so logs can correlate
/// sessions without leaking a usable identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionToken(pub [u8; TOKEN_LEN]);

impl SessionToken {
    /// The full token as lowercase hex (for the owner's own tools, never for shared logs).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionToken({self})")
    }
}

/// The connection identifier returned with a successful MSOCKS CONNECT or BIND reply:
/// `MVER | TOKEN (16) | HOME_ATYP | HOME_ADDR | HOME_PORT`.
///
/// `home` is where the owning proxy process accepts RECONNECT for this session, so a client
/// behind a load balancer goes straight back to the process that holds its state. An
/// unspecified home IP (0.0.0.0 or ::) means "any address of the proxy you already use, at
/// this port", which lets the mobile node pick the proxy address per interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    /// The secret session token.
    pub token: SessionToken,
    /// Where to send RECONNECT.
    pub home: SocketAddr,
}

impl ConnectionId {
    /// Appends the identifier.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(MSOCKS_VERSION);
        out.extend_from_slice(&self.token.0);
        match self.home.ip() {
            IpAddr::V4(ip) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&self.home.port().to_be_bytes());
    }

    /// Reads an identifier from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let v = need!(Self::read(&mut r)?);
        Ok(Some((v, r.consumed())))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        check_version(need!(r.u8()))?;
        let token = SessionToken(need!(r.array::<TOKEN_LEN>()));
        let ip = match need!(r.u8()) {
            ATYP_IPV4 => IpAddr::V4(Ipv4Addr::from(need!(r.array::<4>()))),
            ATYP_IPV6 => IpAddr::V6(Ipv6Addr::from(need!(r.array::<16>()))),
            ATYP_DOMAIN => return Err(DecodeError::AddressTypeNotAllowed(ATYP_DOMAIN)),
            other => return Err(DecodeError::UnknownAddressType(other)),
        };
        let port = need!(r.u16());
        Ok(Some(ConnectionId {
            token,
            home: SocketAddr::new(ip, port),
        }))
    }
}

/// The body of a RECONNECT request, after `VER | CMD | RSV`:
/// `MVER | FLAGS | TOKEN (16) | DATA_READ (u64) | DATA_WRITTEN (u64) [| RESEND_FROM (u64)]`,
/// RESEND_FROM present exactly when FLAGS has [`FLAG_EARLY_RESEND`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectRequest {
    /// Urgent data is received inline from now on ([`FLAG_OOB_INLINE`]).
    pub oob_inline: bool,
    /// The token of the session to resume.
    pub token: SessionToken,
    /// Server-to-client bytes the application has read, counted from `read_origin`.
    pub data_read: u64,
    /// Client-to-server bytes the application has written, counted from `write_origin`.
    pub data_written: u64,
    /// Early resend ([`FLAG_EARLY_RESEND`]): the write-space position from which the client
    /// sends its bytes again right after this request, without waiting for the reply.
    pub resend_from: Option<u64>,
}

/// Size of a RECONNECT body without RESEND_FROM.
pub const RECONNECT_BODY_LEN: usize = 1 + 1 + TOKEN_LEN + 8 + 8;

/// Size of a RECONNECT body with RESEND_FROM.
pub const RECONNECT_EARLY_BODY_LEN: usize = RECONNECT_BODY_LEN + 8;

impl ReconnectRequest {
    /// Appends the body (not the `VER | CMD | RSV` header; see [`crate::Request`]).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(MSOCKS_VERSION);
        let mut flags = if self.oob_inline { FLAG_OOB_INLINE } else { 0 };
        if self.resend_from.is_some() {
            flags |= FLAG_EARLY_RESEND;
        }
        out.push(flags);
        out.extend_from_slice(&self.token.0);
        out.extend_from_slice(&self.data_read.to_be_bytes());
        out.extend_from_slice(&self.data_written.to_be_bytes());
        if let Some(from) = self.resend_from {
            out.extend_from_slice(&from.to_be_bytes());
        }
    }

    pub(crate) fn read_body(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        check_version(need!(r.u8()))?;
        let flags = need!(r.u8());
        check_flags(flags & !FLAG_EARLY_RESEND)?;
        let token = SessionToken(need!(r.array::<TOKEN_LEN>()));
        let data_read = need!(r.u64());
        let data_written = need!(r.u64());
        let resend_from = if flags & FLAG_EARLY_RESEND != 0 {
            Some(need!(r.u64()))
        } else {
            None
        };
        Ok(Some(ReconnectRequest {
            oob_inline: flags & FLAG_OOB_INLINE != 0,
            token,
            data_read,
            data_written,
            resend_from,
        }))
    }
}

/// The trailer of a successful RECONNECT reply: `MVER | DATA_WRITE (u64) | DATA_SALVAGE (u64)`.
///
/// `data_write`: how many of the last bytes the application wrote the client must write
/// again into the new connection. `data_salvage`: how many bytes the client must still read
/// from the old connection's socket before reading the new one (paper, section III-B).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumeCounters {
    /// Bytes to rewrite into the new connection.
    pub data_write: u64,
    /// Bytes to drain from the old connection first.
    pub data_salvage: u64,
}

impl ResumeCounters {
    /// Appends the trailer.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(MSOCKS_VERSION);
        out.extend_from_slice(&self.data_write.to_be_bytes());
        out.extend_from_slice(&self.data_salvage.to_be_bytes());
    }

    /// Reads the trailer from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let v = need!(Self::read(&mut r)?);
        Ok(Some((v, r.consumed())))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        check_version(need!(r.u8()))?;
        let data_write = need!(r.u64());
        let data_salvage = need!(r.u64());
        Ok(Some(ResumeCounters {
            data_write,
            data_salvage,
        }))
    }
}
