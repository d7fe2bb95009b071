//! The namespace testbed with the real daemons running in it: `msocks proxy` in the proxy
//! host, `msocks agent` in the mobile node with both links (wired0, radio0), and helpers to
//! watch the agent's streams and drive its CLI. Used by the agent tests and by the `msocks
//! run` test that moves an unmodified program's download between the links.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use msocks_agent::control::{client, StreamRow};
use msocks_testbed::Testbed;

/// Port of `msocks proxy` on every proxy address.
pub const PROXY_PORT: u16 = 1080;
/// Port of the agent's local SOCKS5 endpoint (on 127.0.0.1 in the mobile node).
pub const AGENT_PORT: u16 = 1080;

/// A child process killed when dropped; its log is printed if the test is failing.
pub struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("----- {} log -----\n{log}\n-----", self.name);
        }
    }
}

/// The testbed with the proxy and the agent running; everything stops on drop.
pub struct Setup {
    /// The namespaces and links.
    pub tb: Testbed,
    /// Scratch directory: configs, logs, the control socket.
    pub dir: PathBuf,
    _proxy: Proc,
    _agent: Proc,
}

impl Setup {
    /// The agent's process id (for signals).
    pub fn agent_pid(&self) -> u32 {
        self._agent.child.id()
    }

    /// The agent's control socket.
    pub fn control(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// What the agent has logged so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's streams now.
    pub fn status(&self) -> Vec<StreamRow> {
        client::status(&self.control()).expect("msocks status")
    }

    /// The one stream to `port`.
    pub fn stream(&self, port: u16) -> Option<StreamRow> {
        self.status()
            .into_iter()
            .find(|r| r.destination.ends_with(&format!(":{port}")))
    }

    /// Waits until the stream to `port` satisfies `f`.
    pub fn wait_stream(&self, port: u16, what: &str, f: impl Fn(&StreamRow) -> bool) -> StreamRow {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let row = self.stream(port);
            if let Some(r) = row.as_ref().filter(|r| f(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "stream to port {port}: {what}; last status: {row:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Kept after a failure: the logs are printed from it, and can be read afterwards.
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Builds the testbed and starts the proxy and the agent. The agent's config has the two
/// interfaces (wired0 preferred: free, high bandwidth, tag lan; radio0: expensive, low, tag
/// wan) followed by whatever `rules` returns for this testbed (`[[rule]]` entries, or "").
pub fn setup(name: &str, rules: impl FnOnce(&Testbed) -> String) -> Setup {
    setup_with(name, |tb| format!("{}{}", interfaces(tb), rules(tb)))
}

/// The `[[interface]]` entries [`setup`] gives the agent: wired0 then radio0.
pub fn interfaces(tb: &Testbed) -> String {
    format!(
        r#"
[[interface]]
name = "wired0"
proxy = "{pw}:{PROXY_PORT}"
cost = "free"
bandwidth = "high"
tags = ["lan"]

[[interface]]
name = "radio0"
proxy = "{pr}:{PROXY_PORT}"
cost = "expensive"
bandwidth = "low"
tags = ["wan"]
"#,
        pw = tb.px_wired_ip,
        pr = tb.px_radio_ip,
    )
}

/// Like [`setup`], with everything after the agent's `listen`, `control`, `manage_routes`
/// and `wait_timeout` given by `body`: more global keys first, then `[[interface]]` and
/// `[[rule]]` entries (e.g. an interface with an IPv6 proxy address: the proxy listens on
/// IPv4 and IPv6).
pub fn setup_with(name: &str, body: impl FnOnce(&Testbed) -> String) -> Setup {
    let tb = Testbed::mobile_proxy_server().expect("testbed");
    let dir = std::env::temp_dir().join(format!("msocks-agent-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = env!("CARGO_BIN_EXE_msocks");

    let proxy_log = dir.join("proxy.log");
    let child = tb
        .px
        .command(exe)
        .args([
            "proxy",
            "--listen",
            &format!("0.0.0.0:{PROXY_PORT}"),
            "--listen",
            &format!("[::]:{PROXY_PORT}"),
            "--log-level",
            "info",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&proxy_log).unwrap())
        .spawn()
        .expect("start msocks proxy");
    let proxy = Proc {
        child,
        name: "proxy",
        log: proxy_log,
    };
    let proxy_at = SocketAddr::from((tb.px_wired_ip, PROXY_PORT));
    wait_connectable(&tb, proxy_at);

    let config = format!(
        r#"
listen = ["127.0.0.1:{AGENT_PORT}"]
control = "{control}"
manage_routes = true
wait_timeout = "60s"
{body}"#,
        control = dir.join("agent.sock").display(),
        body = body(&tb),
    );
    let config_path = dir.join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    let agent_log = dir.join("agent.log");
    let child = tb
        .mn
        .command(exe)
        .args(["agent", "--config"])
        .arg(&config_path)
        .args(["--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .expect("start msocks agent");
    let agent = Proc {
        child,
        name: "agent",
        log: agent_log,
    };
    let control = dir.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(15);
    while client::status(&control).is_err() {
        assert!(
            Instant::now() < deadline,
            "the agent's control socket did not answer"
        );
        thread::sleep(Duration::from_millis(50));
    }
    Setup {
        tb,
        dir,
        _proxy: proxy,
        _agent: agent,
    }
}

/// Waits until `addr` accepts TCP connections from the mobile node.
pub fn wait_connectable(tb: &Testbed, addr: SocketAddr) {
    let ok = tb
        .mn
        .run_in(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return true;
                }
                thread::sleep(Duration::from_millis(20));
            }
            false
        })
        .unwrap();
    assert!(ok, "{addr} did not accept connections");
}

/// Runs `msocks ARGS --control CONTROL` in the mobile node; its standard output.
pub fn run_cli(tb: &Testbed, control: &Path, args: &[&str]) -> String {
    let out = tb
        .mn
        .command(env!("CARGO_BIN_EXE_msocks"))
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .expect("run msocks");
    assert!(
        out.status.success(),
        "msocks {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
