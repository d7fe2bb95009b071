//! `msocks bench-move`: how long a soft move takes, in round trips of the link moved to.
//!
//! It builds the namespace testbed, gives both mobile links a delay (userspace, per packet,
//! each direction on arrival at its far end, with [`LinkDelay`]: the kernel has no netem), starts `msocks proxy` and a server, and
//! opens one [`MobileStream`] through the proxy. Both ends then send a 16-byte record
//! (sequence number, send time) every millisecond while the stream is moved between the
//! links, alternately, `--moves` times each way. For every move it records:
//!
//! * the library's [`MoveReport`]: `duration` (request to the new connection attached),
//!   `connect_time`, `reply_time`;
//! * **down**: from the `migrate()` call until the first byte that travelled over the new
//!   path reaches the mobile application;
//! * **up**: from the `migrate()` call until the first byte the mobile application sent over
//!   the new path reaches the server application.
//!
//! "Over the new path" is decided by stream offset, exactly, with the positions the
//! library's [`MoveReport`] gives:
//! * down: `first_new_read` = DATA_READ of the RECONNECT + `data_salvage` (the salvaged
//!   bytes came out of the old socket; everything after them came over the new connection);
//! * up: `first_new_written` = DATA_WRITTEN of the RECONNECT − `data_write` (the first byte
//!   the proxy took from the new connection; with an early resend the bytes before it were
//!   sent again and skipped by the proxy).
//!
//! Times are divided by the round-trip time of the link moved to, measured in the same run
//! as the median TCP connect time from the mobile node to a listener on the proxy host over
//! that link (one SYN/SYN-ACK exchange), before and after the moves.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use msocks_client::{MobileConfig, MobileStream, MoveReport, ProxyPath, Standby};
use msocks_testbed::{Link, LinkDelay, Testbed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of `msocks bench-move`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchMoveArgs {
    /// Round-trip time added to the wired link (half of it to each direction).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub wired_rtt: Duration,
    /// Round-trip time added to the radio link (half of it to each direction).
    #[arg(long, default_value = "60ms", value_parser = humantime::parse_duration)]
    pub radio_rtt: Duration,
    /// Moves in each direction (wired -> radio and radio -> wired), alternating.
    #[arg(long, default_value_t = 20)]
    pub moves: u32,
    /// Pause after each move (once its first bytes arrived) before the next.
    #[arg(long, default_value = "250ms", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Interval of the 16-byte records each side sends.
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub record_interval: Duration,
    /// TCP connects per link for the RTT measurement (before and after the moves each).
    #[arg(long, default_value_t = 15)]
    pub rtt_samples: u32,
    /// Also write one CSV line per move to this file.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Warm moves: before each move a standby connection is opened on the new path and
    /// probed once (not timed), and the move sends its RECONNECT over it
    /// (`MobileControl::migrate_via`), as `msocks agent` does. Without it every move is
    /// cold: a new TCP connection, then greeting, credentials and RECONNECT.
    #[arg(long)]
    pub warm: bool,
    /// The proxy's session engine: `relay` or `kernel` (the eBPF TCP Splice). The link delay
    /// is applied where packets arrive, and the kernel engine redirects the mobile node's
    /// packets before the proxy's delay point: on `kernel` that direction is not delayed,
    /// so the RTT figures do not describe the spliced path.
    #[arg(long, default_value = "relay", value_parser = ["relay", "kernel"])]
    pub engine: String,
}

use crate::bench::records::{make_record, Arrivals, RECORD};
use crate::bench::rtt::{measure_rtt, start_probe_listener, PROBE_PORT};
use crate::testbed_proxy::PROXY_PORT;
const SERVER_PORT: u16 = 9000;
/// Longest wait for a move's first new-path bytes.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(5);

/// One measured move.
#[derive(Debug, Clone)]
struct Trial {
    from: Link,
    to: Link,
    report: MoveReport,
    /// Request to the first new-path byte at the mobile application.
    down: Duration,
    /// Request to the first new-path byte (from the mobile) at the server application.
    up: Duration,
    /// One-way latency (server send to mobile read) of the record holding that first byte.
    down_record_latency: Duration,
}

/// Runs the benchmark and prints the results.
pub fn run(args: &BenchMoveArgs) -> Result<()> {
    init_logging();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("msocks bench-move needs root: it creates network namespaces and virtual links");
    }
    ensure!(args.moves > 0, "--moves must be at least 1");
    ensure!(args.rtt_samples > 0, "--rtt-samples must be at least 1");
    ensure!(
        args.record_interval >= Duration::from_micros(100),
        "--record-interval must be at least 100us"
    );
    let epoch = Instant::now();
    eprintln!("building the testbed…");
    let tb = Testbed::mobile_proxy_server().context("building the network-namespace testbed")?;
    let _wired_delay = LinkDelay::start(&tb, Link::Wired, args.wired_rtt / 2)
        .context("delaying the wired link")?;
    let _radio_delay = LinkDelay::start(&tb, Link::Radio, args.radio_rtt / 2)
        .context("delaying the radio link")?;
    let proxy = crate::testbed_proxy::start_with_engine(&tb, &args.engine)?;

    for link in Link::ALL {
        start_probe_listener(&tb.px, SocketAddr::new(tb.px_ip(link).into(), PROBE_PORT))?;
    }
    eprintln!("measuring the links' round-trip times…");
    let mut rtt_before = Vec::new();
    for link in Link::ALL {
        rtt_before.push(measure_rtt(&tb, link, args.rtt_samples)?);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let server_log = Arc::new(Mutex::new(Arrivals::default()));
    let server = {
        let (stop, log, interval) = (stop.clone(), server_log.clone(), args.record_interval);
        let listener = tb
            .sv
            .run_in(|| TcpListener::bind(SocketAddr::from((tb.sv_ip, SERVER_PORT))))?
            .context("binding the server")?;
        std::thread::Builder::new()
            .name("bench server".into())
            .spawn(move || serve(listener, stop, log, interval, epoch))
            .context("starting the server thread")?
    };

    let client_log = Arc::new(Mutex::new(Arrivals::default()));
    let trials = tb
        .mn
        .run_in(|| -> Result<Vec<Trial>> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                tokio::select! {
                    r = mover(&tb, args, epoch, &stop, &client_log, &server_log) => r,
                    _ = tokio::signal::ctrl_c() => bail!("interrupted"),
                }
            })
        })
        .context("running the mobile node")??;
    stop.store(true, Ordering::Relaxed);
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))?;
    if let Err(e) = served {
        eprintln!("note: the server ended with an error: {e:#}");
    }

    let mut rtt_after = Vec::new();
    for link in Link::ALL {
        rtt_after.push(measure_rtt(&tb, link, args.rtt_samples)?);
    }
    drop(proxy);

    if let Some(e) = &client_log.lock().map_err(|_| poisoned())?.error {
        bail!("the server's records reached the mobile application out of sequence: {e}");
    }
    if let Some(e) = &server_log.lock().map_err(|_| poisoned())?.error {
        bail!("the mobile's records reached the server application out of sequence: {e}");
    }

    let rtt = |link: Link| -> Duration {
        let i = Link::ALL.iter().position(|l| *l == link).unwrap_or(0);
        let mut all: Vec<Duration> = rtt_before[i].iter().chain(&rtt_after[i]).copied().collect();
        all.sort();
        all[all.len() / 2]
    };
    print_results(args, &trials, &rtt_before, &rtt_after, rtt);
    if let Some(path) = &args.csv {
        write_csv(path, &trials, rtt).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("per-move results written to {}", path.display());
    }
    Ok(())
}

fn poisoned() -> anyhow::Error {
    anyhow::anyhow!("a measurement thread panicked")
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The server: accepts one connection, sends a record every `interval` until `stop`, and
/// logs what arrives.
fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Arrivals>>,
    interval: Duration,
    epoch: Instant,
) -> Result<()> {
    let (conn, _) = listener.accept().context("accepting the stream")?;
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut next = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            writer.write_all(&make_record(seq, epoch))?;
            seq += 1;
            next += interval;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now; // late (a stall): no burst to catch up
            }
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = reader.read(&mut buf).context("receiving")?;
        let at = Instant::now();
        if n == 0 {
            break;
        }
        log.lock()
            .map_err(|_| poisoned())?
            .record(&mut pending, &buf[..n], at);
    }
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("the server's sender panicked"))?
        .context("sending")?;
    Ok(())
}

/// The mobile node: opens the stream, runs its reader and writer, and makes the moves.
async fn mover(
    tb: &Testbed,
    args: &BenchMoveArgs,
    epoch: Instant,
    stop: &Arc<AtomicBool>,
    client_log: &Arc<Mutex<Arrivals>>,
    server_log: &Arc<Mutex<Arrivals>>,
) -> Result<Vec<Trial>> {
    let path = |link: Link| {
        ProxyPath::new(SocketAddr::new(tb.px_ip(link).into(), PROXY_PORT))
            .with_local_addr(IpAddr::from(tb.mn_ip(link)))
    };
    let config = MobileConfig::with_paths(vec![path(Link::Wired), path(Link::Radio)]);
    let stream = MobileStream::connect(SocketAddr::from((tb.sv_ip, SERVER_PORT)), config)
        .await
        .context("opening the mobile stream")?;
    let control = stream.control();
    let (mut rd, mut wr) = tokio::io::split(stream);

    let log = client_log.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = Vec::new();
        loop {
            let n = rd.read(&mut buf).await?;
            let at = Instant::now();
            if n == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            log.lock()
                .map_err(|_| poisoned())?
                .record(&mut pending, &buf[..n], at);
        }
    });
    let (wstop, interval) = (stop.clone(), args.record_interval);
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        while !wstop.load(Ordering::Relaxed) {
            tick.tick().await;
            wr.write_all(&make_record(seq, epoch)).await?;
            seq += 1;
        }
        wr.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    });

    // Let the stream settle on the wired link before the first move.
    tokio::time::sleep(args.settle.max(Duration::from_millis(500))).await;
    let mut on = Link::Wired;
    let mut trials = Vec::new();
    let total = 2 * args.moves;
    while trials.len() < total as usize {
        let to = if on == Link::Wired {
            Link::Radio
        } else {
            Link::Wired
        };
        let standby = if args.warm {
            let cfg = MobileConfig::new(path(to));
            let mut standby = Standby::open(path(to), &cfg)
                .await
                .with_context(|| format!("opening a standby connection on {to:?}"))?;
            standby
                .ping()
                .await
                .with_context(|| format!("probing the standby connection on {to:?}"))?;
            Some(standby)
        } else {
            None
        };
        let requested = Instant::now();
        let result = match standby {
            Some(s) => control.migrate_via(s).await,
            None => control.migrate(path(to)).await,
        };
        let report = result.with_context(|| format!("moving to {to:?}"))?;
        on = to;
        // Offsets from the start of each direction (the origins are 0).
        let down_boundary = report.first_new_read;
        let up_boundary = report.first_new_written;
        let deadline = Instant::now() + FIRST_BYTE_TIMEOUT;
        let (down_at, up_at, stamp) = loop {
            let (down_at, stamp) = {
                let log = client_log.lock().map_err(|_| poisoned())?;
                let stamp = log
                    .stamps
                    .get((down_boundary / RECORD as u64) as usize)
                    .copied();
                (log.arrival_of(down_boundary), stamp)
            };
            let up_at = server_log
                .lock()
                .map_err(|_| poisoned())?
                .arrival_of(up_boundary);
            if let (Some(d), Some(u), Some(s)) = (down_at, up_at, stamp) {
                break (d, u, s);
            }
            ensure!(
                Instant::now() < deadline,
                "no byte arrived over the new path within {FIRST_BYTE_TIMEOUT:?} of moving to {to:?}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let sent = epoch + Duration::from_nanos(stamp);
        let trial = Trial {
            from: report_from(&report, tb),
            to,
            down: down_at.saturating_duration_since(requested),
            up: up_at.saturating_duration_since(requested),
            down_record_latency: down_at.saturating_duration_since(sent),
            report,
        };
        eprintln!(
            "move {:>2}/{total} {:>5} -> {:<5}  attached {:>6.2} ms  first byte down {:>6.2} ms  up {:>6.2} ms  (salvage {} B, rewrite {} B)",
            trials.len() + 1,
            name(trial.from),
            name(trial.to),
            ms(trial.report.duration),
            ms(trial.down),
            ms(trial.up),
            trial.report.data_salvage,
            trial.report.data_write,
        );
        trials.push(trial);
        tokio::time::sleep(args.settle).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.context("writer task")?.context("sending")?;
    reader.await.context("reader task")?.context("receiving")?;
    Ok(trials)
}

/// The link a report's old path belongs to.
fn report_from(report: &MoveReport, tb: &Testbed) -> Link {
    if report.old_path.local_addr == Some(IpAddr::from(tb.mn_ip(Link::Radio))) {
        Link::Radio
    } else {
        Link::Wired
    }
}

fn name(link: Link) -> &'static str {
    match link {
        Link::Wired => "wired",
        Link::Radio => "radio",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and maximum of `values`, which must not be empty.
fn median_max(values: &mut [f64]) -> (f64, f64) {
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[values.len() - 1])
}

fn print_results(
    args: &BenchMoveArgs,
    trials: &[Trial],
    rtt_before: &[Vec<Duration>],
    rtt_after: &[Vec<Duration>],
    rtt: impl Fn(Link) -> Duration,
) {
    println!();
    println!(
        "{} moves; emulated RTT: wired {:?}, radio {:?}; records every {:?}; {} moves each way",
        if args.warm {
            "warm (RECONNECT on a standby connection)"
        } else {
            "cold (new TCP connection + RECONNECT)"
        },
        args.wired_rtt,
        args.radio_rtt,
        args.record_interval,
        args.moves
    );
    println!("measured RTT (median TCP connect time over the link, before / after the moves):");
    for (i, link) in Link::ALL.iter().enumerate() {
        let med = |v: &Vec<Duration>| ms(v[v.len() / 2]);
        println!(
            "  {:<5} {:.2} ms / {:.2} ms  (unit used: {:.2} ms)",
            name(*link),
            med(&rtt_before[i]),
            med(&rtt_after[i]),
            ms(rtt(*link))
        );
    }
    println!();
    println!("| move | n | RTT of new link | attached (MoveReport.duration) | TCP connect | RECONNECT reply | first byte down (at mobile app) | first byte up (at server app) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (from, to) in [(Link::Wired, Link::Radio), (Link::Radio, Link::Wired)] {
        let set: Vec<&Trial> = trials
            .iter()
            .filter(|t| t.from == from && t.to == to)
            .collect();
        if set.is_empty() {
            continue;
        }
        let unit = ms(rtt(to));
        let cell = |f: &dyn Fn(&Trial) -> Duration| {
            let mut v: Vec<f64> = set.iter().map(|t| ms(f(t))).collect();
            let (med, max) = median_max(&mut v);
            format!(
                "{:.2} RTT / {:.2} RTT ({:.1} / {:.1} ms)",
                med / unit,
                max / unit,
                med,
                max
            )
        };
        println!(
            "| {} → {} | {} | {:.2} ms | {} | {} | {} | {} | {} |",
            name(from),
            name(to),
            set.len(),
            unit,
            cell(&|t| t.report.duration),
            cell(&|t| t.report.connect_time),
            cell(&|t| t.report.reply_time),
            cell(&|t| t.down),
            cell(&|t| t.up),
        );
    }
    println!();
    println!("Cells: median / max over the moves, in RTTs of the link moved to (and in ms).");
    for (from, to) in [(Link::Wired, Link::Radio), (Link::Radio, Link::Wired)] {
        let mut lat: Vec<f64> = trials
            .iter()
            .filter(|t| t.from == from && t.to == to)
            .map(|t| ms(t.down_record_latency))
            .collect();
        if !lat.is_empty() {
            let (med, max) = median_max(&mut lat);
            println!(
                "{} → {}: the record holding the first new-path byte was sent by the server {med:.1} ms (median; max {max:.1} ms) before the mobile application read it.",
                name(from),
                name(to)
            );
        }
    }
    let salvaged = trials.iter().filter(|t| t.report.data_salvage > 0).count();
    let rewritten = trials.iter().filter(|t| t.report.data_write > 0).count();
    let retried = trials.iter().filter(|t| t.report.attempts > 1).count();
    println!(
        "Moves with salvage: {salvaged}, with rewrite: {rewritten}, needing more than one attempt: {retried}, of {}.",
        trials.len()
    );
}

fn write_csv(path: &PathBuf, trials: &[Trial], rtt: impl Fn(Link) -> Duration) -> Result<()> {
    let mut out = String::from(
        "from,to,rtt_to_ms,duration_ms,connect_ms,reply_ms,first_down_ms,first_up_ms,down_record_latency_ms,salvage_bytes,rewrite_bytes,attempts\n",
    );
    for t in trials {
        out.push_str(&format!(
            "{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{}\n",
            name(t.from),
            name(t.to),
            ms(rtt(t.to)),
            ms(t.report.duration),
            ms(t.report.connect_time),
            ms(t.report.reply_time),
            ms(t.down),
            ms(t.up),
            ms(t.down_record_latency),
            t.report.data_salvage,
            t.report.data_write,
            t.report.attempts
        ));
    }
    std::fs::write(path, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_map_offsets_to_reads_and_check_sequence() {
        let epoch = Instant::now();
        let mut log = Arrivals::default();
        let mut pending = Vec::new();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(1);
        let mut bytes = Vec::new();
        for seq in 0..3 {
            bytes.extend_from_slice(&make_record(seq, epoch));
        }
        log.record(&mut pending, &bytes[..20], t0);
        log.record(&mut pending, &bytes[20..], t1);
        assert_eq!(log.stamps.len(), 3);
        assert!(log.error.is_none());
        assert_eq!(log.arrival_of(0), Some(t0));
        assert_eq!(log.arrival_of(19), Some(t0));
        assert_eq!(log.arrival_of(20), Some(t1));
        assert_eq!(log.arrival_of(47), Some(t1));
        assert_eq!(log.arrival_of(48), None);
        log.record(&mut pending, &make_record(7, epoch), t1);
        assert!(log.error.is_some());
    }
}
