//! Reading handshake messages off a stream: a small fixed buffer in front of the sans-I/O
//! decoders, which tolerates pipelined messages and keeps whatever the client sent after its
//! request (optimistic data) for the relay.

use msocks_proto::{DecodeError, Decoded};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the handshake buffer: room for the largest message twice over, so a client that
/// pipelines its greeting, authentication and request in one segment is read in one go.
pub const HANDSHAKE_BUFFER: usize = 2 * msocks_proto::MAX_HANDSHAKE_MESSAGE + 64;

/// Why a handshake message could not be read.
#[derive(Debug, Error)]
pub enum ReadError {
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    /// The client closed the connection before a whole message arrived.
    #[error("client closed the connection {}", if *.partial { "in the middle of a message" } else { "before sending a message" })]
    Closed {
        /// Whether some bytes of the message had arrived.
        partial: bool,
    },
    /// The bytes can never become a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    /// More bytes than any valid message can have, still incomplete (cannot happen with the
    /// current formats, which are all shorter than the buffer; kept as a guard).
    #[error("message larger than {HANDSHAKE_BUFFER} bytes")]
    Oversized,
}

/// A bounded read buffer for the handshake phase.
pub struct HandshakeReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for HandshakeReader {
    fn default() -> Self {
        Self::new()
    }
}

impl HandshakeReader {
    /// An empty reader.
    pub fn new() -> Self {
        HandshakeReader {
            buf: vec![0u8; HANDSHAKE_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Reads until `decode` accepts a whole message at the front of the buffer.
    pub async fn next<T, R>(
        &mut self,
        stream: &mut R,
        decode: impl Fn(&[u8]) -> Decoded<T>,
    ) -> Result<T, ReadError>
    where
        R: AsyncRead + Unpin,
    {
        loop {
            if let Some((msg, used)) = decode(&self.buf[self.start..self.end])? {
                self.start += used;
                return Ok(msg);
            }
            if self.start > 0 {
                // Move the partial message to the front so the buffer's whole length is
                // available to it.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(ReadError::Oversized);
            }
            let n = stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return Err(ReadError::Closed {
                    partial: self.end > self.start,
                });
            }
            self.end += n;
        }
    }

    /// The bytes received after the last decoded message.
    pub fn leftover(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msocks_proto::{Greeting, Method, Request};

    #[tokio::test]
    async fn pipelined_messages_and_leftover() {
        let mut wire = vec![5, 1, 0];
        wire.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        wire.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in wire.chunks(3) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut r = HandshakeReader::new();
        let g = r.next(&mut b, Greeting::decode).await.unwrap();
        assert_eq!(g.methods, vec![Method::NO_AUTH]);
        let req = r.next(&mut b, Request::decode).await.unwrap();
        assert!(matches!(req, Request::Open(_)));
        // Whatever arrived with the request stays available for the relay.
        assert!(b"GET / HTTP/1.0\r\n\r\n".starts_with(r.leftover()));
    }

    #[tokio::test]
    async fn close_mid_message_is_reported_as_partial() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            a.write_all(&[5, 3, 0]).await.unwrap();
        });
        let mut r = HandshakeReader::new();
        let e = r.next(&mut b, Greeting::decode).await.unwrap_err();
        assert!(matches!(e, ReadError::Closed { partial: true }), "{e:?}");
    }
}
