//! The proxy's reply (RFC 1928 section 6), extended with the MSOCKS trailers and reply codes.
//!
//! `VER | REP | RSV | ATYP | BND.ADDR | BND.PORT`, then, only when REP is 0x00 and the request
//! was an MSOCKS one, the trailer: a [`ConnectionId`] after MSOCKS CONNECT/BIND, or
//! [`ResumeCounters`] after RECONNECT.

use std::fmt;

use crate::mobility::{ConnectionId, ResumeCounters};
use crate::{need, DecodeError, Decoded, Reader, TargetAddr, SOCKS_VERSION};

/// The REP field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyCode {
    /// 0x00 succeeded.
    Succeeded,
    /// 0x01 general SOCKS server failure (also: malformed request, proxy full).
    GeneralFailure,
    /// 0x02 connection not allowed by ruleset.
    NotAllowed,
    /// 0x03 network unreachable.
    NetworkUnreachable,
    /// 0x04 host unreachable (also: name did not resolve, connect timed out).
    HostUnreachable,
    /// 0x05 connection refused.
    ConnectionRefused,
    /// 0x06 TTL expired.
    TtlExpired,
    /// 0x07 command not supported.
    CommandNotSupported,
    /// 0x08 address type not supported.
    AddressTypeNotSupported,
    /// 0x80 (MSOCKS) no session with that token for this user: unknown, expired, closed, or
    /// owned by another user (these are deliberately indistinguishable).
    UnknownSession,
    /// 0x81 (MSOCKS) the RECONNECT counters are impossible for this session.
    BadCounters,
    /// 0x82 (MSOCKS) another RECONNECT of this session won the race; this one was refused.
    SessionBusy,
    /// 0x83 (MSOCKS) the MSOCKS extension version or flags are not supported.
    MsocksVersionNotSupported,
    /// Any other value.
    Other(u8),
}

impl ReplyCode {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            ReplyCode::Succeeded => 0x00,
            ReplyCode::GeneralFailure => 0x01,
            ReplyCode::NotAllowed => 0x02,
            ReplyCode::NetworkUnreachable => 0x03,
            ReplyCode::HostUnreachable => 0x04,
            ReplyCode::ConnectionRefused => 0x05,
            ReplyCode::TtlExpired => 0x06,
            ReplyCode::CommandNotSupported => 0x07,
            ReplyCode::AddressTypeNotSupported => 0x08,
            ReplyCode::UnknownSession => 0x80,
            ReplyCode::BadCounters => 0x81,
            ReplyCode::SessionBusy => 0x82,
            ReplyCode::MsocksVersionNotSupported => 0x83,
            ReplyCode::Other(v) => v,
        }
    }

    /// The code for a wire value.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0x00 => ReplyCode::Succeeded,
            0x01 => ReplyCode::GeneralFailure,
            0x02 => ReplyCode::NotAllowed,
            0x03 => ReplyCode::NetworkUnreachable,
            0x04 => ReplyCode::HostUnreachable,
            0x05 => ReplyCode::ConnectionRefused,
            0x06 => ReplyCode::TtlExpired,
            0x07 => ReplyCode::CommandNotSupported,
            0x08 => ReplyCode::AddressTypeNotSupported,
            0x80 => ReplyCode::UnknownSession,
            0x81 => ReplyCode::BadCounters,
            0x82 => ReplyCode::SessionBusy,
            0x83 => ReplyCode::MsocksVersionNotSupported,
            v => ReplyCode::Other(v),
        }
    }
}

impl fmt::Display for ReplyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ReplyCode::Succeeded => "succeeded",
            ReplyCode::GeneralFailure => "general SOCKS server failure",
            ReplyCode::NotAllowed => "connection not allowed by ruleset",
            ReplyCode::NetworkUnreachable => "network unreachable",
            ReplyCode::HostUnreachable => "host unreachable",
            ReplyCode::ConnectionRefused => "connection refused",
            ReplyCode::TtlExpired => "TTL expired",
            ReplyCode::CommandNotSupported => "command not supported",
            ReplyCode::AddressTypeNotSupported => "address type not supported",
            ReplyCode::UnknownSession => "unknown MSOCKS session",
            ReplyCode::BadCounters => "impossible RECONNECT counters",
            ReplyCode::SessionBusy => "MSOCKS session is being reconnected by another request",
            ReplyCode::MsocksVersionNotSupported => "MSOCKS version not supported",
            ReplyCode::Other(v) => return write!(f, "unassigned reply code {v:#04x}"),
        };
        write!(f, "{text} ({:#04x})", self.as_u8())
    }
}

/// Which trailer a successful reply carries; the client knows it from the request it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyContext {
    /// A plain SOCKS5 request: no trailer.
    Plain,
    /// An MSOCKS CONNECT or BIND: a connection identifier.
    MobileOpen,
    /// A RECONNECT: the resume counters.
    Reconnect,
}

/// The MSOCKS trailer of a successful reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyExtension {
    /// No trailer (plain SOCKS5, or a failure).
    None,
    /// The identifier of the new session.
    Connection(ConnectionId),
    /// How to finish the resplice on the mobile side.
    Resume(ResumeCounters),
}

/// A reply to any request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// REP.
    pub code: ReplyCode,
    /// BND.ADDR and BND.PORT.
    pub bound: TargetAddr,
    /// The MSOCKS trailer.
    pub extension: ReplyExtension,
}

impl Reply {
    /// A reply with no address and no trailer (what failures carry).
    pub fn failure(code: ReplyCode) -> Self {
        Reply {
            code,
            bound: TargetAddr::UNSPECIFIED,
            extension: ReplyExtension::None,
        }
    }

    /// A successful plain reply.
    pub fn success(bound: TargetAddr) -> Self {
        Reply {
            code: ReplyCode::Succeeded,
            bound,
            extension: ReplyExtension::None,
        }
    }

    /// Appends the reply and its trailer, if any.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[SOCKS_VERSION, self.code.as_u8(), 0x00]);
        self.bound.encode(out);
        match &self.extension {
            ReplyExtension::None => {}
            ReplyExtension::Connection(id) => id.encode(out),
            ReplyExtension::Resume(rc) => rc.encode(out),
        }
    }

    /// Reads a reply from the front of `buf`; `context` says which trailer follows success.
    pub fn decode(buf: &[u8], context: ReplyContext) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != SOCKS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: SOCKS_VERSION,
                got: ver,
            });
        }
        let code = ReplyCode::from_u8(need!(r.u8()));
        let _rsv = need!(r.u8());
        let bound = need!(TargetAddr::read(&mut r)?);
        let extension = match (code, context) {
            (ReplyCode::Succeeded, ReplyContext::MobileOpen) => {
                ReplyExtension::Connection(need!(ConnectionId::read(&mut r)?))
            }
            (ReplyCode::Succeeded, ReplyContext::Reconnect) => {
                ReplyExtension::Resume(need!(ResumeCounters::read(&mut r)?))
            }
            _ => ReplyExtension::None,
        };
        Ok(Some((
            Reply {
                code,
                bound,
                extension,
            },
            r.consumed(),
        )))
    }
}
