//! The header of every UDP datagram relayed under UDP ASSOCIATE (RFC 1928 section 7):
//! `RSV (2) | FRAG | ATYP | DST.ADDR | DST.PORT | DATA`.

use crate::{need, Decoded, Reader, TargetAddr};

/// A UDP relay header; the payload is what follows it in the datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpHeader {
    /// Fragment number; 0 for a whole datagram. msocks implements no reassembly and drops
    /// every datagram whose FRAG is not 0, as RFC 1928 allows.
    pub frag: u8,
    /// Where the datagram goes (client to proxy) or came from (proxy to client).
    pub target: TargetAddr,
}

impl UdpHeader {
    /// Appends the header; the caller appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[0x00, 0x00, self.frag]);
        self.target.encode(out);
    }

    /// Reads the header from the front of a datagram; `consumed` is where the payload starts.
    /// A datagram is never partial, so `Ok(None)` means the datagram is truncated.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let _rsv = need!(r.take(2));
        let frag = need!(r.u8());
        let target = need!(TargetAddr::read(&mut r)?);
        Ok(Some((UdpHeader { frag, target }, r.consumed())))
    }
}
