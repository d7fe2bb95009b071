//! Talking to the proxy before stream data flows: opening a socket on a path, method
//! negotiation and RFC 1929 authentication, the MSOCKS CONNECT/BIND request and RECONNECT.
//!
//! The client offers exactly one method, so it can pipeline greeting, credentials and request
//! in a single write (PROTOCOL.md 2.9): on a move that saves one round trip between the new
//! TCP connection and the RECONNECT reply.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use msocks_proto::{
    Command, ConnectionId, Decoded, Greeting, Method, MethodSelection, MobilityOptions,
    OpenRequest, ProxyFrame, ReconnectRequest, Reply, ReplyCode, ReplyContext, ReplyExtension,
    Request, ResumeCounters, TargetAddr, UserPassReply, UserPassRequest,
};
use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

use crate::config::{MobileConfig, ProxyPath};
use crate::Error;

/// Largest handshake buffer: a reply is at most 58 bytes (PROTOCOL.md 5), and what arrives
/// after it is stream data, handed over as "leftover". Anything longer without a whole
/// message is a broken proxy.
const HANDSHAKE_LIMIT: usize = 4096;

/// Reads whole messages off a stream through a small buffer, keeping what follows them.
pub(crate) struct Handshake {
    buf: Vec<u8>,
}

impl Handshake {
    pub(crate) fn new() -> Self {
        Handshake { buf: Vec::new() }
    }

    /// Reads until `decode` accepts a whole message at the front of the buffer.
    pub(crate) async fn recv<T, S: SockRead>(
        &mut self,
        stream: &mut S,
        during: &'static str,
        decode: impl Fn(&[u8]) -> Decoded<T>,
    ) -> Result<T, Error> {
        loop {
            if let Some((msg, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            if self.buf.len() >= HANDSHAKE_LIMIT {
                return Err(Error::Protocol(
                    "handshake message longer than any valid one",
                ));
            }
            let mut chunk = [0u8; 1024];
            let n = read_some(stream, &mut chunk)
                .await
                .map_err(|e| Error::io(during, e))?;
            if n == 0 {
                return Err(Error::ProxyClosed(during));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Stream bytes that arrived in the same reads as the last message.
    pub(crate) fn into_leftover(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads what the socket holds into `buf`, waiting until it holds something: like
/// `AsyncReadExt::read`, but a short read leaves the socket's readiness alone.
///
/// tokio's `TcpStream::read` takes a read that fills less than the buffer as proof that the
/// socket is drained and waits for the next readiness edge (tokio#5866). The library's
/// sockets receive urgent data inline (`SO_OOBINLINE`), and Linux ends a read just before the
/// urgent mark even when more bytes are queued, so after such a read the urgent byte and
/// everything behind it would wait for the next segment to arrive: forever on an old socket
/// being salvaged (the move fails), or until the server sends again after a reply that was
/// followed by urgent data. `try_read` clears readiness only on `WouldBlock`.
pub(crate) async fn read_some<S: SockRead>(stream: &S, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        stream.readable().await?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// The reading side of a connection to the proxy: a whole `TcpStream`, or the read half of
/// one whose write half the stream's task is using (during an early resend).
pub(crate) trait SockRead {
    /// Waits until the socket may be readable.
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// Reads without waiting.
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl SockRead for TcpStream {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        TcpStream::readable(self)
    }
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
}

impl SockRead for OwnedReadHalf {
    fn readable(&self) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        OwnedReadHalf::readable(self)
    }
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        OwnedReadHalf::try_read(self, buf)
    }
}

/// Socket options shared by every connection a stream makes.
#[derive(Debug, Clone)]
pub(crate) struct SocketOptions {
    pub(crate) send_buffer: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) tcp_user_timeout: Option<Duration>,
}

impl SocketOptions {
    pub(crate) fn from_config(cfg: &MobileConfig) -> Self {
        SocketOptions {
            send_buffer: cfg.send_buffer,
            connect_timeout: cfg.connect_timeout,
            tcp_user_timeout: cfg.tcp_user_timeout,
        }
    }
}

/// A TCP connection to `dest` over `path`: bound to the path's local address and interface,
/// `TCP_NODELAY` on (handshake messages and small writes must not wait for Nagle), and
/// `SO_SNDBUF` set so that the ring buffer can cover everything the socket may hold.
pub(crate) async fn open_socket(
    path: &ProxyPath,
    dest: SocketAddr,
    opts: &SocketOptions,
) -> Result<TcpStream, Error> {
    let setup = |e| Error::connect(dest, e);
    let socket = if dest.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(setup)?;
    {
        let sock = SockRef::from(&socket);
        sock.set_tcp_nodelay(true).map_err(setup)?;
        // Urgent bytes stay in the stream: the proxy forwards urgent data with MSG_OOB, and
        // out of band the kernel would take the byte out of the stream, where this library
        // never reads it, so it would be lost and `data_read` would miss it.
        sock.set_out_of_band_inline(true).map_err(setup)?;
        sock.set_send_buffer_size(opts.send_buffer).map_err(setup)?;
        if let Some(name) = &path.interface {
            sock.bind_device(Some(name.as_bytes())).map_err(setup)?;
        }
        if let Some(timeout) = opts.tcp_user_timeout {
            sock.set_tcp_user_timeout(Some(timeout)).map_err(setup)?;
        }
    }
    if let Some(local) = path.local_addr {
        socket.bind(SocketAddr::new(local, 0)).map_err(setup)?;
    }
    match tokio::time::timeout(opts.connect_timeout, socket.connect(dest)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(Error::connect(dest, e)),
        Err(_) => Err(Error::Timeout("TCP connection to the proxy")),
    }
}

/// The kernel's `SO_SNDBUF` of a connected socket: the ring buffer's capacity.
pub(crate) fn send_buffer_of(stream: &TcpStream) -> Result<usize, Error> {
    SockRef::from(stream)
        .send_buffer_size()
        .map_err(|e| Error::io("reading SO_SNDBUF", e))
}

/// Appends the greeting offering exactly one method, and the credentials if any.
pub(crate) fn encode_auth(out: &mut Vec<u8>, cfg: &MobileConfig) {
    let method = if cfg.credentials.is_some() {
        Method::USER_PASS
    } else {
        Method::NO_AUTH
    };
    Greeting {
        methods: vec![method],
    }
    .encode(out);
    if let Some(creds) = &cfg.credentials {
        UserPassRequest {
            username: creds.username.clone(),
            password: creds.password.clone(),
        }
        .encode(out);
    }
}

/// Reads the method selection and, with credentials, the RFC 1929 verdict.
pub(crate) async fn finish_auth<S: SockRead>(
    hs: &mut Handshake,
    stream: &mut S,
    cfg: &MobileConfig,
) -> Result<(), Error> {
    let selection = hs
        .recv(stream, "method negotiation", MethodSelection::decode)
        .await?;
    let offered = if cfg.credentials.is_some() {
        Method::USER_PASS
    } else {
        Method::NO_AUTH
    };
    if selection.method == Method::NO_ACCEPTABLE {
        return Err(Error::NoAcceptableMethod);
    }
    if selection.method != offered {
        return Err(Error::UnexpectedMethod(selection.method.0));
    }
    if cfg.credentials.is_some() {
        let verdict = hs
            .recv(stream, "authentication", UserPassReply::decode)
            .await?;
        if !verdict.is_success() {
            return Err(Error::AuthFailed(verdict.status));
        }
    }
    Ok(())
}

/// A session just opened by MSOCKS CONNECT, or an MSOCKS BIND after its first reply.
pub(crate) struct Opened {
    pub(crate) stream: TcpStream,
    pub(crate) path: ProxyPath,
    pub(crate) id: ConnectionId,
    /// BND of the (first) reply.
    pub(crate) bound: TargetAddr,
    pub(crate) hs: Handshake,
}

/// Connects over the first path that accepts a TCP connection and opens a session there.
///
/// Only TCP connection failures move on to the next path: an answer from the proxy (a
/// refusal, 0x07) is the proxy's verdict on the request and would be the same on any path.
pub(crate) async fn open_session(
    command: Command,
    target: &TargetAddr,
    cfg: &MobileConfig,
) -> Result<Opened, Error> {
    let opts = SocketOptions::from_config(cfg);
    let mut last = None;
    for path in &cfg.paths {
        match open_socket(path, path.proxy, &opts).await {
            Ok(stream) => {
                let fut = open_on(stream, path, command, target, cfg);
                return match tokio::time::timeout(cfg.handshake_timeout, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(Error::Timeout("MSOCKS handshake")),
                };
            }
            Err(e) => {
                tracing::debug!(%path, error = %e, "cannot reach the proxy on this path");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::Config("no path to the proxy configured".into())))
}

async fn open_on(
    mut stream: TcpStream,
    path: &ProxyPath,
    command: Command,
    target: &TargetAddr,
    cfg: &MobileConfig,
) -> Result<Opened, Error> {
    let mut out = Vec::with_capacity(600);
    encode_auth(&mut out, cfg);
    open_request(command, target, cfg).encode(&mut out);
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::io("sending the MSOCKS request", e))?;
    let mut hs = Handshake::new();
    finish_auth(&mut hs, &mut stream, cfg).await?;
    let (id, bound) = read_open_reply(&mut hs, &mut stream).await?;
    Ok(Opened {
        stream,
        path: path.clone(),
        id,
        bound,
        hs,
    })
}

/// The MSOCKS CONNECT or BIND request with this configuration's mobility options.
fn open_request(command: Command, target: &TargetAddr, cfg: &MobileConfig) -> Request {
    Request::Open(OpenRequest {
        command,
        target: target.clone(),
        mobility: Some(MobilityOptions {
            oob_inline: cfg.oob_inline,
            read_origin: cfg.read_origin,
            write_origin: cfg.write_origin,
        }),
    })
}

/// Opens a session on a standby connection (PROTOCOL.md 3.13): only the request is sent
/// (the connection is authenticated already), and answers to probes still in flight are
/// skipped before the reply.
pub(crate) async fn open_on_standby(
    standby: crate::Standby,
    command: Command,
    target: &TargetAddr,
    cfg: &MobileConfig,
) -> Result<Opened, Error> {
    let crate::Standby {
        mut stream,
        path,
        mut hs,
        ..
    } = standby;
    let mut out = Vec::with_capacity(300);
    open_request(command, target, cfg).encode(&mut out);
    let exchange = async {
        stream
            .write_all(&out)
            .await
            .map_err(|e| Error::io("sending the MSOCKS request", e))?;
        loop {
            let frame = hs
                .recv(&mut stream, "MSOCKS reply", |b| {
                    ProxyFrame::decode(b, ReplyContext::MobileOpen)
                })
                .await?;
            if let ProxyFrame::Reply(reply) = frame {
                return Ok::<Reply, Error>(reply);
            }
        }
    };
    let reply = match tokio::time::timeout(cfg.handshake_timeout, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(Error::Timeout("MSOCKS handshake")),
    };
    let (id, bound) = open_reply(reply)?;
    Ok(Opened {
        stream,
        path,
        id,
        bound,
        hs,
    })
}

/// Reads a reply to MSOCKS CONNECT or BIND (either BIND reply) and its identifier.
pub(crate) async fn read_open_reply(
    hs: &mut Handshake,
    stream: &mut TcpStream,
) -> Result<(ConnectionId, TargetAddr), Error> {
    let reply = hs
        .recv(stream, "MSOCKS reply", |b| {
            Reply::decode(b, ReplyContext::MobileOpen)
        })
        .await?;
    open_reply(reply)
}

/// The identifier and BND of a reply to MSOCKS CONNECT or BIND, or the refusal.
fn open_reply(reply: Reply) -> Result<(ConnectionId, TargetAddr), Error> {
    match (reply.code, reply.extension) {
        (ReplyCode::Succeeded, ReplyExtension::Connection(id)) => Ok((id, reply.bound)),
        // The decoder always reads the identifier after a success in this context; kept
        // total rather than trusting that.
        (ReplyCode::Succeeded, _) => Err(Error::Protocol("success reply without identifier")),
        (ReplyCode::CommandNotSupported, _) => Err(Error::MsocksUnsupported),
        (ReplyCode::MsocksVersionNotSupported, _) => Err(Error::MsocksVersionUnsupported),
        (code, _) => Err(Error::Refused(code)),
    }
}

/// What one RECONNECT attempt needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReconnectParams {
    pub(crate) id: ConnectionId,
    pub(crate) oob_inline: bool,
    pub(crate) data_read: u64,
    pub(crate) data_written: u64,
}

/// An early resend (PROTOCOL.md 3.7.1) for one RECONNECT attempt: the bytes from
/// `resend_from` up to `data_written` go out right behind the request, and the write half
/// of the new connection is handed to the stream's task at once, so new application bytes
/// follow them before the reply arrives.
pub(crate) struct EarlyResend {
    pub(crate) resend_from: u64,
    pub(crate) bytes: Vec<u8>,
    pub(crate) writer: oneshot::Sender<OwnedWriteHalf>,
}

/// The new connection after a successful RECONNECT.
pub(crate) enum ResumedStream {
    /// The whole connection.
    Whole(TcpStream),
    /// Its read half; the stream's task holds the write half (early resend).
    Read(OwnedReadHalf),
}

/// A successful RECONNECT: the new connection and what to do with the old one.
pub(crate) struct Resumed {
    pub(crate) stream: ResumedStream,
    pub(crate) path: ProxyPath,
    pub(crate) counters: ResumeCounters,
    /// Stream bytes read together with the reply: the first bytes of the new connection.
    pub(crate) leftover: Vec<u8>,
    /// Time from sending RECONNECT to having its reply (one round trip plus proxy work).
    pub(crate) reply_time: Duration,
    /// Time the TCP connection took to establish, for the successful attempt.
    pub(crate) connect_time: Duration,
}

/// Reads the answers to greeting and credentials (unless `authenticated`: a standby
/// connection, on which pongs may come first) and then the RECONNECT reply.
async fn read_reconnect_reply<S: SockRead>(
    hs: &mut Handshake,
    stream: &mut S,
    cfg: &MobileConfig,
    authenticated: bool,
) -> Result<Reply, Error> {
    if !authenticated {
        finish_auth(hs, stream, cfg).await?;
        return hs
            .recv(stream, "RECONNECT reply", |b| {
                Reply::decode(b, ReplyContext::Reconnect)
            })
            .await;
    }
    loop {
        let frame = hs
            .recv(stream, "RECONNECT reply", |b| {
                ProxyFrame::decode(b, ReplyContext::Reconnect)
            })
            .await?;
        if let ProxyFrame::Reply(reply) = frame {
            return Ok(reply);
        }
    }
}

/// Sends greeting, credentials and RECONNECT in one write on a fresh connection and reads
/// the answers; on a standby connection (`warm`: its handshake buffer) only RECONNECT, and
/// the answers to probes still in flight are skipped. The caller has stopped using the old
/// socket already, so the counters are final.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn reconnect_on(
    mut stream: TcpStream,
    path: &ProxyPath,
    params: &ReconnectParams,
    cfg: &MobileConfig,
    connect_time: Duration,
    warm: Option<Handshake>,
    early: Option<EarlyResend>,
) -> Result<Resumed, Error> {
    let mut out = Vec::with_capacity(600);
    if warm.is_none() {
        encode_auth(&mut out, cfg);
    }
    Request::Reconnect(ReconnectRequest {
        oob_inline: params.oob_inline,
        token: params.id.token,
        data_read: params.data_read,
        data_written: params.data_written,
        resend_from: early.as_ref().map(|e| e.resend_from),
    })
    .encode(&mut out);
    let sent = Instant::now();
    // An early resend rides in the same write, right behind the request.
    let writer = early.map(|e| {
        out.extend_from_slice(&e.bytes);
        e.writer
    });
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::io("sending RECONNECT", e))?;
    let (mut reader, mut hs) = match writer {
        None => (ResumedStream::Whole(stream), warm),
        Some(writer) => {
            let (rd, wr) = stream.into_split();
            if writer.send(wr).is_err() {
                return Err(Error::Protocol("internal: the stream's task went away"));
            }
            (ResumedStream::Read(rd), warm)
        }
    };
    let authenticated = hs.is_some();
    let hs_ref = hs.get_or_insert_with(Handshake::new);
    let reply = match &mut reader {
        ResumedStream::Whole(s) => read_reconnect_reply(hs_ref, s, cfg, authenticated).await?,
        ResumedStream::Read(r) => read_reconnect_reply(hs_ref, r, cfg, authenticated).await?,
    };
    let hs = hs.unwrap_or_else(Handshake::new);
    let stream = reader;
    let counters = match (reply.code, reply.extension) {
        (ReplyCode::Succeeded, ReplyExtension::Resume(c)) => c,
        (ReplyCode::Succeeded, _) => {
            return Err(Error::Protocol("RECONNECT success without resume counters"));
        }
        (ReplyCode::UnknownSession, _) => return Err(Error::UnknownSession),
        (ReplyCode::BadCounters, _) => return Err(Error::BadCounters),
        (ReplyCode::SessionBusy, _) => return Err(Error::SessionBusy),
        (ReplyCode::MsocksVersionNotSupported, _) => return Err(Error::MsocksVersionUnsupported),
        (ReplyCode::CommandNotSupported, _) => return Err(Error::MsocksUnsupported),
        (code, _) => return Err(Error::ReconnectRefused(code)),
    };
    Ok(Resumed {
        stream,
        path: path.clone(),
        counters,
        leftover: hs.into_leftover(),
        reply_time: sent.elapsed(),
        connect_time,
    })
}
