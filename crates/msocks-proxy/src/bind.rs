//! BIND (RFC 1928; paper Fig. 4): the proxy listens, tells the client where, waits for the
//! destination to connect, tells the client who connected, then relays.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use msocks_proto::{OpenRequest, Reply, ReplyCode, ReplyExtension, TargetAddr};
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

use crate::handshake::HandshakeReader;
use crate::relay::Traffic;
use crate::server::Shared;
use crate::session::{
    allowed_addresses, refuse, run_established, send_reply, Client, MobileSession, Outcome,
};

/// The proxy's own address on the route towards `dest` (a connected UDP socket learns it
/// from the routing table without sending anything).
fn local_address_towards(dest: IpAddr) -> Option<IpAddr> {
    let any: SocketAddr = match dest {
        IpAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        IpAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let probe = std::net::UdpSocket::bind(any).ok()?;
    probe.connect(SocketAddr::new(dest, 9)).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}

pub(crate) async fn serve_bind(
    shared: &Shared,
    mut stream: TcpStream,
    client: &Client,
    open: &OpenRequest,
    reader: &HandshakeReader,
    traffic: &Traffic,
) -> Outcome {
    // Who may connect: the request's destination (RFC 1928: DST.ADDR is used to evaluate the
    // BIND), or anyone when it is the unspecified address.
    let unspecified = matches!(&open.target, TargetAddr::Ip(sa) if sa.ip().is_unspecified());
    let expected: Option<HashSet<IpAddr>> = if unspecified {
        if let Err(why) =
            crate::session::check_rules(shared, client, open.command, &open.target, None)
        {
            return refuse(&mut stream, client, open, ReplyCode::NotAllowed, &why).await;
        }
        None
    } else {
        match allowed_addresses(shared, client, open.command, &open.target).await {
            Ok(addrs) => Some(addrs.iter().map(|a| a.ip()).collect()),
            Err((code, why)) => return refuse(&mut stream, client, open, code, &why).await,
        }
    };

    let client_side_ip = stream.local_addr().map(|a| a.ip()).ok();
    let listen_ip = shared
        .config
        .bind
        .address
        .or_else(|| {
            expected
                .as_ref()
                .and_then(|set| set.iter().next().copied())
                .and_then(local_address_towards)
        })
        .or(client_side_ip)
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let listener = match TcpListener::bind(SocketAddr::new(listen_ip, 0)).await {
        Ok(l) => {
            // The server's connection inherits it: urgent bytes stay in the stream from the
            // first (see `connect::connect_one`).
            let _ = socket2::SockRef::from(&l).set_out_of_band_inline(true);
            l
        }
        Err(e) => {
            return refuse(
                &mut stream,
                client,
                open,
                ReplyCode::GeneralFailure,
                &format!("cannot listen on {listen_ip}: {e}"),
            )
            .await
        }
    };
    let listen_addr = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                &mut stream,
                client,
                open,
                ReplyCode::GeneralFailure,
                &e.to_string(),
            )
            .await
        }
    };
    // An MSOCKS BIND gets its identifier in both replies (docs/PROTOCOL.md).
    let mut mobile =
        match MobileSession::register_if_mobile(shared, client, open, &mut stream).await {
            Ok(m) => m,
            Err(refused) => return refused,
        };
    let extension = mobile
        .as_ref()
        .map_or(ReplyExtension::None, |m| m.extension());
    let reply = |addr| Reply {
        code: ReplyCode::Succeeded,
        bound: TargetAddr::Ip(addr),
        extension,
    };
    if let Err(e) = send_reply(&mut stream, &reply(listen_addr)).await {
        return Outcome::Ended(format!("client gone before the first BIND reply: {e}"));
    }
    info!(session = client.id, client = %client.peer, user = %client.user_name(), listen = %listen_addr, dest = %open.target, "BIND listening");

    let deadline = tokio::time::Instant::now() + shared.config.limits.bind_timeout;
    let mut watch_client = true;
    let mut peek = [0u8; 1];
    let server = loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((conn, from)) => {
                    if expected.as_ref().is_some_and(|set| !set.contains(&from.ip())) {
                        info!(session = client.id, from = %from, dest = %open.target, "BIND: connection from an unexpected address dropped");
                        continue;
                    }
                    break (conn, from);
                }
                Err(e) => return refuse(&mut stream, client, open, ReplyCode::GeneralFailure, &format!("accept failed: {e}")).await,
            },
            r = stream.peek(&mut peek), if watch_client => match r {
                Ok(0) | Err(_) => return Outcome::Ended("client closed while waiting for the BIND connection".into()),
                // Early data: leave it in the socket for the relay and stop watching.
                Ok(_) => watch_client = false,
            },
            () = tokio::time::sleep_until(deadline) => {
                return refuse(&mut stream, client, open, ReplyCode::TtlExpired, "no incoming connection within the bind timeout").await;
            }
            () = shared.abort.cancelled() => return Outcome::Ended("proxy shutdown".into()),
        }
    };
    let (server, from) = server;
    drop(listener);
    let _ = server.set_nodelay(true);
    if let Err(e) = send_reply(&mut stream, &reply(from)).await {
        return Outcome::Ended(format!("client gone before the second BIND reply: {e}"));
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
