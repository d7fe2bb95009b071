//! Standby connections and liveness probes (PROTOCOL.md 3.13).
//!
//! A mobile node can open an authenticated connection to the proxy ahead of need with the
//! STANDBY request (`VER | 0x84 | RSV | MVER | FLAGS`). After the proxy's success reply the
//! connection waits for its real request, and meanwhile carries probes:
//!
//! * client → proxy: [`StandbyFrame::Ping`] (`0x01 | NONCE u64`) or the connection's request
//!   (starting with the version byte `0x05`), after which the connection is an ordinary one;
//! * proxy → client: [`ProxyFrame::Pong`] (`0x02 | NONCE u64`) for each ping, in order, and
//!   the reply to the request.
//!
//! So a move onto a standby connection costs one RECONNECT exchange instead of a TCP
//! handshake plus one, and the pings tell the mobile node within a second whether the path
//! carrying them still works, long before TCP would give up.

use crate::{
    need, DecodeError, Decoded, Reader, Reply, ReplyContext, Request, MSOCKS_VERSION, SOCKS_VERSION,
};

/// First byte of a ping frame (client → proxy).
pub const FRAME_PING: u8 = 0x01;
/// First byte of a pong frame (proxy → client).
pub const FRAME_PONG: u8 = 0x02;
/// Size of a ping or pong frame: type byte and 64-bit nonce.
pub const PROBE_FRAME_LEN: usize = 9;

/// What a client sends on a standby connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StandbyFrame {
    /// A liveness probe; the proxy answers with a pong carrying the same nonce.
    Ping(u64),
    /// The connection's request; the standby ends and the request is served as if it had
    /// followed authentication directly.
    Request(Request),
}

impl StandbyFrame {
    /// Appends the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            StandbyFrame::Ping(nonce) => {
                out.push(FRAME_PING);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            StandbyFrame::Request(r) => r.encode(out),
        }
    }

    /// Reads a frame from the front of `buf`. A first byte other than `0x01` and `0x05` is
    /// [`DecodeError::UnknownFrame`].
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        match first {
            FRAME_PING => {
                let mut r = Reader::new(buf);
                let _ = need!(r.u8());
                let nonce = need!(r.u64());
                Ok(Some((StandbyFrame::Ping(nonce), r.consumed())))
            }
            SOCKS_VERSION => Ok(Request::decode(buf)?.map(|(r, n)| (StandbyFrame::Request(r), n))),
            other => Err(DecodeError::UnknownFrame(other)),
        }
    }
}

/// What a client reads on a standby connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyFrame {
    /// The answer to a ping.
    Pong(u64),
    /// The reply to the connection's request (STANDBY's own reply, or the request sent
    /// after it), decoded in the context the caller gives.
    Reply(Reply),
}

impl ProxyFrame {
    /// Appends the frame.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ProxyFrame::Pong(nonce) => {
                out.push(FRAME_PONG);
                out.extend_from_slice(&nonce.to_be_bytes());
            }
            ProxyFrame::Reply(r) => r.encode(out),
        }
    }

    /// Reads a frame from the front of `buf`; a reply is decoded in `context`.
    pub fn decode(buf: &[u8], context: ReplyContext) -> Decoded<Self> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        match first {
            FRAME_PONG => {
                let mut r = Reader::new(buf);
                let _ = need!(r.u8());
                let nonce = need!(r.u64());
                Ok(Some((ProxyFrame::Pong(nonce), r.consumed())))
            }
            SOCKS_VERSION => {
                Ok(Reply::decode(buf, context)?.map(|(r, n)| (ProxyFrame::Reply(r), n)))
            }
            other => Err(DecodeError::UnknownFrame(other)),
        }
    }
}

/// Appends the STANDBY request: `VER | 0x84 | RSV | MVER | FLAGS` (FLAGS all reserved, 0).
pub fn encode_standby_request(out: &mut Vec<u8>) {
    out.extend_from_slice(&[
        SOCKS_VERSION,
        crate::request::CMD_STANDBY,
        0x00,
        MSOCKS_VERSION,
        0x00,
    ]);
}

/// Reads the part of a STANDBY request after `VER | CMD | RSV`: `MVER | FLAGS`.
pub(crate) fn read_standby_body(r: &mut Reader<'_>) -> Result<Option<()>, DecodeError> {
    let mver = need!(r.u8());
    if mver != MSOCKS_VERSION {
        return Err(DecodeError::UnsupportedMsocksVersion(mver));
    }
    let flags = need!(r.u8());
    if flags != 0 {
        return Err(DecodeError::ReservedFlags(flags));
    }
    Ok(Some(()))
}
