//! The table of MSOCKS sessions: unguessable tokens mapped to the engine that owns each
//! session, so a RECONNECT arriving on any new connection finds its session.

use std::collections::HashMap;
use std::sync::Mutex;

use msocks_proto::mobility::{SessionToken, TOKEN_LEN};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A RECONNECT handed to the engine of its session.
pub(crate) struct Attach {
    /// The new mobile-side connection, handshake done, RECONNECT read, no reply sent yet.
    pub(crate) stream: TcpStream,
    /// The client's counters.
    pub(crate) data_read: u64,
    pub(crate) data_written: u64,
    /// Early resend: the client's bytes from this write-space position follow the request
    /// without waiting for the reply (PROTOCOL.md 3.7.1).
    pub(crate) resend_from: Option<u64>,
    /// Bytes that arrived with the request (the start of an early resend).
    pub(crate) early: Vec<u8>,
    /// The client receives urgent data inline from now on (RECONNECT's FLAGS bit 0).
    pub(crate) oob_inline: bool,
    /// For log lines.
    pub(crate) peer: std::net::SocketAddr,
    /// The engine's verdict, for the RECONNECT handler's log line.
    pub(crate) done: oneshot::Sender<Result<String, String>>,
}

struct Entry {
    owner: Option<String>,
    attach: mpsc::Sender<Attach>,
}

/// Why a RECONNECT could not be handed to a session.
pub(crate) enum LookupError {
    /// No session with that token for this user (unknown, ended, or another user's).
    Unknown,
    /// The session's engine has a RECONNECT queued already.
    Busy,
}

/// All live MSOCKS sessions of this proxy process.
#[derive(Default)]
pub(crate) struct Registry {
    sessions: Mutex<HashMap<SessionToken, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionToken, Entry>> {
        // A poisoned lock means a panic elsewhere while inserting or removing one entry; the
        // map itself is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new session under a fresh random token.
    pub(crate) fn register(
        &self,
        owner: Option<String>,
        attach: mpsc::Sender<Attach>,
    ) -> std::io::Result<SessionToken> {
        let mut map = self.lock();
        loop {
            let mut bytes = [0u8; TOKEN_LEN];
            getrandom::fill(&mut bytes).map_err(|e| {
                std::io::Error::other(format!("no randomness for a session token: {e}"))
            })?;
            let token = SessionToken(bytes);
            // 128 random bits do not collide in practice; checking costs nothing.
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(token) {
                v.insert(Entry { owner, attach });
                return Ok(token);
            }
        }
    }

    /// Forgets a session.
    pub(crate) fn remove(&self, token: &SessionToken) {
        self.lock().remove(token);
    }

    /// Hands a RECONNECT to its session, if `user` owns it.
    pub(crate) fn attach(
        &self,
        token: &SessionToken,
        user: Option<&str>,
        attach: Attach,
    ) -> Result<(), Box<(LookupError, Attach)>> {
        let map = self.lock();
        let Some(entry) = map.get(token) else {
            return Err(Box::new((LookupError::Unknown, attach)));
        };
        if entry.owner.as_deref() != user {
            return Err(Box::new((LookupError::Unknown, attach)));
        }
        entry.attach.try_send(attach).map_err(|e| {
            Box::new(match e {
                mpsc::error::TrySendError::Full(a) => (LookupError::Busy, a),
                mpsc::error::TrySendError::Closed(a) => (LookupError::Unknown, a),
            })
        })
    }

    /// Number of live MSOCKS sessions.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
