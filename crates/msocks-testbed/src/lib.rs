//! Throw-away Linux network namespaces for msocks tests, benchmarks and demos.
//!
//! MSOCKS moves live TCP streams between the network interfaces of a mobile
//! node. Exercising that for real needs a node with two interfaces, a proxy
//! and a server, which this crate builds out of network namespaces and veth
//! pairs with the `ip` tool (iproute2):
//!
//! * [`Netns`] is one named namespace, deleted again when it is dropped
//!   (including during a panic's unwinding); [`Netns::cleanup_stale`] removes
//!   what killed runs left behind.
//! * [`veth_pair`], [`Netns::addr_add`], [`Netns::route_add`] and friends wire
//!   namespaces together.
//! * [`Testbed::mobile_proxy_server`] builds the whole mobile node / proxy /
//!   server topology and supports hard hand-offs with [`Testbed::link_down`]
//!   and [`Testbed::link_up`].
//! * [`DelayEmulator`] adds a fixed delay to the packets crossing one
//!   interface by holding them in userspace through the iptables `NFQUEUE`
//!   target (the kernels here have no `sch_netem`); [`LinkDelay`] delays
//!   both directions of a testbed link that way.
//!
//! Safety of the host: every command (iptables too) runs with `ip -n NAME`
//! or `ip netns exec NAME`, so the host's own interfaces, routes and
//! `/etc/resolv.conf` are never touched, and the namespaces are connected only
//! to each other, so traffic cannot leave them. All of this needs root
//! (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`); tests call [`require_root`] first.

#![warn(missing_docs)]

use std::io::Write as _;
use std::process::ExitStatus;

mod delay;
mod netns;
mod testbed;

pub use delay::{
    DelayConfig, DelayEmulator, DelayStats, Direction, LinkDelay, DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PACKETS, MAX_DELAY, POLL_INTERVAL,
};
pub use netns::{veth_pair, LinkStats, Netns, Route, RouteAction, NAME_PREFIX};
pub use testbed::{Link, Testbed, SV_IF_ON_PX, SV_IF_ON_SV};

/// Everything that can go wrong while building or tearing down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument was rejected before anything was run, e.g. an interface
    /// name longer than the kernel allows or a malformed CIDR.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        /// What kind of argument it was ("tag", "interface name", ...).
        what: &'static str,
        /// The offending value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A helper program (`ip`, `sysctl`, ...) could not be started at all.
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        /// The command line, for the log.
        cmd: String,
        /// The error from `spawn`.
        #[source]
        source: std::io::Error,
    },
    /// A helper program ran but exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line, for the log.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error, trimmed; usually says exactly what was wrong.
        stderr: String,
    },
    /// A file operation on namespace bookkeeping files failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted ("open", "write", ...).
        op: &'static str,
        /// The file concerned.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `setns(2)` refused to move a thread into a namespace.
    #[error("setns into network namespace {name}: {source}")]
    Setns {
        /// The namespace's name.
        name: String,
        /// The errno from the kernel.
        #[source]
        source: nix::Error,
    },
    /// The thread for [`Netns::run_in`] could not be spawned.
    #[error("could not spawn a thread for network namespace {name}: {source}")]
    Thread {
        /// The namespace's name.
        name: String,
        /// The error from the thread builder.
        #[source]
        source: std::io::Error,
    },
    /// A netfilter queue for [`DelayEmulator`] could not be set up.
    #[error("NFQUEUE {op} in network namespace {netns}: {source}")]
    Queue {
        /// The namespace's name.
        netns: String,
        /// What was attempted.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program printed something this crate could not understand.
    #[error("unexpected output from `{cmd}`: {detail}")]
    Parse {
        /// The command line, for the log.
        cmd: String,
        /// What was wrong with the output.
        detail: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Decides whether a test that needs root can run.
///
/// Returns `true` when the effective uid is 0. Otherwise, when the `CI`
/// environment variable is set (to anything but empty, `0` or `false`), it
/// panics, because a CI run that silently skips the namespace tests would
/// look green while testing nothing. On a developer machine it prints a loud
/// banner to standard error and returns `false`, so that the caller can
/// return early and `cargo test` still works without root.
///
/// Use it as the first line of every test that builds namespaces:
///
/// ```no_run
/// # fn t() {
/// if !msocks_testbed::require_root("my_test") {
///     return;
/// }
/// # }
/// ```
pub fn require_root(test_name: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let ci = std::env::var("CI")
        .map(|v| !matches!(v.trim(), "" | "0" | "false"))
        .unwrap_or(false);
    if ci {
        panic!("test {test_name} needs root and CI is set");
    }
    let line = format!(
        "SKIPPED {test_name}: needs root (run as root or set CI=true to make this a failure)"
    );
    let bar = "#".repeat(line.len());
    // Written to the stderr handle rather than with `eprintln!`, which the
    // test harness captures and hides for passing tests: a skip nobody
    // sees is as bad as a silent pass. Nothing useful can be done if the
    // write fails, so its result is ignored.
    let _ = writeln!(std::io::stderr().lock(), "\n{bar}\n{line}\n{bar}\n");
    false
}
