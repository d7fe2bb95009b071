//! `msocks bench`: the benchmark suite (issue 6). It builds the namespace testbed, starts the
//! peers itself (msocks with its relay and kernel engines, microsocks, dante, and IP
//! forwarding as the floor), runs every
//! scenario for each with a separate load-generator process on the mobile node and a sink on
//! the server, and writes a Markdown report with SVG plots made here.
//!
//! * [`peers`]: starting the contenders in the proxy namespace.
//! * [`worker`]: the load generator and the sink (hidden `msocks bench-worker`).
//! * [`procstat`]: CPU seconds and memory of process trees, machine load.
//! * [`scenarios`]: throughput vs connections (Fig. 11), request/response latency (Table I),
//!   memory per idle session, session set-up rate, hand-off gap (MSOCKS vs MPTCP).
//! * [`report`] and [`plot`]: the Markdown and the SVG.
//! * [`records`] and [`rtt`]: timestamped records and link RTT probes, shared with
//!   `msocks bench-move`.

pub mod peers;
pub mod plot;
pub mod procstat;
pub mod records;
pub mod report;
pub mod rtt;
pub mod scenarios;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msocks_testbed::Testbed;

use worker::WorkerProc;

/// Options of `msocks bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Short windows and fewer repetitions: a few minutes instead of up to 30.
    #[arg(long)]
    pub quick: bool,
    /// The Markdown report to write; the SVG plots go to a `bench/` folder beside it.
    #[arg(long, default_value = "docs/BENCHMARKS.md", value_name = "FILE")]
    pub out: PathBuf,
    /// Scenarios to run, comma-separated: throughput, latency, memory, setup, handoff.
    #[arg(
        long,
        default_value = "throughput,latency,memory,setup,handoff",
        value_name = "LIST"
    )]
    pub scenarios: String,
    /// Peers to compare, comma-separated: ip-forward, msocks (relay engine), msocks-kernel
    /// (the eBPF TCP Splice engine, `[engine] kind = "kernel"`), microsocks, dante.
    #[arg(
        long,
        default_value = "ip-forward,msocks,msocks-kernel,microsocks,dante",
        value_name = "LIST"
    )]
    pub peers: String,
    /// Repetitions of every measurement (the tables show medians); default 3, or 5 without
    /// --quick.
    #[arg(long, value_name = "N")]
    pub reps: Option<usize>,
    /// Connection counts of the throughput scenario, comma-separated.
    #[arg(long, default_value = "1,8,64,256,1024", value_name = "LIST")]
    pub conns: String,
    /// Sessions held open by the memory scenario.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub idle_sessions: usize,
    /// Writer threads of the throughput scenario's load generator (at most one per
    /// connection). On 2 CPUs, 2 threads were worse than 1 (at 1024 connections every peer
    /// lost throughput, the kernel engine most): try more on larger machines.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub load_threads: usize,
    /// How the throughput scenario's load generator writes: `write` (from a buffer, one copy
    /// per byte, as most applications send) or `sendfile` (from a 64 KiB in-memory file, no
    /// copy in the load generator, like `iperf3 -Z`; through IP forwarding and the kernel
    /// engine, whose whole path is charged to the sending CPU, it roughly doubles the rate).
    #[arg(long, value_enum, default_value_t = worker::SendWith::Write, value_name = "HOW")]
    pub load_send: worker::SendWith,
    /// Print the report to standard output instead of writing --out (plots are still written
    /// beside --out).
    #[arg(long)]
    pub stdout: bool,
}

/// The scenarios, in the order they run and are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scenario {
    /// Aggregate throughput vs simultaneous connections (Fig. 11), CPU per GB.
    Throughput,
    /// 1-byte request/response latency (Table I).
    Latency,
    /// Proxy memory per 1,000 idle sessions.
    Memory,
    /// SOCKS5 CONNECT + close per second.
    Setup,
    /// Longest gap in a record stream across a move: MSOCKS (cold) vs MPTCP.
    Handoff,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Throughput,
        Scenario::Latency,
        Scenario::Memory,
        Scenario::Setup,
        Scenario::Handoff,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Memory => "memory",
            Scenario::Setup => "setup",
            Scenario::Handoff => "handoff",
        }
    }
}

fn parse_scenarios(s: &str) -> Result<Vec<Scenario>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some(sc) = Scenario::ALL.into_iter().find(|x| x.name() == part) else {
            bail!("unknown scenario {part:?} (known: throughput, latency, memory, setup, handoff)");
        };
        if !out.contains(&sc) {
            out.push(sc);
        }
    }
    out.sort();
    Ok(out)
}

/// Sizes and durations of one run, from `--quick` and the options.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whether `--quick` was given.
    pub quick: bool,
    /// Repetitions of every measurement.
    pub reps: usize,
    /// Connection counts of the throughput scenario.
    pub conns: Vec<usize>,
    /// Time before a measuring window, for connections to reach steady state.
    pub warmup: Duration,
    /// Length of a throughput or set-up measuring window.
    pub window: Duration,
    /// Round trips per latency run.
    pub rounds: usize,
    /// Concurrent open-close loops of the set-up scenario.
    pub setup_concurrency: usize,
    /// Sessions of the memory scenario.
    pub idle_sessions: usize,
    /// Moves each way in the hand-off scenario.
    pub moves: usize,
    /// Writer threads of the throughput scenario's load generator.
    pub load_threads: usize,
    /// How the throughput scenario's load generator writes.
    pub load_send: worker::SendWith,
}

impl Settings {
    fn from_args(args: &BenchArgs) -> Result<Settings> {
        let conns = args
            .conns
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<usize>()
                    .with_context(|| format!("bad --conns entry {c:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if conns.is_empty() || conns.contains(&0) {
            bail!("--conns must list positive counts");
        }
        let reps = args.reps.unwrap_or(if args.quick { 3 } else { 5 });
        if reps == 0 {
            bail!("--reps must be at least 1");
        }
        Ok(Settings {
            quick: args.quick,
            reps,
            conns,
            warmup: Duration::from_millis(if args.quick { 300 } else { 1000 }),
            window: Duration::from_millis(if args.quick { 1000 } else { 3000 }),
            rounds: if args.quick { 3000 } else { 20_000 },
            setup_concurrency: 16,
            idle_sessions: args.idle_sessions.max(1),
            moves: if args.quick { 4 } else { 15 },
            load_threads: match args.load_threads {
                0 => bail!("--load-threads must be at least 1"),
                n => n,
            },
            load_send: args.load_send,
        })
    }
}

/// What every scenario needs: the testbed, the sink and the settings.
pub struct Ctx<'a> {
    /// The three namespaces (no delay on the links).
    pub tb: &'a Testbed,
    /// The run's sizes.
    pub settings: &'a Settings,
    /// The sink's discard listener.
    pub discard: SocketAddr,
    /// The sink's echo listener.
    pub echo: SocketAddr,
    /// The sink process.
    pub sink_pid: u32,
}

/// CPU and wall time of the processes involved during one measuring window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    /// Wall seconds of the window (as the load generator timed it).
    pub seconds: f64,
    /// CPU seconds of the proxy's process tree (0 for IP forwarding: that is kernel work
    /// charged to no process).
    pub proxy_cpu: f64,
    /// CPU seconds of the load generator.
    pub load_cpu: f64,
    /// CPU seconds of the sink.
    pub sink_cpu: f64,
    /// Busy CPU seconds of the whole machine (all users).
    pub machine_cpu: f64,
}

/// Runs a load worker against `proxy` and measures its window: proxy and sink CPU are read
/// when the worker says `MARK` and when its `RESULT` arrives.
pub fn measure(
    ctx: &Ctx<'_>,
    proxy: &peers::PeerProc,
    args: &[String],
    timeout: Duration,
) -> Result<(serde_json::Value, Window)> {
    let mut w = WorkerProc::start(&ctx.tb.mn, args)?;
    w.expect("READY", timeout)?;
    w.expect("MARK", timeout)?;
    let proxy_cpu = || proxy.pid().map_or(0.0, procstat::tree_cpu_seconds);
    let (p0, s0, m0) = (
        proxy_cpu(),
        procstat::tree_cpu_seconds(ctx.sink_pid),
        procstat::machine_busy_seconds(),
    );
    let result = w.result(timeout)?;
    let (p1, s1, m1) = (
        proxy_cpu(),
        procstat::tree_cpu_seconds(ctx.sink_pid),
        procstat::machine_busy_seconds(),
    );
    let num = |k: &str| {
        result
            .get(k)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
    };
    let window = Window {
        seconds: num("seconds"),
        proxy_cpu: p1 - p0,
        load_cpu: num("cpu"),
        sink_cpu: s1 - s0,
        machine_cpu: m1 - m0,
    };
    Ok((result, window))
}

/// Runs one measurement, and once more if it fails (a VM stall or a peer that hiccupped
/// must not throw away a whole run); a second failure is reported and skipped, so the table
/// shows fewer repetitions instead of the run ending.
pub fn attempt<T>(what: &str, mut f: impl FnMut() -> Result<T>) -> Option<T> {
    for round in 1..=2 {
        match f() {
            Ok(v) => return Some(v),
            Err(e) => eprintln!("  {what}: attempt {round} failed: {e:#}"),
        }
    }
    eprintln!("  {what}: skipped");
    None
}

/// The median of `values` (NaN for none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Namespace sysctls that let the set-up scenario open tens of thousands of short
/// connections: a wide port range (above the peers' listening ports) and reuse of TIME_WAIT ports for new outgoing connections.
fn tune(tb: &Testbed) -> Result<()> {
    for ns in [&tb.mn, &tb.px, &tb.sv] {
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=10000 65000",
            "net.ipv4.tcp_tw_reuse=1",
            "net.core.somaxconn=4096",
            "net.ipv4.tcp_max_syn_backlog=4096",
        ])?;
    }
    Ok(())
}

/// Runs the suite.
pub fn run(args: &BenchArgs) -> Result<()> {
    init_logging();
    if !nix::unistd::Uid::effective().is_root() {
        bail!("msocks bench needs root: it creates network namespaces and virtual links");
    }
    let settings = Settings::from_args(args)?;
    let scenarios = parse_scenarios(&args.scenarios)?;
    let wanted = peers::parse_list(&args.peers)?;
    let peers = peers::ensure_installed(&wanted);
    worker::raise_fd_limit();
    let niceness = raise_priority();
    let started = Instant::now();
    let mut results = report::Results::new(args, &settings, &peers, &scenarios);
    results.niceness = niceness;

    let plain: Vec<Scenario> = scenarios
        .iter()
        .copied()
        .filter(|s| *s != Scenario::Handoff)
        .collect();
    if !plain.is_empty() {
        eprintln!("building the testbed…");
        let tb =
            Testbed::mobile_proxy_server().context("building the network-namespace testbed")?;
        tune(&tb)?;
        let discard = SocketAddr::from((tb.sv_ip, 9000));
        let echo = SocketAddr::from((tb.sv_ip, 9001));
        let mut sink = WorkerProc::start(&tb.sv, &worker::sink_args(discard, echo))?;
        sink.expect("READY", Duration::from_secs(10))?;
        let ctx = Ctx {
            tb: &tb,
            settings: &settings,
            discard,
            echo,
            sink_pid: sink.pid(),
        };
        for sc in plain {
            let t = Instant::now();
            eprintln!("== scenario {} ==", sc.name());
            match sc {
                Scenario::Throughput => {
                    results.throughput = scenarios::throughput::run(&ctx, &peers)?
                }
                Scenario::Latency => results.latency = scenarios::latency::run(&ctx, &peers)?,
                Scenario::Memory => results.memory = scenarios::memory::run(&ctx, &peers)?,
                Scenario::Setup => results.setup = scenarios::setup::run(&ctx, &peers)?,
                Scenario::Handoff => {}
            }
            eprintln!("   ({} took {:.0} s)", sc.name(), t.elapsed().as_secs_f64());
        }
        drop(sink);
    }
    if scenarios.contains(&Scenario::Handoff) {
        eprintln!("== scenario handoff ==");
        results.handoff = Some(scenarios::handoff::run(&settings)?);
    }
    results.elapsed = started.elapsed();
    report::write(args, &results)
}

/// Niceness the suite runs at: the peers, load generators and sinks it starts inherit it.
pub const NICENESS: i32 = -10;

/// Lowers this thread's niceness to [`NICENESS`] before any thread or process is started, so
/// that everything the suite starts inherits it. On a shared machine, other work (at the
/// default niceness 0) then disturbs the measurements much less: a woken ping-pong process no
/// longer waits behind a compiler for its turn. Every peer gets the same, so comparisons stay
/// fair. Returns the niceness set, or `None` if the kernel refused.
fn raise_priority() -> Option<i32> {
    // SAFETY: setpriority takes plain integers and touches no memory of this process; `who`
    // 0 with PRIO_PROCESS is the calling thread on Linux.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICENESS) };
    if r == 0 {
        Some(NICENESS)
    } else {
        eprintln!(
            "cannot set niceness {NICENESS} ({}); measuring at the default priority",
            std::io::Error::last_os_error()
        );
        None
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
