//! Table I of the paper: the request/response latency a proxy adds. One connection does
//! 1-byte round trips with the echo server (TCP_NODELAY everywhere); the same through IP
//! forwarding is the floor.

use std::time::Duration;

use anyhow::Result;

use crate::bench::peers::{self, Peer};
use crate::bench::worker::pingpong_args;
use crate::bench::{attempt, measure, Ctx};

/// One run of round trips.
#[derive(Debug, Clone)]
pub struct Run {
    /// Mean round trip, µs.
    pub mean_us: f64,
    /// Percentiles 0..=100 of the round trip, µs.
    pub quantiles_us: Vec<f64>,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// CPU seconds of the load generator during the run.
    pub load_cpu: f64,
}

impl Run {
    /// Median round trip, µs.
    pub fn median_us(&self) -> f64 {
        self.quantiles_us.get(50).copied().unwrap_or(f64::NAN)
    }
}

/// All runs of one peer.
#[derive(Debug, Clone)]
pub struct Row {
    /// The peer.
    pub peer: Peer,
    /// One per repetition.
    pub runs: Vec<Run>,
    /// IP forwarding measured in the same runs as this peer, round by round beside it: for
    /// `msocks-kernel` only (its group, with the splice program attached, is not the others').
    pub beside_forward: Vec<Run>,
}

/// Runs the ping-pong for every peer, `reps` times.
///
/// The peers run side by side: every repetition starts all of them, and one load generator
/// does its round trips through them in turn (see `worker::pingpong`), so that the machine's
/// changing load falls on all of them alike. Except `msocks-kernel`, which is measured in a
/// run of its own: its eBPF program on the proxy host's interfaces would otherwise also be in
/// the path of the other peers' packets. IP forwarding runs in that group too, beside it, so
/// that the kernel engine is compared with the floor under the same load, round by round
/// (`Row::beside_forward`).
pub fn run(ctx: &Ctx<'_>, peers: &[Peer]) -> Result<Vec<Row>> {
    let s = ctx.settings;
    let mut rows: Vec<Row> = peers
        .iter()
        .map(|&peer| Row {
            peer,
            runs: Vec::new(),
            beside_forward: Vec::new(),
        })
        .collect();
    let together: Vec<Peer> = peers
        .iter()
        .copied()
        .filter(|&p| p != Peer::MsocksKernel)
        .collect();
    let mut groups: Vec<Vec<Peer>> = vec![together];
    if peers.contains(&Peer::MsocksKernel) {
        let mut kernel = vec![Peer::MsocksKernel];
        if peers.contains(&Peer::Forward) {
            kernel.push(Peer::Forward);
        }
        groups.push(kernel);
    }
    for rep in 0..s.reps {
        for group in groups.iter().filter(|g| !g.is_empty()) {
            let names: Vec<&str> = group.iter().map(|p| p.name()).collect();
            let Some((result, window)) = attempt(&names.join(", "), || {
                let procs = group
                    .iter()
                    .map(|&p| peers::start(ctx.tb, p))
                    .collect::<Result<Vec<_>>>()?;
                let vias: Vec<_> = procs.iter().map(|p| p.via()).collect();
                let args = pingpong_args(&vias, ctx.echo, Duration::from_millis(200), s.rounds);
                // The proxy CPU of the window is not reported here; any peer will do.
                measure(ctx, &procs[0], &args, Duration::from_secs(120))
            }) else {
                continue;
            };
            let ways = result
                .get("ways")
                .and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default();
            for (peer, way) in group.iter().zip(ways) {
                let num = |k: &str| {
                    way.get(k)
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(f64::NAN)
                };
                let quantiles_us: Vec<f64> = way
                    .get("quantiles_us")
                    .and_then(serde_json::Value::as_array)
                    .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                    .unwrap_or_default();
                let run = Run {
                    mean_us: num("mean_us"),
                    p99_us: num("p99_us"),
                    quantiles_us,
                    // The load generator served the whole group: its share per peer.
                    load_cpu: window.load_cpu / group.len() as f64,
                };
                let beside_kernel = *peer == Peer::Forward && group.contains(&Peer::MsocksKernel);
                eprintln!(
                    "  rep {} {:>10}{}: mean {:7.1} µs  median {:7.1} µs  p99 {:7.1} µs",
                    rep + 1,
                    peer.name(),
                    if beside_kernel {
                        " (beside msocks-kernel)"
                    } else {
                        ""
                    },
                    run.mean_us,
                    run.median_us(),
                    run.p99_us
                );
                if beside_kernel {
                    if let Some(row) = rows.iter_mut().find(|r| r.peer == Peer::MsocksKernel) {
                        row.beside_forward.push(run);
                    }
                } else if let Some(row) = rows.iter_mut().find(|r| r.peer == *peer) {
                    row.runs.push(run);
                }
            }
        }
    }
    Ok(rows)
}
