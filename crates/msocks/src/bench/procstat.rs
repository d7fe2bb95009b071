//! What the kernel says a process tree used: CPU seconds from `/proc/PID/stat`, memory from
//! `/proc/PID/smaps_rollup`, and the whole machine's busy time from `/proc/stat`.
//!
//! A peer may be several processes (dante forks workers), so every figure is summed over the
//! process and all its descendants; memory is the proportional set size (Pss), which shares
//! pages that forked processes have in common instead of counting them once per process.

use std::collections::HashMap;
use std::fs;

/// Clock ticks per second of `/proc/*/stat` times (`sysconf(_SC_CLK_TCK)`; 100 on Linux).
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions and only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The fields after the command name of `/proc/PID/stat`; the name is in parentheses and may
/// itself contain spaces and parentheses, so the split is at the last `)`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// `ppid` of every live process.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Field 4 of stat is the ppid; after the name it is the second field.
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse().ok()) {
            map.insert(pid, ppid);
        }
    }
    map
}

/// `root` and all its live descendants.
pub fn tree(root: u32) -> Vec<u32> {
    let parents = parents();
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(
            parents
                .iter()
                .filter(|(_, &pp)| pp == p)
                .map(|(&pid, _)| pid),
        );
        i += 1;
    }
    out
}

/// CPU seconds (user + system) used by `root` and its descendants, including descendants
/// already reaped (their time is in the parents' `cutime`/`cstime`).
pub fn tree_cpu_seconds(root: u32) -> f64 {
    let ticks: u64 = tree(root)
        .into_iter()
        .filter_map(stat_fields)
        .map(|f| {
            // utime, stime, cutime, cstime are fields 14–17, i.e. 11–14 after the name.
            (11..=14)
                .filter_map(|i| f.get(i)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    ticks as f64 / ticks_per_second()
}

/// A value in kB from a `/proc` key-value file such as `status` or `smaps_rollup`.
fn kb_field(path: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Proportional set size of `root` and its descendants, in bytes. Falls back to `VmRSS`
/// where `smaps_rollup` is missing (kernels before 4.14).
pub fn tree_pss_bytes(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(|pid| {
            kb_field(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
                .or_else(|| kb_field(&format!("/proc/{pid}/status"), "VmRSS:"))
        })
        .sum::<u64>()
        * 1024
}

/// Busy CPU seconds of the whole machine so far (all CPUs, everything but idle and iowait),
/// from the first line of `/proc/stat`: other users of a shared machine show up here.
pub fn machine_busy_seconds() -> f64 {
    let Ok(text) = fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy: u64 = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum();
    busy as f64 / ticks_per_second()
}

/// CPU seconds (user + system) this process has used, from `getrusage(RUSAGE_SELF)`, with
/// microsecond resolution.
pub fn self_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_measurable() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(tree_pss_bytes(me) > 0);
        // Burn a little CPU so the tick counter moves.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(self_cpu_seconds() > 0.0);
        assert!(machine_busy_seconds() > 0.0);
    }
}
