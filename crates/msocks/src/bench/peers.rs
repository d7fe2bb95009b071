//! The SOCKS5 servers compared, started for real inside the proxy namespace: `msocks proxy`
//! (this binary), microsocks and dante (`danted`) from Debian's packages, and plain IP
//! forwarding through the proxy host as the floor every proxy is measured against.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use msocks_testbed::{Testbed, SV_IF_ON_PX};

/// One contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// No proxy: the mobile node connects to the server, and the proxy host routes.
    Forward,
    /// `msocks proxy`, plain SOCKS5 sessions (the `relay` engine).
    Msocks,
    /// `msocks proxy` with `[engine] kind = "kernel"`: plain sessions spliced by the eBPF
    /// TCP Splice (docs/KERNEL-SPLICE.md), so after the SOCKS exchange the proxy process
    /// touches no byte.
    MsocksKernel,
    /// microsocks: one thread per client, small copies.
    Microsocks,
    /// dante-server: forked worker processes.
    Dante,
}

impl Peer {
    /// Every peer, in the order tables list them.
    pub const ALL: [Peer; 5] = [
        Peer::Forward,
        Peer::Msocks,
        Peer::MsocksKernel,
        Peer::Microsocks,
        Peer::Dante,
    ];

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Forward => "ip-forward",
            Peer::Msocks => "msocks",
            Peer::MsocksKernel => "msocks-kernel",
            Peer::Microsocks => "microsocks",
            Peer::Dante => "dante",
        }
    }

    /// Parses [`Peer::name`].
    pub fn parse(s: &str) -> Result<Peer> {
        Peer::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| {
                format!(
                    "unknown peer {s:?} (known: ip-forward, msocks, msocks-kernel, microsocks, dante)"
                )
            })
    }

    /// Whether connections go through a SOCKS5 server (all but the forwarding floor).
    pub fn is_proxy(self) -> bool {
        self != Peer::Forward
    }

    /// The Debian package and the program it must provide.
    fn package(self) -> Option<(&'static str, &'static str)> {
        match self {
            Peer::Microsocks => Some(("microsocks", "microsocks")),
            Peer::Dante => Some(("dante-server", "danted")),
            _ => None,
        }
    }
}

/// Where the load generator sends its connections.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    /// Straight to the server (IP forwarding through the proxy host).
    Direct,
    /// Through the SOCKS5 server at this address (no authentication).
    Socks(SocketAddr),
}

impl Via {
    /// The form the worker's `--via` option takes.
    pub fn arg(self) -> String {
        match self {
            Via::Direct => "direct".into(),
            Via::Socks(a) => format!("socks:{a}"),
        }
    }

    /// Parses [`Via::arg`].
    pub fn parse(s: &str) -> Result<Via> {
        if s == "direct" {
            return Ok(Via::Direct);
        }
        let addr = s
            .strip_prefix("socks:")
            .with_context(|| format!("--via must be `direct` or `socks:ADDR:PORT`, not {s:?}"))?;
        Ok(Via::Socks(
            addr.parse()
                .with_context(|| format!("bad address in --via {s:?}"))?,
        ))
    }
}

/// Whether `program` is on the PATH.
fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Installs the Debian packages of the peers whose program is missing (apt-get, as root).
/// Returns the peers that are usable afterwards.
pub fn ensure_installed(peers: &[Peer]) -> Vec<Peer> {
    let missing: Vec<(&str, &str)> = peers
        .iter()
        .filter_map(|p| p.package())
        .filter(|(_, prog)| !have(prog))
        .collect();
    if !missing.is_empty() {
        let pkgs: Vec<&str> = missing.iter().map(|(p, _)| *p).collect();
        eprintln!("installing {} with apt-get…", pkgs.join(" "));
        let ok = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("warning: apt-get install {} failed", pkgs.join(" "));
        }
    }
    peers
        .iter()
        .copied()
        .filter(|p| match p.package() {
            Some((pkg, prog)) => {
                let ok = have(prog);
                if !ok {
                    eprintln!(
                        "warning: {prog} (package {pkg}) is not installed: peer {} skipped",
                        p.name()
                    );
                }
                ok
            }
            None => true,
        })
        .collect()
}

/// A running peer; its whole process group is stopped when dropped.
pub struct PeerProc {
    child: Option<Child>,
    via: Via,
    scratch: Option<PathBuf>,
}

impl PeerProc {
    /// Where clients connect.
    pub fn via(&self) -> Via {
        self.via
    }

    /// The root process (None for IP forwarding, which is the kernel's work).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for PeerProc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // The peer runs in its own process group (dante forks workers): stop them all.
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A fresh listening port for every start: a restarted peer must not trip over connections
/// of its predecessor still in TIME_WAIT on the old port (not every peer sets SO_REUSEADDR).
/// They stay below the ephemeral range the bench sets (10000 and up), where the proxy's own
/// outgoing connections could hold them.
static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(2_000);

/// Starts `peer` in the proxy namespace and waits until it accepts connections from the
/// mobile node. Every start is a fresh process, so no run inherits another's heap.
pub fn start(tb: &Testbed, peer: Peer) -> Result<PeerProc> {
    let port = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if peer == Peer::Forward {
        // The testbed already routes between the mobile node and the server.
        tb.px.set_forwarding(true)?;
        return Ok(PeerProc {
            child: None,
            via: Via::Direct,
            scratch: None,
        });
    }
    let listen = SocketAddr::from(([0, 0, 0, 0], port));
    let mut scratch = None;
    let mut cmd: Command = match peer {
        Peer::Msocks | Peer::MsocksKernel => {
            let exe = std::env::current_exe().context("locating the msocks binary")?;
            let mut c = tb.px.command(exe);
            // warn: a line per session would cost msocks what dante's logging costs it
            // (off here). MSOCKS_BENCH_PROXY_LOG sets another level, to look into a run.
            let level = std::env::var("MSOCKS_BENCH_PROXY_LOG").unwrap_or_else(|_| "warn".into());
            c.args([
                "proxy",
                "--listen",
                &listen.to_string(),
                "--log-level",
                &level,
            ]);
            if peer == Peer::MsocksKernel {
                let dir = std::env::temp_dir()
                    .join(format!("msocks-bench-kernel-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let conf = dir.join("proxy.toml");
                std::fs::write(&conf, "[engine]\nkind = \"kernel\"\n")
                    .with_context(|| format!("writing {}", conf.display()))?;
                c.arg("--config").arg(&conf);
                scratch = Some(dir);
            }
            c
        }
        Peer::Microsocks => {
            let mut c = tb.px.command("microsocks");
            c.args(["-i", "0.0.0.0", "-p", &port.to_string()]);
            c
        }
        Peer::Dante => {
            let dir = std::env::temp_dir()
                .join(format!("msocks-bench-dante-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let conf = dir.join("danted.conf");
            // No `log:` in the rules: dante would otherwise write a line per connection,
            // which msocks (at warn level) does not do either.
            let text = format!(
                "logoutput: stderr\n\
                 internal: 0.0.0.0 port = {port}\n\
                 external: {ext}\n\
                 clientmethod: none\n\
                 socksmethod: none\n\
                 user.privileged: root\n\
                 user.unprivileged: nobody\n\
                 client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
                 socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n",
                port = port,
                ext = SV_IF_ON_PX,
            );
            std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
            scratch = Some(dir);
            let mut c = tb.px.command("danted");
            c.arg("-f").arg(&conf).args(["-N", "2"]);
            c
        }
        Peer::Forward => unreachable!("handled above"),
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} in the proxy namespace", peer.name()))?;
    if let Some(err) = child.stderr.take() {
        let name = peer.name();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                // dante logs every worker's start and exit at info level, microsocks every
                // client it connects; keep warnings and errors, not that chatter.
                if line.contains("info:")
                    || line.contains("sigchld()")
                    || line.contains("shutting down")
                    || line.contains(": connected to ")
                {
                    continue;
                }
                eprintln!("  [{name}] {line}");
            }
        });
    }
    let proc = PeerProc {
        child: Some(child),
        via: Via::Socks(SocketAddr::from((tb.px_wired_ip, port))),
        scratch,
    };
    let at = SocketAddr::from((tb.px_wired_ip, port));
    let ready = tb.mn.run_in(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&at, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })?;
    ensure!(
        ready,
        "{} did not start listening on {at} within 10 s",
        peer.name()
    );
    Ok(proc)
}

/// Parses a comma-separated `--peers` list.
pub fn parse_list(s: &str) -> Result<Vec<Peer>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = Peer::parse(part)?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        bail!("--peers names no peer");
    }
    out.sort();
    Ok(out)
}
