//! The SOCKS5 exchange with the agent, as pure functions: what to send, how long the reply
//! is, and which errno a refusal becomes.

use libc::c_int;
use msocks_proto::{
    Command, Greeting, Method, MethodSelection, OpenRequest, Reply, ReplyCode, ReplyContext,
    Request, TargetAddr,
};

/// Why the exchange with the agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// A system call failed (the errno), e.g. the agent refused the TCP connection.
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Io {
        /// Which step.
        what: &'static str,
        /// The errno.
        errno: c_int,
    },
    /// The agent closed the connection mid-handshake.
    #[error("the agent closed the connection during the SOCKS5 handshake")]
    Closed,
    /// No answer within the time limit.
    #[error("no answer from the agent within the time limit")]
    Timeout,
    /// The agent wants a method this shim does not offer (authentication).
    #[error("the agent does not accept clients without authentication (method {0:#04x})")]
    Method(u8),
    /// The agent sent something that is not SOCKS5.
    #[error("the agent's answer is not SOCKS5: {0}")]
    Protocol(String),
    /// The agent refused the CONNECT with this reply code.
    #[error("the agent refused: {0:?}")]
    Refused(ReplyCode),
}

impl HandshakeError {
    /// The errno the program's `connect` fails with: as close to what a direct connect would
    /// have said as the SOCKS5 reply allows.
    pub fn errno(&self) -> c_int {
        match self {
            HandshakeError::Io { errno, .. } => match *errno {
                // The agent itself is unreachable: the program sees a refusal (fail closed).
                libc::ECONNREFUSED | libc::ECONNRESET | libc::ENETUNREACH | libc::EHOSTUNREACH => {
                    libc::ECONNREFUSED
                }
                e => e,
            },
            HandshakeError::Closed | HandshakeError::Method(_) | HandshakeError::Protocol(_) => {
                libc::ECONNREFUSED
            }
            HandshakeError::Timeout => libc::ETIMEDOUT,
            HandshakeError::Refused(code) => errno_for_reply(*code),
        }
    }
}

/// The errno for a SOCKS5 reply code other than success.
pub fn errno_for_reply(code: ReplyCode) -> c_int {
    match code {
        ReplyCode::ConnectionRefused => libc::ECONNREFUSED,
        ReplyCode::NetworkUnreachable => libc::ENETUNREACH,
        ReplyCode::HostUnreachable => libc::EHOSTUNREACH,
        ReplyCode::TtlExpired => libc::ETIMEDOUT,
        ReplyCode::NotAllowed => libc::EACCES,
        ReplyCode::AddressTypeNotSupported => libc::EAFNOSUPPORT,
        _ => libc::ECONNREFUSED,
    }
}

/// The greeting: SOCKS5, one method, no authentication.
pub fn greeting() -> Vec<u8> {
    let mut out = Vec::with_capacity(3);
    Greeting {
        methods: vec![Method::NO_AUTH],
    }
    .encode(&mut out);
    out
}

/// Checks the agent's method selection (2 bytes).
pub fn check_selection(buf: &[u8]) -> Result<(), HandshakeError> {
    match MethodSelection::decode(buf) {
        Ok(Some((sel, _))) if sel.method == Method::NO_AUTH => Ok(()),
        Ok(Some((sel, _))) => Err(HandshakeError::Method(sel.method.0)),
        Ok(None) => Err(HandshakeError::Protocol("short method selection".into())),
        Err(e) => Err(HandshakeError::Protocol(e.to_string())),
    }
}

/// A plain CONNECT request for `target`.
pub fn connect_request(target: &TargetAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(262);
    Request::Open(OpenRequest {
        command: Command::Connect,
        target: target.clone(),
        mobility: None,
    })
    .encode(&mut out);
    out
}

/// Bytes read first from a reply: enough to know its full length (VER REP RSV ATYP and the
/// first address byte, which for a name is its length). Every reply is at least 10 bytes.
pub const REPLY_HEAD: usize = 5;

/// The total length of the reply that starts with `head`. The shim reads exactly this much
/// so no byte of the program's stream is consumed.
pub fn reply_len(head: &[u8; REPLY_HEAD]) -> Result<usize, HandshakeError> {
    if head[0] != 5 {
        return Err(HandshakeError::Protocol(format!(
            "reply version {:#04x}",
            head[0]
        )));
    }
    match head[3] {
        0x01 => Ok(4 + 4 + 2),
        0x04 => Ok(4 + 16 + 2),
        0x03 => Ok(4 + 1 + usize::from(head[4]) + 2),
        t => Err(HandshakeError::Protocol(format!(
            "reply address type {t:#04x}"
        ))),
    }
}

/// The outcome of a whole reply: `Ok` on success.
pub fn check_reply(buf: &[u8]) -> Result<(), HandshakeError> {
    match Reply::decode(buf, ReplyContext::Plain) {
        Ok(Some((reply, _))) if reply.code == ReplyCode::Succeeded => Ok(()),
        Ok(Some((reply, _))) => Err(HandshakeError::Refused(reply.code)),
        Ok(None) => Err(HandshakeError::Protocol("short reply".into())),
        Err(e) => Err(HandshakeError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        assert_eq!(greeting(), [5, 1, 0]);
        assert_eq!(
            connect_request(&TargetAddr::Ip("192.0.2.1:80".parse().unwrap())),
            [5, 1, 0, 1, 192, 0, 2, 1, 0, 80]
        );
        assert_eq!(
            connect_request(&TargetAddr::Domain("a.b".into(), 443)),
            [5, 1, 0, 3, 3, b'a', b'.', b'b', 1, 187]
        );
        let v6 = connect_request(&TargetAddr::Ip("[2001:db8::1]:80".parse().unwrap()));
        assert_eq!((v6.len(), v6[3]), (22, 4));
        assert_eq!(check_selection(&[5, 0]), Ok(()));
        assert_eq!(check_selection(&[5, 2]), Err(HandshakeError::Method(2)));
        assert!(matches!(
            check_selection(&[4, 0]),
            Err(HandshakeError::Protocol(_))
        ));
    }

    #[test]
    fn reply_lengths() {
        assert_eq!(reply_len(&[5, 0, 0, 1, 10]), Ok(10));
        assert_eq!(reply_len(&[5, 0, 0, 4, 0]), Ok(22));
        assert_eq!(reply_len(&[5, 0, 0, 3, 7]), Ok(14));
        assert!(reply_len(&[5, 0, 0, 9, 0]).is_err());
        assert!(reply_len(&[4, 0, 0, 1, 0]).is_err());
        assert_eq!(check_reply(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]), Ok(()));
        assert_eq!(
            check_reply(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]),
            Err(HandshakeError::Refused(ReplyCode::ConnectionRefused))
        );
    }

    #[test]
    fn reply_codes_map_to_errnos() {
        let cases = [
            (0x01, libc::ECONNREFUSED),
            (0x02, libc::EACCES),
            (0x03, libc::ENETUNREACH),
            (0x04, libc::EHOSTUNREACH),
            (0x05, libc::ECONNREFUSED),
            (0x06, libc::ETIMEDOUT),
            (0x07, libc::ECONNREFUSED),
            (0x08, libc::EAFNOSUPPORT),
            (0x80, libc::ECONNREFUSED),
            (0x42, libc::ECONNREFUSED),
        ];
        for (code, errno) in cases {
            assert_eq!(
                HandshakeError::Refused(ReplyCode::from_u8(code)).errno(),
                errno,
                "reply {code:#04x}"
            );
        }
        assert_eq!(HandshakeError::Timeout.errno(), libc::ETIMEDOUT);
        assert_eq!(HandshakeError::Closed.errno(), libc::ECONNREFUSED);
        let agent_down = HandshakeError::Io {
            what: "connecting to the agent",
            errno: libc::ECONNREFUSED,
        };
        assert_eq!(agent_down.errno(), libc::ECONNREFUSED);
        let in_use = HandshakeError::Io {
            what: "connecting to the agent",
            errno: libc::EISCONN,
        };
        assert_eq!(in_use.errno(), libc::EISCONN);
    }
}
