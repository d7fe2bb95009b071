//! Session set-up rate: concurrent loops each opening a session (TCP connect, SOCKS5 greeting,
//! CONNECT to the echo server, reply) and closing it at once. Through IP forwarding the loop
//! is a TCP connect and close, the floor.

use std::time::Duration;

use anyhow::Result;

use crate::bench::peers::{self, Peer};
use crate::bench::worker::{load_args, Mode};
use crate::bench::{attempt, measure, Ctx, Window};

/// One measured window.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Sessions opened and closed in the window.
    pub count: u64,
    /// Attempts that failed.
    pub failed: u64,
    /// CPU use during the window.
    pub window: Window,
}

impl Run {
    /// Sessions per second.
    pub fn rate(&self) -> f64 {
        self.count as f64 / self.window.seconds.max(1e-9)
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

/// Runs the open-close loops for every peer, `reps` times, peers interleaved.
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
                    Mode::Setup,
                    proc_.via(),
                    ctx.echo,
                    s.setup_concurrency,
                    s.warmup,
                    s.window,
                    0,
                );
                measure(ctx, &proc_, &args, Duration::from_secs(60))
            }) else {
                continue;
            };
            let get = |k: &str| {
                result
                    .get(k)
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0)
            };
            let run = Run {
                count: get("count"),
                failed: get("failed"),
                window,
            };
            eprintln!(
                "  rep {} {:>10}: {:8.0} sessions/s ({} failed)  proxy {:4.2} core  load {:4.2} core",
                rep + 1,
                row.peer.name(),
                run.rate(),
                run.failed,
                window.proxy_cpu / window.seconds.max(1e-9),
                window.load_cpu / window.seconds.max(1e-9),
            );
            row.runs.push(run);
        }
    }
    Ok(rows)
}
