//! The one error type of every decoder: what was wrong with the bytes, precisely enough for
//! the I/O layer to pick the protocol reply and write a useful log line.

use thiserror::Error;

/// Why a byte sequence can never become a valid message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The version byte is not the one this message requires (0x05 for SOCKS5 messages,
    /// 0x01 for RFC 1929 authentication).
    #[error("unsupported protocol version {got:#04x} (expected {expected:#04x})")]
    UnsupportedVersion {
        /// The version byte this message must carry.
        expected: u8,
        /// The version byte that was received.
        got: u8,
    },
    /// A method-selection message that offers no method at all (NMETHODS = 0).
    #[error("the client offered no authentication method")]
    NoMethods,
    /// A request command byte that is neither a SOCKS5 nor an MSOCKS command.
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    /// An address type byte other than 0x01 (IPv4), 0x03 (domain) and 0x04 (IPv6).
    #[error("unknown address type {0:#04x}")]
    UnknownAddressType(u8),
    /// A domain name of length zero.
    #[error("empty domain name")]
    EmptyDomain,
    /// A domain name that is not valid UTF-8 (names are resolved as text).
    #[error("domain name is not valid UTF-8")]
    InvalidDomain,
    /// An RFC 1929 username or password of length zero.
    #[error("empty {0} in username/password authentication")]
    EmptyCredential(&'static str),
    /// An RFC 1929 username or password that is not valid UTF-8.
    #[error("{0} in username/password authentication is not valid UTF-8")]
    InvalidCredential(&'static str),
    /// An MSOCKS extension whose version this implementation does not speak.
    #[error("unsupported MSOCKS extension version {0}")]
    UnsupportedMsocksVersion(u8),
    /// MSOCKS flag bits that are reserved in this version were set.
    #[error("reserved MSOCKS flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// An address type that is valid in general but not allowed in this position (a domain
    /// name where only an IP address may stand, such as a connection identifier's home).
    #[error("address type {0:#04x} is not allowed here")]
    AddressTypeNotAllowed(u8),
    /// A standby-connection frame whose type byte is neither a probe nor the start of a
    /// request or reply.
    #[error("unknown standby frame type {0:#04x}")]
    UnknownFrame(u8),
}
