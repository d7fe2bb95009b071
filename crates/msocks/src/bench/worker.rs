//! The benchmark's traffic: `msocks bench-worker`, a hidden subcommand this binary runs as a
//! child process inside a namespace. As `sink` it serves the server side (a discard and an
//! echo listener) in the server namespace; as `load` it is the load generator on the mobile
//! node. Being separate processes, their own CPU use can be reported beside the proxy's.
//!
//! The worker talks to the orchestrator over standard output, one line each: `READY` when it
//! is set up, `MARK` when its measuring window starts (the orchestrator samples the proxy's
//! CPU then), and `RESULT {json}` at the end of the window.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use msocks_proto::{
    Command as SocksCommand, OpenRequest, Reply, ReplyCode, ReplyContext, Request, TargetAddr,
};
use msocks_testbed::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::peers::Via;
use super::procstat::self_cpu_seconds;

/// Options of the hidden `msocks bench-worker`.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Clone, clap::Subcommand)]
enum Role {
    /// Discard and echo listeners (the server namespace).
    Sink {
        #[arg(long)]
        discard: SocketAddr,
        #[arg(long)]
        echo: SocketAddr,
    },
    /// A load generator (the mobile node).
    Load(LoadArgs),
}

/// What a load generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `--conns` connections each writing as fast as they can to the discard server.
    Bulk,
    /// One connection doing 1-byte request/response round trips with the echo server.
    Pingpong,
    /// `--conns` loops each opening a session (SOCKS5 CONNECT) and closing it at once.
    Setup,
    /// `--conns` sessions opened and left idle until a line arrives on standard input.
    Idle,
}

/// Options of a load generator.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// `direct` or `socks:ADDR:PORT`.
    #[arg(long)]
    via: String,
    /// The server address (discard for bulk, echo otherwise).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 1)]
    conns: usize,
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Round trips measured by `pingpong`.
    #[arg(long, default_value_t = 5000)]
    rounds: usize,
    /// Threads writing `bulk`'s connections (each its own event loop, with a share of them).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// How `bulk` writes: `write` from a buffer (one copy per byte in the load generator),
    /// or `sendfile` from a 64 KiB in-memory file (the kernel takes the pages by reference,
    /// as `iperf3 -Z` does).
    #[arg(long, value_enum, default_value_t = SendWith::Write)]
    send: SendWith,
}

/// How the bulk load generator hands its bytes to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendWith {
    /// write(2) from a static buffer of zeros, as most applications send.
    Write,
    /// sendfile(2) from a memfd holding one chunk of zeros: no copy in the load generator,
    /// and the segments carry page-sized fragments (as from a file server).
    Sendfile,
}

/// Sessions opened at once while setting up many connections: more would only overflow the
/// servers' accept queues.
const OPEN_CONCURRENCY: usize = 64;
/// Size of each bulk write; the data is zeros from one static buffer, never allocated per
/// connection.
const CHUNK: usize = 64 * 1024;
static ZEROS: [u8; CHUNK] = [0u8; CHUNK];

/// Runs the worker (the hidden subcommand).
pub fn run(args: &WorkerArgs) -> Result<()> {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match &args.role {
        Role::Sink { discard, echo } => rt.block_on(sink(*discard, *echo)),
        Role::Load(load) if load.mode == Mode::Pingpong => {
            let vias = load
                .via
                .split(',')
                .map(super::peers::Via::parse)
                .collect::<Result<Vec<_>>>()?;
            pingpong(&vias, load)
        }
        Role::Load(load) => {
            let via = super::peers::Via::parse(&load.via)?;
            match load.mode {
                Mode::Bulk => rt.block_on(bulk(via, load)),
                Mode::Setup => rt.block_on(setup(via, load)),
                Mode::Idle => rt.block_on(idle(via, load)),
                Mode::Pingpong => unreachable!("matched above"),
            }
        }
    }
}

/// Many sessions need many descriptors: lift the soft limit to the hard one.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    // The orchestrator is gone if this fails; the worker then ends on its own soon.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A listener with a deep accept queue. With the default of 128, the set-up scenario's
/// connections (over 20,000 a second through IP forwarding) overflowed it whenever the sink's
/// one thread was off the CPU for a few milliseconds; the kernel then drops SYNs, and each
/// dropped SYN stalled a load loop for the 1 s of its retransmission timer: set-up rates
/// collapsed at random, to a few hundred a second, with every process idle.
fn sink_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // The namespaces' somaxconn is raised to match (`bench::tune`).
    socket.listen(4096)?;
    tokio::net::TcpListener::from_std(socket.into())
}

async fn sink(discard: SocketAddr, echo: SocketAddr) -> Result<()> {
    let discard = sink_listener(discard).context("binding discard")?;
    let echo = sink_listener(echo).context("binding echo")?;
    say("READY");
    tokio::spawn(async move {
        while let Ok((s, _)) = discard.accept().await {
            tokio::spawn(discard_conn(s));
        }
    });
    while let Ok((s, _)) = echo.accept().await {
        tokio::spawn(echo_conn(s));
    }
    Ok(())
}

thread_local! {
    /// The sink's one receive buffer: reads are synchronous (`try_read`) on a single-threaded
    /// runtime, so every connection can share it.
    static DISCARD_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
}

async fn discard_conn(s: tokio::net::TcpStream) {
    loop {
        if s.readable().await.is_err() {
            return;
        }
        let r = DISCARD_BUF.with(|b| s.try_read(&mut b.borrow_mut()));
        match r {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

async fn echo_conn(mut s: tokio::net::TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn connect_request(target: SocketAddr) -> Vec<u8> {
    let mut req = Vec::with_capacity(32);
    Request::Open(OpenRequest {
        command: SocksCommand::Connect,
        target: TargetAddr::Ip(target),
        mobility: None,
    })
    .encode(&mut req);
    req
}

fn check_reply(buf: &[u8]) -> std::io::Result<bool> {
    match Reply::decode(buf, ReplyContext::Plain) {
        Ok(Some((reply, _))) if reply.code == ReplyCode::Succeeded => Ok(true),
        Ok(Some((reply, _))) => Err(std::io::Error::other(format!(
            "proxy refused: {}",
            reply.code
        ))),
        Ok(None) => Ok(false),
        Err(e) => Err(std::io::Error::other(format!("bad reply: {e}"))),
    }
}

/// A connection to `target`, through the SOCKS5 server of `via` if any (no authentication,
/// one round trip per message as ordinary clients do).
pub async fn open(via: Via, target: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let addr = match via {
        Via::Direct => target,
        Via::Socks(p) => p,
    };
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    if let Via::Socks(_) = via {
        s.write_all(&[5, 1, 0]).await?;
        let mut m = [0u8; 2];
        s.read_exact(&mut m).await?;
        if m != [5, 0] {
            return Err(std::io::Error::other("proxy refused no-authentication"));
        }
        s.write_all(&connect_request(target)).await?;
        let mut buf = Vec::with_capacity(32);
        let mut chunk = [0u8; 64];
        loop {
            let n = s.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if check_reply(&buf)? {
                break;
            }
        }
    }
    Ok(s)
}

/// The blocking twin of [`open`], for the latency measurement (no event loop in the path).
fn open_blocking(via: Via, target: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    let addr = match via {
        Via::Direct => target,
        Via::Socks(p) => p,
    };
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    if let Via::Socks(_) = via {
        s.write_all(&[5, 1, 0])?;
        let mut m = [0u8; 2];
        s.read_exact(&mut m)?;
        if m != [5, 0] {
            return Err(std::io::Error::other("proxy refused no-authentication"));
        }
        s.write_all(&connect_request(target))?;
        let mut buf = Vec::with_capacity(32);
        let mut chunk = [0u8; 64];
        loop {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
            if check_reply(&buf)? {
                break;
            }
        }
    }
    Ok(s)
}

/// Opens `n` connections, [`OPEN_CONCURRENCY`] at a time.
async fn open_many(via: Via, target: SocketAddr, n: usize) -> Result<Vec<tokio::net::TcpStream>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(OPEN_CONCURRENCY);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..batch {
            set.spawn(open(via, target));
        }
        while let Some(r) = set.join_next().await {
            out.push(
                r.context("opening task")?.with_context(|| {
                    format!("opening a connection to {target} via {}", via.arg())
                })?,
            );
        }
    }
    Ok(out)
}

async fn bulk(via: Via, args: &LoadArgs) -> Result<()> {
    ensure!(args.conns > 0, "--conns must be at least 1");
    ensure!(args.threads > 0, "--threads must be at least 1");
    let conns = open_many(via, args.target, args.conns).await?;
    let source = match args.send {
        SendWith::Sendfile => Some(Arc::new(zero_chunk_file()?)),
        SendWith::Write => None,
    };
    say("READY");
    let sent = Arc::new(AtomicU64::new(0));
    // Connection i is written by thread i mod threads. Thread 0 is this one; the others get
    // their sockets out of this runtime and into their own.
    let threads = args.threads.min(conns.len());
    let mut shares: Vec<Vec<std::net::TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in conns.into_iter().enumerate() {
        if i % threads == 0 {
            tokio::spawn(write_forever(s, sent.clone(), source.clone()));
        } else {
            shares[i % threads].push(s.into_std().context("moving a connection")?);
        }
    }
    for share in shares.into_iter().skip(1) {
        let sent = sent.clone();
        let source = source.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .context("starting a writer thread's event loop")?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                for s in share {
                    match tokio::net::TcpStream::from_std(s) {
                        Ok(s) => {
                            tokio::spawn(write_forever(s, sent.clone(), source.clone()));
                        }
                        Err(e) => eprintln!("  load generator: a connection lost: {e}"),
                    }
                }
                // The process exits at the end of the window.
                std::future::pending::<()>().await
            })
        });
    }
    tokio::time::sleep(args.warmup).await;
    let (b0, c0, t0) = (
        sent.load(Ordering::Relaxed),
        self_cpu_seconds(),
        Instant::now(),
    );
    say("MARK");
    tokio::time::sleep(args.duration).await;
    let (b1, c1, secs) = (
        sent.load(Ordering::Relaxed),
        self_cpu_seconds(),
        t0.elapsed().as_secs_f64(),
    );
    say(&format!(
        "RESULT {}",
        serde_json::json!({"bytes": b1 - b0, "seconds": secs, "cpu": c1 - c0})
    ));
    // The connections are simply dropped with the process.
    std::process::exit(0)
}

/// A memfd holding one chunk of zeros, the source of `sendfile` writes.
fn zero_chunk_file() -> Result<std::os::fd::OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let fd = memfd_create(c"msocks-bench-chunk", MemFdCreateFlag::MFD_CLOEXEC)
        .context("creating the load generator's in-memory file")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&ZEROS)
        .context("filling the load generator's in-memory file")?;
    Ok(file.into())
}

/// Writes 64 KiB blocks into `s` as fast as it takes them, counting what it took: with
/// sendfile(2) from `source` when given, else with write(2).
async fn write_forever(
    s: tokio::net::TcpStream,
    sent: Arc<AtomicU64>,
    source: Option<Arc<std::os::fd::OwnedFd>>,
) {
    loop {
        if s.writable().await.is_err() {
            return;
        }
        let result = match &source {
            Some(file) => s.try_io(tokio::io::Interest::WRITABLE, || {
                let mut offset: libc::off_t = 0;
                nix::sys::sendfile::sendfile(&s, file.as_ref(), Some(&mut offset), CHUNK)
                    .map_err(std::io::Error::from)
            }),
            None => s.try_write(&ZEROS),
        };
        match result {
            Ok(n) => {
                sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

async fn setup(via: Via, args: &LoadArgs) -> Result<()> {
    ensure!(args.conns > 0, "--conns must be at least 1");
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    say("READY");
    for _ in 0..args.conns {
        let (done, failed, target) = (done.clone(), failed.clone(), args.target);
        tokio::spawn(async move {
            loop {
                match open(via, target).await {
                    Ok(s) => {
                        drop(s);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // The first few say why (on stderr, which the suite shows), so that
                        // a "failed" count in the report can be looked into.
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("  set-up attempt failed: {e}");
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        });
    }
    tokio::time::sleep(args.warmup).await;
    let (n0, f0, c0, t0) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        self_cpu_seconds(),
        Instant::now(),
    );
    say("MARK");
    tokio::time::sleep(args.duration).await;
    let (n1, f1, c1, secs) = (
        done.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        self_cpu_seconds(),
        t0.elapsed().as_secs_f64(),
    );
    say(&format!(
        "RESULT {}",
        serde_json::json!({"count": n1 - n0, "failed": f1 - f0, "seconds": secs, "cpu": c1 - c0})
    ));
    std::process::exit(0)
}

async fn idle(via: Via, args: &LoadArgs) -> Result<()> {
    let conns = open_many(via, args.target, args.conns).await?;
    say("READY");
    // Hold the sessions until the orchestrator has measured and says so.
    let _ = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)
    })
    .await;
    drop(conns);
    say(&format!(
        "RESULT {}",
        serde_json::json!({"cpu": self_cpu_seconds()})
    ));
    Ok(())
}

/// Round trips through every one of `vias` in turn: round `i` goes through all of them, the
/// first being `i mod n`, so that each sees the same moments of the machine's load (on a
/// shared machine the load changes within seconds, far more than the differences measured).
fn pingpong(vias: &[Via], args: &LoadArgs) -> Result<()> {
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    ensure!(!vias.is_empty(), "--via must name at least one way");
    let mut conns = vias
        .iter()
        .map(|&via| open_blocking(via, args.target))
        .collect::<std::io::Result<Vec<_>>>()
        .context("opening the ping-pong connections")?;
    say("READY");
    let mut byte = [0u8; 1];
    let mut round = |s: &mut std::net::TcpStream| -> Result<Duration> {
        let t = Instant::now();
        s.write_all(&[7])?;
        s.read_exact(&mut byte)?;
        Ok(t.elapsed())
    };
    // Warm-up: caches, the proxy's lazy buffers, TCP's quick-ack mode.
    let warm_until = Instant::now() + args.warmup;
    while Instant::now() < warm_until {
        for s in conns.iter_mut() {
            round(s)?;
        }
    }
    let c0 = self_cpu_seconds();
    say("MARK");
    let n = conns.len();
    let mut us: Vec<Vec<f64>> = vec![Vec::with_capacity(args.rounds); n];
    for i in 0..args.rounds {
        for j in 0..n {
            let k = (i + j) % n;
            us[k].push(round(&mut conns[k])?.as_secs_f64() * 1e6);
        }
    }
    let cpu = self_cpu_seconds() - c0;
    let per_way: Vec<serde_json::Value> = us
        .into_iter()
        .map(|mut v| {
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            v.sort_by(f64::total_cmp);
            // Percentiles 0..=100, enough for the table and the distribution plot.
            let q: Vec<f64> = (0..=100).map(|p| v[(p * (v.len() - 1)) / 100]).collect();
            let p99 = v[(v.len() * 99 / 100).min(v.len() - 1)];
            serde_json::json!({"mean_us": mean, "p99_us": p99, "quantiles_us": q})
        })
        .collect();
    say(&format!(
        "RESULT {}",
        serde_json::json!({"ways": per_way, "cpu": cpu})
    ));
    Ok(())
}

/// The arguments of a ping-pong load generator through every one of `vias` in turn.
pub fn pingpong_args(
    vias: &[Via],
    target: SocketAddr,
    warmup: Duration,
    rounds: usize,
) -> Vec<String> {
    let mut args = load_args(
        Mode::Pingpong,
        Via::Direct,
        target,
        1,
        warmup,
        Duration::ZERO,
        rounds,
    );
    let list: Vec<String> = vias.iter().map(|v| v.arg()).collect();
    if let Some(i) = args.iter().position(|a| a == "--via") {
        args[i + 1] = list.join(",");
    }
    args
}

/// A worker process started by the orchestrator; killed when dropped.
pub struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl WorkerProc {
    /// Starts `msocks bench-worker ARGS` in `ns`.
    pub fn start(ns: &Netns, args: &[String]) -> Result<WorkerProc> {
        let exe = std::env::current_exe().context("locating the msocks binary")?;
        let mut child = ns
            .command(exe)
            .arg("bench-worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a bench worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(WorkerProc {
            child,
            stdin,
            lines,
        })
    }

    /// The worker's process id (for its CPU use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the line starting with `word`, returning the rest of it.
    pub fn expect(&mut self, word: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(word) {
                        return Ok(rest.trim().to_owned());
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("bench worker: no {word} within {timeout:?}")
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!("bench worker ended before {word} (exit: {status:?})")
                }
            }
        }
    }

    /// Waits for `RESULT` and parses its JSON.
    pub fn result(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let text = self.expect("RESULT", timeout)?;
        serde_json::from_str(&text).context("parsing the worker's RESULT")
    }

    /// Sends a line to the worker's standard input (the `idle` load ends on it).
    pub fn poke(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("worker stdin closed")?;
        writeln!(stdin, "go").context("writing to the worker")?;
        stdin.flush().context("writing to the worker")
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Arguments of a load worker.
pub fn load_args(
    mode: Mode,
    via: Via,
    target: SocketAddr,
    conns: usize,
    warmup: Duration,
    duration: Duration,
    rounds: usize,
) -> Vec<String> {
    let mode = match mode {
        Mode::Bulk => "bulk",
        Mode::Pingpong => "pingpong",
        Mode::Setup => "setup",
        Mode::Idle => "idle",
    };
    vec![
        "load".into(),
        "--mode".into(),
        mode.into(),
        "--via".into(),
        via.arg(),
        "--target".into(),
        target.to_string(),
        "--conns".into(),
        conns.to_string(),
        "--warmup".into(),
        humantime::format_duration(warmup).to_string(),
        "--duration".into(),
        humantime::format_duration(duration).to_string(),
        "--rounds".into(),
        rounds.to_string(),
        "--threads".into(),
        "1".into(),
    ]
}

/// `args` (from [`load_args`]) with `threads` writer threads writing with `send` (bulk
/// only).
pub fn bulk_options(mut args: Vec<String>, threads: usize, send: SendWith) -> Vec<String> {
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        args[i + 1] = threads.max(1).to_string();
    }
    let send = match send {
        SendWith::Sendfile => "sendfile",
        SendWith::Write => "write",
    };
    args.extend(["--send".into(), send.into()]);
    args
}

/// Arguments of the sink worker.
pub fn sink_args(discard: SocketAddr, echo: SocketAddr) -> Vec<String> {
    vec![
        "sink".into(),
        "--discard".into(),
        discard.to_string(),
        "--echo".into(),
        echo.to_string(),
    ]
}
