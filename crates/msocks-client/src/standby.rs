//! Standby connections (PROTOCOL.md 3.13): authenticated connections to the proxy opened
//! ahead of need, on a path a stream may move to.
//!
//! A [`Standby`] does two jobs for a mobile node. Its [`ping`](Standby::ping) is a liveness
//! probe of the path: a path whose link is up but loses packets stops answering within the
//! probe's timeout, long before TCP would notice. And
//! [`MobileControl::migrate_via`](crate::MobileControl::migrate_via) moves a stream onto it
//! with a single RECONNECT exchange: no TCP handshake, no greeting, no authentication, so a
//! warm move costs one round trip where a cold one costs two.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use msocks_proto::{ProxyFrame, Reply, ReplyCode, ReplyContext, Request, StandbyFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::{MobileConfig, ProxyPath};
use crate::handshake::{encode_auth, finish_auth, open_socket, Handshake, SocketOptions};
use crate::Error;

/// An authenticated connection to the proxy waiting for a request, answering probes.
pub struct Standby {
    pub(crate) stream: TcpStream,
    pub(crate) path: ProxyPath,
    pub(crate) proxy: SocketAddr,
    pub(crate) hs: Handshake,
    next_nonce: u64,
    opened: Instant,
}

impl Standby {
    /// Connects over `path` to its proxy address, authenticates with `config`'s credentials
    /// and sends STANDBY, all bounded by `config.connect_timeout` and
    /// `config.handshake_timeout`.
    pub async fn open(path: ProxyPath, config: &MobileConfig) -> Result<Standby, Error> {
        let dest = path.proxy;
        Self::open_to(path, dest, config).await
    }

    /// Like [`open`](Standby::open), to `dest` instead of the path's proxy address (a
    /// session's home, when it is a specific address).
    pub async fn open_to(
        path: ProxyPath,
        dest: SocketAddr,
        config: &MobileConfig,
    ) -> Result<Standby, Error> {
        path.validate()?;
        let opts = SocketOptions::from_config(config);
        let mut stream = open_socket(&path, dest, &opts).await?;
        let handshake = async {
            let mut out = Vec::with_capacity(600);
            encode_auth(&mut out, config);
            Request::Standby.encode(&mut out);
            stream
                .write_all(&out)
                .await
                .map_err(|e| Error::io("sending STANDBY", e))?;
            let mut hs = Handshake::new();
            finish_auth(&mut hs, &mut stream, config).await?;
            let reply = hs
                .recv(&mut stream, "STANDBY reply", |b| {
                    Reply::decode(b, ReplyContext::Plain)
                })
                .await?;
            match reply.code {
                ReplyCode::Succeeded => Ok(hs),
                ReplyCode::CommandNotSupported => Err(Error::MsocksUnsupported),
                ReplyCode::MsocksVersionNotSupported => Err(Error::MsocksVersionUnsupported),
                code => Err(Error::Refused(code)),
            }
        };
        let hs = match tokio::time::timeout(config.handshake_timeout, handshake).await {
            Ok(r) => r?,
            Err(_) => return Err(Error::Timeout("STANDBY handshake")),
        };
        Ok(Standby {
            stream,
            path,
            proxy: dest,
            hs,
            next_nonce: 1,
            opened: Instant::now(),
        })
    }

    /// Sends a probe and waits for its answer; returns the round-trip time. Not bounded in
    /// time: wrap it in a timeout, and drop a standby whose probe timed out (the answer may
    /// still be on its way, and the path is suspect anyway).
    pub async fn ping(&mut self) -> Result<Duration, Error> {
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        let mut out = Vec::with_capacity(msocks_proto::standby::PROBE_FRAME_LEN);
        StandbyFrame::Ping(nonce).encode(&mut out);
        let sent = Instant::now();
        self.stream
            .write_all(&out)
            .await
            .map_err(|e| Error::io("sending a probe", e))?;
        loop {
            let frame = self
                .hs
                .recv(&mut self.stream, "probe answer", |b| {
                    ProxyFrame::decode(b, ReplyContext::Plain)
                })
                .await?;
            match frame {
                ProxyFrame::Pong(n) if n == nonce => return Ok(sent.elapsed()),
                // The answer to an earlier probe that the caller stopped waiting for.
                ProxyFrame::Pong(_) => continue,
                ProxyFrame::Reply(_) => {
                    return Err(Error::Protocol("a reply on a standby connection"));
                }
            }
        }
    }

    /// The path this connection was opened on.
    pub fn path(&self) -> &ProxyPath {
        &self.path
    }

    /// The proxy address it is connected to.
    pub fn proxy(&self) -> SocketAddr {
        self.proxy
    }

    /// How long ago it was opened.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("path", &self.path)
            .field("proxy", &self.proxy)
            .field("age", &self.opened.elapsed())
            .finish()
    }
}
