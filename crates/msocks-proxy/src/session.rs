//! One client connection from accept to close: method negotiation, authentication, the
//! request, the access rules, and the command's own handler. Every failure answers the client
//! with the reply RFC 1928/1929 define for it (or a clean close where they define none) and
//! ends only this session.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use msocks_proto::{
    DecodeError, Greeting, Method, MethodSelection, OpenRequest, Reply, ReplyCode, ReplyExtension,
    Request, TargetAddr, UserPassReply, UserPassRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::handshake::{HandshakeReader, ReadError};
use crate::relay::{relay, RelayEnd, RelayLimits, Traffic};
use crate::rules::{Query, Verdict};
use crate::server::{HandshakeSlot, Shared};
use crate::{bind, connect, resolve, udp};

/// Who is asking, for log lines and rules.
pub(crate) struct Client {
    pub(crate) id: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) user: Option<String>,
}

impl Client {
    pub(crate) fn user_name(&self) -> &str {
        self.user.as_deref().unwrap_or("-")
    }
}

/// How the handshake ended when it did not produce a request.
#[derive(Debug)]
enum HandshakeEnd {
    /// The client broke the protocol or failed to authenticate; it got its reply.
    Refused(String),
    /// The connection ended without anything to answer.
    Quiet(String),
}

fn socks4_rejection() -> [u8; 8] {
    // VN=0, CD=0x5B "request rejected or failed", port and address zero.
    [0x00, 0x5B, 0, 0, 0, 0, 0, 0]
}

async fn send(stream: &mut TcpStream, encode: impl FnOnce(&mut Vec<u8>)) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(64);
    encode(&mut out);
    stream.write_all(&out).await
}

pub(crate) async fn send_reply(stream: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    send(stream, |o| reply.encode(o)).await
}

/// The reply code for a request that could not be decoded.
pub(crate) fn request_error_reply(e: &DecodeError) -> ReplyCode {
    match e {
        DecodeError::UnknownCommand(_) => ReplyCode::CommandNotSupported,
        DecodeError::UnknownAddressType(_) => ReplyCode::AddressTypeNotSupported,
        DecodeError::EmptyDomain | DecodeError::InvalidDomain => ReplyCode::HostUnreachable,
        DecodeError::UnsupportedMsocksVersion(_) | DecodeError::ReservedFlags(_) => {
            ReplyCode::MsocksVersionNotSupported
        }
        _ => ReplyCode::GeneralFailure,
    }
}

fn describe_read_error(phase: &str, e: &ReadError) -> HandshakeEnd {
    match e {
        ReadError::Closed { partial: false } => {
            HandshakeEnd::Quiet(format!("client closed before its {phase}"))
        }
        ReadError::Closed { partial: true } => {
            HandshakeEnd::Quiet(format!("client closed in the middle of its {phase}"))
        }
        ReadError::Io(err) => {
            HandshakeEnd::Quiet(format!("connection error during {phase}: {err}"))
        }
        other => HandshakeEnd::Refused(format!("bad {phase}: {other}")),
    }
}

/// Method negotiation, authentication and the request.
async fn handshake(
    shared: &Shared,
    stream: &mut TcpStream,
    reader: &mut HandshakeReader,
    client: &mut Client,
) -> Result<Request, HandshakeEnd> {
    let greeting = match reader.next(stream, Greeting::decode).await {
        Ok(g) => g,
        Err(e) => {
            match &e {
                ReadError::Malformed(DecodeError::UnsupportedVersion { got: 4, .. }) => {
                    let _ = stream.write_all(&socks4_rejection()).await;
                    return Err(HandshakeEnd::Refused(
                        "SOCKS4 client (only SOCKS5 is served)".into(),
                    ));
                }
                ReadError::Malformed(DecodeError::NoMethods) => {
                    let _ = send(stream, |o| {
                        MethodSelection {
                            method: Method::NO_ACCEPTABLE,
                        }
                        .encode(o)
                    })
                    .await;
                }
                _ => {}
            }
            return Err(describe_read_error("greeting", &e));
        }
    };

    let method = match &shared.credentials {
        Some(_) if greeting.offers(Method::USER_PASS) => Method::USER_PASS,
        Some(_) => Method::NO_ACCEPTABLE,
        None if greeting.offers(Method::NO_AUTH) => Method::NO_AUTH,
        // An open proxy still talks to a client that only knows how to send credentials.
        None if greeting.offers(Method::USER_PASS) => Method::USER_PASS,
        None => Method::NO_ACCEPTABLE,
    };
    send(stream, |o| MethodSelection { method }.encode(o))
        .await
        .map_err(|e| HandshakeEnd::Quiet(format!("write failed: {e}")))?;
    if method == Method::NO_ACCEPTABLE {
        let offered: Vec<String> = greeting
            .methods
            .iter()
            .map(|m| format!("{:#04x}", m.0))
            .collect();
        return Err(HandshakeEnd::Refused(format!(
            "no acceptable authentication method among [{}]",
            offered.join(", ")
        )));
    }

    if method == Method::USER_PASS {
        let creds = match reader.next(stream, UserPassRequest::decode).await {
            Ok(c) => c,
            Err(e) => {
                if matches!(e, ReadError::Malformed(_)) {
                    let _ = send(stream, |o| UserPassReply::FAILURE.encode(o)).await;
                }
                return Err(describe_read_error("username/password message", &e));
            }
        };
        let verified = match &shared.credentials {
            Some(store) => {
                let store = store.clone();
                let UserPassRequest { username, password } = creds.clone();
                // Hash verification is deliberately slow; keep it off the I/O threads.
                tokio::task::spawn_blocking(move || store.verify(&username, &password))
                    .await
                    .unwrap_or(false)
            }
            None => true,
        };
        if !verified {
            let _ = send(stream, |o| UserPassReply::FAILURE.encode(o)).await;
            warn!(session = client.id, client = %client.peer, user = %creds.username, "authentication failed");
            return Err(HandshakeEnd::Refused("authentication failed".into()));
        }
        send(stream, |o| UserPassReply::SUCCESS.encode(o))
            .await
            .map_err(|e| HandshakeEnd::Quiet(format!("write failed: {e}")))?;
        client.user = Some(creds.username);
    }

    match reader.next(stream, Request::decode).await {
        Ok(r) => Ok(r),
        Err(e) => {
            if let ReadError::Malformed(d) = &e {
                let _ = send_reply(stream, &Reply::failure(request_error_reply(d))).await;
            }
            Err(describe_read_error("request", &e))
        }
    }
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    slot: HandshakeSlot,
) {
    let _ = stream.set_nodelay(true);
    let mut client = Client {
        id,
        peer,
        user: None,
    };
    let mut reader = HandshakeReader::new();
    let request = {
        // Dropped at the end of this block: the handshake is over either way.
        let slot = slot;
        let timeout = shared.config.limits.handshake_timeout;
        tokio::select! {
            r = tokio::time::timeout(timeout, handshake(&shared, &mut stream, &mut reader, &mut client)) => match r {
                Ok(Ok(req)) => req,
                Ok(Err(HandshakeEnd::Refused(why))) => {
                    info!(session = id, client = %peer, user = %client.user_name(), reason = %why, "handshake refused");
                    return;
                }
                Ok(Err(HandshakeEnd::Quiet(why))) => {
                    debug!(session = id, client = %peer, reason = %why, "handshake ended");
                    return;
                }
                Err(_) => {
                    debug!(session = id, client = %peer, "handshake timed out; closing");
                    return;
                }
            },
            () = slot.evicted() => {
                debug!(session = id, client = %peer, "handshake table full; dropping this oldest half-open client");
                return;
            }
            () = shared.abort.cancelled() => return,
        }
    };

    let request = match request {
        Request::Standby if shared.config.mobility.enabled => {
            match crate::standby::hold(&shared, &mut stream, &mut reader, &client).await {
                Some(r) => r,
                None => return,
            }
        }
        other => other,
    };
    let open = match request {
        Request::Open(open) if open.mobility.is_none() || shared.config.mobility.enabled => open,
        Request::Reconnect(rc) if shared.config.mobility.enabled => {
            if rc.resend_from.is_none() && !reader.leftover().is_empty() {
                // Nothing may follow a plain RECONNECT before its reply: the client cannot
                // know yet what to rewrite. (With early resend, its bytes follow at once.)
                let _ = send_reply(&mut stream, &Reply::failure(ReplyCode::GeneralFailure)).await;
                info!(session = id, client = %peer, "RECONNECT refused: data sent before the reply");
                return;
            }
            let early = reader.leftover().to_vec();
            return reconnect(&shared, stream, &client, rc, early).await;
        }
        Request::Open(_) | Request::Reconnect(_) | Request::Standby => {
            // Mobility is switched off in the config; clients can fall back to plain SOCKS5.
            let _ = send_reply(&mut stream, &Reply::failure(ReplyCode::CommandNotSupported)).await;
            info!(session = id, client = %peer, user = %client.user_name(), "MSOCKS request refused: [mobility] enabled = false (0x07)");
            return;
        }
    };

    let Some(_place) = shared.try_open_session() else {
        let _ = send_reply(&mut stream, &Reply::failure(ReplyCode::GeneralFailure)).await;
        warn!(
            session = id, client = %peer, user = %client.user_name(), dest = %open.target,
            max_sessions = shared.config.limits.max_sessions,
            "session limit reached; request refused (0x01)"
        );
        return;
    };

    let started = Instant::now();
    let traffic = Traffic::default();
    let end = match open.command {
        msocks_proto::Command::Connect => {
            serve_connect(&shared, stream, &client, &open, &reader, &traffic).await
        }
        msocks_proto::Command::Bind => {
            bind::serve_bind(&shared, stream, &client, &open, &reader, &traffic).await
        }
        msocks_proto::Command::UdpAssociate => {
            udp::serve_udp(&shared, stream, &client, &open, &traffic).await
        }
    };
    match end {
        Outcome::Refused => {}
        Outcome::Ended(reason) => info!(
            session = id,
            client = %peer,
            user = %client.user_name(),
            cmd = %open.command.name(),
            dest = %open.target,
            up = traffic.up.load(Ordering::Relaxed),
            down = traffic.down.load(Ordering::Relaxed),
            duration_ms = started.elapsed().as_millis() as u64,
            reason = %reason,
            "session closed"
        ),
    }
}

/// How a command handler ended.
pub(crate) enum Outcome {
    /// The request was refused with a failure reply (already logged).
    Refused,
    /// The session ran and ended for this reason.
    Ended(String),
}

/// Refuses a request: sends the failure reply and logs why.
pub(crate) async fn refuse(
    stream: &mut TcpStream,
    client: &Client,
    open: &OpenRequest,
    code: ReplyCode,
    why: &str,
) -> Outcome {
    let _ = send_reply(stream, &Reply::failure(code)).await;
    info!(
        session = client.id,
        client = %client.peer,
        user = %client.user_name(),
        cmd = %open.command.name(),
        dest = %open.target,
        reply = %code,
        reason = why,
        "request refused"
    );
    Outcome::Refused
}

/// Asks the rules about a destination; `Err` carries the refusal reason for the log.
pub(crate) fn check_rules(
    shared: &Shared,
    client: &Client,
    command: msocks_proto::Command,
    target: &TargetAddr,
    ip: Option<std::net::IpAddr>,
) -> Result<bool, String> {
    let (host, ip) = match target {
        TargetAddr::Ip(sa) => (None, Some(ip.unwrap_or(sa.ip()))),
        TargetAddr::Domain(name, _) => (Some(name.as_str()), ip),
    };
    let q = Query {
        client: client.peer.ip(),
        user: client.user.as_deref(),
        command,
        host,
        port: target.port(),
        ip,
    };
    match shared.rules.evaluate(&q) {
        Verdict::Allow(_) => Ok(true),
        Verdict::Deny(rule) => Err(format!("denied by {rule}")),
        Verdict::NeedsAddress => Ok(false),
    }
}

/// Resolves `target` and keeps the addresses the rules allow (asking the rules again with
/// each address when a deciding rule tests destination networks).
pub(crate) async fn allowed_addresses(
    shared: &Shared,
    client: &Client,
    command: msocks_proto::Command,
    target: &TargetAddr,
) -> Result<Vec<SocketAddr>, (ReplyCode, String)> {
    let decided = check_rules(shared, client, command, target, None)
        .map_err(|why| (ReplyCode::NotAllowed, why))?;
    let addrs = resolve::resolve(target, shared.config.limits.resolve_timeout)
        .await
        .map_err(|e| (ReplyCode::HostUnreachable, e.to_string()))?;
    if decided {
        return Ok(addrs);
    }
    let mut refusal = String::new();
    let mut allowed = Vec::with_capacity(addrs.len());
    for a in addrs {
        match check_rules(shared, client, command, target, Some(a.ip())) {
            Ok(_) => allowed.push(a),
            Err(why) => refusal = format!("{why} for {}", a.ip()),
        }
    }
    if allowed.is_empty() {
        Err((ReplyCode::NotAllowed, refusal))
    } else {
        Ok(allowed)
    }
}

pub(crate) fn relay_limits(shared: &Shared) -> RelayLimits {
    RelayLimits {
        buffer_size: shared.config.limits.buffer_size,
        idle_timeout: shared.config.limits.idle_timeout,
    }
}

/// Logs the opening of an established session and runs it with its engine: the MSOCKS
/// engine when `mobile` is given, else the plain relay.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_established(
    shared: &Shared,
    mobile: Option<(&mut MobileSession<'_>, msocks_proto::MobilityOptions)>,
    client_stream: TcpStream,
    server: TcpStream,
    client: &Client,
    open: &OpenRequest,
    early: &[u8],
    traffic: &Traffic,
) -> Outcome {
    let server_addr = server
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let token = mobile.as_ref().map(|(m, _)| m.id.token.to_string());
    info!(
        session = client.id,
        client = %client.peer,
        user = %client.user_name(),
        cmd = %open.command.name(),
        dest = %open.target,
        server = %server_addr,
        msocks_token = token.as_deref().unwrap_or("-"),
        "session opened"
    );
    match mobile {
        None => {
            let (client_stream, server, early) =
                match crate::kernel::run(shared, client.id, client_stream, server, early, traffic)
                    .await
                {
                    crate::kernel::KernelRun::Ended(end) => return Outcome::Ended(end),
                    crate::kernel::KernelRun::Relay {
                        client,
                        server,
                        early_sent,
                    } => (client, server, if early_sent { &[][..] } else { early }),
                };
            let end: RelayEnd = relay(
                client_stream,
                server,
                early,
                relay_limits(shared),
                traffic,
                &shared.abort,
            )
            .await;
            Outcome::Ended(end.to_string())
        }
        Some((session, options)) => {
            session
                .run(client, traffic, options, client_stream, server, early)
                .await
        }
    }
}

async fn serve_connect(
    shared: &Shared,
    mut stream: TcpStream,
    client: &Client,
    open: &OpenRequest,
    reader: &HandshakeReader,
    traffic: &Traffic,
) -> Outcome {
    let addrs = match allowed_addresses(shared, client, open.command, &open.target).await {
        Ok(a) => a,
        Err((code, why)) => return refuse(&mut stream, client, open, code, &why).await,
    };
    let server = tokio::select! {
        r = connect::connect_any(&addrs, shared.config.limits.connect_timeout) => match r {
            Ok(s) => s,
            Err(e) => return refuse(&mut stream, client, open, e.reply_code(), &e.to_string()).await,
        },
        () = shared.abort.cancelled() => return Outcome::Ended("proxy shutdown".into()),
    };
    let bound = server
        .local_addr()
        .map(TargetAddr::Ip)
        .unwrap_or(TargetAddr::UNSPECIFIED);
    let mut mobile =
        match MobileSession::register_if_mobile(shared, client, open, &mut stream).await {
            Ok(m) => m,
            Err(refused) => return refused,
        };
    let extension = mobile
        .as_ref()
        .map_or(ReplyExtension::None, |m| m.extension());
    let reply = Reply {
        code: ReplyCode::Succeeded,
        bound,
        extension,
    };
    if let Err(e) = send_reply(&mut stream, &reply).await {
        return Outcome::Ended(format!("client gone before the reply: {e}"));
    }
    let engine = mobile.as_mut().zip(open.mobility);
    run_established(
        shared,
        engine,
        stream,
        server,
        client,
        open,
        reader.leftover(),
        traffic,
    )
    .await
}

/// An MSOCKS session between registration and its end: the token is forgotten on drop.
pub(crate) struct MobileSession<'a> {
    shared: &'a Shared,
    id: msocks_proto::ConnectionId,
    attach_rx: Option<tokio::sync::mpsc::Receiver<crate::registry::Attach>>,
}

impl<'a> MobileSession<'a> {
    /// Issues a connection identifier whose home is `mobility.home`, or this listener's port
    /// on "any address of the proxy".
    pub(crate) fn register(
        shared: &'a Shared,
        client: &Client,
        stream: &TcpStream,
    ) -> std::io::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let local = stream.local_addr()?;
        let token = shared.registry.register(client.user.clone(), tx)?;
        let home = shared.config.mobility.home.unwrap_or_else(|| {
            let any = if local.is_ipv4() {
                std::net::IpAddr::from([0u8; 4])
            } else {
                std::net::IpAddr::from([0u16; 8])
            };
            SocketAddr::new(any, local.port())
        });
        Ok(MobileSession {
            shared,
            id: msocks_proto::ConnectionId { token, home },
            attach_rx: Some(rx),
        })
    }

    /// Registers a session when the client asked for mobility; on failure the client gets
    /// reply 0x01 and the outcome to return.
    pub(crate) async fn register_if_mobile(
        shared: &'a Shared,
        client: &Client,
        open: &OpenRequest,
        stream: &mut TcpStream,
    ) -> Result<Option<Self>, Outcome> {
        if open.mobility.is_none() {
            return Ok(None);
        }
        match Self::register(shared, client, stream) {
            Ok(m) => Ok(Some(m)),
            Err(e) => Err(refuse(
                stream,
                client,
                open,
                ReplyCode::GeneralFailure,
                &e.to_string(),
            )
            .await),
        }
    }

    /// The reply trailer carrying the identifier.
    pub(crate) fn extension(&self) -> msocks_proto::ReplyExtension {
        msocks_proto::ReplyExtension::Connection(self.id)
    }

    /// Runs the session's engine to its end.
    async fn run(
        &mut self,
        client: &Client,
        traffic: &Traffic,
        options: msocks_proto::MobilityOptions,
        stream: TcpStream,
        server: TcpStream,
        early: &[u8],
    ) -> Outcome {
        let Some(mut rx) = self.attach_rx.take() else {
            return Outcome::Ended("engine already ran".into());
        };
        let back = crate::kernel_mobile::run(
            self.shared,
            client,
            traffic,
            options,
            stream,
            server,
            early,
            &mut rx,
        )
        .await;
        let fallback = match back {
            Ok(end) => return Outcome::Ended(end),
            Err(f) => f,
        };
        let engine = crate::mobile::MobileEngine::new(
            self.shared,
            client,
            traffic,
            options,
            fallback.stream,
            fallback.server,
            fallback.start,
        );
        Outcome::Ended(engine.run(rx).await)
    }
}

impl Drop for MobileSession<'_> {
    fn drop(&mut self) {
        self.shared.registry.remove(&self.id.token);
    }
}

/// A RECONNECT: hands the connection to the session's engine, which replies.
async fn reconnect(
    shared: &Shared,
    stream: TcpStream,
    client: &Client,
    rc: msocks_proto::ReconnectRequest,
    early: Vec<u8>,
) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let attach = crate::registry::Attach {
        stream,
        data_read: rc.data_read,
        data_written: rc.data_written,
        resend_from: rc.resend_from,
        early,
        oob_inline: rc.oob_inline,
        peer: client.peer,
        done: done_tx,
    };
    match shared
        .registry
        .attach(&rc.token, client.user.as_deref(), attach)
    {
        Ok(()) => match done_rx.await {
            Ok(Ok(summary)) => {
                info!(session = client.id, client = %client.peer, user = %client.user_name(), token = %rc.token, "RECONNECT accepted: {summary}")
            }
            Ok(Err(why)) => {
                info!(session = client.id, client = %client.peer, user = %client.user_name(), token = %rc.token, reason = %why, "RECONNECT refused")
            }
            Err(_) => {
                info!(session = client.id, client = %client.peer, token = %rc.token, "RECONNECT dropped: the session ended")
            }
        },
        Err(refused) => {
            let (why, returned) = *refused;
            let mut stream = returned.stream;
            let code = match why {
                crate::registry::LookupError::Unknown => ReplyCode::UnknownSession,
                crate::registry::LookupError::Busy => ReplyCode::SessionBusy,
            };
            let _ = send_reply(&mut stream, &Reply::failure(code)).await;
            info!(session = client.id, client = %client.peer, user = %client.user_name(), token = %rc.token, reply = %code, "RECONNECT refused");
        }
    }
}
