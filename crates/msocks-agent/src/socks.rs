//! The local SOCKS5 endpoint's handshake (RFC 1928, no authentication; CONNECT, BIND and
//! UDP ASSOCIATE), on the sans-I/O messages of `msocks-proto`.

use msocks_proto::{
    Command, DecodeError, Decoded, Greeting, Method, MethodSelection, Reply, ReplyCode, Request,
    TargetAddr,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Room for a greeting and a request pipelined together, plus early data.
const BUFFER: usize = 2 * msocks_proto::MAX_HANDSHAKE_MESSAGE + 64;

/// Why a local client's handshake ended without a CONNECT to carry out.
#[derive(Debug, Error)]
pub enum SocksError {
    /// The connection failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The client closed before a whole message.
    #[error("the client closed the connection during the handshake")]
    Closed,
    /// Bytes that are not SOCKS5.
    #[error("malformed SOCKS5 message: {0}")]
    Malformed(#[from] DecodeError),
    /// The client closed without sending a byte: a port check (`msocks run` looks whether
    /// the agent answers before it starts the program), not a failed handshake.
    #[error("the client closed the connection without sending anything")]
    Silent,
    /// The client offered no "no authentication" method (answered 0xFF).
    #[error("the client offers no usable authentication method")]
    NoMethod,
    /// More bytes than any handshake message, still incomplete.
    #[error("handshake message too long")]
    Oversized,
    /// An MSOCKS command (answered 0x07: local programs talk plain SOCKS5 to the agent).
    #[error("unsupported command {0}")]
    Unsupported(&'static str),
}

/// A bounded buffer in front of the decoders.
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    async fn next<T, R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        decode: impl Fn(&[u8]) -> Decoded<T>,
    ) -> Result<T, SocksError> {
        loop {
            if let Some((msg, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            if self.buf.len() >= BUFFER {
                // Cannot happen with valid messages, which are all shorter.
                return Err(SocksError::Oversized);
            }
            let mut chunk = [0u8; 512];
            let room = (BUFFER - self.buf.len()).min(chunk.len());
            let n = stream.read(&mut chunk[..room]).await?;
            if n == 0 {
                return Err(SocksError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What a local program asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRequest {
    /// CONNECT to `target`; `early` holds whatever the program sent after its request, to
    /// be relayed first.
    Connect {
        /// DST of the request.
        target: TargetAddr,
        /// Bytes that followed the request.
        early: Vec<u8>,
    },
    /// BIND: accept one connection from `target`.
    Bind {
        /// DST of the request: the host expected to connect.
        target: TargetAddr,
    },
    /// UDP ASSOCIATE; `client` is the address the program says it will send from (often
    /// all zeros: unknown).
    UdpAssociate {
        /// DST of the request.
        client: TargetAddr,
    },
}

/// Reads the greeting and the request. Unsupported commands and methods are answered here;
/// the replies to the supported requests are the caller's.
pub async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<LocalRequest, SocksError> {
    let mut reader = Reader { buf: Vec::new() };
    let greeting = match reader.next(stream, Greeting::decode).await {
        Err(SocksError::Closed) if reader.buf.is_empty() => return Err(SocksError::Silent),
        r => r?,
    };
    let method = if greeting.offers(Method::NO_AUTH) {
        Method::NO_AUTH
    } else {
        Method::NO_ACCEPTABLE
    };
    let mut out = Vec::with_capacity(2);
    MethodSelection { method }.encode(&mut out);
    stream.write_all(&out).await?;
    if method == Method::NO_ACCEPTABLE {
        return Err(SocksError::NoMethod);
    }
    let request = match reader.next(stream, Request::decode).await {
        Ok(r) => r,
        Err(SocksError::Malformed(DecodeError::UnknownCommand(_))) => {
            send_reply(
                stream,
                ReplyCode::CommandNotSupported,
                TargetAddr::UNSPECIFIED,
            )
            .await?;
            return Err(SocksError::Unsupported("unknown"));
        }
        Err(SocksError::Malformed(e @ DecodeError::UnknownAddressType(_))) => {
            send_reply(
                stream,
                ReplyCode::AddressTypeNotSupported,
                TargetAddr::UNSPECIFIED,
            )
            .await?;
            return Err(e.into());
        }
        Err(e) => return Err(e),
    };
    let unsupported = match &request {
        // MSOCKS commands are for the proxy; a local program that speaks them should talk
        // to the proxy directly.
        Request::Open(o) if o.mobility.is_some() => "MSOCKS",
        Request::Reconnect(_) => "RECONNECT",
        Request::Standby => "STANDBY",
        Request::Open(o) => {
            return Ok(match o.command {
                Command::Connect => LocalRequest::Connect {
                    target: o.target.clone(),
                    early: std::mem::take(&mut reader.buf),
                },
                Command::Bind => LocalRequest::Bind {
                    target: o.target.clone(),
                },
                Command::UdpAssociate => LocalRequest::UdpAssociate {
                    client: o.target.clone(),
                },
            })
        }
    };
    send_reply(
        stream,
        ReplyCode::CommandNotSupported,
        TargetAddr::UNSPECIFIED,
    )
    .await?;
    Err(SocksError::Unsupported(unsupported))
}

/// Writes a plain SOCKS5 reply.
pub async fn send_reply<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: ReplyCode,
    bound: TargetAddr,
) -> std::io::Result<()> {
    let reply = if code == ReplyCode::Succeeded {
        Reply::success(bound)
    } else {
        Reply::failure(code)
    };
    let mut out = Vec::with_capacity(32);
    reply.encode(&mut out);
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_with_early_data_bind_and_msocks_refused() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut wire = vec![5, 1, 0, 5, 1, 0, 3, 11];
        wire.extend_from_slice(b"example.org");
        wire.extend_from_slice(&[0, 80]);
        wire.extend_from_slice(b"GET /");
        client.write_all(&wire).await.unwrap();
        let request = read_request(&mut server).await.unwrap();
        assert_eq!(
            request,
            LocalRequest::Connect {
                target: TargetAddr::Domain("example.org".into(), 80),
                early: b"GET /".to_vec()
            }
        );

        let (mut client, mut server) = tokio::io::duplex(1024);
        client
            .write_all(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80])
            .await
            .unwrap();
        let request = read_request(&mut server).await.unwrap();
        assert_eq!(
            request,
            LocalRequest::Bind {
                target: TargetAddr::Ip("1.2.3.4:80".parse().unwrap())
            }
        );

        // An MSOCKS command from a local program: 0x07.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let mut wire = vec![5, 1, 0];
        Request::Standby.encode(&mut wire);
        client.write_all(&wire).await.unwrap();
        let e = read_request(&mut server).await.unwrap_err();
        assert!(matches!(e, SocksError::Unsupported("STANDBY")), "{e:?}");
        let mut answer = [0u8; 12];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer[..4], &[5, 0, 5, 7]);
    }

    #[tokio::test]
    async fn refuses_clients_that_insist_on_authentication() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[5, 1, 2]).await.unwrap();
        assert!(matches!(
            read_request(&mut server).await,
            Err(SocksError::NoMethod)
        ));
        let mut answer = [0u8; 2];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [5, 0xFF]);
    }
}
