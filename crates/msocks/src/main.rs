//! `msocks`: one binary for transport-layer mobility. `msocks proxy` runs the SOCKS5/MSOCKS
//! proxy; `msocks passwd` makes users-file entries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod agent_cli;
mod bench;
mod bench_move;
mod demo;
mod run;
mod testbed_proxy;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use msocks_proxy::{Credentials, Proxy, ProxyConfig};
use tracing::{info, warn};

const ABOUT: &str = "Transport-layer mobility (MSOCKS): a SOCKS5 proxy whose streams can move \
between addresses and network interfaces without the server noticing.";

const AFTER_HELP: &str = "Examples:
  msocks proxy                                  serve SOCKS5 on 127.0.0.1:1080, no authentication
  msocks proxy --listen 0.0.0.0:1080 --users /etc/msocks/users
  msocks proxy --config /etc/msocks/proxy.toml --check-config
  sudo msocks demo                              watch a stream survive link moves
  curl --socks5-hostname 127.0.0.1:1080 https://example.org/
On the mobile node (see msocks agent --help):
  sudo msocks agent --config /etc/msocks/agent.toml   local SOCKS5 on 127.0.0.1:1080
  msocks run -- wget http://example.org/big.iso        any dynamically linked program
  msocks status --interfaces

Documentation: README.md, docs/CONFIG.md (proxy configuration), crates/msocks-agent/README.md
(agent configuration, policy, probes), docs/SHIM.md (msocks run), docs/PROTOCOL.md (wire
format, error replies).";

#[derive(Parser)]
#[command(name = "msocks", version, about = ABOUT, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the SOCKS5/MSOCKS proxy server.
    #[command(
        long_about = "Run the SOCKS5 proxy server (RFC 1928: CONNECT, BIND, UDP ASSOCIATE over \
IPv4, IPv6 and domain names; RFC 1929 username/password authentication).\n\n\
With no arguments it serves on 127.0.0.1:1080 without authentication. Every option can be \
set in a TOML file given with --config; flags given here override the file. The log shows \
one line per session opened and closed (client, user, destination, bytes each way, \
duration, reason). SIGTERM or SIGINT stops accepting clients, lets live sessions finish \
for limits.shutdown_grace, and exits 0.",
        after_help = "Log levels: --log-level, else RUST_LOG, else [log] level in the config (default info).\n\
Example config: docs/CONFIG.md."
    )]
    Proxy(ProxyArgs),
    /// Hash a password for the users file (reads it from standard input).
    #[command(
        long_about = "Read a password from standard input (one line) and print a users-file line \
`USERNAME:$argon2id$...` with the password hashed by Argon2id and a random salt.\n\n\
Example: printf '%s\\n' 'correct horse' | msocks passwd alice >> /etc/msocks/users"
    )]
    Passwd {
        /// The user name (1 to 255 bytes, no `:`).
        username: String,
    },
    /// Show a live TCP stream surviving moves between two links (root, Linux).
    #[command(
        long_about = "Build a throw-away testbed of network namespaces — a mobile node with two \
links (wired, radio) to a proxy host, and a server behind it — start `msocks proxy` and a \
server in it, and run a bulk transfer both ways through the MSOCKS library while the stream \
is moved between the links: soft moves on request, and hard ones where the link carrying the \
stream is pulled with no warning. A progress line shows bytes, the current link and the \
moves; the end shows the SHA-256 of what each side sent and received. Exit status 0 only when \
every byte arrived exactly once over a single server connection.\n\n\
Needs root (namespaces, veth links). Everything is removed at the end, also on Ctrl-C or \
failure; traffic never leaves the namespaces.",
        after_help = "Example: sudo msocks demo --bytes 256MiB --moves 50 --hard-every 5"
    )]
    Demo(demo::DemoArgs),
    /// Measure how long a soft move takes, in RTTs of the link moved to (root, Linux).
    #[command(
        long_about = "Build the namespace testbed with a userspace packet delay on both mobile \
links (NFQUEUE; default RTTs: wired 10 ms, radio 60 ms), start `msocks proxy` and a server, and \
move one MobileStream between the links while both ends send a timestamped record every \
millisecond. For each move: the library's MoveReport (attached, TCP connect, RECONNECT reply) \
and the time from the move request to the first byte over the new path at the mobile \
application (down) and at the server (up), in round trips of the link moved to, measured in \
the same run. Prints a Markdown table (median / max per direction). Needs root.",
        after_help = "Example: sudo msocks bench-move --moves 20 --wired-rtt 10ms --radio-rtt 60ms"
    )]
    BenchMove(bench_move::BenchMoveArgs),
    /// Run the benchmark suite against microsocks, dante and IP forwarding (root, Linux).
    #[command(
        long_about = "Build the namespace testbed, start the peers in it (msocks proxy, microsocks, \
dante's danted, installing the last two with apt-get if missing, and plain IP forwarding as the \
floor), and measure each: aggregate throughput vs simultaneous connections (1 to 1024), proxy \
CPU seconds per GB, 1-byte request/response latency (mean, median, p99), memory per idle \
session, session set-up rate, and the longest gap in a record stream across a move (MSOCKS \
cold move vs Linux MPTCP with a backup subflow, on links with emulated delay). The load \
generator and the sink are separate processes whose CPU use is reported beside the proxy's. \
Writes a Markdown report with SVG plots (default docs/BENCHMARKS.md and docs/bench/*.svg). \
--quick takes a few minutes; a full run up to 30 minutes on 2 cores. Needs root.",
        after_help = "Examples:\n  sudo msocks bench --quick\n  sudo msocks bench --scenarios throughput,latency --peers msocks,dante --out /tmp/b.md"
    )]
    Bench(bench::BenchArgs),
    /// Internal: a load generator or sink process of `msocks bench`.
    #[command(hide = true)]
    BenchWorker(bench::worker::WorkerArgs),
    /// Run the mobile-node agent: a local SOCKS5 endpoint whose streams follow the links.
    #[command(long_about = agent_cli::AGENT_LONG_ABOUT, after_help = agent_cli::AGENT_AFTER_HELP)]
    Agent(agent_cli::AgentArgs),
    /// Show the agent's streams and the interfaces they use.
    #[command(long_about = agent_cli::STATUS_LONG_ABOUT)]
    Status(agent_cli::StatusArgs),
    /// Move the agent's streams onto an interface by hand.
    #[command(long_about = agent_cli::MOVE_LONG_ABOUT)]
    Move(agent_cli::MoveArgs),
    /// Run an unmodified program with its TCP connections sent through the agent (LD_PRELOAD).
    #[command(
        long_about = run::RUN_LONG_ABOUT,
        after_help = "Examples:\n  msocks run -- curl -o big.iso http://example.org/big.iso\n  \
msocks run --dns local --exclude 10.0.0.0/8 -- python3 fetch.py"
    )]
    Run(run::RunArgs),
}

#[derive(Args)]
struct ProxyArgs {
    /// Address to accept clients on, ADDR:PORT (IPv6 as [ADDR]:PORT). Repeat for several;
    /// replaces `listen` from the config. Port 0 picks a free port (the log says which).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// TOML configuration file (every option; see docs/CONFIG.md).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Users file (`user:password` or `user:<hash>` per line); makes authentication mandatory.
    #[arg(long, value_name = "FILE")]
    users: Option<PathBuf>,
    /// Log filter, e.g. `info`, `debug`, `msocks_proxy=debug`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Most sessions at once (overrides limits.max_sessions).
    #[arg(long, value_name = "N")]
    max_sessions: Option<usize>,
    /// Close sessions idle this long, e.g. `90s`, `10m`; `0s` disables (overrides limits.idle_timeout).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Session engine (overrides engine.kind): `relay` copies in userspace; `kernel` splices
    /// each session's two TCP connections in an eBPF datapath (Linux, root; sessions that
    /// cannot be spliced use the relay, and the log says why). See docs/KERNEL-SPLICE.md.
    #[arg(long, value_name = "ENGINE", value_parser = parse_engine)]
    engine: Option<msocks_proxy::config::EngineKind>,
    /// Validate the configuration (and users file), print a summary, and exit.
    #[arg(long)]
    check_config: bool,
}

fn parse_engine(s: &str) -> Result<msocks_proxy::config::EngineKind, String> {
    match s {
        "relay" => Ok(msocks_proxy::config::EngineKind::Relay),
        "kernel" => Ok(msocks_proxy::config::EngineKind::Kernel),
        other => Err(format!("unknown engine {other:?}: use `relay` or `kernel`")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Proxy(args) => run_proxy(args),
        Command::Passwd { username } => passwd(&username),
        Command::Demo(args) => run_demo(&args),
        Command::BenchMove(args) => bench_move::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::BenchWorker(args) => bench::worker::run(&args),
        Command::Agent(args) => agent_cli::run_agent(args),
        Command::Status(args) => agent_cli::run_status(&args),
        Command::Move(args) => agent_cli::run_move(&args),
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msocks: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out a cause whose text the message before it
/// already includes (library errors often quote their source).
fn error_chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Logs to standard error, in colour only when it is a terminal (a log file or a pipe gets
/// plain text).
fn init_tracing(filter: tracing_subscriber::EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn run_demo(args: &demo::DemoArgs) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    init_tracing(filter);
    if demo::run(args)? {
        Ok(())
    } else {
        anyhow::bail!("the demo found lost, duplicated or reordered bytes (see above)")
    }
}

fn passwd(username: &str) -> Result<()> {
    if username.is_empty() || username.len() > 255 || username.contains(':') {
        anyhow::bail!("the user name must be 1 to 255 bytes and contain no ':'");
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() || password.len() > 255 {
        anyhow::bail!("the password must be 1 to 255 bytes (SOCKS5 cannot carry more)");
    }
    let hash = msocks_proxy::auth::hash_password(password)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("{username}:{hash}");
    Ok(())
}

/// The configuration from the file (or defaults) with the flags applied on top.
fn effective_config(args: &ProxyArgs) -> Result<ProxyConfig> {
    let mut config = match &args.config {
        Some(path) => ProxyConfig::load(path)?,
        None => ProxyConfig::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args.listen.clone();
    }
    if let Some(users) = &args.users {
        config.auth.users_file = Some(users.clone());
    }
    if let Some(level) = &args.log_level {
        config.log.level = level.clone();
    }
    if let Some(n) = args.max_sessions {
        config.limits.max_sessions = n;
    }
    if let Some(d) = args.idle_timeout {
        config.limits.idle_timeout = d;
    }
    if let Some(kind) = args.engine {
        config.engine.kind = kind;
    }
    config.validate()?;
    Ok(config)
}

fn init_logging(config: &ProxyConfig, flag: Option<&str>) -> Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match (
        flag,
        std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()),
    ) {
        (Some(f), _) => {
            EnvFilter::try_new(f).with_context(|| format!("invalid --log-level {f:?}"))?
        }
        (None, Some(env)) => {
            EnvFilter::try_new(&env).with_context(|| format!("invalid RUST_LOG {env:?}"))?
        }
        (None, None) => EnvFilter::try_new(&config.log.level)
            .with_context(|| format!("invalid [log] level {:?}", config.log.level))?,
    };
    init_tracing(filter);
    Ok(())
}

/// Many sessions need many descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!("could not raise the open-file limit from {soft}: {e}");
            }
        }
    }
}

fn run_proxy(args: ProxyArgs) -> Result<()> {
    let config = effective_config(&args)?;
    let credentials = match &config.auth.users_file {
        Some(path) => {
            let c = Credentials::load(path)?;
            if c.is_empty() {
                anyhow::bail!(
                    "users file {} lists no user: no client could authenticate",
                    path.display()
                );
            }
            Some(c)
        }
        None => None,
    };
    if args.check_config {
        println!("configuration OK");
        println!(
            "  listen: {}",
            config
                .listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        match &credentials {
            Some(c) => println!("  authentication: username/password, {} user(s)", c.len()),
            None => println!("  authentication: none"),
        }
        println!("  rules: {}", config.rules.len());
        println!("  max sessions: {}", config.limits.max_sessions);
        println!("  engine: {:?}", config.engine.kind);
        return Ok(());
    }
    init_logging(&config, args.log_level.as_deref())?;
    raise_fd_limit();
    if let Some(c) = &credentials {
        for user in c.plaintext_users() {
            warn!("user {user:?} has a clear-text password in the users file; `msocks passwd` makes a hash");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let proxy = Proxy::bind(config, credentials).await?;
        proxy.run(shutdown_signal()).await;
        Ok(())
    })
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        _ => {
            warn!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
