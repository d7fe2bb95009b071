//! Resident memory per idle session: a freshly started proxy's proportional set size (Pss,
//! summed over its processes) before and while the load generator holds `idle_sessions`
//! sessions open (SOCKS5 CONNECT to the echo server, then nothing).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::bench::peers::{self, Peer};
use crate::bench::procstat;
use crate::bench::worker::{load_args, Mode, WorkerProc};
use crate::bench::{attempt, Ctx};

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Pss of the idle proxy, bytes.
    pub baseline: u64,
    /// Pss with the sessions open, bytes.
    pub loaded: u64,
    /// Sessions held.
    pub sessions: usize,
    /// Processes in the proxy's tree with the sessions open.
    pub processes: usize,
}

impl Run {
    /// Bytes per session.
    pub fn per_session(&self) -> f64 {
        self.loaded.saturating_sub(self.baseline) as f64 / self.sessions.max(1) as f64
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

/// Measures every proxy peer (IP forwarding has no process to measure).
pub fn run(ctx: &Ctx<'_>, peers: &[Peer]) -> Result<Vec<Row>> {
    let s = ctx.settings;
    let mut rows: Vec<Row> = peers
        .iter()
        .filter(|p| p.is_proxy())
        .map(|&peer| Row {
            peer,
            runs: Vec::new(),
        })
        .collect();
    for rep in 0..s.reps {
        for row in rows.iter_mut() {
            let Some((baseline, loaded, processes)) = attempt(row.peer.name(), || {
                let proc_ = peers::start(ctx.tb, row.peer)?;
                let pid = proc_.pid().context("a proxy peer has a process")?;
                // Let a forking peer finish starting its workers before the baseline.
                std::thread::sleep(Duration::from_millis(300));
                let baseline = procstat::tree_pss_bytes(pid);
                let args = load_args(
                    Mode::Idle,
                    proc_.via(),
                    ctx.echo,
                    s.idle_sessions,
                    Duration::ZERO,
                    Duration::ZERO,
                    0,
                );
                let mut w = WorkerProc::start(&ctx.tb.mn, &args)?;
                w.expect("READY", Duration::from_secs(120))?;
                // Sessions are established once the replies arrived; give the proxy a moment
                // to settle whatever it does after replying.
                std::thread::sleep(Duration::from_millis(300));
                let loaded = procstat::tree_pss_bytes(pid);
                let processes = procstat::tree(pid).len();
                w.poke()?;
                let _ = w.result(Duration::from_secs(30));
                Ok((baseline, loaded, processes))
            }) else {
                continue;
            };
            let run = Run {
                baseline,
                loaded,
                sessions: s.idle_sessions,
                processes,
            };
            eprintln!(
                "  rep {} {:>10}: {:8.0} B per idle session ({} → {} KiB, {} processes)",
                rep + 1,
                row.peer.name(),
                run.per_session(),
                baseline / 1024,
                loaded / 1024,
                processes
            );
            row.runs.push(run);
        }
    }
    Ok(rows)
}
