//! The `kernel` engine of MSOCKS sessions: the session's two connections are spliced at
//! packet level ([`msocks_splice`]), and a RECONNECT moves the splice to the new mobile-side
//! connection exactly as the paper's section III-B.4/5 says, from what the datapath saw:
//!
//! * `snd_una_C` is the highest ACK the mobile node sent through the splice, `snd_una_D` the
//!   highest ACK the server sent, both kept as 64-bit stream offsets by polling the 32-bit
//!   datapath counters (a poll every [`POLL`] is far more often than 2 GiB can pass).
//! * The resume points and the reply counters come from [`msocks_proto::resplice`], as for the
//!   relay engine; the server's retransmission of bytes the application already read falls
//!   below the new splice point and is cut off by the datapath.
//! * The proxy's TCP never acknowledges session data, so every byte the mobile node has not
//!   seen acknowledged is still in its socket, and every byte the server has not seen
//!   acknowledged is still in the server's: nothing is kept in the proxy.
//!
//! An early resend (PROTOCOL.md 3.7.1) is taken when none of its bytes reached the proxy's
//! socket before the new connection was held (later ones meet HOLD and the client's TCP sends
//! them again, into the splice); bytes already in the socket could not be passed on by a
//! frozen server socket, so that RECONNECT gets `0x81` and the session is unchanged (the
//! library retries without early resend, and does not use it again for that stream). A client reading urgent data out of band (its
//! counters skip urgent bytes the datapath does not track) gets `0x83`; a RECONNECT after a
//! RST went through the splice gets `0x01`. Where a session cannot be spliced at all it runs
//! on the relay engine ([`crate::mobile`]), and the log says why.

use std::sync::atomic::Ordering;
use std::time::Duration;

use msocks_proto::resplice::{offset, resplice};
use msocks_proto::{
    MobilityOptions, Reply, ReplyCode, ReplyExtension, SessionPosition, TargetAddr,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::EngineKind;
use crate::mobile::Start;
use crate::registry::Attach;
use crate::relay::Traffic;
use crate::server::Shared;
use crate::session::{send_reply, Client};

/// How often a live splice's counters and state are read.
const POLL: Duration = Duration::from_millis(100);
/// How long a finished splice's entries stay (see `kernel.rs`).
const LINGER: Duration = Duration::from_secs(2);
/// The largest TCP window (2^30 with window scaling): the server cannot have sent more than
/// this beyond what the mobile node acknowledged.
const MAX_WINDOW: u64 = 1 << 30;

/// A session this engine gives back to the relay engine, with where its streams stand.
pub(crate) struct Fallback {
    /// The mobile-side connection.
    pub(crate) stream: TcpStream,
    /// The server-side connection.
    pub(crate) server: TcpStream,
    /// What has moved so far.
    pub(crate) start: Start,
}

/// Runs an MSOCKS session on the kernel engine when it is configured and the session can be
/// spliced; otherwise hands it back for the relay engine. Returns the reason it ended.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    shared: &Shared,
    client: &Client,
    traffic: &Traffic,
    options: MobilityOptions,
    stream: TcpStream,
    mut server: TcpStream,
    early: &[u8],
    attach_rx: &mut mpsc::Receiver<Attach>,
) -> Result<String, Fallback> {
    if shared.config.engine.kind != EngineKind::Kernel {
        info!(session = client.id, engine = "relay", "engine");
        return Err(Fallback {
            stream,
            server,
            start: Start::fresh(early),
        });
    }
    if !options.oob_inline {
        info!(
            session = client.id,
            engine = "relay",
            reason = "the client reads urgent data out of band",
            "engine: not spliced"
        );
        return Err(Fallback {
            stream,
            server,
            start: Start::fresh(early),
        });
    }
    if !early.is_empty() {
        if let Err(e) = server.write_all(early).await {
            return Ok(format!("writing the client's early data: {e}"));
        }
        traffic.up.fetch_add(early.len() as u64, Ordering::Relaxed);
    }
    linux::run(
        shared,
        client,
        traffic,
        options,
        stream,
        server,
        early.len() as u64,
        attach_rx,
    )
    .await
}

#[cfg(not(target_os = "linux"))]
mod linux {
    use super::*;

    /// No kernel engine off Linux: the relay engine runs the session.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        _shared: &Shared,
        client: &Client,
        _traffic: &Traffic,
        _options: MobilityOptions,
        stream: TcpStream,
        server: TcpStream,
        up_written: u64,
        _attach_rx: &mut mpsc::Receiver<Attach>,
    ) -> Result<String, Fallback> {
        info!(
            session = client.id,
            engine = "relay",
            reason = "the kernel engine needs Linux",
            "engine: not spliced"
        );
        Err(Fallback {
            stream,
            server,
            start: Start {
                up_written,
                down_written: 0,
                up_pending: Vec::new(),
                down_pending: Vec::new(),
            },
        })
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use msocks_splice::maps::EV_RST;
    use msocks_splice::splice::StreamCounts;
    use msocks_splice::{Spliced, Status};

    /// A 64-bit stream offset followed through a 32-bit counter relative to a splice point.
    #[derive(Debug, Clone, Copy)]
    pub(super) struct Extended {
        /// Stream offset of the splice point.
        base: u64,
        /// The counter's last value (relative to the splice point, modulo 2^32).
        last: u32,
        /// Everything that passed the splice point, in bytes.
        ahead: u64,
    }

    impl Extended {
        pub(super) fn at(base: u64) -> Extended {
            Extended {
                base,
                last: 0,
                ahead: 0,
            }
        }

        /// Takes a new reading; counters only grow, by less than 2^31 between readings.
        pub(super) fn update(&mut self, now: u32) {
            self.ahead += u64::from(now.wrapping_sub(self.last));
            self.last = now;
        }

        pub(super) fn value(&self) -> u64 {
            self.base + self.ahead
        }
    }

    /// A spliced session's counters, as stream offsets.
    struct Counters {
        /// Server → client bytes the mobile node acknowledged (`snd_una_C`).
        down_acked: Extended,
        /// Server → client bytes the splice sent (`snd_nxt_C`).
        down_sent: Extended,
        /// Client → server bytes the server acknowledged (`snd_una_D`).
        up_acked: Extended,
        /// The last reading (for its FIN flags).
        last: StreamCounts,
    }

    impl Counters {
        fn at(down: u64, up: u64) -> Counters {
            Counters {
                down_acked: Extended::at(down),
                down_sent: Extended::at(down),
                up_acked: Extended::at(up),
                last: StreamCounts::default(),
            }
        }

        fn read(&mut self, sp: &Spliced) -> Result<(), msocks_splice::Error> {
            self.take(sp.stream_counts()?);
            Ok(())
        }

        fn take(&mut self, c: StreamCounts) {
            self.down_acked.update(c.down_acked);
            self.up_acked.update(c.up_acked);
            self.down_sent.update(c.down_sent);
            self.last = c;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run(
        shared: &Shared,
        client: &Client,
        traffic: &Traffic,
        options: MobilityOptions,
        stream: TcpStream,
        server: TcpStream,
        up_written: u64,
        attach_rx: &mut mpsc::Receiver<Attach>,
    ) -> Result<String, Fallback> {
        let bound = server
            .local_addr()
            .map(TargetAddr::Ip)
            .unwrap_or(TargetAddr::UNSPECIFIED);
        // Held at once: with bytes relayed before HOLD, the packet-evidence test of moved
        // MSOCKS sessions (tests/kernel_evidence.rs) found segments to the mobile node that
        // were no copies of the server's, not yet explained; plain sessions relay first.
        let spliced = match crate::kernel::splice_streams(shared, stream, server, Duration::ZERO)
            .await
        {
            Ok(sp) => sp,
            Err(crate::kernel::NotSpliced::Lost(why)) => return Ok(why),
            Err(crate::kernel::NotSpliced::Refused(r)) => {
                let r = *r;
                info!(session = client.id, engine = "relay", reason = %r.reason, "engine: not spliced");
                traffic.up.fetch_add(r.drained.0, Ordering::Relaxed);
                traffic.down.fetch_add(r.drained.1, Ordering::Relaxed);
                return Err(Fallback {
                    stream: r.client,
                    server: r.server,
                    start: Start {
                        up_written: up_written + r.drained.0,
                        down_written: r.drained.1,
                        up_pending: r.pending_to_server,
                        down_pending: r.pending_to_client,
                    },
                });
            }
        };
        info!(session = client.id, engine = "kernel", "engine: spliced");
        let (drained_up, drained_down) = spliced.drained();
        let session = KernelSession {
            shared,
            client,
            options,
            bound,
            counters: Counters::at(drained_down, up_written + drained_up),
            spliced: Some(spliced),
            sent_before: 0,
            moves: 0,
        };
        Ok(session.run(attach_rx, traffic).await)
    }

    struct KernelSession<'a> {
        shared: &'a Shared,
        client: &'a Client,
        options: MobilityOptions,
        /// The proxy's address on the server-side connection, for RECONNECT replies.
        bound: TargetAddr,
        counters: Counters,
        /// Always `Some` between calls; taken while a blocking step owns it.
        spliced: Option<Spliced>,
        /// The most server-to-client bytes an earlier splice of the session sent: a move
        /// resumes at the client's position, but the client may have read further on the
        /// old connection (it reads on while its RECONNECT is under way), and its next
        /// RECONNECT's `data_read` is checked against what was ever sent.
        sent_before: u64,
        moves: u64,
    }

    impl KernelSession<'_> {
        async fn run(
            mut self,
            attach_rx: &mut mpsc::Receiver<Attach>,
            traffic: &Traffic,
        ) -> String {
            let idle_timeout = self.shared.config.limits.idle_timeout;
            let mut last_packets = 0u64;
            let mut last_move = tokio::time::Instant::now();
            let end = loop {
                let Some(sp) = self.spliced.as_ref() else {
                    break "kernel splice lost".to_owned();
                };
                tokio::select! {
                    () = self.shared.abort.cancelled() => break "proxy shutdown".to_owned(),
                    a = attach_rx.recv() => match a {
                        Some(a) => {
                            if let Err(end) = self.attach(a).await {
                                break end;
                            }
                            last_move = tokio::time::Instant::now();
                        }
                        None => break "session table closed".to_owned(),
                    },
                    () = tokio::time::sleep(POLL) => {
                        // One read of both entries gives the counts, the end and the activity.
                        let (up, down) = match sp.entries() {
                            Ok(e) => e,
                            Err(e) => break format!("kernel splice: {e}"),
                        };
                        self.counters.take(sp.stream_counts_of(&up, &down));
                        if sp.status_of(&up, &down) == Status::Finished {
                            tokio::time::sleep(LINGER).await;
                            break "closed by both ends (kernel splice)".to_owned();
                        }
                        tracing::trace!(session = self.client.id, up_events = up.events, down_events = down.events,
                            up_fin_end = up.fin_end, down_fin_end = down.fin_end, up_last_ack = up.last_ack,
                            down_last_ack = down.last_ack, counts = ?self.counters.last, "kernel splice state");
                        let packets = up.packets.wrapping_add(down.packets);
                        if packets != last_packets {
                            last_packets = packets;
                            last_move = tokio::time::Instant::now();
                        } else if !idle_timeout.is_zero() && last_move.elapsed() >= idle_timeout {
                            break "idle timeout (kernel splice)".to_owned();
                        }
                    }
                }
            };
            if let Some(sp) = self.spliced.take() {
                let _ = self.counters.read(&sp);
                // What each side acknowledged: the session's bytes, end to end.
                traffic
                    .up
                    .fetch_add(self.counters.up_acked.value(), Ordering::Relaxed);
                traffic
                    .down
                    .fetch_add(self.counters.down_acked.value(), Ordering::Relaxed);
                // Entries removed, frozen sockets closed without a segment.
                sp.teardown();
            }
            format!("{end}; moves={}", self.moves)
        }

        /// Handles one RECONNECT. `Err` ends the session (with its reason).
        async fn attach(&mut self, mut a: Attach) -> Result<(), String> {
            let id = self.client.id;
            // Early bytes that came with the request are in the proxy's socket already, and
            // a frozen server socket cannot pass them on; an early resend without them is
            // taken (later early bytes meet HOLD and the client's TCP sends them again).
            // Out of band: never (0x83, the flag is not supported here). Early bytes: not this
            // time (0x81, as for a RESEND_FROM the proxy cannot use: the session is unchanged
            // and the client retries without, PROTOCOL.md 3.7.1).
            let refusal = if !a.oob_inline {
                Some((
                    "out-of-band urgent data",
                    ReplyCode::MsocksVersionNotSupported,
                ))
            } else if a.resend_from.is_some() && !a.early.is_empty() {
                Some((
                    "early resend with bytes behind the request",
                    ReplyCode::BadCounters,
                ))
            } else {
                None
            };
            if let Some((why, code)) = refusal {
                let _ = send_reply(&mut a.stream, &Reply::failure(code)).await;
                info!(session = id, from = %a.peer, reason = why, reply = %code, "RECONNECT refused on a kernel-spliced session; session unchanged");
                let _ = a
                    .done
                    .send(Err(format!("{why} is not taken by the kernel engine")));
                return Ok(());
            }
            let Some(sp) = self.spliced.as_ref() else {
                return Err("kernel splice lost".into());
            };
            let reset = sp
                .entries()
                .map(|(up, down)| (up.events | down.events) & EV_RST != 0)
                .unwrap_or(true);
            if reset {
                let _ = send_reply(&mut a.stream, &Reply::failure(ReplyCode::GeneralFailure)).await;
                warn!(session = id, from = %a.peer, "RECONNECT refused: a RST went through the kernel splice (0x01)");
                let _ = a
                    .done
                    .send(Err("the spliced connections were reset".into()));
                return Ok(());
            }

            // Stop the datapath and read where each side stands (final: nothing moves now).
            let Some(mut sp) = self.spliced.take() else {
                return Err("kernel splice lost".into());
            };
            let stopped = tokio::task::spawn_blocking(move || {
                let r = sp.suspend().map(|_| ());
                (sp, r)
            })
            .await;
            let (sp, stopped) = match stopped {
                Ok(pair) => pair,
                Err(e) => return Err(format!("kernel engine task: {e}")),
            };
            let read = stopped.and_then(|()| self.counters.read(&sp));
            self.spliced = Some(sp);
            if let Err(e) = read {
                return Err(format!("kernel splice: {e}"));
            }
            let pos = SessionPosition {
                read_origin: self.options.read_origin,
                write_origin: self.options.write_origin,
                down_sent: self.counters.down_sent.value().max(self.sent_before),
                down_acked: self.counters.down_acked.value(),
                up_received: self.counters.up_acked.value(),
            };
            let splice = match resplice(&pos, a.data_read, a.data_written) {
                Ok(s) => s,
                Err(e) => {
                    let _ = self.sp().map(|sp| sp.unsuspend());
                    let _ =
                        send_reply(&mut a.stream, &Reply::failure(ReplyCode::BadCounters)).await;
                    warn!(session = id, from = %a.peer, error = %e, position = ?pos, "RECONNECT refused: impossible counters (0x81); session unchanged");
                    let _ = a.done.send(Err(format!("impossible counters: {e}")));
                    return Ok(());
                }
            };
            let read = offset(a.data_read, self.options.read_origin);
            if read > pos.down_acked + MAX_WINDOW {
                // resplice() checked read against what the splice sent; this cannot happen.
                let _ = self.sp().map(|sp| sp.unsuspend());
                let _ = send_reply(&mut a.stream, &Reply::failure(ReplyCode::BadCounters)).await;
                let _ = a.done.send(Err("data_read beyond a TCP window".into()));
                return Ok(());
            }
            // An early resend starts at RESEND_FROM, which must lie within what the server
            // has (PROTOCOL.md 3.7.1); the bytes from there to `snd_una_D` reach the server
            // again and its TCP drops them.
            let up_back = match a.resend_from {
                None => 0,
                Some(from) => {
                    let from = offset(from, self.options.write_origin);
                    let written = offset(a.data_written, self.options.write_origin);
                    if from > pos.up_received
                        || written < from
                        || pos.up_received - from > msocks_proto::resplice::MAX_RESPLICE_SPAN
                    {
                        let _ = self.sp().map(|sp| sp.unsuspend());
                        let _ = send_reply(&mut a.stream, &Reply::failure(ReplyCode::BadCounters))
                            .await;
                        warn!(session = id, from = %a.peer, resend_from = from, received = pos.up_received, written,
                            "RECONNECT refused: impossible RESEND_FROM (0x81); session unchanged");
                        let _ = a.done.send(Err("impossible RESEND_FROM".into()));
                        return Ok(());
                    }
                    (pos.up_received - from) as u32
                }
            };
            let resume = msocks_splice::Resume {
                down_ahead: (splice.resume_down_at - pos.down_acked) as u32,
                up_back,
            };
            let mut refusal = Vec::new();
            Reply::failure(ReplyCode::BadCounters).encode(&mut refusal);
            let early = a.resend_from.is_some().then_some(refusal);
            // The server's FIN was acknowledged by the client: the server will not send it
            // again, so the proxy ends the new connection's down direction itself, right
            // after the reply (the client expects the end of the stream there too).
            let fin = self.counters.last.down_closed;
            let mut reply = Vec::new();
            Reply {
                code: ReplyCode::Succeeded,
                bound: self.bound.clone(),
                extension: ReplyExtension::Resume(splice.counters),
            }
            .encode(&mut reply);
            let new = match a.stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    let _ = self.sp().map(|sp| sp.unsuspend());
                    let _ = a.done.send(Err(format!("new connection: {e}")));
                    return Ok(());
                }
            };
            let Some(sp) = self.spliced.take() else {
                return Err("kernel splice lost".into());
            };
            let timeout = self.shared.config.limits.handshake_timeout;
            let drain = self.shared.config.engine.drain_timeout;
            // HOLD the new connection, reply, and splice it once the reply is acknowledged
            // (blocking steps: off the reactor).
            let moved = tokio::task::spawn_blocking(move || {
                move_splice(sp, new, &reply, early, fin, resume, timeout, drain)
            })
            .await;
            let moved = match moved {
                Ok(m) => m,
                Err(e) => return Err(format!("kernel engine task: {e}")),
            };
            match moved {
                Moved::Done(sp) => {
                    self.spliced = Some(sp);
                    self.sent_before = pos.down_sent;
                    // The new splice point of the client's stream is where its bytes on the new
                    // connection start.
                    self.counters =
                        Counters::at(splice.resume_down_at, pos.up_received - u64::from(up_back));
                    self.moves += 1;
                    let summary = format!(
                        "resumed at {} (to {}): data_salvage={} data_write={} moves={} (kernel splice)",
                        splice.resume_down_at,
                        a.peer,
                        splice.counters.data_salvage,
                        splice.counters.data_write,
                        self.moves
                    );
                    info!(session = id, to = %a.peer, resume_at = splice.resume_down_at,
                        data_salvage = splice.counters.data_salvage, data_write = splice.counters.data_write,
                        moves = self.moves, "session resumed on a new connection (kernel splice)");
                    let _ = a.done.send(Ok(summary));
                }
                Moved::NotReplied(sp, why) => {
                    // The client was not told anything: the session goes on as it was.
                    let _ = sp.unsuspend();
                    self.spliced = Some(sp);
                    let _ = a.done.send(Err(why));
                }
                Moved::Failed(sp, why) => {
                    // The client was told to resume here, and the new connection is closed:
                    // the session stays stopped until the client's next RECONNECT, which
                    // starts from the same (final) counters.
                    warn!(session = id, from = %a.peer, reason = %why, "kernel resplice failed after the reply; waiting for another RECONNECT");
                    self.spliced = Some(sp);
                    let _ = a.done.send(Err(why));
                }
            }
            Ok(())
        }

        fn sp(&self) -> Result<&Spliced, msocks_splice::Error> {
            self.spliced
                .as_ref()
                .ok_or(msocks_splice::Error::Unavailable)
        }
    }

    /// How a move ended.
    enum Moved {
        /// Spliced to the new connection.
        Done(Spliced),
        /// Nothing was sent to the client.
        NotReplied(Spliced, String),
        /// The reply went out but the new connection could not be spliced.
        Failed(Spliced, String),
    }

    /// The blocking part of a move: HOLD, reply, resplice. With `early_refusal` (the request
    /// asked for early resend) an early byte that reached the socket before HOLD gets that
    /// reply (0x81) instead, and the session goes on as it was.
    #[allow(clippy::too_many_arguments)]
    fn move_splice(
        sp: Spliced,
        new: std::net::TcpStream,
        reply: &[u8],
        early_refusal: Option<Vec<u8>>,
        fin: bool,
        resume: msocks_splice::Resume,
        timeout: Duration,
        drain: Duration,
    ) -> Moved {
        use std::io::Write;
        use std::os::fd::AsFd;
        if let Err(e) = sp.prepare_client(&new) {
            return Moved::NotReplied(sp, format!("holding the new connection: {e}"));
        }
        if let Some(refusal) = early_refusal {
            if msocks_splice::repair::inq(new.as_fd()).map_or(true, |n| n > 0) {
                sp.forget_client(&new);
                let _ = new
                    .set_nonblocking(false)
                    .and_then(|()| new.set_write_timeout(Some(timeout)))
                    .and_then(|()| (&new).write_all(&refusal));
                return Moved::NotReplied(
                    sp,
                    "early resend bytes reached the proxy before the new connection was held \
                     (0x81; the client retries without)"
                        .into(),
                );
            }
        }
        match sp.resplice_client(new, resume, reply, fin, drain.max(timeout)) {
            Ok(sp) => Moved::Done(sp),
            Err(f) => {
                let f = *f;
                if f.replied {
                    Moved::Failed(f.splice, format!("resplicing: {}", f.error))
                } else {
                    Moved::NotReplied(f.splice, format!("resplicing: {}", f.error))
                }
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::linux::Extended;

    #[test]
    fn extended_counters_follow_a_32_bit_counter_past_4_gib() {
        // A splice point 5 GiB into the stream; the datapath's relative counter wraps twice.
        let mut e = Extended::at(5 << 30);
        let mut truth: u64 = 5 << 30;
        for step in [
            1u64 << 20,
            (1 << 31) - 1,
            1 << 30,
            1 << 31,
            3 << 29,
            7,
            (1 << 31) - 5,
        ] {
            truth += step;
            e.update((truth - (5 << 30)) as u32);
            assert_eq!(e.value(), truth);
        }
        assert!(truth - (5 << 30) > 1 << 33, "the counter wrapped twice");
    }

    #[test]
    fn an_unchanged_reading_adds_nothing() {
        let mut e = Extended::at(u64::MAX - 10);
        e.update(0);
        e.update(0);
        assert_eq!(e.value(), u64::MAX - 10);
    }
}
