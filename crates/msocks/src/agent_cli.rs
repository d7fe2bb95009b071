//! `msocks agent`, `msocks status` and `msocks move`: thin wrappers over `msocks-agent`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use msocks_agent::control::client;
use msocks_agent::{Agent, AgentConfig};

/// Long help of `msocks agent`.
pub const AGENT_LONG_ABOUT: &str = "Run the mobile-node agent: a local SOCKS5 endpoint (default \
127.0.0.1:1080, no authentication, CONNECT) that programs use as they are — curl \
--socks5-hostname, a browser's SOCKS setting, ssh -o ProxyCommand='nc -X 5 -x 127.0.0.1:1080 %h %p'. \
Each local connection becomes an MSOCKS stream to the proxy, placed by the policy in the \
config file: which interface its data leaves by (the proxy address routed out of that \
interface) and which one its data arrives on (the local address it uses), chosen separately. \
When an interface goes down its streams move at once to the next one the policy allows, \
and back when it returns; nothing is lost and the server sees one connection.\n\n\
The config file lists [[interface]] entries (name, proxy, cost, bandwidth, latency, tags) and \
[[rule]] entries (host, network, port, uid, program -> outbound, inbound, when_unavailable); \
see crates/msocks-agent/README.md. With manage_routes (default when root) the agent installs \
`ip route replace PROXY/32 dev IFACE` per interface and removes it on exit. SIGHUP reloads \
the policy and re-places every stream; SIGTERM/SIGINT stop the agent.";

/// Long help of `msocks status`.
pub const STATUS_LONG_ABOUT: &str = "Show the agent's streams: id, program, destination, the \
interface data leaves by (OUT) and arrives on (IN), bytes up and down, moves, state and the \
rule that placed it. --json prints the agent's answer as JSON for scripts.";

/// Long help of `msocks move`.
pub const MOVE_LONG_ABOUT: &str = "Move one stream (by the id `msocks status` shows) or every \
stream (--all) onto an interface, both directions, now; it stays there while that interface is \
usable, then the policy takes over again. The interface `auto` hands streams back to the \
policy at once. Returns when the streams are on the new path.";

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
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = msocks_agent::config::DEFAULT_CONTROL)]
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
    /// The agent's control socket.
    #[arg(long, value_name = "PATH", default_value = msocks_agent::config::DEFAULT_CONTROL)]
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
    let filter = match args.log_level.as_deref() {
        Some(f) => tracing_subscriber::EnvFilter::try_new(f)
            .with_context(|| format!("invalid --log-level {f:?}"))?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    crate::init_tracing(filter);
    if config.interfaces.is_empty() {
        tracing::warn!(
            "no [[interface]] configured: every stream will wait for one (see --config)"
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
