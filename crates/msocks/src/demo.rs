//! `msocks demo`: a throw-away testbed (network namespaces: a mobile node with a wired and a
//! radio link to the proxy host, and a server behind it), a real `msocks proxy`, and a bulk
//! transfer both ways through the MSOCKS library while the stream is moved between the links
//! — softly on request, and hard by pulling the link it is on. It ends with the SHA-256 of
//! what each side sent and received; the exit status is 0 only when they match.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msocks_client::{MobileConfig, MobileStream, ProxyPath};
use msocks_testbed::{Link, Testbed};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of `msocks demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Bytes to send each way.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub bytes: u64,
    /// Moves between the links during the transfer.
    #[arg(long, default_value_t = 20)]
    pub moves: u32,
    /// Every Nth move is hard: the current link is pulled with no warning (0: never).
    #[arg(long, default_value_t = 3)]
    pub hard_every: u32,
    /// Pause between moves.
    #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Cap on the transfer rate each way, so the moves fall inside the transfer
    /// (e.g. `20MiB`); 0 for as fast as the links go.
    #[arg(long, default_value = "12MiB", value_parser = parse_size)]
    pub rate: u64,
}

/// Parses `64MiB`, `1GiB`, `500KiB`, `1000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [
        ("GiB", 1u64 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suf, m)| s.strip_suffix(suf).map(|n| (n, *m)))
    .unwrap_or((s, 1));
    num.trim()
        .parse::<u64>()
        .map_err(|_| format!("{s:?} is not a size like 64MiB"))?
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The deterministic byte stream each side sends (xorshift64*, so the receiver's hash can be
/// compared with the sender's without storing the data).
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What one end of the transfer saw.
#[derive(Debug, Default, Clone)]
struct Side {
    sent: u64,
    sent_sha: String,
    received: u64,
    received_sha: String,
}

use crate::testbed_proxy::PROXY_PORT;
const SERVER_PORT: u16 = 9000;
const CHUNK: usize = 64 * 1024;

/// Runs the demo; `Ok(true)` when every byte arrived exactly once.
pub fn run(args: &DemoArgs) -> Result<bool> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("msocks demo needs root: it creates network namespaces and virtual links");
    }
    eprintln!("building the testbed: namespaces mn (mobile node), px (proxy), sv (server)…");
    let tb = Testbed::mobile_proxy_server().context("building the network-namespace testbed")?;
    eprintln!(
        "  wired: mn {} <-> px {}   radio: mn {} <-> px {}   server: {}",
        tb.mn_wired_ip, tb.px_wired_ip, tb.mn_radio_ip, tb.px_radio_ip, tb.sv_ip
    );

    let proxy = crate::testbed_proxy::start(&tb)?;

    let bytes = args.bytes;
    let server = tb
        .sv
        .run_in(|| {
            let listener = TcpListener::bind(SocketAddr::from((tb.sv_ip, SERVER_PORT)));
            std::thread::spawn(move || serve_one(listener?, bytes))
        })
        .context("starting the server in the server namespace")?;

    let wired = ProxyPath::new(SocketAddr::from((tb.px_wired_ip, PROXY_PORT)))
        .with_local_addr(tb.mn_wired_ip.into());
    let radio = ProxyPath::new(SocketAddr::from((tb.px_radio_ip, PROXY_PORT)))
        .with_local_addr(tb.mn_radio_ip.into());
    let target = SocketAddr::from((tb.sv_ip, SERVER_PORT));
    let client = tb
        .mn
        .run_in(|| -> Result<(Side, u32, u32)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(client_side(&tb, args, target, wired, radio))
        })
        .context("running the mobile node")??;
    let (client, soft, hard) = client;
    let server = server
        .join()
        .map_err(|_| anyhow::anyhow!("the server thread panicked"))??;
    drop(proxy);

    let up_ok = client.sent_sha == server.0.received_sha && client.sent == server.0.received;
    let down_ok = server.0.sent_sha == client.received_sha && server.0.sent == client.received;
    let one_conn = server.1 == 1;
    println!();
    println!(
        "moves: {} ({soft} soft, {hard} hard); server saw {} TCP connection(s)",
        soft + hard,
        server.1
    );
    println!(
        "up   (mobile -> server): sent {} bytes sha256 {}  received {} bytes sha256 {}  {}",
        client.sent,
        client.sent_sha,
        server.0.received,
        server.0.received_sha,
        if up_ok { "MATCH" } else { "MISMATCH" }
    );
    println!(
        "down (server -> mobile): sent {} bytes sha256 {}  received {} bytes sha256 {}  {}",
        server.0.sent,
        server.0.sent_sha,
        client.received,
        client.received_sha,
        if down_ok { "MATCH" } else { "MISMATCH" }
    );
    let ok = up_ok && down_ok && one_conn;
    println!(
        "verdict: {}",
        if ok {
            "PASS: every byte arrived exactly once, in order, over one server connection"
        } else {
            "FAIL"
        }
    );
    Ok(ok)
}

/// The server: accepts the stream, sends `bytes` of pattern 1 while hashing what it
/// receives, and counts every connection it is offered for a moment after (a mobility layer
/// that works shows the server one connection only).
fn serve_one(listener: TcpListener, bytes: u64) -> std::io::Result<(Side, u32)> {
    let (conn, _) = listener.accept()?;
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<(u64, String)> {
        let mut pattern = Pattern(1);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            pattern.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok((bytes, hex(&hash.finalize())))
    });
    let mut reader = conn;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        received += n as u64;
    }
    let (sent, sent_sha) = sender
        .join()
        .map_err(|_| std::io::Error::other("sender thread panicked"))??;
    listener.set_nonblocking(true)?;
    let mut connections = 1;
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if listener.accept().is_ok() {
            connections += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((
        Side {
            sent,
            sent_sha,
            received,
            received_sha: hex(&hash.finalize()),
        },
        connections,
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn client_side(
    tb: &Testbed,
    args: &DemoArgs,
    target: SocketAddr,
    wired: ProxyPath,
    radio: ProxyPath,
) -> Result<(Side, u32, u32)> {
    let mut config = MobileConfig::with_paths(vec![wired.clone(), radio.clone()]);
    config.read_origin = (1 << 32) - 1_000_000; // counters cross 2^32 during the demo
    config.write_origin = (1 << 63) - 1_000_000; // and 2^63
    let stream = MobileStream::connect(target, config)
        .await
        .context("opening the mobile stream")?;
    let control = stream.control();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let bytes = args.bytes;
    let rate = args.rate;

    let up2 = up.clone();
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern(2);
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut left = bytes;
        let start = Instant::now();
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            pattern.fill(&mut buf[..n]);
            hash.update(&buf[..n]);
            wr.write_all(&buf[..n]).await?;
            left -= n as u64;
            let done = up2.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
            pace(rate, done, start).await;
        }
        wr.shutdown().await?;
        Ok::<_, std::io::Error>((bytes, hex(&hash.finalize())))
    });
    let down2 = down.clone();
    let reader = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        let start = Instant::now();
        loop {
            let n = rd.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            received += n as u64;
            down2.store(received, Ordering::Relaxed);
            pace(rate, received, start).await;
        }
        Ok::<_, std::io::Error>((received, hex(&hash.finalize())))
    });

    // The mover: alternates links; every `hard_every`th move pulls the current link first.
    let tty = std::io::stderr().is_terminal();
    let mut on = Link::Wired;
    let (mut soft, mut hard) = (0u32, 0u32);
    let (mut soft_times, mut hard_times): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let mut last_print = Instant::now();
    let mut moves_left = args.moves;
    let mut next_move = Instant::now() + args.interval;
    let progress = |on: Link, soft: u32, hard: u32| {
        let line = format!(
            "up {:>6.1} MiB  down {:>6.1} MiB  link {:<5}  moves {} ({} soft, {} hard)",
            up.load(Ordering::Relaxed) as f64 / 1048576.0,
            down.load(Ordering::Relaxed) as f64 / 1048576.0,
            if on == Link::Wired { "wired" } else { "radio" },
            soft + hard,
            soft,
            hard
        );
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    };
    while !(writer.is_finished() && reader.is_finished()) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        if moves_left > 0 && Instant::now() >= next_move {
            let to = if on == Link::Wired {
                Link::Radio
            } else {
                Link::Wired
            };
            let path = if to == Link::Wired {
                wired.clone()
            } else {
                radio.clone()
            };
            let is_hard = args.hard_every > 0 && (soft + hard + 1) % args.hard_every == 0;
            if is_hard {
                tb.link_down(on).context("pulling the link")?;
            }
            let moved = control.migrate(path).await;
            if is_hard {
                tb.link_up(on).context("restoring the link")?;
            }
            let report = match moved {
                Ok(report) => report,
                // Both directions finished between the loop's check and the move: the
                // transfer is over, nothing is left to move.
                Err(msocks_client::Error::Closed) => {
                    moves_left = 0;
                    continue;
                }
                Err(e) => return Err(e).with_context(|| format!("moving to {to:?}")),
            };
            if is_hard {
                hard += 1;
                hard_times.push(report.duration);
            } else {
                soft += 1;
                soft_times.push(report.duration);
            }
            tracing::info!(?report, "moved");
            on = to;
            moves_left -= 1;
            next_move = Instant::now() + args.interval;
        }
        if last_print.elapsed() >= Duration::from_millis(if tty { 100 } else { 1000 }) {
            progress(on, soft, hard);
            last_print = Instant::now();
        }
    }
    progress(on, soft, hard);
    let (sent, sent_sha) = writer.await.context("writer task")?.context("sending")?;
    let (received, received_sha) = reader.await.context("reader task")?.context("receiving")?;
    eprintln!();
    for (kind, times) in [("soft", &mut soft_times), ("hard", &mut hard_times)] {
        if !times.is_empty() {
            times.sort();
            eprintln!(
                "{kind} moves: median {:.2} ms, max {:.2} ms from the move request to the stream attached on the new link",
                times[times.len() / 2].as_secs_f64() * 1e3,
                times[times.len() - 1].as_secs_f64() * 1e3
            );
        }
    }
    if moves_left > 0 {
        eprintln!("\nnote: the transfer ended before all moves were made ({moves_left} left); use a larger --bytes or a smaller --rate");
    }
    Ok((
        Side {
            sent,
            sent_sha,
            received,
            received_sha,
        },
        soft,
        hard,
    ))
}

/// Sleeps as needed to keep `done` bytes since `start` at or under `rate` bytes/s.
async fn pace(rate: u64, done: u64, start: Instant) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    let elapsed = start.elapsed();
    if due > elapsed {
        tokio::time::sleep(due - elapsed).await;
    }
}
