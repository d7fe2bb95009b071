//! Standby connections (PROTOCOL.md 3.13): an authenticated connection the mobile node opens
//! ahead of need. The proxy answers its pings until the real request arrives (usually a
//! RECONNECT), which is then served as if it had followed authentication directly.
//!
//! A standby holds one of the `max_sessions` places while it waits, so standbys cannot
//! exhaust the proxy any more than sessions can, and it is closed when it stays silent for
//! `[mobility] standby_idle`.

use std::sync::Arc;

use msocks_proto::{ProxyFrame, Reply, ReplyCode, Request, StandbyFrame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::handshake::{HandshakeReader, ReadError};
use crate::server::Shared;
use crate::session::{send_reply, Client};

/// Confirms the standby and answers pings until the client sends its request, which is
/// returned. `None` when the standby ended (closed, idle, refused, proxy stopping); the
/// reason is logged.
pub(crate) async fn hold(
    shared: &Arc<Shared>,
    stream: &mut TcpStream,
    reader: &mut HandshakeReader,
    client: &Client,
) -> Option<Request> {
    let Some(place) = shared.try_open_session() else {
        let _ = send_reply(stream, &Reply::failure(ReplyCode::GeneralFailure)).await;
        warn!(
            session = client.id, client = %client.peer, user = %client.user_name(),
            max_sessions = shared.config.limits.max_sessions,
            "session limit reached; STANDBY refused (0x01)"
        );
        return None;
    };
    if send_reply(
        stream,
        &Reply::success(msocks_proto::TargetAddr::UNSPECIFIED),
    )
    .await
    .is_err()
    {
        return None;
    }
    debug!(session = client.id, client = %client.peer, user = %client.user_name(), "standby connection waiting");
    let idle = shared.config.mobility.standby_idle;
    let mut pings = 0u64;
    let request = loop {
        let frame = tokio::select! {
            r = tokio::time::timeout(idle, reader.next(stream, StandbyFrame::decode)) => r,
            () = shared.abort.cancelled() => return None,
        };
        match frame {
            Ok(Ok(StandbyFrame::Ping(nonce))) => {
                pings += 1;
                let mut out = Vec::with_capacity(msocks_proto::standby::PROBE_FRAME_LEN);
                ProxyFrame::Pong(nonce).encode(&mut out);
                if stream.write_all(&out).await.is_err() {
                    return None;
                }
            }
            Ok(Ok(StandbyFrame::Request(Request::Standby))) => {
                // Already on standby: a second one is a confused client.
                let _ = send_reply(stream, &Reply::failure(ReplyCode::GeneralFailure)).await;
                info!(session = client.id, client = %client.peer, "STANDBY on a standby connection refused (0x01)");
                return None;
            }
            Ok(Ok(StandbyFrame::Request(r))) => break r,
            Ok(Err(ReadError::Malformed(e))) => {
                let code = match e {
                    msocks_proto::DecodeError::UnknownFrame(_) => ReplyCode::GeneralFailure,
                    ref other => crate::session::request_error_reply(other),
                };
                let _ = send_reply(stream, &Reply::failure(code)).await;
                info!(session = client.id, client = %client.peer, reason = %e, "standby connection closed: bad frame");
                return None;
            }
            Ok(Err(e)) => {
                debug!(session = client.id, client = %client.peer, pings, reason = %e, "standby connection ended");
                return None;
            }
            Err(_) => {
                debug!(session = client.id, client = %client.peer, pings, "standby connection idle for {idle:?}; closing");
                return None;
            }
        }
    };
    drop(place);
    debug!(session = client.id, client = %client.peer, pings, "standby connection used");
    Some(request)
}
