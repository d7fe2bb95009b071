//! tcpdump captures of one interface of a testbed namespace, for the
//! evidence checkers.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;

use msocks_testbed::Netns;

/// tcpdump on one interface of a namespace, stopped with SIGTERM on drop so
/// that it flushes its buffer.
pub struct Capture {
    child: Child,
    path: PathBuf,
    /// tcpdump's standard error, collected to its end.
    stderr: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Capture {
    pub fn start(ns: &Netns, iface: &str, path: &Path) -> Capture {
        let mut child = ns
            .command("tcpdump")
            .args([
                "-i",
                iface,
                "-n",
                "-s",
                "0",
                "--immediate-mode",
                "-B",
                "65536",
            ])
            .args(["--time-stamp-precision", "nano", "-w"])
            .arg(path)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (Debian package tcpdump) must be installed");
        // tcpdump says "listening on ..." once its socket is bound.
        let mut err = child.stderr.take().expect("piped stderr");
        let mut seen = Vec::new();
        let mut b = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("listening on") {
            let n = err.read(&mut b).expect("reading tcpdump's stderr");
            assert!(n > 0, "tcpdump exited: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&b[..n]);
        }
        // Keep draining stderr so tcpdump never blocks on it; its last
        // lines say how many packets the kernel dropped.
        let stderr = thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = err.read_to_end(&mut rest);
            rest
        });
        Capture {
            child,
            path: path.to_owned(),
            stderr: Some(stderr),
        }
    }

    /// Stops tcpdump (SIGTERM, so it flushes) and returns the file and the
    /// number of packets the kernel dropped before tcpdump could read them.
    pub fn stop(mut self) -> (PathBuf, u64) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // "N packets dropped by kernel"; unknown counts as lossy.
        let dropped = text
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX);
        (self.path.clone(), dropped)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
