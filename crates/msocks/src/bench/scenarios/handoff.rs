//! Hand-off: the longest gap in a stream of small timestamped records across a soft move
//! between the mobile node's links, in round trips of the link moved to.
//!
//! Both ends send a 16-byte record every millisecond (TCP_NODELAY on). For each move the gap
//! is the longest time between two consecutive record arrivals at a receiving application
//! (the mobile node for "down", the server for "up") around the move. Without a move it is
//! about the record interval.
//!
//! The links get their delay from the userspace NFQUEUE emulator
//! ([`msocks_testbed::LinkDelay`], on arrival at each end: the kernel has no netem), and the
//! RTTs are measured in the same run. Methods compared, on the same testbed:
//!
//! * **MSOCKS cold**: `MobileControl::migrate`, a new TCP connection to the proxy on the new
//!   link and RECONNECT, the old connection dropped (make-before-break).
//! * **MSOCKS warm**: `MobileControl::migrate_via` over a standby connection opened and
//!   probed on the new link just before (while the old link carries the stream).
//! * **MPTCP**: Linux MPTCP end to end (`IPPROTO_MPTCP` sockets on the mobile node and the
//!   server, no proxy; the proxy host just routes), the radio subflow set up in advance as a
//!   backup; a move swaps the `backup` flags of the two endpoints (`ip mptcp endpoint
//!   change`), which signals MP_PRIO to the server.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use msocks_client::{MobileConfig, MobileStream, ProxyPath};
use msocks_testbed::{Link, LinkDelay, Testbed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::bench::records::{make_record, RECORD};
use crate::bench::rtt::{measure_rtt, start_probe_listener, PROBE_PORT};
use crate::bench::{median, Settings};
use crate::testbed_proxy::PROXY_PORT;

/// Configured round-trip times of the links (as in `msocks bench-move`).
pub const WIRED_RTT: Duration = Duration::from_millis(10);
/// See [`WIRED_RTT`].
pub const RADIO_RTT: Duration = Duration::from_millis(60);
/// Interval of the records each side sends.
const INTERVAL: Duration = Duration::from_millis(1);
const MSOCKS_SERVER_PORT: u16 = 9000;
const MPTCP_SERVER_PORT: u16 = 9100;
/// `IPPROTO_MPTCP`.
const IPPROTO_MPTCP: i32 = 262;
/// `SOL_MPTCP` and `MPTCP_INFO` (linux/mptcp.h).
const SOL_MPTCP: libc::c_int = 284;
const MPTCP_INFO: libc::c_int = 1;

/// How the MSOCKS library moves the stream.
///
/// How an MSOCKS move is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsocksMove {
    /// `MobileControl::migrate`: new TCP connection + RECONNECT.
    Cold,
    /// `MobileControl::migrate_via`: RECONNECT over a standby connection opened (and
    /// probed) on the new path while the old one still carries the stream, as the agent
    /// keeps them.
    Warm,
}

/// One move.
#[derive(Debug, Clone, Copy)]
pub struct Move {
    /// The link moved to.
    pub to: Link,
    /// Longest gap between record arrivals at the mobile application.
    pub gap_down: Duration,
    /// Longest gap between record arrivals at the server application.
    pub gap_up: Duration,
    /// Share of the bytes through the mobile node's two interfaces that used the new link,
    /// shortly after the move: the check that the stream really moved.
    pub on_new_link: f64,
}

/// The moves of one method.
#[derive(Debug, Clone)]
pub struct MethodResult {
    /// E.g. "MSOCKS cold (new TCP + RECONNECT)".
    pub method: String,
    /// Every measured move.
    pub moves: Vec<Move>,
    /// Why the method could not be measured, if it could not.
    pub error: Option<String>,
}

/// The scenario's results.
#[derive(Debug, Clone)]
pub struct HandoffResult {
    /// Median measured RTT of the wired link.
    pub wired_rtt: Duration,
    /// Median measured RTT of the radio link.
    pub radio_rtt: Duration,
    /// One entry per method.
    pub methods: Vec<MethodResult>,
}

impl HandoffResult {
    /// The measured RTT of `link`.
    pub fn rtt(&self, link: Link) -> Duration {
        match link {
            Link::Wired => self.wired_rtt,
            Link::Radio => self.radio_rtt,
        }
    }
}

/// Builds a delayed testbed and measures every method.
pub fn run(settings: &Settings) -> Result<HandoffResult> {
    let tb = Testbed::mobile_proxy_server().context("building the hand-off testbed")?;
    let _wired =
        LinkDelay::start(&tb, Link::Wired, WIRED_RTT / 2).context("delaying the wired link")?;
    let _radio =
        LinkDelay::start(&tb, Link::Radio, RADIO_RTT / 2).context("delaying the radio link")?;
    for link in Link::ALL {
        start_probe_listener(&tb.px, SocketAddr::new(tb.px_ip(link).into(), PROBE_PORT))?;
    }
    let rtt_of = |link| -> Result<Duration> {
        let v = measure_rtt(&tb, link, 11)?;
        Ok(v[v.len() / 2])
    };
    let (wired_rtt, radio_rtt) = (rtt_of(Link::Wired)?, rtt_of(Link::Radio)?);
    eprintln!(
        "  link RTTs measured: wired {:.2} ms, radio {:.2} ms",
        wired_rtt.as_secs_f64() * 1e3,
        radio_rtt.as_secs_f64() * 1e3
    );
    let settle = |to: Link| {
        Duration::from_millis(300)
            + 4 * if to == Link::Wired {
                wired_rtt
            } else {
                radio_rtt
            }
    };
    let mut methods = Vec::new();

    // First without the host routes (the kernel's initial windows of 10 segments), for
    // comparison; then with them on both sides, as `msocks agent` installs them on the
    // mobile node and docs/CONFIG.md asks of the proxy host.
    let proxy = crate::testbed_proxy::start(&tb)?;
    let warm = msocks_moves(&tb, settings, MsocksMove::Warm, &settle, 0);
    drop(proxy);
    methods.push(outcome(
        "MSOCKS warm, kernel's initial windows (no host route)",
        warm,
    ));
    install_host_routes(&tb)?;
    let proxy = crate::testbed_proxy::start(&tb)?;
    let cold = msocks_moves(&tb, settings, MsocksMove::Cold, &settle, 1);
    drop(proxy);
    methods.push(outcome(
        "MSOCKS cold (new TCP connection + RECONNECT)",
        cold,
    ));
    let proxy = crate::testbed_proxy::start(&tb)?;
    let warm = msocks_moves(&tb, settings, MsocksMove::Warm, &settle, 2);
    drop(proxy);
    methods.push(outcome(
        "MSOCKS warm (RECONNECT on a standby connection)",
        warm,
    ));

    methods.push(outcome(
        "Linux MPTCP, backup subflow (MP_PRIO switch)",
        mptcp_moves(&tb, settings, &settle),
    ));
    Ok(HandoffResult {
        wired_rtt,
        radio_rtt,
        methods,
    })
}

fn outcome(name: &str, r: Result<Vec<Move>>) -> MethodResult {
    match r {
        Ok(moves) => MethodResult {
            method: name.into(),
            moves,
            error: None,
        },
        Err(e) => {
            eprintln!("  {name}: not measured: {e:#}");
            MethodResult {
                method: name.into(),
                moves: Vec::new(),
                error: Some(format!("{e:#}")),
            }
        }
    }
}

/// Arrival time of every record at one receiving application.
type Log = Arc<Mutex<Vec<Instant>>>;

fn log_arrivals(log: &Log, pending: &mut usize, n: usize) {
    let at = Instant::now();
    *pending += n;
    if let Ok(mut l) = log.lock() {
        while *pending >= RECORD {
            *pending -= RECORD;
            l.push(at);
        }
    }
}

/// The longest gap between consecutive arrivals that spans any instant of
/// `[from, from + within]`.
fn longest_gap(log: &Log, from: Instant, within: Duration) -> Option<Duration> {
    let l = log.lock().ok()?;
    let end = from + within;
    l.windows(2)
        .filter(|w| w[1] >= from && w[0] <= end)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
}

/// The server side: sends a record every [`INTERVAL`] on `conn` until `stop`, and logs the
/// arrivals of what comes back.
fn serve(conn: TcpStream, stop: Arc<AtomicBool>, log: Log, epoch: Instant) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut writer = conn.try_clone()?;
    let wstop = stop.clone();
    std::thread::Builder::new()
        .name("handoff server tx".into())
        .spawn(move || {
            let mut next = Instant::now();
            let mut seq = 0u64;
            while !wstop.load(Ordering::Relaxed) {
                if writer.write_all(&make_record(seq, epoch)).is_err() {
                    return;
                }
                seq += 1;
                next += INTERVAL;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            let _ = writer.shutdown(std::net::Shutdown::Write);
        })?;
    std::thread::Builder::new()
        .name("handoff server rx".into())
        .spawn(move || {
            let mut reader = conn;
            let mut buf = [0u8; 4096];
            let mut pending = 0;
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log_arrivals(&log, &mut pending, n);
            }
        })?;
    Ok(())
}

/// Runs the record streams over `mobile` (whose server end is being served) and makes
/// `2 * settings.moves` moves, wired → radio and back, with `do_move`.
async fn moves_over<S, F, Fut>(
    mobile: S,
    settings: &Settings,
    stop: &Arc<AtomicBool>,
    server_log: &Log,
    settle: &(dyn Fn(Link) -> Duration + Sync),
    mut do_move: F,
) -> Result<Vec<Move>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    F: FnMut(Link) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let epoch = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(mobile);
    let client_log: Log = Arc::default();
    let log = client_log.clone();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        let mut pending = 0;
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            log_arrivals(&log, &mut pending, n);
        }
    });
    let wstop = stop.clone();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        while !wstop.load(Ordering::Relaxed) {
            tick.tick().await;
            if wr.write_all(&make_record(seq, epoch)).await.is_err() {
                return;
            }
            seq += 1;
        }
        let _ = wr.shutdown().await;
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut on = Link::Wired;
    let mut out = Vec::new();
    for i in 0..2 * settings.moves {
        let to = if on == Link::Wired {
            Link::Radio
        } else {
            Link::Wired
        };
        let requested = Instant::now();
        do_move(to)
            .await
            .with_context(|| format!("move {} to {to:?}", i + 1))?;
        let wait = settle(to);
        tokio::time::sleep(wait).await;
        let on_new_link = share_on(to).await?;
        let gap_down = longest_gap(&client_log, requested, wait)
            .context("no records reached the mobile node")?;
        let gap_up =
            longest_gap(server_log, requested, wait).context("no records reached the server")?;
        eprintln!(
            "  move {:>2} {:?} -> {:?}: longest gap down {:6.1} ms, up {:6.1} ms; {:3.0} % of the bytes then on the new link",
            i + 1,
            on,
            to,
            gap_down.as_secs_f64() * 1e3,
            gap_up.as_secs_f64() * 1e3,
            on_new_link * 100.0
        );
        out.push(Move {
            to,
            gap_down,
            gap_up,
            on_new_link,
        });
        on = to;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = writer.await;
    reader.abort();
    Ok(out)
}

/// The share of the bytes through the mobile node's interfaces (both directions) that went
/// over `link` during the next 200 ms.
///
/// Called on the mobile node's runtime thread, which is in its namespace, and which also runs
/// the record receiver: the counters are read from `/proc/thread-self/net/dev` (a file read),
/// not with `Netns::link_stats` (a subprocess, `ip netns exec … cat`, which blocked this
/// thread for milliseconds: the records arriving meanwhile were logged late, and the pause
/// counted as a gap of the move before or after it, 7–10 ms radio → wired gaps that ended
/// at the next move's request, before any RECONNECT).
async fn share_on(link: Link) -> Result<f64> {
    let before = link_bytes()?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = link_bytes()?;
    let delta: Vec<u64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b))
        .collect();
    let total: u64 = delta.iter().sum();
    let i = Link::ALL.iter().position(|l| *l == link).unwrap_or(0);
    Ok(if total == 0 {
        0.0
    } else {
        delta[i] as f64 / total as f64
    })
}

/// Bytes received plus sent by each of the mobile node's interfaces (in [`Link::ALL`]
/// order), from `/proc/thread-self/net/dev` of the calling thread's namespace.
fn link_bytes() -> Result<[u64; 2]> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")
        .context("reading /proc/thread-self/net/dev")?;
    link_bytes_in(&text)
}

/// [`link_bytes`] from the text of a `/proc/net/dev`.
fn link_bytes_in(text: &str) -> Result<[u64; 2]> {
    let mut out = [0u64; 2];
    for (i, l) in Link::ALL.iter().enumerate() {
        let line = text
            .lines()
            .find_map(|line| {
                let (name, rest) = line.split_once(':')?;
                (name.trim() == l.mn_if()).then_some(rest)
            })
            .with_context(|| format!("no {} in /proc/thread-self/net/dev", l.mn_if()))?;
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing the {} line of /proc/net/dev", l.mn_if()))?;
        ensure!(
            fields.len() >= 9,
            "the {} line of /proc/net/dev has {} fields",
            l.mn_if(),
            fields.len()
        );
        out[i] = fields[0] + fields[8];
    }
    Ok(out)
}

/// Accepts one connection on `listener` and serves it on threads. The listener stays open
/// until `stop`: MPTCP's additional subflows (MP_JOIN) are accepted through it, and would be
/// reset once it is closed.
fn accept_and_serve(listener: TcpListener, stop: Arc<AtomicBool>, log: Log) -> Result<()> {
    std::thread::Builder::new()
        .name("handoff accept".into())
        .spawn(move || {
            if let Ok((conn, _)) = listener.accept() {
                let _ = serve(conn, stop.clone(), log, Instant::now());
            }
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
            drop(listener);
        })?;
    Ok(())
}

/// Runs `f` on a current-thread tokio runtime in the mobile node's namespace.
fn in_mn<T: Send>(
    tb: &Testbed,
    f: impl std::future::Future<Output = Result<T>> + Send,
) -> Result<T> {
    tb.mn.run_in(|| -> Result<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f)
    })?
}

/// Installs on the mobile node the host routes to the proxy's addresses that `msocks agent`
/// installs (`msocks_agent::routes`), with their larger initial congestion and receive
/// windows, and on the proxy host the same windows on its routes to the mobile node's
/// addresses (docs/CONFIG.md, "Routes of the proxy host"): the proxy's side of the
/// connection a stream moves to is as fresh (or idle) as the mobile node's, and its first
/// round trip carries the records down.
fn install_host_routes(tb: &Testbed) -> Result<()> {
    for link in Link::ALL {
        for (ns, to, dev) in [
            (&tb.mn, tb.px_ip(link), link.mn_if()),
            (&tb.px, tb.mn_ip(link), link.px_if()),
        ] {
            let args = msocks_agent::routes::host_route_args(to.into(), None, dev);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ns.ip(&args)
                .with_context(|| format!("ip {}", args.join(" ")))?;
        }
    }
    Ok(())
}

/// `index` numbers the MSOCKS methods of a run: each gets a server port of its own, as the
/// previous method's listener may still be closing.
fn msocks_moves(
    tb: &Testbed,
    settings: &Settings,
    how: MsocksMove,
    settle: &(dyn Fn(Link) -> Duration + Sync),
    index: u16,
) -> Result<Vec<Move>> {
    eprintln!("  MSOCKS ({how:?}):");
    let server_port = MSOCKS_SERVER_PORT + index;
    let stop = Arc::new(AtomicBool::new(false));
    let server_log: Log = Arc::default();
    let listener = tb
        .sv
        .run_in(|| TcpListener::bind(SocketAddr::from((tb.sv_ip, server_port))))?
        .context("binding the server")?;
    accept_and_serve(listener, stop.clone(), server_log.clone())?;
    let path = |link: Link| {
        ProxyPath::new(SocketAddr::new(tb.px_ip(link).into(), PROXY_PORT))
            .with_local_addr(IpAddr::from(tb.mn_ip(link)))
    };
    let result = in_mn(tb, async {
        let config = MobileConfig::with_paths(vec![path(Link::Wired), path(Link::Radio)]);
        let stream = MobileStream::connect(SocketAddr::from((tb.sv_ip, server_port)), config)
            .await
            .context("opening the mobile stream")?;
        let control = stream.control();
        moves_over(stream, settings, &stop, &server_log, settle, |to| {
            let control = control.clone();
            let p = path(to);
            async move { msocks_move(&control, how, p).await }
        })
        .await
    });
    stop.store(true, Ordering::Relaxed);
    result
}

/// One move of the MSOCKS library, the way `how` says.
async fn msocks_move(
    control: &msocks_client::MobileControl,
    how: MsocksMove,
    to: ProxyPath,
) -> Result<()> {
    match how {
        MsocksMove::Cold => {
            control
                .migrate(to)
                .await
                .context("MobileControl::migrate")?;
        }
        MsocksMove::Warm => {
            // Opened while the old path still carries the stream: make-before-break, so
            // it does not widen the gap.
            let cfg = MobileConfig::new(to.clone());
            let mut standby = msocks_client::Standby::open(to, &cfg)
                .await
                .context("opening a standby connection")?;
            standby
                .ping()
                .await
                .context("probing the standby connection")?;
            control
                .migrate_via(standby)
                .await
                .context("MobileControl::migrate_via")?;
        }
    }
    Ok(())
}

/// MPTCP endpoint ids the scenario configures on the mobile node.
fn endpoint_id(link: Link) -> &'static str {
    match link {
        Link::Wired => "1",
        Link::Radio => "2",
    }
}

/// The number of additional subflows of an MPTCP socket (`mptcpi_subflows`, the first byte
/// of `struct mptcp_info`), or None when the socket is not (or no longer) MPTCP.
fn mptcp_subflows(fd: std::os::fd::RawFd) -> Option<u8> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call.
    let r = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0 && len > 0).then_some(info[0])
}

fn mptcp_socket() -> std::io::Result<socket2::Socket> {
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::from(IPPROTO_MPTCP)),
    )
}

fn mptcp_moves(
    tb: &Testbed,
    settings: &Settings,
    settle: &(dyn Fn(Link) -> Duration + Sync),
) -> Result<Vec<Move>> {
    eprintln!("  MPTCP:");
    for ns in [&tb.mn, &tb.sv] {
        ns.ip(&[
            "mptcp",
            "limits",
            "set",
            "subflow",
            "2",
            "add_addr_accepted",
            "2",
        ])?;
    }
    let (wired, radio) = (
        tb.mn_ip(Link::Wired).to_string(),
        tb.mn_ip(Link::Radio).to_string(),
    );
    // The wired address is the initial subflow's (the main table prefers wired); its
    // endpoint exists so that its backup flag can be changed. The radio endpoint opens the
    // second subflow, as a backup.
    tb.mn.ip(&[
        "mptcp",
        "endpoint",
        "add",
        &wired,
        "dev",
        Link::Wired.mn_if(),
        "id",
        endpoint_id(Link::Wired),
    ])?;
    tb.mn.ip(&[
        "mptcp",
        "endpoint",
        "add",
        &radio,
        "dev",
        Link::Radio.mn_if(),
        "id",
        endpoint_id(Link::Radio),
        "subflow",
        "backup",
    ])?;

    let stop = Arc::new(AtomicBool::new(false));
    let server_log: Log = Arc::default();
    let at = SocketAddr::from((tb.sv_ip, MPTCP_SERVER_PORT));
    let listener = tb
        .sv
        .run_in(|| -> std::io::Result<TcpListener> {
            let s = mptcp_socket()?;
            s.set_reuse_address(true)?;
            s.bind(&at.into())?;
            s.listen(16)?;
            Ok(s.into())
        })?
        .context("an MPTCP listener on the server (is net.mptcp.enabled 1?)")?;
    accept_and_serve(listener, stop.clone(), server_log.clone())?;

    let mn_name = tb.mn.name().to_owned();
    let result = in_mn(tb, async {
        let sock = mptcp_socket().context("an MPTCP socket on the mobile node")?;
        sock.connect(&at.into())
            .with_context(|| format!("MPTCP connect to {at}"))?;
        sock.set_tcp_nodelay(true)?;
        let std_stream: TcpStream = sock.into();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std_stream);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match mptcp_subflows(fd) {
                Some(n) if n >= 1 => break,
                None => bail!("the connection fell back to plain TCP (no MPTCP)"),
                _ => {}
            }
            ensure!(
                Instant::now() < deadline,
                "the backup subflow over the radio link did not come up within 3 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std_stream.set_nonblocking(true)?;
        let stream = tokio::net::TcpStream::from_std(std_stream)?;
        moves_over(stream, settings, &stop, &server_log, settle, |to| {
            let from = if to == Link::Wired {
                Link::Radio
            } else {
                Link::Wired
            };
            let ns = mn_name.clone();
            let addr_of = |l: Link| {
                if l == Link::Wired {
                    wired.clone()
                } else {
                    radio.clone()
                }
            };
            let (to_addr, from_addr) = (addr_of(to), addr_of(from));
            async move {
                // The new link becomes active first, then the old one backup: never are
                // both backup. `ip` is run off the event loop, so the record streams go on.
                // The endpoint is named by address, not by id: looked up by id, the change
                // reached no subflow on this kernel (checked with the byte counters).
                tokio::task::spawn_blocking(move || -> Result<()> {
                    for (addr, flag) in [(to_addr, "nobackup"), (from_addr, "backup")] {
                        let out = std::process::Command::new("ip")
                            .args(["-n", &ns, "mptcp", "endpoint", "change", &addr, flag])
                            .output()?;
                        ensure!(
                            out.status.success(),
                            "ip mptcp endpoint change {addr} {flag}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        );
                    }
                    Ok(())
                })
                .await
                .context("the endpoint change task")?
            }
        })
        .await
    });
    stop.store(true, Ordering::Relaxed);
    result
}

/// Median gap of `moves` to `to`, in ms and in RTTs of `to`, down and up.
pub fn summary(res: &HandoffResult, moves: &[Move], to: Link) -> Option<(f64, f64, f64, f64)> {
    let m: Vec<&Move> = moves.iter().filter(|m| m.to == to).collect();
    if m.is_empty() {
        return None;
    }
    let rtt = res.rtt(to).as_secs_f64();
    let down = median(m.iter().map(|x| x.gap_down.as_secs_f64()));
    let up = median(m.iter().map(|x| x.gap_up.as_secs_f64()));
    Some((down * 1e3, down / rtt, up * 1e3, up / rtt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_bytes_add_received_and_sent_per_interface() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
 radio0: 5000      40    0    0    0     0          0         0     7000      50    0    0    0     0       0          0
wired0: 1234567890123 9 0 0 0 0 0 0 10 2 0 0 0 0 0 0
";
        let got = link_bytes_in(text).unwrap();
        let want = |l: Link| {
            if l == Link::Wired {
                1_234_567_890_133
            } else {
                12_000
            }
        };
        assert_eq!(got, [want(Link::ALL[0]), want(Link::ALL[1])]);
    }

    #[test]
    fn link_bytes_need_both_interfaces_and_whole_lines() {
        assert!(link_bytes_in("wired0: 1 0 0 0 0 0 0 0 2 0 0 0 0 0 0 0\n").is_err());
        assert!(link_bytes_in("wired0: 1 2 3\nradio0: 1 2 3\n").is_err());
        assert!(link_bytes_in("wired0: x 0 0 0 0 0 0 0 2\nradio0: 1 0 0 0 0 0 0 0 2\n").is_err());
    }
}
