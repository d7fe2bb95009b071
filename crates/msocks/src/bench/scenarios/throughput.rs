//! Fig. 11 of the paper: aggregate throughput against the number of simultaneous
//! connections, each writing as fast as it can through the peer to the discard server; and
//! from the same windows, the proxy's CPU seconds per GB moved.

use std::time::Duration;

use anyhow::Result;

use crate::bench::peers::{self, Peer};
use crate::bench::worker::{bulk_options, load_args, Mode};
use crate::bench::{attempt, measure, Ctx, Window};

/// One measured window.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Bytes the load generator wrote during the window.
    pub bytes: u64,
    /// CPU use during the window.
    pub window: Window,
}

impl Run {
    /// GB (10^9 bytes) per second.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / 1e9 / self.window.seconds.max(1e-9)
    }
    /// Proxy CPU seconds per GB moved.
    pub fn cpu_per_gb(&self) -> f64 {
        self.window.proxy_cpu / (self.bytes as f64 / 1e9).max(1e-12)
    }
}

/// All runs of one peer at one connection count.
#[derive(Debug, Clone)]
pub struct Row {
    /// The peer.
    pub peer: Peer,
    /// Simultaneous connections.
    pub conns: usize,
    /// One per repetition.
    pub runs: Vec<Run>,
}

/// Runs every connection count for every peer, `reps` times, peers interleaved.
pub fn run(ctx: &Ctx<'_>, peers: &[Peer]) -> Result<Vec<Row>> {
    let s = ctx.settings;
    let mut rows: Vec<Row> = Vec::new();
    for &conns in &s.conns {
        for &peer in peers {
            rows.push(Row {
                peer,
                conns,
                runs: Vec::new(),
            });
        }
    }
    for rep in 0..s.reps {
        for row in rows.iter_mut() {
            let what = format!("{} with {} connections", row.peer.name(), row.conns);
            let Some((result, window)) = attempt(&what, || {
                let proc_ = peers::start(ctx.tb, row.peer)?;
                let args = bulk_options(
                    load_args(
                        Mode::Bulk,
                        proc_.via(),
                        ctx.discard,
                        row.conns,
                        s.warmup,
                        s.window,
                        0,
                    ),
                    s.load_threads,
                    s.load_send,
                );
                measure(ctx, &proc_, &args, Duration::from_secs(60))
            }) else {
                continue;
            };
            let bytes = result
                .get("bytes")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            let run = Run { bytes, window };
            eprintln!(
                "  rep {} {:>10} {:>5} conns: {:6.3} GB/s  proxy {:4.2} core  load {:4.2} core  machine {:4.2} cores",
                rep + 1,
                row.peer.name(),
                row.conns,
                run.gbps(),
                window.proxy_cpu / window.seconds,
                window.load_cpu / window.seconds,
                window.machine_cpu / window.seconds,
            );
            row.runs.push(run);
        }
    }
    Ok(rows)
}
