//! The Markdown report (`--out`, docs/BENCHMARKS.md by default) and its SVG figures: the
//! machine, the date, the exact command, then one section per scenario with medians over the
//! repetitions and ratios against the peers measured in the same run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use msocks_testbed::Link;

use super::peers::Peer;
use super::plot::{Plot, Series};
use super::scenarios::{handoff, latency, memory, setup, throughput};
use super::{median, BenchArgs, Scenario, Settings};

/// Markers around the section `msocks bench-move` results live in; the suite keeps whatever
/// is between them when it rewrites the report.
const MOVE_BEGIN: &str = "<!-- bench-move:begin (kept as is by `msocks bench`) -->";
const MOVE_END: &str = "<!-- bench-move:end -->";

/// Everything measured in one run.
pub struct Results {
    command: String,
    settings: Settings,
    peers: Vec<Peer>,
    scenarios: Vec<Scenario>,
    date: String,
    code: String,
    load_before: String,
    /// Niceness the suite and everything it started ran at, if it could be set.
    pub niceness: Option<i32>,
    /// Fig. 11 rows.
    pub throughput: Vec<throughput::Row>,
    /// Table I rows.
    pub latency: Vec<latency::Row>,
    /// Idle-session memory rows.
    pub memory: Vec<memory::Row>,
    /// Set-up rate rows.
    pub setup: Vec<setup::Row>,
    /// Hand-off results.
    pub handoff: Option<handoff::HandoffResult>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

impl Results {
    /// Empty results for a run with these options; records the date, command and load now.
    pub fn new(
        _args: &BenchArgs,
        settings: &Settings,
        peers: &[Peer],
        scenarios: &[Scenario],
    ) -> Results {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Results {
            command: format!("sudo target/release/msocks {}", args.join(" ")),
            settings: settings.clone(),
            peers: peers.to_vec(),
            scenarios: scenarios.to_vec(),
            date: sh("date -u '+%Y-%m-%d %H:%M UTC'"),
            // Taken at the start: the run itself rewrites the report in the working tree.
            code: code_version(),
            load_before: std::fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_default(),
            niceness: None,
            throughput: Vec::new(),
            latency: Vec::new(),
            memory: Vec::new(),
            setup: Vec::new(),
            handoff: None,
            elapsed: Duration::ZERO,
        }
    }
}

fn sh(cmd: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:").map(|v| {
                    v.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0)
                })
            })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} CPUs ({cpu}), {:.0} GiB memory, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

fn code_version() -> String {
    let commit = sh("git rev-parse --short HEAD 2>/dev/null");
    if commit.is_empty() {
        return "unknown (not a git checkout)".into();
    }
    let dirty = !sh("git status --porcelain --untracked-files=no 2>/dev/null").is_empty();
    if dirty {
        format!("commit `{commit}` plus uncommitted changes")
    } else {
        format!("commit `{commit}`")
    }
}

fn f(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".into()
    }
}

/// Writes the report and its figures (or prints the report with `--stdout`).
pub fn write(args: &BenchArgs, r: &Results) -> Result<()> {
    let fig_dir = args
        .out
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join("bench");
    std::fs::create_dir_all(&fig_dir).with_context(|| format!("creating {}", fig_dir.display()))?;
    let kept = std::fs::read_to_string(&args.out)
        .ok()
        .map(|t| kept_move_section(&t))
        .unwrap_or_default();
    let md = render(r, &fig_dir, &kept)?;
    if args.stdout {
        print!("{md}");
    } else {
        std::fs::write(&args.out, md).with_context(|| format!("writing {}", args.out.display()))?;
        eprintln!("report written to {}", args.out.display());
    }
    Ok(())
}

/// The `msocks bench-move` section of an existing report: between the markers, or, in a
/// report written before them, from its "## Move time" heading to the end.
fn kept_move_section(text: &str) -> String {
    if let (Some(a), Some(b)) = (text.find(MOVE_BEGIN), text.find(MOVE_END)) {
        if a < b {
            return text[a + MOVE_BEGIN.len()..b].trim().to_owned();
        }
    }
    text.find("## Move time")
        .map(|i| text[i..].trim().to_owned())
        .unwrap_or_default()
}

fn write_fig(dir: &Path, name: &str, plot: &Plot<'_>) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, plot.to_svg()).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn render(r: &Results, fig_dir: &Path, kept: &str) -> Result<String> {
    let s = &r.settings;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Every number here was measured by the command shown, on the machine described; none is an \
estimate. `msocks bench` writes this file itself (apart from the `msocks bench-move` section \
at the end, which it keeps). Re-run it to check a number on another machine.\n"
    );
    let _ = writeln!(md, "## This run\n");
    let _ = writeln!(
        md,
        "```sh\ncargo build --release -p msocks\n{}\n```\n",
        r.command
    );
    let _ = writeln!(md, "* Date: {}.", r.date);
    let _ = writeln!(md, "* Machine: {}.", machine());
    let build = if cfg!(debug_assertions) {
        "debug build (numbers of msocks not representative)"
    } else {
        "release build"
    };
    let _ = writeln!(md, "* Code: {}, {build}.", r.code);
    let _ = writeln!(
        md,
        "* Mode: {}; {} repetitions of every measurement (tables show medians), {} s measuring \
windows after {} ms of warm-up; the run took {:.0} s.",
        if s.quick { "`--quick`" } else { "full" },
        s.reps,
        s.window.as_secs_f64(),
        s.warmup.as_millis(),
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "* Load average when the run started: {}. The machine is shared with other work; the \
\"machine\" columns show all CPU use during each window (everything, not only this run), so \
noise is visible.",
        r.load_before
    );
    let _ = writeln!(
        md,
        "* Priority: {}.",
        match r.niceness {
            Some(n) => format!(
                "the suite, and with it every peer, load generator and sink it starts, ran at \
niceness {n}, so that other work on the machine (at the default 0) disturbs it less; no \
real-time scheduling"
            ),
            None => "the default niceness (lowering it failed)".to_owned(),
        }
    );
    let _ = writeln!(
        md,
        "* Peers: {}. Each measurement starts the peer afresh in the proxy namespace: `msocks \
proxy --log-level warn` (plain SOCKS5 sessions, the `relay` engine; `msocks-kernel`: the same \
with `[engine] kind = \"kernel\"`, the eBPF TCP Splice of docs/KERNEL-SPLICE.md, which after \
the SOCKS exchange forwards each session's segments at tc ingress without the proxy process), \
`microsocks`, `danted -N 2` (Debian's dante-server, no logging rules), or no proxy at all \
(`ip-forward`: the mobile node connects to the server and the proxy host routes: the floor).\n",
        r.peers
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "Set-up: the testbed of `msocks-testbed` (three network namespaces: mobile node `mn`, \
proxy host `px`, server `sv`, veth links, no added delay except in the hand-off scenario). \
The load generator (`msocks bench-worker load`) runs in `mn`; the sink (a discard and an \
echo server, one thread, accept queues of 4096) in `sv`. Both are separate processes, so their CPU \
use is reported beside the proxy's (from `getrusage` and `/proc/PID/stat`; the proxy's \
summed over its process tree). IP forwarding has no process: its CPU cost is kernel time \
charged to nobody, shown as –.\n"
    );
    if r.scenarios.contains(&Scenario::Throughput) {
        throughput_section(&mut md, r, fig_dir)?;
    }
    if r.scenarios.contains(&Scenario::Latency) {
        latency_section(&mut md, r, fig_dir)?;
    }
    if r.scenarios.contains(&Scenario::Memory) {
        memory_section(&mut md, r);
    }
    if r.scenarios.contains(&Scenario::Setup) {
        setup_section(&mut md, r);
    }
    if let Some(h) = &r.handoff {
        handoff_section(&mut md, h, s);
    }
    if !kept.is_empty() {
        let _ = writeln!(md, "{MOVE_BEGIN}\n\n{kept}\n\n{MOVE_END}");
    }
    Ok(md)
}

fn rel(fig_dir: &Path, file: &Path) -> String {
    let dir = fig_dir
        .file_name()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{dir}/{name}")
}

fn best_other(values: &[(Peer, f64)], higher_is_better: bool) -> f64 {
    let v = values
        .iter()
        .filter(|(p, v)| matches!(p, Peer::Microsocks | Peer::Dante) && v.is_finite())
        .map(|(_, v)| *v);
    if higher_is_better {
        v.fold(f64::NAN, f64::max)
    } else {
        v.fold(f64::NAN, f64::min)
    }
}

fn throughput_section(md: &mut String, r: &Results, fig_dir: &Path) -> Result<()> {
    let _ = writeln!(
        md,
        "## Throughput vs simultaneous connections (the paper's Fig. 11)\n"
    );
    let _ = writeln!(
        md,
        "Each connection writes 64 KiB blocks as fast as it can, from the mobile node through the \
peer to the discard server; throughput is what the load generator wrote during the window \
(GB = 10⁹ bytes). Connections are opened (64 at a time) before the warm-up. The load \
generator writes with {} thread(s) (`--load-threads`), with {} (`--load-send`: `write` from a \
buffer, or `sendfile` from a 64 KiB in-memory file, which spares the load generator's copy; \
on 2026-11-25 `--quick --conns 1,64,1024` with `sendfile` roughly doubled IP forwarding and \
the kernel engine, to 3.6–4.7 GB/s, while msocks' relay at 1024 connections ranged from 0.6 to \
3.4 GB/s over two runs of three windows). Through IP forwarding and the kernel \
engine the packets' whole path across the testbed is kernel work done on the sending CPU and \
charged to the load generator, which therefore shows about one core in those rows: there the \
sending thread is the limit, for both alike. A second writing thread did not lift it on 2 \
CPUs: in four alternating runs (2026-11-25, `--scenarios throughput --conns 1,64,1024`), two \
threads at 1024 connections gave 1.78 and 0.29 GB/s through the kernel engine against 2.78 and \
2.76 with one, and less for msocks too.\n",
        r.settings.load_threads,
        match r.settings.load_send {
            crate::bench::worker::SendWith::Write => "write(2)",
            crate::bench::worker::SendWith::Sendfile => "sendfile(2)",
        }
    );
    let series: Vec<Series> = r
        .peers
        .iter()
        .map(|&p| Series {
            name: p.name().into(),
            points: r
                .throughput
                .iter()
                .filter(|row| row.peer == p)
                .map(|row| {
                    (
                        row.conns as f64,
                        median(row.runs.iter().map(throughput::Run::gbps)),
                    )
                })
                .collect(),
        })
        .collect();
    let fig = write_fig(
        fig_dir,
        "throughput.svg",
        &Plot {
            title: "Aggregate throughput (median)",
            x_label: "simultaneous connections",
            y_label: "GB/s",
            log_x: true,
            series,
        },
    )?;
    let _ = writeln!(md, "![throughput vs connections]({})\n", rel(fig_dir, &fig));
    let mut header = String::from("| connections |");
    let mut sep = String::from("|---|");
    for p in &r.peers {
        let _ = write!(header, " {} GB/s |", p.name());
        sep.push_str("---|");
    }
    header.push_str(" msocks ÷ best of microsocks, dante | msocks ÷ ip-forward |");
    sep.push_str("---|---|");
    let _ = writeln!(md, "{header}\n{sep}");
    for &n in &s_conns(r) {
        let vals: Vec<(Peer, f64)> = r
            .throughput
            .iter()
            .filter(|row| row.conns == n)
            .map(|row| (row.peer, median(row.runs.iter().map(throughput::Run::gbps))))
            .collect();
        let get = |p: Peer| vals.iter().find(|(q, _)| *q == p).map_or(f64::NAN, |v| v.1);
        let mut line = format!("| {n} |");
        for &p in &r.peers {
            let _ = write!(line, " {} |", f(get(p), 3));
        }
        let _ = write!(
            line,
            " {} | {} |",
            ratio(get(Peer::Msocks), best_other(&vals, true)),
            ratio(get(Peer::Msocks), get(Peer::Forward))
        );
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(
        md,
        "\nCPU during the same windows (medians; \"cores\" = CPU seconds per second):\n"
    );
    let _ = writeln!(md, "| peer | connections | proxy CPU s per GB | proxy cores | load generator cores | sink cores | machine cores (all work) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for row in &r.throughput {
        let per = |g: fn(&throughput::Run) -> f64| median(row.runs.iter().map(g));
        let is_proxy = row.peer.is_proxy();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.peer.name(),
            row.conns,
            if is_proxy {
                f(per(throughput::Run::cpu_per_gb), 3)
            } else {
                "–".into()
            },
            if is_proxy {
                f(per(|x| x.window.proxy_cpu / x.window.seconds), 2)
            } else {
                "–".into()
            },
            f(per(|x| x.window.load_cpu / x.window.seconds), 2),
            f(per(|x| x.window.sink_cpu / x.window.seconds), 2),
            f(per(|x| x.window.machine_cpu / x.window.seconds), 2),
        );
    }
    let cpu_ratios: Vec<String> = s_conns(r)
        .iter()
        .map(|&n| {
            let vals: Vec<(Peer, f64)> = r
                .throughput
                .iter()
                .filter(|row| row.conns == n)
                .map(|row| {
                    (
                        row.peer,
                        median(row.runs.iter().map(throughput::Run::cpu_per_gb)),
                    )
                })
                .collect();
            let m = vals
                .iter()
                .find(|(p, _)| *p == Peer::Msocks)
                .map_or(f64::NAN, |v| v.1);
            format!("{n}: {}", ratio(m, best_other(&vals, false)))
        })
        .collect();
    let _ = writeln!(
        md,
        "\nmsocks CPU per GB ÷ the lowest of microsocks and dante, by connections: {}.",
        cpu_ratios.join(", ")
    );
    let _ = writeln!(
        md,
        "\nOn 2 CPUs the proxy, the load generator, the sink and the kernel's TCP work share two \
cores, so the totals cannot exceed 2; when the machine column is near 2, the run was CPU-bound \
for everyone and the ranking, not the absolute number, is the result.\n"
    );
    Ok(())
}

fn s_conns(r: &Results) -> Vec<usize> {
    let mut v: Vec<usize> = r.throughput.iter().map(|row| row.conns).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn latency_section(md: &mut String, r: &Results, fig_dir: &Path) -> Result<()> {
    let _ = writeln!(md, "## Request/response latency (the paper's Table I)\n");
    let _ = writeln!(
        md,
        "One connection per peer sends 1 byte to the echo server and waits for it to come back, \
{} times per run after 200 ms of warm-up (TCP_NODELAY at both ends; blocking sockets in the \
load generator). The peers are measured side by side: each repetition starts all of them, and \
one load generator makes its round trips through them in turn (round i through every peer, \
starting with a different one each round), so that the machine's changing load (it is shared) \
falls on all of them alike; `msocks-kernel` runs in a group of its own, beside IP forwarding \
only, because its eBPF program on the proxy host's interfaces would also be in the other \
proxies' path (the table below this one compares those two). The load generator's CPU is its \
whole run's divided by the peers it served. \"Added\" is the median round trip minus that of \
IP forwarding in the same runs (for `msocks-kernel`, the IP forwarding of its own group).\n",
        r.settings.rounds
    );
    let floor = r
        .latency
        .iter()
        .find(|row| row.peer == Peer::Forward)
        .map_or(f64::NAN, |row| {
            median(row.runs.iter().map(latency::Run::median_us))
        });
    let _ = writeln!(md, "| peer | mean µs | median µs | p99 µs | added median µs | median ÷ ip-forward | load generator CPU s per run |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let mut series = Vec::new();
    for row in &r.latency {
        let med = median(row.runs.iter().map(latency::Run::median_us));
        // Each peer against the floor measured in its own runs.
        let floor = if row.beside_forward.is_empty() {
            floor
        } else {
            median(row.beside_forward.iter().map(latency::Run::median_us))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.peer.name(),
            f(median(row.runs.iter().map(|x| x.mean_us)), 1),
            f(med, 1),
            f(median(row.runs.iter().map(|x| x.p99_us)), 1),
            if row.peer.is_proxy() {
                f(med - floor, 1)
            } else {
                "–".into()
            },
            ratio(med, floor),
            f(median(row.runs.iter().map(|x| x.load_cpu)), 3),
        );
        // The distribution of the run with the median median.
        let mut runs: Vec<&latency::Run> = row.runs.iter().collect();
        runs.sort_by(|a, b| a.median_us().total_cmp(&b.median_us()));
        if let Some(run) = runs.get(runs.len() / 2) {
            series.push(Series {
                name: row.peer.name().into(),
                points: run
                    .quantiles_us
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i <= 99)
                    .map(|(i, &v)| (i as f64, v))
                    .collect(),
            });
        }
    }
    kernel_beside_forward(md, r);
    let fig = write_fig(
        fig_dir,
        "latency.svg",
        &Plot {
            title: "1-byte round trip by percentile (median run)",
            x_label: "percentile",
            y_label: "round trip, µs",
            log_x: false,
            series,
        },
    )?;
    let _ = writeln!(
        md,
        "Note: a spliced segment (`msocks-kernel`) is rewritten and redirected at tc ingress of \
the proxy host's interface, so it skips the proxy host's IP stack (routing, netfilter) that a \
forwarded packet crosses; it can therefore be faster than the `ip-forward` floor. The splice \
crate's own ping-pong test (`crates/msocks-splice/tests/latency.rs`, run by hand as root) \
measures a spliced and a routed connection side by side on a bare testbed, without this \
suite's load generator and sink.\n"
    );
    let _ = writeln!(md, "\n![round-trip percentiles]({})\n", rel(fig_dir, &fig));
    Ok(())
}

/// The kernel engine against IP forwarding measured round by round beside it, in the same
/// runs (the splice program attached for both).
fn kernel_beside_forward(md: &mut String, r: &Results) {
    let Some(row) = r
        .latency
        .iter()
        .find(|row| row.peer == Peer::MsocksKernel && !row.beside_forward.is_empty())
    else {
        return;
    };
    let stat = |runs: &[latency::Run]| {
        (
            median(runs.iter().map(latency::Run::median_us)),
            median(runs.iter().map(|x| x.mean_us)),
            median(runs.iter().map(|x| x.p99_us)),
        )
    };
    let (k_med, k_mean, k_p99) = stat(&row.runs);
    let (f_med, f_mean, f_p99) = stat(&row.beside_forward);
    let _ = writeln!(
        md,
        "\n`msocks-kernel` and IP forwarding in the same runs (its group: round i through one, \
then the other; the splice program is attached to the proxy host's interfaces for both, and \
finds no entry for the forwarded connection). Medians over the repetitions:\n"
    );
    let _ = writeln!(
        md,
        "| | ip-forward µs | msocks-kernel µs | msocks-kernel ÷ ip-forward |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for (what, fw, k) in [
        ("mean", f_mean, k_mean),
        ("median", f_med, k_med),
        ("p99", f_p99, k_p99),
    ] {
        let _ = writeln!(
            md,
            "| {what} | {} | {} | {} |",
            f(fw, 1),
            f(k, 1),
            ratio(k, fw)
        );
    }
    let _ = writeln!(md);
}

fn memory_section(md: &mut String, r: &Results) {
    let _ = writeln!(md, "## Memory per idle session\n");
    let _ = writeln!(
        md,
        "A freshly started peer's proportional set size (Pss from `/proc/PID/smaps_rollup`, summed \
over its processes) before and while the load generator holds {} sessions open (SOCKS5 \
CONNECT to the echo server, then nothing). Kernel socket memory is not included (it is the \
same for every peer). IP forwarding keeps no per-connection state in a process.\n",
        r.settings.idle_sessions
    );
    let _ = writeln!(md, "| peer | bytes per idle session | MiB per 1,000 idle sessions | idle Pss MiB | processes with the sessions open |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for row in &r.memory {
        let per = median(row.runs.iter().map(memory::Run::per_session));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            row.peer.name(),
            f(per, 0),
            f(per * 1000.0 / 1024.0 / 1024.0, 2),
            f(
                median(row.runs.iter().map(|x| x.baseline as f64 / 1024.0 / 1024.0)),
                1
            ),
            f(median(row.runs.iter().map(|x| x.processes as f64)), 0),
        );
    }
    let _ = writeln!(md);
}

fn setup_section(md: &mut String, r: &Results) {
    let _ = writeln!(md, "## Session set-up rate\n");
    let _ = writeln!(
        md,
        "{} concurrent loops each open a session (TCP connect, greeting, CONNECT to the echo \
server, reply) and close it at once; through IP forwarding a loop is a TCP connect and close. \
Sessions per second completed during the window.\n",
        r.settings.setup_concurrency
    );
    let vals: Vec<(Peer, f64)> = r
        .setup
        .iter()
        .map(|row| (row.peer, median(row.runs.iter().map(setup::Run::rate))))
        .collect();
    let get = |p: Peer| vals.iter().find(|(q, _)| *q == p).map_or(f64::NAN, |v| v.1);
    let _ = writeln!(md, "| peer | sessions/s | ÷ ip-forward | failed attempts | proxy cores | load generator cores | machine cores (all work) |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for row in &r.setup {
        let per = |g: fn(&setup::Run) -> f64| median(row.runs.iter().map(g));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            row.peer.name(),
            f(get(row.peer), 0),
            ratio(get(row.peer), get(Peer::Forward)),
            f(per(|x| x.failed as f64), 0),
            if row.peer.is_proxy() {
                f(per(|x| x.window.proxy_cpu / x.window.seconds), 2)
            } else {
                "–".into()
            },
            f(per(|x| x.window.load_cpu / x.window.seconds), 2),
            f(per(|x| x.window.machine_cpu / x.window.seconds), 2),
        );
    }
    let _ = writeln!(
        md,
        "\nEarlier versions of this suite saw rates collapse at random, to a few hundred sessions \
a second with every process idle, most often through IP forwarding (the fastest, so the \
sink's accept queue mattered most there): the sink listened with a backlog of 128, which \
overflowed whenever its thread was off the CPU for a few milliseconds; the kernel then \
dropped SYNs (`ListenOverflows` in the server namespace), and each dropped SYN stalled a \
loop for the 1 s of its retransmission timer. The sink now listens with 4096."
    );
    let _ = writeln!(
        md,
        "\nmsocks ÷ best of microsocks, dante: {}.\n",
        ratio(get(Peer::Msocks), best_other(&vals, true))
    );
}

fn handoff_section(md: &mut String, h: &handoff::HandoffResult, s: &Settings) {
    let _ = writeln!(md, "## Hand-off: longest gap across a move\n");
    let _ = writeln!(
        md,
        "Both ends send a 16-byte timestamped record every millisecond (TCP_NODELAY). For each \
soft move between the mobile node's links, the gap is the longest time between two \
consecutive records arriving at the receiving application (down: at the mobile node; up: at \
the server), in round trips of the link moved to. Without a move it is about 1 ms. {} moves \
each way per method. Delay comes from the userspace NFQUEUE emulator of `msocks-testbed` \
(packets held on arrival at each end of a link; the kernel has no netem), configured RTTs \
{} ms (wired) and {} ms (radio); measured in this run: {:.2} ms and {:.2} ms (median TCP \
connect time to the proxy host).\n",
        s.moves,
        handoff::WIRED_RTT.as_millis(),
        handoff::RADIO_RTT.as_millis(),
        h.wired_rtt.as_secs_f64() * 1e3,
        h.radio_rtt.as_secs_f64() * 1e3
    );
    let _ = writeln!(
        md,
        "| method | move | n | gap down: median (max) | gap up: median (max) | bytes on the new link after the move (least of the moves) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for m in &h.methods {
        if let Some(e) = &m.error {
            let _ = writeln!(
                md,
                "| {} | – | 0 | not measured: {} | |",
                m.method,
                e.replace('|', "/")
            );
            continue;
        }
        for to in [Link::Radio, Link::Wired] {
            let moves: Vec<&handoff::Move> = m.moves.iter().filter(|x| x.to == to).collect();
            let Some((dms, drtt, ums, urtt)) = handoff::summary(h, &m.moves, to) else {
                continue;
            };
            let rtt = h.rtt(to).as_secs_f64();
            let max_d = moves
                .iter()
                .map(|x| x.gap_down.as_secs_f64())
                .fold(0.0, f64::max);
            let max_u = moves
                .iter()
                .map(|x| x.gap_up.as_secs_f64())
                .fold(0.0, f64::max);
            let from = if to == Link::Radio {
                "wired → radio"
            } else {
                "radio → wired"
            };
            let _ = writeln!(
                md,
                "| {} | {from} | {} | {:.2} RTT ({:.1} ms) ({:.2} RTT) | {:.2} RTT ({:.1} ms) ({:.2} RTT) | {:.0} % |",
                m.method,
                moves.len(),
                drtt,
                dms,
                max_d / rtt,
                urtt,
                ums,
                max_u / rtt,
                moves.iter().map(|x| x.on_new_link).fold(1.0, f64::min) * 100.0
            );
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "MPTCP runs end to end (`IPPROTO_MPTCP` sockets on the mobile node and the server, no \
proxy; the proxy host routes). The radio subflow is opened in advance as a backup (`ip mptcp \
endpoint add … subflow backup`); a move makes the new link's endpoint `nobackup` and then the \
old one's `backup` (`ip mptcp endpoint change`, which sends MP_PRIO to the server). The gap \
includes running those two `ip` commands (a few ms). MSOCKS cold opens a new TCP connection \
to the proxy over the new link and sends RECONNECT; the old connection carries data until \
then. MSOCKS warm first opens a standby connection on the new link (authenticated, probed \
once) while the old one carries the stream, then sends RECONNECT on it, as `msocks agent` \
does. Both send the client's unacknowledged bytes right behind the RECONNECT (early resend, \
PROTOCOL.md 3.7.1).\n"
    );
    let _ = writeln!(
        md,
        "Initial windows: the MSOCKS cold and warm rows run with the host routes to the proxy's \
addresses that `msocks agent` installs on the mobile node (`msocks_agent::routes`: `initcwnd \
{w} initrwnd {w}`), and with the same windows on the proxy host's routes to the mobile node's \
addresses (docs/CONFIG.md, \"Routes of the proxy host\"). The first row runs without either, \
with the kernel's initial congestion window of 10 segments: the connection the stream moves \
to is fresh or, for a standby connection, idle (which restarts its window), every 16-byte \
record is a segment of its own (TCP_NODELAY) in both directions, and after 10 of them a sender \
(the mobile node up, the proxy down) waits about one round trip of the new link for the first \
acknowledgments. MPTCP's subflows go to the server, not to the proxy's addresses, so the \
routes do not change them.\n",
        w = msocks_agent::routes::INIT_WINDOW
    );
}
