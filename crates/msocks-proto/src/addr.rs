//! Addresses as SOCKS5 carries them: ATYP, then an IPv4 address, a length-prefixed domain
//! name or an IPv6 address, then a port.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{need, DecodeError, Decoded, Reader};

/// ATYP value of an IPv4 address.
pub const ATYP_IPV4: u8 = 0x01;
/// ATYP value of a domain name.
pub const ATYP_DOMAIN: u8 = 0x03;
/// ATYP value of an IPv6 address.
pub const ATYP_IPV6: u8 = 0x04;

/// A destination or bound address: an IP socket address or a domain name with a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// An IPv4 or IPv6 address and port.
    Ip(SocketAddr),
    /// A domain name (1 to 255 bytes of UTF-8 on the wire) and port, resolved by the proxy.
    Domain(String, u16),
}

impl TargetAddr {
    /// The all-zero IPv4 address with port 0, used in replies that carry no address.
    pub const UNSPECIFIED: TargetAddr =
        TargetAddr::Ip(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));

    /// The port, whatever the address kind.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(sa) => sa.port(),
            TargetAddr::Domain(_, port) => *port,
        }
    }

    /// Number of bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        match self {
            TargetAddr::Ip(SocketAddr::V4(_)) => 1 + 4 + 2,
            TargetAddr::Ip(SocketAddr::V6(_)) => 1 + 16 + 2,
            TargetAddr::Domain(name, _) => 1 + 1 + name.len().min(255) + 2,
        }
    }

    /// Appends ATYP, address and port. A domain longer than 255 bytes cannot be expressed in
    /// SOCKS5; it is truncated to 255 bytes (callers validate names before encoding them).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TargetAddr::Ip(SocketAddr::V4(sa)) => {
                out.push(ATYP_IPV4);
                out.extend_from_slice(&sa.ip().octets());
                out.extend_from_slice(&sa.port().to_be_bytes());
            }
            TargetAddr::Ip(SocketAddr::V6(sa)) => {
                out.push(ATYP_IPV6);
                out.extend_from_slice(&sa.ip().octets());
                out.extend_from_slice(&sa.port().to_be_bytes());
            }
            TargetAddr::Domain(name, port) => {
                let bytes = &name.as_bytes()[..name.len().min(255)];
                out.push(ATYP_DOMAIN);
                out.push(bytes.len() as u8);
                out.extend_from_slice(bytes);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
    }

    /// Reads ATYP, address and port from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let addr = need!(Self::read(&mut r)?);
        Ok(Some((addr, r.consumed())))
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        let atyp = need!(r.u8());
        let addr = match atyp {
            ATYP_IPV4 => {
                let ip = Ipv4Addr::from(need!(r.array::<4>()));
                TargetAddr::Ip(SocketAddr::new(IpAddr::V4(ip), need!(r.u16())))
            }
            ATYP_IPV6 => {
                let ip = Ipv6Addr::from(need!(r.array::<16>()));
                TargetAddr::Ip(SocketAddr::new(IpAddr::V6(ip), need!(r.u16())))
            }
            ATYP_DOMAIN => {
                let len = need!(r.u8());
                if len == 0 {
                    return Err(DecodeError::EmptyDomain);
                }
                let raw = need!(r.take(len as usize));
                let port = need!(r.u16());
                let name = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidDomain)?;
                TargetAddr::Domain(name.to_owned(), port)
            }
            other => return Err(DecodeError::UnknownAddressType(other)),
        };
        Ok(Some(addr))
    }
}

impl From<SocketAddr> for TargetAddr {
    fn from(sa: SocketAddr) -> Self {
        TargetAddr::Ip(sa)
    }
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetAddr::Ip(sa) => write!(f, "{sa}"),
            TargetAddr::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}
