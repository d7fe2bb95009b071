//! `msocks bench` on a tiny scale, as CI can afford it: msocks (both engines) against IP
//! forwarding, one repetition, small connection counts. It must exit 0, write a report whose tables hold
//! plausible measured numbers, and write well-formed SVG figures beside it.

use std::process::Command;
use std::time::{Duration, Instant};

const MSOCKS_BIN: &str = env!("CARGO_BIN_EXE_msocks");

/// The cells of the table row whose first cell is `first`, after the heading `section`.
fn row<'a>(report: &'a str, section: &str, first: &str) -> Vec<&'a str> {
    let start = report
        .find(section)
        .unwrap_or_else(|| panic!("no section {section:?}:\n{report}"));
    let line = report[start..]
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .unwrap_or_else(|| panic!("no row {first:?} in {section:?}:\n{report}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

fn num(cell: &str) -> f64 {
    cell.trim_end_matches('×')
        .parse()
        .unwrap_or_else(|_| panic!("{cell:?} is not a number"))
}

fn well_formed_svg(path: &std::path::Path) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    assert!(svg.contains("<polyline"), "no line in {}", path.display());
    assert!(!svg.contains("NaN"), "NaN in {}", path.display());
}

#[test]
fn bench_quick_writes_a_sane_report() {
    if !msocks_testbed::require_root("bench_quick_writes_a_sane_report") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("msocks-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("BENCH.md");
    let started = Instant::now();
    let status = Command::new(MSOCKS_BIN)
        .args([
            "bench",
            "--quick",
            "--reps",
            "1",
            "--conns",
            "1,4",
            "--idle-sessions",
            "50",
        ])
        .args([
            "--scenarios",
            "throughput,latency,memory,setup",
            "--peers",
            "ip-forward,msocks,msocks-kernel",
        ])
        .arg("--out")
        .arg(&out)
        .status()
        .expect("start msocks bench");
    assert!(status.success(), "msocks bench failed: {status}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    let report = std::fs::read_to_string(&out).expect("the report");

    for conns in ["1", "4"] {
        let r = row(&report, "## Throughput", conns);
        let (fwd, msocks) = (num(r[1]), num(r[2]));
        assert!(fwd > 0.001 && msocks > 0.001, "throughput row {r:?}");
    }
    let lat = row(&report, "## Request/response latency", "msocks");
    let (mean, median, p99) = (num(lat[1]), num(lat[2]), num(lat[3]));
    assert!(
        median > 1.0 && median <= p99 && mean > 1.0,
        "latency row {lat:?}"
    );
    // The kernel engine against IP forwarding measured beside it, in the same runs.
    let beside = row(
        &report,
        "`msocks-kernel` and IP forwarding in the same runs",
        "median",
    );
    let (fwd, kernel) = (num(beside[1]), num(beside[2]));
    assert!(
        fwd > 1.0 && kernel > 1.0,
        "kernel beside ip-forward {beside:?}"
    );
    for conns in ["1", "4"] {
        let r = row(&report, "## Throughput", conns);
        assert!(num(r[3]) > 0.001, "kernel throughput row {r:?}");
    }
    let mem = row(&report, "## Memory per idle session", "msocks");
    assert!(
        num(mem[1]) >= 0.0 && num(mem[3]) > 0.5,
        "memory row {mem:?}"
    );
    let setup = row(&report, "## Session set-up rate", "msocks");
    assert!(num(setup[1]) > 10.0, "set-up row {setup:?}");
    // CPU of the proxy was measured (not the – of IP forwarding).
    let cpu = row(&report, "CPU during the same windows", "msocks");
    assert!(num(cpu[2]) > 0.0, "CPU row {cpu:?}");

    well_formed_svg(&dir.join("bench/throughput.svg"));
    well_formed_svg(&dir.join("bench/latency.svg"));
    let _ = std::fs::remove_dir_all(&dir);
}
