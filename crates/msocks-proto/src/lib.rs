//! Sans-I/O wire format of SOCKS5 ([RFC 1928]), username/password authentication
//! ([RFC 1929]) and the MSOCKS mobility extensions (connection identifiers and RECONNECT,
//! after Maltz & Bhagwat, "MSOCKS: An Architecture for Transport Layer Mobility").
//!
//! Nothing here touches a socket. Every message has an `encode` that appends its bytes to a
//! `Vec<u8>` and a `decode` that reads from the front of a byte slice and returns:
//!
//! * `Ok(Some((message, consumed)))` when a whole message is at the front of the slice,
//! * `Ok(None)` when the slice is a valid but incomplete prefix (read more bytes and retry),
//! * `Err(DecodeError)` when the bytes can never become a valid message.
//!
//! Decoders never allocate more than the message they return needs, and every length on the
//! wire is at most one byte wide except the fixed-size MSOCKS counters, so a hostile peer
//! cannot make a decoder allocate without bound. `docs/PROTOCOL.md` in the repository is the
//! byte-level specification this crate implements.
//!
//! [RFC 1928]: https://www.rfc-editor.org/rfc/rfc1928
//! [RFC 1929]: https://www.rfc-editor.org/rfc/rfc1929
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod error;
pub mod greeting;
pub mod mobility;
pub mod reply;
pub mod request;
pub mod resplice;
pub mod standby;
pub mod udp;
pub mod userpass;

pub use addr::TargetAddr;
pub use error::DecodeError;
pub use greeting::{Greeting, Method, MethodSelection};
pub use mobility::{
    ConnectionId, MobilityOptions, ReconnectRequest, ResumeCounters, SessionToken, MSOCKS_VERSION,
};
pub use reply::{Reply, ReplyCode, ReplyContext, ReplyExtension};
pub use request::{Command, OpenRequest, Request};
pub use resplice::{resplice, Resplice, RespliceError, SessionPosition};
pub use standby::{encode_standby_request, ProxyFrame, StandbyFrame};
pub use udp::UdpHeader;
pub use userpass::{UserPassReply, UserPassRequest};

/// The SOCKS protocol version byte this crate speaks (RFC 1928).
pub const SOCKS_VERSION: u8 = 0x05;

/// The largest number of bytes any client-to-proxy handshake message can occupy on the wire:
/// an RFC 1929 request with a 255-byte username and a 255-byte password (513 bytes), which is
/// longer than a request with a 255-byte domain name plus the largest MSOCKS trailer (280
/// bytes) and a greeting offering 255 methods (257 bytes). I/O layers size their handshake
/// buffers with it.
pub const MAX_HANDSHAKE_MESSAGE: usize = {
    let greeting = 1 + 1 + 255;
    let userpass = 1 + 1 + 255 + 1 + 255;
    let request = 3 + 1 + 1 + 255 + 2 + mobility::MAX_REQUEST_TRAILER;
    let mut max = greeting;
    if userpass > max {
        max = userpass;
    }
    if request > max {
        max = request;
    }
    max
};

/// Outcome of decoding: the message and how many bytes of the input it used, or `None` when
/// more bytes are needed.
pub type Decoded<T> = Result<Option<(T, usize)>, DecodeError>;

/// A cursor over the input that reports "incomplete" instead of panicking at the end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn consumed(&self) -> usize {
        self.pos
    }

    /// The next `n` bytes, or `None` when the input ends first.
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let bytes = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(bytes)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Some(a)
    }
}

/// `?` for "incomplete": returns `Ok(None)` from the enclosing decoder when the input ends.
macro_rules! need {
    ($e:expr) => {
        match $e {
            Some(v) => v,
            None => return Ok(None),
        }
    };
}
pub(crate) use need;
