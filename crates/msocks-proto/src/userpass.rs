//! Username/password sub-negotiation (RFC 1929).

use crate::{need, DecodeError, Decoded, Reader};

/// The sub-negotiation version byte of RFC 1929.
pub const USERPASS_VERSION: u8 = 0x01;

/// The client's credentials: `VER | ULEN | UNAME | PLEN | PASSWD`.
///
/// `Debug` hides the password so that credentials never reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct UserPassRequest {
    /// 1 to 255 bytes of UTF-8.
    pub username: String,
    /// 1 to 255 bytes of UTF-8.
    pub password: String,
}

impl std::fmt::Debug for UserPassRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserPassRequest")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl UserPassRequest {
    /// Appends the request. Fields longer than 255 bytes are truncated to 255.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(USERPASS_VERSION);
        for field in [&self.username, &self.password] {
            let bytes = &field.as_bytes()[..field.len().min(255)];
            out.push(bytes.len() as u8);
            out.extend_from_slice(bytes);
        }
    }

    /// Reads a request from the front of `buf`.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != USERPASS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: USERPASS_VERSION,
                got: ver,
            });
        }
        let ulen = need!(r.u8());
        if ulen == 0 {
            return Err(DecodeError::EmptyCredential("username"));
        }
        let uname = need!(r.take(ulen as usize));
        let plen = need!(r.u8());
        if plen == 0 {
            return Err(DecodeError::EmptyCredential("password"));
        }
        let passwd = need!(r.take(plen as usize));
        let username = std::str::from_utf8(uname)
            .map_err(|_| DecodeError::InvalidCredential("username"))?
            .to_owned();
        let password = std::str::from_utf8(passwd)
            .map_err(|_| DecodeError::InvalidCredential("password"))?
            .to_owned();
        Ok(Some((UserPassRequest { username, password }, r.consumed())))
    }
}

/// The proxy's verdict: `VER | STATUS`, status 0x00 meaning success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPassReply {
    /// 0x00 on success; any other value is a failure and the proxy closes the connection.
    pub status: u8,
}

impl UserPassReply {
    /// The success reply.
    pub const SUCCESS: UserPassReply = UserPassReply { status: 0x00 };
    /// The failure reply msocks sends.
    pub const FAILURE: UserPassReply = UserPassReply { status: 0x01 };

    /// Appends the two bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[USERPASS_VERSION, self.status]);
    }

    /// Reads the two bytes.
    pub fn decode(buf: &[u8]) -> Decoded<Self> {
        let mut r = Reader::new(buf);
        let ver = need!(r.u8());
        if ver != USERPASS_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                expected: USERPASS_VERSION,
                got: ver,
            });
        }
        let status = need!(r.u8());
        Ok(Some((UserPassReply { status }, r.consumed())))
    }

    /// Whether the status means success.
    pub fn is_success(&self) -> bool {
        self.status == 0
    }
}
