//! Method negotiation (RFC 1928 section 3): the client's greeting and the proxy's choice.

use crate::{need, DecodeError, Decoded, Reader, SOCKS_VERSION};

/// An authentication method code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Method(pub u8);

impl Method {
    /// X'00' NO AUTHENTICATION REQUIRED.
    pub const NO_AUTH: Method = Method(0x00);
    /// X'01' GSSAPI (not implemented by msocks; never selected).
    pub const GSSAPI: Method = Method(0x01);
    /// X'02' USERNAME/PASSWORD (RFC 1929).
    pub const USER_PASS: Method = Method(0x02);
    /// X'FF' NO ACCEPTABLE METHODS: the proxy's answer when it can use none of the offers.
    pub const NO_ACCEPTABLE: Method = Method(0xFF);
}

/// The client's first message: `VER | NMETHODS | METHODS...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The methods the client offers, in the client's order (1 to 255 of them).
    pub methods: Vec<Method>,
}

impl Greeting {
    /// Appends the greeting. At most the first 255 methods are written.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let n = self.methods.len().min(255);
        out.push(SOCKS_VERSION);
        out.push(n as u8);
        out.extend(self.methods[..n].iter().map(|m| m.0));
    }

    /// Reads a greeting from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != SOCKS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: SOCKS_VERSION,
                got: ver,
            });
        }
        let n = need!(r.u8());
        if n == 0 {
            return Err(DecodeError::NoMethods);
        }
        let methods = need!(r.take(n as usize))
            .iter()
            .map(|&b| Method(b))
            .collect();
        Ok(Some((Greeting { methods }, r.consumed())))
    }

    /// Whether the client offered `method`.
    pub fn offers(&self, method: Method) -> bool {
        self.methods.contains(&method)
    }
}

/// The proxy's answer to the greeting: `VER | METHOD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodSelection {
    /// The chosen method, or [`Method::NO_ACCEPTABLE`].
    pub method: Method,
}

impl MethodSelection {
    /// Appends the two bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[SOCKS_VERSION, self.method.0]);
    }

    /// Reads the two bytes.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != SOCKS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: SOCKS_VERSION,
                got: ver,
            });
        }
        let method = Method(need!(r.u8()));
        Ok(Some((MethodSelection { method }, r.consumed())))
    }
}
