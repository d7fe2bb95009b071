//! Table I of the paper: the request/response latency a proxy adds. One connection does
//! 1-byte round trips with the echo server (TCP_NODELAY everywhere); the same through IP
//! forwarding is the floor.

use std::time::Duration;

use anyhow::Result;

use crate::bench::peers::{self, Peer};
use crate::bench::worker::{load_args, Mode};
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
}

/// Runs the ping-pong for every peer, `reps` times, peers interleaved.
pub fn run(ctx: &Ctx<'_>, peers: &[Peer]) -> Result<Vec<Row>> {
    let s = ctx.settings;
    let mut rows: Vec<Row> = peers
        .iter()
        .map(|&peer| Row {
            peer,
            runs: Vec::new(),
        })
        .collect();
    for rep in 0..s.reps {
        for row in rows.iter_mut() {
            let Some((result, window)) = attempt(row.peer.name(), || {
                let proc_ = peers::start(ctx.tb, row.peer)?;
                let args = load_args(
                    Mode::Pingpong,
                    proc_.via(),
                    ctx.echo,
                    1,
                    Duration::from_millis(200),
                    Duration::ZERO,
                    s.rounds,
                );
                measure(ctx, &proc_, &args, Duration::from_secs(120))
            }) else {
                continue;
            };
            let num = |k: &str| {
                result
                    .get(k)
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(f64::NAN)
            };
            let quantiles_us: Vec<f64> = result
                .get("quantiles_us")
                .and_then(serde_json::Value::as_array)
                .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
                .unwrap_or_default();
            let run = Run {
                mean_us: num("mean_us"),
                p99_us: num("p99_us"),
                quantiles_us,
                load_cpu: window.load_cpu,
            };
            eprintln!(
                "  rep {} {:>10}: mean {:7.1} µs  median {:7.1} µs  p99 {:7.1} µs",
                rep + 1,
                row.peer.name(),
                run.mean_us,
                run.median_us(),
                run.p99_us
            );
            row.runs.push(run);
        }
    }
    Ok(rows)
}
