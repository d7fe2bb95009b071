//! `msocks agent`, `msocks status` and `msocks move`: thin wrappers over `msocks-agent`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use msocks_agent::control::client;
use msocks_agent::{Agent, AgentConfig};

/// Long help of `msocks agent`.
pub const AGENT_LONG_ABOUT: &str = "Run the mobile-node agent: a local SOCKS5 endpoint (default \
127.0.0.1:1080, no authentication; CONNECT, BIND and UDP ASSOCIATE) that programs use as they \
are — curl --socks5-hostname, a browser's SOCKS setting, git -c http.proxy=socks5h://..., \
ssh -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p' — or without any proxy setting through \
`msocks run -- PROGRAM`. Each local connection becomes an MSOCKS stream to `msocks proxy`, \
placed by the policy in the config file: which interface its data leaves by (the proxy \
address routed out of that interface) and which one its data arrives on (the local address \
it uses), chosen separately. When an interface goes down, loses its address or stops \
answering the agent's liveness probe (a silent failure, found within probe_timeout, 1 s), \
its streams move at once to the next one the policy allows, and back when it returns; \
nothing is lost and the server sees one connection.\n\n\
The config file lists [[interface]] entries (name, proxy, gateway, cost, bandwidth, latency, \
tags) and [[rule]] entries (host, network, port, uid, program -> outbound, inbound, \
when_unavailable); every key is in crates/msocks-agent/README.md. Without --config there is \
no interface and every stream waits. An interface named in the file need not exist yet: it \
is used when it appears. With manage_routes (default when root) the agent installs `ip route \
replace PROXY/32 dev IFACE` per interface and removes it on exit. SIGHUP reloads the policy \
(a broken file is reported and the old policy kept; check it first with --check-config) and \
re-places every stream; SIGTERM/SIGINT stop the agent. Logs go to standard error.";

/// Examples shown after `msocks agent --help`.
pub const AGENT_AFTER_HELP: &str = "Minimal config: one [[interface]] per link, with the proxy's \
address as reached over that link (the agent routes it out of that link):
  [[interface]]
  name = \"eth0\"
  proxy = \"192.0.2.1:1080\"

  [[interface]]
  name = \"wwan0\"
  proxy = \"[2001:db8::1]:1080\"
  cost = \"expensive\"

Examples:
  msocks agent --config /etc/msocks/agent.toml --check-config
  sudo msocks agent --config /etc/msocks/agent.toml
  curl --socks5-hostname 127.0.0.1:1080 http://example.org/
  msocks run -- wget http://example.org/big.iso
  msocks status; msocks status --interfaces; msocks move 3 wwan0
  kill -HUP $(pidof msocks)                 reload the policy

If the config sets `control`, give status and move the same path (--control PATH, or
MSOCKS_CONTROL in the environment).";

/// Long help of `msocks status`.
pub const STATUS_LONG_ABOUT: &str = "Show the agent's streams: id, program, destination, the \
interface data leaves by (OUT) and arrives on (IN), bytes up and down, moves, state and the \
rule that placed it. --json prints the agent's answer as JSON for scripts. --interfaces shows \
each configured interface instead: LINK is usable, down, no address, no IPv4/IPv6 address \
(none of its proxy's family), or absent (no such kernel interface yet); PROBE is alive, \
failed (with the reason) or - (not probed).";

/// Long help of `msocks move`.
pub const MOVE_LONG_ABOUT: &str = "Move one stream (by the id `msocks status` shows) or every \
stream (--all) onto an interface, both directions, now, and pin it there: while that interface \
is unusable the policy places the stream, and it returns to the pinned interface when that \
is usable again (`msocks status` shows the pin). The interface `auto` removes the pin and \
hands streams back to the policy at once. Only streams open now are moved; new ones follow \
the policy. Returns when the streams are on the new path. Examples: `msocks move 3 \
wwan0`, `msocks move --all eth0`, `msocks move --all auto`.";

/// Options of `msocks agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// TOML configuration file (interfaces and rules).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address of the local SOCKS5 endpoint; repeat for several (replaces `listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Control socket path (replaces `control`; default /run/msocks/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `msocks_agent=debug` (else RUST_LOG, else info).
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Validate the config file, print what it configures and exit (0 if valid).
    #[arg(long)]
    pub check_config: bool,
}

/// Options of `msocks status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show the interfaces instead of the streams: link state, liveness probe and its
    /// round trip, whether a standby connection is ready (warm moves), streams out / in.
    #[arg(long)]
    pub interfaces: bool,
    /// The agent's control socket (the `control` key of its config).
    #[arg(
        long,
        value_name = "PATH",
        env = "MSOCKS_CONTROL",
        default_value = msocks_agent::config::DEFAULT_CONTROL
    )]
    pub control: PathBuf,
}

/// Options of `msocks move`: `msocks move ID IFACE` or `msocks move --all IFACE`.
#[derive(Debug, clap::Args)]
pub struct MoveArgs {
    /// Move every stream (then the only argument is IFACE).
    #[arg(long)]
    pub all: bool,
    /// ID IFACE, or IFACE with --all: the stream (see `msocks status`) and the interface to
    /// move it to (`auto`: back to the policy).
    #[arg(value_name = "ID|IFACE", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The agent's control socket (the `control` key of its config).
    #[arg(
        long,
        value_name = "PATH",
        env = "MSOCKS_CONTROL",
        default_value = msocks_agent::config::DEFAULT_CONTROL
    )]
    pub control: PathBuf,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run_agent(args: AgentArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if let Some(c) = &args.control {
        config.control = c.clone();
    }
    if args.check_config {
        print!("{}", config_summary(&config, args.config.as_deref()));
        return Ok(());
    }
    let filter = match args.log_level.as_deref() {
        Some(f) => tracing_subscriber::EnvFilter::try_new(f)
            .with_context(|| format!("invalid --log-level {f:?}"))?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    crate::init_tracing(filter);
    if config.interfaces.is_empty() {
        tracing::warn!(
            "no [[interface]] configured: every stream will wait for one, then be refused; \
             give --config FILE with an [[interface]] per link (see msocks agent --help)"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let agent = Agent::bind(config, args.config.clone()).await?;
        agent.run(crate::shutdown_signal()).await?;
        Ok(())
    })
}

/// What `msocks agent --check-config` prints: the effective settings, every interface
/// (noting ones that do not exist on this host now) and every rule.
fn config_summary(config: &AgentConfig, path: Option<&std::path::Path>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let file = path.map_or("(no --config: defaults)".into(), |p| {
        p.display().to_string()
    });
    let _ = writeln!(out, "config {file}: valid");
    let listen: Vec<String> = config.listen.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "listen {}; control {}; manage_routes {}; probes {}",
        listen.join(", "),
        config.control.display(),
        if config.manage_routes_effective() {
            "on"
        } else {
            "off"
        },
        if config.standby {
            format!(
                "every {:?}, timeout {:?}",
                config.probe_interval, config.probe_timeout
            )
        } else {
            "off".into()
        },
    );
    if config.interfaces.is_empty() {
        let _ = writeln!(
            out,
            "no [[interface]]: every stream would wait for one (add one per link)"
        );
    }
    for i in &config.interfaces {
        let proxy = i
            .proxy
            .map_or("none (inbound only)".into(), |p| p.to_string());
        // /sys/class/net lists the kernel's interfaces in this network namespace.
        let present = std::path::Path::new("/sys/class/net")
            .join(&i.name)
            .exists();
        let _ = writeln!(
            out,
            "interface {}: proxy {proxy}{}{}",
            i.name,
            if i.tags.is_empty() {
                String::new()
            } else {
                format!(", tags {}", i.tags.join(","))
            },
            if present {
                ""
            } else {
                " (not present now: used when it appears)"
            },
        );
    }
    for (n, r) in config.rules.iter().enumerate() {
        let label = r
            .name
            .as_deref()
            .map_or(String::new(), |x| format!(" ({x:?})"));
        let _ = writeln!(
            out,
            "rule {}{label}: outbound {}, inbound {}",
            n + 1,
            r.outbound.as_ref().map_or("any".into(), |v| v.join(",")),
            r.inbound.as_ref().map_or("any".into(), |v| v.join(",")),
        );
    }
    out
}

/// Prints the agent's streams.
pub fn run_status(args: &StatusArgs) -> Result<()> {
    if args.interfaces {
        let rows = client::interfaces(&args.control)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", client::format_interfaces(&rows));
        }
        return Ok(());
    }
    let rows = client::status(&args.control)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", client::format_table(&rows));
    }
    Ok(())
}

/// Moves streams by hand.
pub fn run_move(args: &MoveArgs) -> Result<()> {
    let (id, interface) = match (args.all, args.args.as_slice()) {
        (true, [iface]) => (None, iface),
        (false, [id, iface]) => (
            Some(
                id.parse::<u64>()
                    .with_context(|| format!("{id:?} is not a stream id (see `msocks status`)"))?,
            ),
            iface,
        ),
        (true, _) => anyhow::bail!("usage: msocks move --all IFACE"),
        (false, _) => anyhow::bail!("usage: msocks move ID IFACE (or --all IFACE)"),
    };
    let moved = client::move_streams(&args.control, id, interface)?;
    if args.json {
        println!("{}", serde_json::json!({ "moved": moved }));
    } else if moved.is_empty() {
        println!("no stream to move");
    } else {
        let ids: Vec<String> = moved.iter().map(u64::to_string).collect();
        println!("moved to {interface}: stream(s) {}", ids.join(", "));
    }
    Ok(())
}
