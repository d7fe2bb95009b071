//! UDP ASSOCIATE (RFC 1928 section 7): a relay socket facing the client and one socket per
//! address family facing destinations, alive as long as the client's TCP control connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use msocks_proto::{OpenRequest, Reply, ReplyCode, TargetAddr, UdpHeader};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};
use tracing::{debug, info};

use crate::relay::Traffic;
use crate::server::Shared;
use crate::session::{check_rules, refuse, send_reply, Client, Outcome};

/// Largest UDP payload over IPv4/IPv6 without jumbograms.
const MAX_DATAGRAM: usize = 65_535;
/// Names resolved for datagrams are remembered, a bounded number of them.
const NAME_CACHE: usize = 256;

/// Waits until `sock` has a datagram to read; never, when there is no socket.
async fn readable_opt(sock: &Option<UdpSocket>) -> std::io::Result<()> {
    match sock {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// Reads a datagram now, after readiness was reported, into the association's one receive
/// buffer, which is allocated with the first datagram: an association nobody sends on holds
/// no buffer. `None` when there was nothing after all (a spurious wake-up) or the read failed.
fn try_recv(sock: &UdpSocket, buf: &mut Vec<u8>) -> Option<(usize, SocketAddr)> {
    if buf.is_empty() {
        buf.resize(MAX_DATAGRAM, 0);
    }
    sock.try_recv_from(buf).ok()
}

pub(crate) async fn serve_udp(
    shared: &Shared,
    mut control: TcpStream,
    client: &Client,
    open: &OpenRequest,
    traffic: &Traffic,
) -> Outcome {
    if let crate::rules::Verdict::Deny(rule) = shared
        .rules
        .evaluate_association(client.peer.ip(), client.user.as_deref())
    {
        return refuse(
            &mut control,
            client,
            open,
            ReplyCode::NotAllowed,
            &format!("denied by {rule}"),
        )
        .await;
    }
    // Datagrams are accepted only from the client's address, and from the port it named
    // (or, when it named none, the port of its first datagram).
    let mut client_ip = client.peer.ip();
    let mut client_port: Option<u16> = None;
    if let TargetAddr::Ip(sa) = &open.target {
        if !sa.ip().is_unspecified() {
            client_ip = sa.ip();
        }
        if sa.port() != 0 {
            client_port = Some(sa.port());
        }
    }
    let local_ip = match control.local_addr() {
        Ok(a) => a.ip(),
        Err(e) => {
            return refuse(
                &mut control,
                client,
                open,
                ReplyCode::GeneralFailure,
                &e.to_string(),
            )
            .await
        }
    };
    let relay_sock = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                &mut control,
                client,
                open,
                ReplyCode::GeneralFailure,
                &format!("cannot bind UDP: {e}"),
            )
            .await
        }
    };
    let relay_addr = match relay_sock.local_addr() {
        Ok(a) => a,
        Err(e) => {
            return refuse(
                &mut control,
                client,
                open,
                ReplyCode::GeneralFailure,
                &e.to_string(),
            )
            .await
        }
    };
    if let Err(e) = send_reply(&mut control, &Reply::success(TargetAddr::Ip(relay_addr))).await {
        return Outcome::Ended(format!("client gone before the reply: {e}"));
    }
    info!(session = client.id, client = %client.peer, user = %client.user_name(), relay = %relay_addr, "UDP association opened");

    let mut out4: Option<UdpSocket> = None;
    let mut out6: Option<UdpSocket> = None;
    let mut names: HashMap<String, IpAddr> = HashMap::new();
    // One receive buffer for the three sockets: the select below waits for readiness only
    // and reads in the branch that won, so no two reads ever need a buffer at once. Both it
    // and `packet` are allocated by the first datagram, not up front.
    let mut buf: Vec<u8> = Vec::new();
    let mut control_buf = [0u8; 64];
    let mut packet = Vec::new();
    let idle = shared.config.limits.idle_timeout;
    let idle_sleep = tokio::time::sleep(if idle.is_zero() {
        std::time::Duration::from_secs(1 << 30)
    } else {
        idle
    });
    tokio::pin!(idle_sleep);

    loop {
        tokio::select! {
            r = relay_sock.readable() => {
                if r.is_err() { continue; }
                let Some((n, src)) = try_recv(&relay_sock, &mut buf) else { continue };
                let from_client = &buf[..n];
                if src.ip() != client_ip || client_port.is_some_and(|p| p != src.port()) {
                    debug!(session = client.id, from = %src, "UDP: datagram from a stranger dropped");
                    continue;
                }
                client_port = Some(src.port());
                let Ok(Some((header, used))) = UdpHeader::decode(from_client) else {
                    debug!(session = client.id, "UDP: malformed header dropped");
                    continue;
                };
                if header.frag != 0 {
                    debug!(session = client.id, frag = header.frag, "UDP: fragment dropped (no reassembly)");
                    continue;
                }
                let dest_ip = match &header.target {
                    TargetAddr::Ip(sa) => sa.ip(),
                    TargetAddr::Domain(name, _) => match names.get(name) {
                        Some(ip) => *ip,
                        None => match crate::resolve::resolve(&header.target, shared.config.limits.resolve_timeout).await {
                            Ok(addrs) => {
                                let ip = addrs[0].ip();
                                if names.len() >= NAME_CACHE { names.clear(); }
                                names.insert(name.clone(), ip);
                                ip
                            }
                            Err(e) => { debug!(session = client.id, error = %e, "UDP: datagram dropped"); continue; }
                        },
                    },
                };
                if let Err(why) = check_rules(shared, client, open.command, &header.target, Some(dest_ip)) {
                    debug!(session = client.id, dest = %header.target, reason = %why, "UDP: datagram dropped");
                    continue;
                }
                let slot = if dest_ip.is_ipv4() { &mut out4 } else { &mut out6 };
                if slot.is_none() {
                    let any: SocketAddr = if dest_ip.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
                    match UdpSocket::bind(any).await {
                        Ok(s) => *slot = Some(s),
                        Err(e) => { debug!(session = client.id, error = %e, "UDP: cannot open outbound socket"); continue; }
                    }
                }
                if let Some(sock) = slot.as_ref() {
                    let payload = &from_client[used..];
                    if sock.send_to(payload, SocketAddr::new(dest_ip, header.target.port())).await.is_ok() {
                        traffic.up.fetch_add(payload.len() as u64, Ordering::Relaxed);
                    }
                }
                idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle);
            }
            r = readable_opt(&out4) => {
                if let (Ok(()), Some(sock)) = (r, out4.as_ref()) {
                    if let Some((n, src)) = try_recv(sock, &mut buf) {
                        forward_to_client(&relay_sock, client_ip, client_port, &mut packet, &buf[..n], src, traffic).await;
                        idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                }
            }
            r = readable_opt(&out6) => {
                if let (Ok(()), Some(sock)) = (r, out6.as_ref()) {
                    if let Some((n, src)) = try_recv(sock, &mut buf) {
                        forward_to_client(&relay_sock, client_ip, client_port, &mut packet, &buf[..n], src, traffic).await;
                        idle_sleep.as_mut().reset(tokio::time::Instant::now() + idle);
                    }
                }
            }
            r = control.read(&mut control_buf) => match r {
                Ok(0) => return Outcome::Ended("client closed the control connection".into()),
                Err(e) => return Outcome::Ended(format!("control connection error: {e}")),
                Ok(_) => {} // Nothing is expected on the control connection; ignore it.
            },
            () = &mut idle_sleep, if !idle.is_zero() => return Outcome::Ended("idle timeout".into()),
            () = shared.abort.cancelled() => return Outcome::Ended("proxy shutdown".into()),
        }
    }
}

async fn forward_to_client(
    relay_sock: &UdpSocket,
    client_ip: IpAddr,
    client_port: Option<u16>,
    packet: &mut Vec<u8>,
    payload: &[u8],
    src: SocketAddr,
    traffic: &Traffic,
) {
    // Until the client has sent a datagram, its port is unknown and replies have nowhere to go.
    let Some(port) = client_port else { return };
    packet.clear();
    UdpHeader {
        frag: 0,
        target: TargetAddr::Ip(src),
    }
    .encode(packet);
    packet.extend_from_slice(payload);
    if relay_sock
        .send_to(packet, SocketAddr::new(client_ip, port))
        .await
        .is_ok()
    {
        traffic
            .down
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
    }
}
