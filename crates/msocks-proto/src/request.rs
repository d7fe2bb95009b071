//! The client's request (RFC 1928 section 4), extended with the MSOCKS commands.
//!
//! `VER | CMD | RSV | ATYP | DST.ADDR | DST.PORT` for the SOCKS5 commands;
//! the same followed by a [`MobilityOptions`] trailer for MSOCKS CONNECT and BIND;
//! `VER | CMD | RSV | <RECONNECT body>` for RECONNECT;
//! `VER | CMD | RSV | MVER | FLAGS` for STANDBY.

use crate::mobility::{MobilityOptions, ReconnectRequest};
use crate::{need, DecodeError, Decoded, Reader, TargetAddr, SOCKS_VERSION};

/// CMD of a SOCKS5 CONNECT.
pub const CMD_CONNECT: u8 = 0x01;
/// CMD of a SOCKS5 BIND.
pub const CMD_BIND: u8 = 0x02;
/// CMD of a SOCKS5 UDP ASSOCIATE.
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;
/// CMD of an MSOCKS CONNECT: a CONNECT whose reply carries a connection identifier.
pub const CMD_MSOCKS_CONNECT: u8 = 0x81;
/// CMD of an MSOCKS BIND: a BIND whose replies carry a connection identifier.
pub const CMD_MSOCKS_BIND: u8 = 0x82;
/// CMD of an MSOCKS RECONNECT.
pub const CMD_RECONNECT: u8 = 0x83;
/// CMD of an MSOCKS STANDBY: hold this authenticated connection for a later request and
/// answer liveness probes meanwhile (PROTOCOL.md 3.13).
pub const CMD_STANDBY: u8 = 0x84;

/// What a new session asks the proxy to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Connect to the target.
    Connect,
    /// Listen for one connection from the target.
    Bind,
    /// Relay UDP datagrams.
    UdpAssociate,
}

impl Command {
    /// Lowercase name for logs and config files.
    pub fn name(self) -> &'static str {
        match self {
            Command::Connect => "connect",
            Command::Bind => "bind",
            Command::UdpAssociate => "udpassociate",
        }
    }
}

/// A request that opens a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenRequest {
    /// What to do.
    pub command: Command,
    /// DST.ADDR and DST.PORT.
    pub target: TargetAddr,
    /// Present when the client used an MSOCKS command and so wants a connection identifier.
    pub mobility: Option<MobilityOptions>,
}

/// Any request a client can send after authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// CONNECT, BIND or UDP ASSOCIATE, plain or MSOCKS.
    Open(OpenRequest),
    /// Resume an existing session over this new connection.
    Reconnect(ReconnectRequest),
    /// Keep this connection open for a later request, answering probes meanwhile.
    Standby,
}

impl Request {
    /// Appends the request. UDP ASSOCIATE cannot carry mobility options (it has no MSOCKS
    /// command code); they are not written for it.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Open(open) => {
                let cmd = match (open.command, open.mobility.is_some()) {
                    (Command::Connect, false) => CMD_CONNECT,
                    (Command::Bind, false) => CMD_BIND,
                    (Command::UdpAssociate, _) => CMD_UDP_ASSOCIATE,
                    (Command::Connect, true) => CMD_MSOCKS_CONNECT,
                    (Command::Bind, true) => CMD_MSOCKS_BIND,
                };
                out.extend_from_slice(&[SOCKS_VERSION, cmd, 0x00]);
                open.target.encode(out);
                if cmd != CMD_UDP_ASSOCIATE {
                    if let Some(m) = &open.mobility {
                        m.encode(out);
                    }
                }
            }
            Request::Reconnect(rc) => {
                out.extend_from_slice(&[SOCKS_VERSION, CMD_RECONNECT, 0x00]);
                rc.encode_body(out);
            }
            Request::Standby => crate::standby::encode_standby_request(out),
        }
    }

    /// Reads a request from the front of `buf`. The reserved byte is ignored, as most SOCKS5
    /// servers do.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != SOCKS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: SOCKS_VERSION,
                got: ver,
            });
        }
        let cmd = need!(r.u8());
        let (command, mobile) = match cmd {
            CMD_CONNECT => (Command::Connect, false),
            CMD_BIND => (Command::Bind, false),
            CMD_UDP_ASSOCIATE => (Command::UdpAssociate, false),
            CMD_MSOCKS_CONNECT => (Command::Connect, true),
            CMD_MSOCKS_BIND => (Command::Bind, true),
            CMD_RECONNECT => {
                let _rsv = need!(r.u8());
                let body = need!(ReconnectRequest::read_body(&mut r)?);
                return Ok(Some((Request::Reconnect(body), r.consumed())));
            }
            CMD_STANDBY => {
                let _rsv = need!(r.u8());
                need!(crate::standby::read_standby_body(&mut r)?);
                return Ok(Some((Request::Standby, r.consumed())));
            }
            other => return Err(DecodeError::UnknownCommand(other)),
        };
        let _rsv = need!(r.u8());
        let target = need!(TargetAddr::read(&mut r)?);
        let mobility = if mobile {
            Some(need!(MobilityOptions::read(&mut r)?))
        } else {
            None
        };
        Ok(Some((
            Request::Open(OpenRequest {
                command,
                target,
                mobility,
            }),
            r.consumed(),
        )))
    }
}
