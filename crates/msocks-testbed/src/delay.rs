//! Link delay emulated at packet level, in userspace, with the iptables
//! `NFQUEUE` target.
//!
//! The kernels this project runs on have neither `sch_netem` nor `sch_fq`, so
//! `tc` cannot add delay. Instead [`DelayEmulator`] puts iptables rules into
//! one namespace that hand the packets crossing one interface to a netfilter
//! queue. A thread in that namespace takes each packet's metadata from the
//! queue (and its first bytes, unused), holds it until its due time — its
//! arrival at the queue plus the one-way delay — and then gives the kernel the
//! verdict `ACCEPT`, which lets the packet continue exactly where it stopped.
//! [`LinkDelay`] delays both directions of a [`Testbed`] link that way.
//!
//! Unlike a TCP-level relay this delays the packets of the connections under
//! test themselves: nothing is terminated or re-originated, sequence numbers,
//! options and ACK timing stay end to end.
//!
//! Where packets are held matters. A packet sent by a local socket stays
//! charged to that socket (`sk_wmem_alloc`) until it is freed after leaving
//! the host — and across a veth pair even until the peer namespace's IP layer
//! takes it. Holding it on the way out (`POSTROUTING`) therefore makes TCP
//! Small Queues throttle the sender as if its NIC were stalled: on this
//! testbed a proxy socket then sent its 1 ms records in bursts every 2–3 ms
//! over a 5 ms hold, and its first segment after a move 17 ms late over a
//! 30 ms one. Received packets are orphaned before `PREROUTING`, so holding
//! them there delays them like a long wire would. Hence the default
//! [`Direction::Ingress`], and [`LinkDelay`], which delays each direction of a
//! link on arrival at its far end.
//!
//! Properties:
//!
//! * The delay is the same for every packet and packets leave the queue in
//!   the order they entered it, so nothing is reordered.
//! * The handler polls the queue (the [`nfq`] crate offers no descriptor to
//!   wait on) every [`POLL_INTERVAL`]; a packet is therefore held for the
//!   configured delay plus up to about that interval and the timer slack
//!   (its thread asks for 1 µs). Measure the resulting RTT rather than
//!   assume it: on the 2-core VM this was written on, a 40 ms RTT measured
//!   about 40.3–40.5 ms as TCP connect time.
//! * Memory is bounded: beyond [`DelayConfig::max_packets`] or
//!   [`DelayConfig::max_bytes`] held, packets are dropped, with a log line.
//!   The kernel's own queue limit is set a little above ours as a backstop.
//! * The rules use `--queue-bypass`: should the handler be gone, packets pass
//!   undelayed instead of being black-holed.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nfq::{Message, Queue, Verdict};

use crate::netns::{check_ifname, Netns};
use crate::testbed::{Link, Testbed};
use crate::{Error, Result};

/// How long the handler sleeps at most before looking for new packets.
pub const POLL_INTERVAL: Duration = Duration::from_micros(100);
/// Longest one-way delay accepted: far beyond any link worth emulating, and
/// short enough that TCP connections survive it.
pub const MAX_DELAY: Duration = Duration::from_secs(10);
/// Default [`DelayConfig::max_packets`].
pub const DEFAULT_MAX_PACKETS: u32 = 4096;
/// Default [`DelayConfig::max_bytes`]: 64 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// Bytes of each packet copied to the handler. It never looks at them, but
/// only in "copy packet" mode does the kernel report a packet's full length
/// (`NFQA_CAP_LEN`), which the byte limit needs.
const COPY_RANGE: u16 = 64;
/// Timer slack of the handler's thread: the kernel's default (50 µs) would
/// add that much to most holds.
const TIMER_SLACK_NS: u64 = 1_000;
/// First netfilter queue number tried. Queue numbers are per network
/// namespace; a number already bound there is skipped.
const FIRST_QUEUE: u16 = 0x4d53; // "MS"
/// Queue numbers tried before giving up.
const QUEUE_ATTEMPTS: u16 = 32;
/// Packets taken from the queue in one round before due packets are
/// released, so that a flood cannot starve the releases.
const RECV_BATCH: usize = 256;
/// How long [`DelayEmulator::start`] waits for the handler to report that it
/// bound its queue.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// The iptables programs, one per IP family.
const IPTABLES: [&str; 2] = ["iptables", "ip6tables"];

/// Hands out queue numbers, so that the emulators of one process do not
/// race for the same number in one namespace.
static NEXT_QUEUE: AtomicU16 = AtomicU16::new(FIRST_QUEUE);

/// Which packets of an interface a [`DelayEmulator`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Packets received on the interface (`PREROUTING -i`). They no longer
    /// belong to a sending socket, so this is the faithful choice.
    Ingress,
    /// Packets leaving through the interface (`POSTROUTING -o`). Packets of
    /// local sockets stay charged to them while held, and TCP Small Queues
    /// then throttles those sockets (see the module documentation): only
    /// for traffic the namespace forwards.
    Egress,
    /// Both of the above: a round trip through the interface grows by twice
    /// the delay, with the caveat of [`Direction::Egress`].
    Both,
}

impl Direction {
    /// The `mangle` chains and match flags of the rules.
    fn hooks(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Direction::Ingress => &[("PREROUTING", "-i")],
            Direction::Egress => &[("POSTROUTING", "-o")],
            Direction::Both => &[("PREROUTING", "-i"), ("POSTROUTING", "-o")],
        }
    }
}

/// What a [`DelayEmulator`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DelayConfig {
    /// Added to every packet held.
    pub one_way_delay: Duration,
    /// Which packets are held.
    pub direction: Direction,
    /// Most packets held at once; further packets are dropped.
    pub max_packets: u32,
    /// Most bytes (whole IP packets, as the kernel holds them) held at
    /// once; further packets are dropped.
    pub max_bytes: u64,
}

impl DelayConfig {
    /// `one_way_delay` on [`Direction::Ingress`], with the default limits
    /// ([`DEFAULT_MAX_PACKETS`], [`DEFAULT_MAX_BYTES`]).
    pub fn new(one_way_delay: Duration) -> DelayConfig {
        DelayConfig {
            one_way_delay,
            direction: Direction::Ingress,
            max_packets: DEFAULT_MAX_PACKETS,
            max_bytes: DEFAULT_MAX_BYTES,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.one_way_delay > MAX_DELAY {
            return Err(Error::Invalid {
                what: "one-way delay",
                value: format!("{:?}", self.one_way_delay),
                reason: format!("must be at most {MAX_DELAY:?}"),
            });
        }
        if self.max_packets == 0 || self.max_bytes == 0 {
            return Err(Error::Invalid {
                what: "delay queue limit",
                value: format!("{} packets, {} bytes", self.max_packets, self.max_bytes),
                reason: "both limits must be positive".to_owned(),
            });
        }
        Ok(())
    }
}

/// Counters of a [`DelayEmulator`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayStats {
    /// Packets held and then let through.
    pub delayed: u64,
    /// Packets dropped because the limits were reached.
    pub dropped: u64,
    /// Most packets held at once so far.
    pub peak_held: u64,
}

#[derive(Debug, Default)]
struct Counters {
    delayed: AtomicU64,
    dropped: AtomicU64,
    peak_held: AtomicU64,
}

/// Delays every packet received on (by default) one interface of a
/// namespace.
///
/// Created by [`DelayEmulator::start`]; dropping it removes the iptables
/// rules (traffic then flows undelayed), lets the packets it still holds go
/// at once, and stops its thread. It borrows the [`Netns`], so it cannot
/// outlive the namespace.
///
/// Needs the `iptables` and `ip6tables` programs (the Debian package
/// `iptables`; either backend works) and a kernel with the NFQUEUE target.
#[derive(Debug)]
pub struct DelayEmulator<'ns> {
    ns: &'ns Netns,
    ifname: String,
    config: DelayConfig,
    queue_num: u16,
    /// Rules added so far, as the iptables program and the rule spec after
    /// `-A`/`-D`; removed in reverse order on drop.
    rules: Vec<(&'static str, Vec<String>)>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl<'ns> DelayEmulator<'ns> {
    /// Delays every packet that arrives on interface `ifname` of namespace
    /// `ns` by `one_way_delay`, with the default limits. Round trips through
    /// the interface grow by `one_way_delay` (plus the handler's polling
    /// overhead; see the module documentation); [`LinkDelay`] delays the
    /// other direction too.
    pub fn start(
        ns: &'ns Netns,
        ifname: &str,
        one_way_delay: Duration,
    ) -> Result<DelayEmulator<'ns>> {
        DelayEmulator::start_with(ns, ifname, DelayConfig::new(one_way_delay))
    }

    /// Like [`DelayEmulator::start`], with every setting in `config`.
    ///
    /// The handler thread is started and has bound its queue before the
    /// rules are added, so no packet waits for a handler that is not there
    /// yet. If any step fails, what was set up so far is removed again.
    pub fn start_with(
        ns: &'ns Netns,
        ifname: &str,
        config: DelayConfig,
    ) -> Result<DelayEmulator<'ns>> {
        check_ifname(ifname)?;
        config.validate()?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<u16>>();
        let handler = Handler {
            config,
            ns_name: ns.name().to_owned(),
            ifname: ifname.to_owned(),
            stop: Arc::clone(&stop),
            counters: Arc::clone(&counters),
        };
        let thread_name = format!("delay {ifname}");
        // `run_in` joins its own thread when the closure returns; the handler
        // thread spawned from inside it inherits the namespace and outlives
        // that, so its netlink socket is created in `ns`.
        let thread = ns
            .run_in(move || {
                std::thread::Builder::new()
                    .name(thread_name)
                    .spawn(move || handler.run(ready_tx))
            })?
            .map_err(|source| Error::Thread {
                name: ns.name().to_owned(),
                source,
            })?;
        let mut emulator = DelayEmulator {
            ns,
            ifname: ifname.to_owned(),
            config,
            queue_num: 0,
            rules: Vec::new(),
            stop,
            counters,
            thread: Some(thread),
        };
        // From here on, `Drop` stops the thread and removes added rules.
        emulator.queue_num = match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(Ok(num)) => num,
            Ok(Err(source)) => {
                return Err(Error::Queue {
                    netns: ns.name().to_owned(),
                    op: "set up",
                    source,
                })
            }
            Err(_) => {
                return Err(Error::Queue {
                    netns: ns.name().to_owned(),
                    op: "set up",
                    source: io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the handler thread did not report within 5 s",
                    ),
                })
            }
        };
        let queue = emulator.queue_num.to_string();
        for program in IPTABLES {
            for &(chain, dir) in config.direction.hooks() {
                let spec: Vec<String> = [
                    "-t",
                    "mangle",
                    chain,
                    dir,
                    ifname,
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    &queue,
                    "--queue-bypass",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect();
                emulator.iptables(program, "-A", &spec)?;
                emulator.rules.push((program, spec));
            }
        }
        Ok(emulator)
    }

    /// The configuration in force.
    pub fn config(&self) -> DelayConfig {
        self.config
    }

    /// The interface whose packets are delayed.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The netfilter queue number used inside the namespace.
    pub fn queue_num(&self) -> u16 {
        self.queue_num
    }

    /// Packets delayed and dropped so far.
    pub fn stats(&self) -> DelayStats {
        DelayStats {
            delayed: self.counters.delayed.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            peak_held: self.counters.peak_held.load(Ordering::Relaxed),
        }
    }

    /// Runs `program -w <spec with the chain after op>` in the namespace;
    /// `spec` is `-t TABLE CHAIN MATCH...`.
    fn iptables(&self, program: &str, op: &str, spec: &[String]) -> Result<()> {
        let mut args: Vec<&str> = vec![program, "-w"];
        // `-t mangle` first, then the operation and the chain.
        args.extend(spec[..2].iter().map(String::as_str));
        args.push(op);
        args.extend(spec[2..].iter().map(String::as_str));
        self.ns.exec(&args).map(drop)
    }
}

impl Drop for DelayEmulator<'_> {
    /// Removes the rules, then stops the handler, which lets the packets it
    /// still holds go at once. Failures are logged, not raised.
    fn drop(&mut self) {
        for (program, spec) in std::mem::take(&mut self.rules).into_iter().rev() {
            if let Err(e) = self.iptables(program, "-D", &spec) {
                eprintln!(
                    "msocks-testbed: could not remove a delay rule in {}: {e}",
                    self.ns.name()
                );
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!(
                    "msocks-testbed: the delay handler for {} in {} panicked",
                    self.ifname,
                    self.ns.name()
                );
            }
        }
    }
}

/// Both directions of one [`Testbed`] link delayed, each on arrival at its
/// far end: packets from the mobile node when they reach the proxy host,
/// packets to it when they reach the mobile node (two [`DelayEmulator`]s on
/// [`Direction::Ingress`]).
///
/// The link's round-trip time grows by `2 × one_way_delay`. Dropping it
/// removes both emulators.
#[derive(Debug)]
pub struct LinkDelay<'tb> {
    link: Link,
    /// Holds what the proxy host receives from the mobile node.
    at_px: DelayEmulator<'tb>,
    /// Holds what the mobile node receives from the proxy host.
    at_mn: DelayEmulator<'tb>,
}

impl<'tb> LinkDelay<'tb> {
    /// Delays both directions of `link` by `one_way_delay`, with the default
    /// limits.
    pub fn start(tb: &'tb Testbed, link: Link, one_way_delay: Duration) -> Result<LinkDelay<'tb>> {
        LinkDelay::start_with(tb, link, DelayConfig::new(one_way_delay))
    }

    /// Like [`LinkDelay::start`] with every setting in `config` except its
    /// direction, which is always [`Direction::Ingress`] at both ends.
    pub fn start_with(tb: &'tb Testbed, link: Link, config: DelayConfig) -> Result<LinkDelay<'tb>> {
        let config = DelayConfig {
            direction: Direction::Ingress,
            ..config
        };
        let at_px = DelayEmulator::start_with(&tb.px, link.px_if(), config)?;
        let at_mn = DelayEmulator::start_with(&tb.mn, link.mn_if(), config)?;
        Ok(LinkDelay { link, at_px, at_mn })
    }

    /// The delayed link.
    pub fn link(&self) -> Link {
        self.link
    }

    /// Counters of the direction towards the proxy host (mobile node to
    /// proxy host) and of the direction towards the mobile node.
    pub fn stats(&self) -> (DelayStats, DelayStats) {
        (self.at_px.stats(), self.at_mn.stats())
    }
}

/// The queue handler's state, moved onto its thread.
struct Handler {
    config: DelayConfig,
    ns_name: String,
    ifname: String,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

/// A packet waiting for its due time.
struct Held {
    due: Instant,
    len: u64,
    msg: Message,
}

impl Handler {
    /// Binds a queue, reports its number (or the error) on `ready`, then
    /// delays packets until told to stop.
    fn run(self, ready: mpsc::Sender<io::Result<u16>>) {
        let (mut queue, num) = match self.open() {
            Ok(bound) => bound,
            Err(e) => {
                // The receiver only goes away if `start` gave up waiting.
                let _ = ready.send(Err(e));
                return;
            }
        };
        if ready.send(Ok(num)).is_err() {
            // `start` gave up waiting and returned an error: nobody will
            // add rules for this queue.
            let _ = queue.unbind(num);
            return;
        }
        self.serve(&mut queue);
        if let Err(e) = queue.unbind(num) {
            eprintln!(
                "msocks-testbed: unbinding delay queue {num} in {}: {e}",
                self.ns_name
            );
        }
    }

    /// Opens a netlink socket and binds the first free queue number, copying
    /// [`COPY_RANGE`] bytes, accepting GSO packets whole (nothing here touches
    /// the payload), with the kernel's queue limit a little above ours.
    fn open(&self) -> io::Result<(Queue, u16)> {
        // Only precision is lost if this fails.
        if let Err(e) = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS) {
            eprintln!("msocks-testbed: delay handler: setting the timer slack failed: {e}");
        }
        let mut queue = Queue::open()?;
        let mut last = io::Error::other("no queue number tried");
        for _ in 0..QUEUE_ATTEMPTS {
            let num = NEXT_QUEUE.fetch_add(1, Ordering::Relaxed);
            match queue.bind(num) {
                Ok(()) => {
                    queue.set_copy_range(num, COPY_RANGE)?;
                    queue.set_recv_gso(num, true)?;
                    let kernel_limit = self.config.max_packets.saturating_add(256);
                    queue.set_queue_max_len(num, kernel_limit)?;
                    queue.set_fail_open(num, false)?;
                    queue.set_nonblocking(true);
                    return Ok((queue, num));
                }
                // Bound by someone else in this namespace: try the next.
                Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn serve(&self, queue: &mut Queue) {
        let delay = self.config.one_way_delay;
        let mut held: VecDeque<Held> = VecDeque::new();
        let mut held_bytes = 0u64;
        let mut recv_error_logged = false;
        while !self.stop.load(Ordering::Relaxed) {
            let mut received = 0;
            while received < RECV_BATCH {
                let mut msg = match queue.recv() {
                    Ok(msg) => msg,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if !recv_error_logged {
                            eprintln!(
                                "msocks-testbed: delay queue on {} in {}: receive failed: {e}",
                                self.ifname, self.ns_name
                            );
                            recv_error_logged = true;
                        }
                        break;
                    }
                };
                received += 1;
                let now = Instant::now();
                let len = msg.get_original_len() as u64;
                if held.len() >= self.config.max_packets as usize
                    || held_bytes.saturating_add(len) > self.config.max_bytes
                {
                    let dropped = self.counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    // The first drop and then every 1000th, so a flood does
                    // not flood the log too.
                    if dropped == 1 || dropped % 1000 == 0 {
                        eprintln!(
                            "msocks-testbed: delay queue on {} in {} is full ({} packets, {} bytes held): dropped {dropped} packet(s) so far",
                            self.ifname,
                            self.ns_name,
                            held.len(),
                            held_bytes
                        );
                    }
                    msg.set_verdict(Verdict::Drop);
                    self.verdict(queue, msg);
                    continue;
                }
                held_bytes += len;
                held.push_back(Held {
                    due: now + delay,
                    len,
                    msg,
                });
                self.counters
                    .peak_held
                    .fetch_max(held.len() as u64, Ordering::Relaxed);
            }
            // Every packet waits the same time, so due times grow along the
            // queue and releasing from the front keeps the order.
            let now = Instant::now();
            while held.front().is_some_and(|h| h.due <= now) {
                if let Some(h) = held.pop_front() {
                    held_bytes -= h.len;
                    self.release(queue, h.msg);
                }
            }
            if received == 0 {
                let wait = held
                    .front()
                    .map_or(POLL_INTERVAL, |h| h.due.saturating_duration_since(now))
                    .min(POLL_INTERVAL);
                std::thread::sleep(wait);
            }
        }
        // Stopping: the rules are gone, so let what is held go now.
        for h in held.drain(..) {
            self.release(queue, h.msg);
        }
    }

    fn release(&self, queue: &mut Queue, mut msg: Message) {
        msg.set_verdict(Verdict::Accept);
        self.verdict(queue, msg);
        self.counters.delayed.fetch_add(1, Ordering::Relaxed);
    }

    fn verdict(&self, queue: &mut Queue, msg: Message) {
        if let Err(e) = queue.verdict(msg) {
            eprintln!(
                "msocks-testbed: delay queue on {} in {}: verdict failed: {e}",
                self.ifname, self.ns_name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_checked() {
        assert!(DelayConfig::new(Duration::from_millis(30))
            .validate()
            .is_ok());
        assert!(DelayConfig::new(Duration::ZERO).validate().is_ok());
        assert!(DelayConfig::new(Duration::from_secs(11))
            .validate()
            .is_err());
        let mut c = DelayConfig::new(Duration::from_millis(1));
        c.max_packets = 0;
        assert!(matches!(c.validate(), Err(Error::Invalid { .. })));
    }
}
