//! Starting `msocks proxy` inside the proxy namespace of a [`Testbed`], for `msocks demo` and
//! `msocks bench-move`: this very binary, so the demo shows the proxy users run.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use msocks_testbed::Testbed;

/// The port the proxy listens on, on every address of the proxy namespace.
pub const PROXY_PORT: u16 = 1080;

/// The proxy process; killed when dropped.
pub struct ProxyProc(Child);

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the proxy at warn level (its warnings and errors are relayed to our standard
/// error, prefixed) and waits until it accepts connections from the mobile node.
pub fn start(tb: &Testbed) -> Result<ProxyProc> {
    start_with_engine(tb, "relay")
}

/// [`start`] with the session engine `engine` (`relay` or `kernel`).
pub fn start_with_engine(tb: &Testbed, engine: &str) -> Result<ProxyProc> {
    let exe = std::env::current_exe().context("locating the msocks binary")?;
    // MSOCKS_PROXY_LOG (a log filter) shows more of the proxy's log, for debugging.
    let level = std::env::var("MSOCKS_PROXY_LOG").unwrap_or_else(|_| "warn".into());
    let mut child = tb
        .px
        .command(&exe)
        .args([
            "proxy",
            "--listen",
            &format!("0.0.0.0:{PROXY_PORT}"),
            "--log-level",
            &level,
            "--engine",
            engine,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting msocks proxy in the proxy namespace")?;
    let stderr = child.stderr.take();
    let proxy = ProxyProc(child);
    if let Some(err) = stderr {
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("\n  [proxy] {line}");
            }
        });
    }
    let proxy_at = SocketAddr::from((tb.px_wired_ip, PROXY_PORT));
    let ready = tb.mn.run_in(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&proxy_at, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    ensure!(
        ready,
        "msocks proxy did not start listening on {proxy_at} within 10 s"
    );
    Ok(proxy)
}
