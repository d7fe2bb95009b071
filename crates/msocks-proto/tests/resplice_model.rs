//! Property tests of the RECONNECT resplice arithmetic (`msocks_proto::resplice`) against an
//! executable model of an MSOCKS session with data in flight, so that "no byte is lost or
//! duplicated" (paper, sections III-B.3 to III-B.5, Figs. 8–10) is checked on the bytes
//! themselves, not only on the formulas.
//!
//! # The model
//!
//! Sans-I/O and deterministic; proptest generates the sequence of events. Both byte streams
//! carry distinct 64-bit symbols (`sym(stream, i)`, a bijective hash of the position `i`) in
//! place of bytes, so a byte delivered twice, skipped, or taken from the wrong position is
//! visible at the first place it happens. Positions are offsets from the session's start;
//! the counters that cross the wire (`data_read`, `data_written`) are those offsets added to
//! client-chosen origins (near 0, 2^32, 2^63, 2^64 − small, or anywhere), so they wrap.
//!
//! * **DOWN** (server → proxy → mobile application). The server produces bytes, the proxy
//!   holds them (as the relay engine's copy or the server's retransmission queue would) and
//!   sends them onto the mobile connection, window-limited by the mobile's receive buffer.
//!   Sent bytes are in flight until they *arrive* in the mobile kernel's receive buffer; the
//!   mobile kernel acknowledges what arrived, but only a prefix of those ACKs has reached the
//!   proxy (`acked ≤ arrived ≤ sent`). The application reads through the library, which
//!   serves the bytes it salvaged from earlier connections first, then the kernel buffer; the
//!   application may have read more than the proxy saw acknowledged (Fig. 9). The proxy
//!   frees (or the server forgets) everything below `acked`, so a resplice must never resume
//!   below it.
//! * **UP** (mobile application → proxy → server). The application writes into its kernel
//!   (flow-controlled: at most `sndbuf` bytes not yet acknowledged to the mobile), and the
//!   library keeps the last `ring_cap ≥ sndbuf` written bytes in a ring. Written bytes are in
//!   the mobile's send buffer / in flight until the proxy reads them. Two engines:
//!   - *relay*: the proxy owns what it read and passes it to the server in order; the safe
//!     point (`snd_una_D`) is what the proxy received;
//!   - *splice*: the proxy forwards what it read onto the server leg, where it may still be
//!     lost at a break (the dead mobile socket was the one to retransmit it); the safe point
//!     is what the server acknowledged, and the server's TCP drops bytes below its `rcv_nxt`
//!     (duplicates from the rewrite), which the model also checks carry the right content.
//! * **BREAK**: the mobile connection dies. In-flight bytes and ACKs in both directions are
//!   lost (and, with the splice engine, a suffix of the server leg), but bytes already in
//!   the mobile kernel's receive buffer stay readable by the library (the salvage) and bytes
//!   the proxy received stay received. While disconnected, the application may go on reading
//!   that buffer and writing (into the ring only, within its flow-control budget).
//! * **RECONNECT**: the library snapshots `data_read` and `data_written`. A *soft* move then
//!   lets the old connection deliver everything still in flight (no loss); a *hard* one lets
//!   it deliver a few more segments and ACKs and then kills it. The proxy freezes its
//!   position and calls `resplice`, which must succeed. Then the protocol's mobile side is
//!   carried out: the library takes exactly `data_salvage` bytes from what its old socket
//!   still holds (counting bytes it salvaged earlier that the application has not read yet:
//!   they are part of the old stream position; asserts they are there) and discards the
//!   rest; it writes the last `data_write` bytes of its ring into the new connection (asserts
//!   the ring holds them); the proxy resumes DOWN at `resume_down_at` (asserts it still has
//!   those bytes) and, for UP, the first byte of the new connection is the safe point.
//!
//! # Properties
//!
//! * After any event sequence and a final drain, the application has read exactly the DOWN
//!   stream and the server has received exactly the UP stream, each once, in order, and
//!   `resplice` never rejected counters the model produced honestly.
//! * Every successful resplice is a gap-free, duplicate-free plan in the proxy's and the
//!   client's own accounting (`resume = data_read + data_salvage ∈ [acked, sent]`,
//!   `data_written − data_write = safe point`, both spans ≤ `MAX_RESPLICE_SPAN`).
//! * Perturbed counters derived from each honest RECONNECT (data_read beyond sent or before
//!   the origin, data_written below the safe point, before the origin or too far ahead, a
//!   proxy origin that does not match the client's, an inconsistent proxy position, a salvage
//!   no socket could hold) are rejected with the expected `RespliceError`.
//! * On arbitrary positions and counters, `resplice` agrees exactly with a reference
//!   formulation of the rules.
//! * Unit tests replay Figs. 8, 9 and 10 of the paper (and the worked example of
//!   docs/PROTOCOL.md section 3.11) in the model, and a coverage test checks that the
//!   generator really reaches salvage, Fig. 9 reads, rewrites, server-side duplicates,
//!   discarded kernel bytes and counter wrap-around.
//!
//! Cases per property come from `MSOCKS_FUZZ_CASES` (default 512), as in `fuzz_decoders.rs`:
//! `MSOCKS_FUZZ_CASES=100000 cargo test --release -p msocks-proto --test resplice_model`.

use std::collections::VecDeque;

use msocks_proto::resplice::{counter_at, offset, MAX_RESPLICE_SPAN};
use msocks_proto::{resplice, Resplice, RespliceError, ResumeCounters, SessionPosition};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

const DEFAULT_CASES: u32 = 512;

/// Proptest configuration: `MSOCKS_FUZZ_CASES` cases (default [`DEFAULT_CASES`]).
fn config() -> ProptestConfig {
    let cases = match std::env::var("MSOCKS_FUZZ_CASES") {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MSOCKS_FUZZ_CASES must be a number of cases, got {v:?}")),
        Err(std::env::VarError::NotPresent) => DEFAULT_CASES,
        Err(e) => panic!("MSOCKS_FUZZ_CASES: {e}"),
    };
    ProptestConfig::with_cases(cases)
}

// ---------------------------------------------------------------------------------------------
// Stream contents
// ---------------------------------------------------------------------------------------------

/// One "byte" of a stream: a symbol unique to its position.
type Sym = u64;

const DOWN: u64 = 0xD0D0_D0D0_0000_0000;
const UP: u64 = 0x0B0B_0B0B_0000_0000;

/// The symbol at position `i` of `stream` (splitmix64, a bijection, of `i ^ stream`).
fn sym(stream: u64, i: u64) -> Sym {
    let mut z = (i ^ stream).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Names the symbol `s` found where position `expected` of `stream` should be.
fn describe(stream: u64, s: Sym, expected: u64) -> String {
    let lo = expected.saturating_sub(1 << 16);
    match (lo..expected.saturating_add(1 << 16)).find(|&i| sym(stream, i) == s) {
        Some(i) if i < expected => format!("stream byte {i} again (duplicate)"),
        Some(i) => format!("stream byte {i} (bytes {expected}..{i} lost)"),
        None => format!("a symbol from no nearby position ({s:#x})"),
    }
}

fn syms(stream: u64, from: u64, to: u64) -> Vec<Sym> {
    (from..to).map(|i| sym(stream, i)).collect()
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits in u64")
}

fn as_usize(n: u64) -> usize {
    usize::try_from(n).expect("span fits in usize")
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// How the proxy carries the client → server stream (docs/PROTOCOL.md section 3.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    /// Userspace relay: `snd_una_D` is what the proxy read from the mobile node.
    Relay,
    /// Kernel splice: `snd_una_D` is what the server acknowledged.
    Splice,
}

#[derive(Debug, Clone, Copy)]
struct Params {
    engine: Engine,
    read_origin: u64,
    write_origin: u64,
    /// Mobile kernel receive buffer (bounds what the proxy may have in flight + unread).
    rcvbuf: usize,
    /// Mobile kernel send buffer (bounds what the application may write unacknowledged).
    sndbuf: usize,
    /// Size of the library's ring of last written bytes (`>= sndbuf`).
    ring_cap: usize,
    /// Report `down_sent` as the highest byte ever sent rather than the current connection's
    /// send point (both are honest; the latter is tighter after a resume below it).
    sent_high_water: bool,
}

/// How the old connection ends at a RECONNECT.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// The old connection still works: everything in flight is delivered and acknowledged
    /// before the proxy detaches it. Nothing is lost.
    Soft,
    /// After the client's snapshot, the old connection delivers `late_down` more bytes to the
    /// mobile, `late_ack` more ACKs to the proxy, `late_up` more bytes to the proxy, then dies:
    /// everything else in flight is lost, and the splice engine's server leg keeps only its
    /// first `server_keep` bytes. (No effect if the connection had already broken.)
    Hard {
        late_down: usize,
        late_ack: usize,
        late_up: usize,
        server_keep: usize,
    },
}

const HARD: Move = Move::Hard {
    late_down: 0,
    late_ack: 0,
    late_up: 0,
    server_keep: usize::MAX,
};

#[derive(Debug, Clone, Copy)]
enum Event {
    /// The server produces k DOWN bytes (now held by the proxy).
    Produce(usize),
    /// The proxy sends up to k DOWN bytes onto the mobile connection.
    Send(usize),
    /// Up to k in-flight DOWN bytes arrive in the mobile kernel's receive buffer.
    DownArrive(usize),
    /// ACKs for up to k more arrived DOWN bytes reach the proxy.
    DownAck(usize),
    /// The application reads up to k bytes.
    Read(usize),
    /// The application writes up to k bytes (as many as flow control allows).
    Write(usize),
    /// Up to k UP bytes in flight reach the proxy.
    UpArrive(usize),
    /// The mobile learns that up to k more UP bytes are safe (frees its send buffer).
    UpAck(usize),
    /// Splice engine: up to k bytes on the proxy → server leg reach the server.
    ServerArrive(usize),
    /// Splice engine: the server's ACK for up to k more bytes reaches the proxy.
    ServerAck(usize),
    /// The mobile connection dies (see [`Move::Hard`]); the session waits for a RECONNECT.
    Break { server_keep: usize },
    /// The mobile node reconnects.
    Reconnect(Move),
}

/// What the runs exercised (for the coverage test).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    reconnects: u64,
    soft: u64,
    /// Reconnects with `data_salvage > 0` (Fig. 8).
    salvaged: u64,
    /// Reconnects where the application had read past what the proxy saw acknowledged (Fig. 9).
    read_past_ack: u64,
    /// Reconnects with `data_write > 0` (Fig. 10).
    rewrites: u64,
    /// Reconnects whose rewrite included bytes written while disconnected.
    wrote_while_down: u64,
    /// Reconnects with salvage still unread from an earlier reconnect.
    nested_salvage: u64,
    /// Arrived bytes the library discarded from an old socket (beyond the salvage).
    discarded: u64,
    /// Rewritten bytes the server's TCP dropped as duplicates (splice).
    server_dups: u64,
    /// Reconnects whose `data_read` or `data_written` had wrapped past 2^64.
    wrapped: u64,
    /// Reconnects whose `data_read` or `data_written` had crossed a 2^32 boundary.
    crossed_2_32: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.reconnects += o.reconnects;
        self.soft += o.soft;
        self.salvaged += o.salvaged;
        self.read_past_ack += o.read_past_ack;
        self.rewrites += o.rewrites;
        self.wrote_while_down += o.wrote_while_down;
        self.nested_salvage += o.nested_salvage;
        self.discarded += o.discarded;
        self.server_dups += o.server_dups;
        self.wrapped += o.wrapped;
        self.crossed_2_32 += o.crossed_2_32;
    }
}

#[derive(Debug)]
struct Model {
    p: Params,
    connected: bool,

    // DOWN, proxy side (offsets in the server → client stream).
    /// Bytes the server has produced; the proxy can send any of them from `acked` on.
    produced: u64,
    /// Next byte the proxy sends on the current mobile connection (`snd_nxt_C`).
    next_send: u64,
    /// Highest `next_send` ever.
    sent_high_water: u64,
    /// What the proxy has seen acknowledged (`snd_una_C`); it no longer has bytes below.
    acked: u64,
    /// In flight towards the mobile on the current connection.
    down_wire: VecDeque<Sym>,

    // DOWN, mobile side.
    /// One past the last byte in the current connection's kernel receive buffer.
    arrived: u64,
    /// The current (or, while disconnected, the old) connection's kernel receive buffer.
    kernel_rcv: VecDeque<Sym>,
    /// Bytes the library drained from earlier connections and has not delivered yet.
    salvage: VecDeque<Sym>,
    /// Bytes the application has read (`data_read - read_origin`).
    app_read: u64,

    // UP, mobile side.
    /// Bytes the application has written (`data_written - write_origin`).
    written: u64,
    /// Bytes written while disconnected since the last reconnect.
    written_while_down: u64,
    /// The library's ring of the last `ring_cap` written bytes.
    ring: VecDeque<Sym>,
    /// In the mobile send buffer / in flight towards the proxy on the current connection.
    up_wire: VecDeque<Sym>,
    /// What the mobile knows is safe (frees its send buffer).
    mobile_acked: u64,

    // UP, proxy and server side.
    /// Stream position the proxy gives the next byte it reads from the mobile connection.
    up_next: u64,
    /// Splice engine: the proxy → server leg, with stream positions.
    server_wire: VecDeque<(u64, Sym)>,
    /// The server's `rcv_nxt`: bytes below it were received, checked, exactly once.
    server_rcv: u64,
    /// Splice engine: what the proxy has seen the server acknowledge.
    server_acked: u64,

    stats: Stats,
}

impl Model {
    fn new(p: Params) -> Self {
        assert!(p.rcvbuf > 0 && p.sndbuf > 0 && p.ring_cap >= p.sndbuf);
        Model {
            p,
            connected: true,
            produced: 0,
            next_send: 0,
            sent_high_water: 0,
            acked: 0,
            down_wire: VecDeque::new(),
            arrived: 0,
            kernel_rcv: VecDeque::new(),
            salvage: VecDeque::new(),
            app_read: 0,
            written: 0,
            written_while_down: 0,
            ring: VecDeque::new(),
            up_wire: VecDeque::new(),
            mobile_acked: 0,
            up_next: 0,
            server_wire: VecDeque::new(),
            server_rcv: 0,
            server_acked: 0,
            stats: Stats::default(),
        }
    }

    /// `snd_una_D`: the first client → server byte the proxy does not count as safe.
    fn up_safe(&self) -> u64 {
        match self.p.engine {
            Engine::Relay => self.up_next,
            Engine::Splice => self.server_acked,
        }
    }

    fn apply(&mut self, e: Event) {
        match e {
            Event::Produce(k) => self.produced += as_u64(k),
            Event::Send(k) => self.send(k),
            Event::DownArrive(k) => self.down_arrive(k),
            Event::DownAck(k) => self.down_ack(k),
            Event::Read(k) => self.read(k),
            Event::Write(k) => self.write(k),
            Event::UpArrive(k) => self.up_arrive(k),
            Event::UpAck(k) => self.up_ack(k),
            Event::ServerArrive(k) => self.server_arrive(k),
            Event::ServerAck(k) => self.server_ack(k),
            Event::Break { server_keep } => {
                if self.connected {
                    self.kill_connection(server_keep);
                }
            }
            Event::Reconnect(mv) => {
                self.reconnect(mv);
            }
        }
    }

    fn send(&mut self, k: usize) {
        if !self.connected {
            return;
        }
        let room = self.p.rcvbuf - (self.down_wire.len() + self.kernel_rcv.len());
        let avail = as_usize(self.produced - self.next_send);
        let n = k.min(room).min(avail);
        for _ in 0..n {
            self.down_wire.push_back(sym(DOWN, self.next_send));
            self.next_send += 1;
        }
        self.sent_high_water = self.sent_high_water.max(self.next_send);
    }

    fn down_arrive(&mut self, k: usize) {
        if !self.connected {
            return;
        }
        let n = k.min(self.down_wire.len());
        self.kernel_rcv.extend(self.down_wire.drain(..n));
        self.arrived += as_u64(n);
    }

    fn down_ack(&mut self, k: usize) {
        if self.connected {
            self.acked += as_u64(k).min(self.arrived - self.acked);
        }
    }

    /// The application reads through the library: salvaged bytes first, then the kernel
    /// buffer of the current (or, while disconnected, the dead) connection.
    fn read(&mut self, k: usize) {
        for _ in 0..k {
            let Some(s) = self
                .salvage
                .pop_front()
                .or_else(|| self.kernel_rcv.pop_front())
            else {
                return;
            };
            assert!(
                s == sym(DOWN, self.app_read),
                "DOWN: the application's byte {} should be stream byte {} but is {}",
                self.app_read,
                self.app_read,
                describe(DOWN, s, self.app_read)
            );
            self.app_read += 1;
        }
    }

    fn write(&mut self, k: usize) {
        let budget = self.p.sndbuf - as_usize(self.written - self.mobile_acked);
        for _ in 0..k.min(budget) {
            let s = sym(UP, self.written);
            if self.ring.len() == self.p.ring_cap {
                self.ring.pop_front();
            }
            self.ring.push_back(s);
            if self.connected {
                self.up_wire.push_back(s);
            } else {
                self.written_while_down += 1;
            }
            self.written += 1;
        }
    }

    fn up_arrive(&mut self, k: usize) {
        if !self.connected {
            return;
        }
        let n = k.min(self.up_wire.len());
        for _ in 0..n {
            let s = self.up_wire.pop_front().expect("counted");
            let pos = self.up_next;
            self.up_next += 1;
            match self.p.engine {
                Engine::Relay => self.server_accept(pos, s),
                Engine::Splice => self.server_wire.push_back((pos, s)),
            }
        }
    }

    fn up_ack(&mut self, k: usize) {
        if self.connected {
            self.mobile_acked += as_u64(k).min(self.up_safe() - self.mobile_acked);
        }
    }

    fn server_arrive(&mut self, k: usize) {
        let n = k.min(self.server_wire.len());
        for _ in 0..n {
            let (pos, s) = self.server_wire.pop_front().expect("counted");
            self.server_accept(pos, s);
        }
    }

    fn server_ack(&mut self, k: usize) {
        if self.p.engine == Engine::Splice {
            self.server_acked += as_u64(k).min(self.server_rcv - self.server_acked);
        }
    }

    /// The server's TCP receives the byte the proxy put at stream position `pos`.
    fn server_accept(&mut self, pos: u64, s: Sym) {
        assert!(
            s == sym(UP, pos),
            "UP: the proxy put {} at stream position {pos} (rewrite misaligned)",
            describe(UP, s, pos)
        );
        assert!(
            pos <= self.server_rcv,
            "UP: gap at the server: got position {pos}, expected {} (bytes lost)",
            self.server_rcv
        );
        if pos < self.server_rcv {
            assert_eq!(
                self.p.engine,
                Engine::Splice,
                "UP: the relay proxy delivered position {pos} twice"
            );
            self.stats.server_dups += 1;
        } else {
            self.server_rcv += 1;
        }
    }

    /// The mobile connection dies: everything in flight on it is lost.
    fn kill_connection(&mut self, server_keep: usize) {
        self.connected = false;
        self.down_wire.clear();
        self.up_wire.clear();
        self.server_wire.truncate(server_keep);
    }

    /// The proxy's frozen position when the RECONNECT arrives.
    fn position(&self) -> SessionPosition {
        SessionPosition {
            read_origin: self.p.read_origin,
            write_origin: self.p.write_origin,
            down_sent: if self.p.sent_high_water {
                self.sent_high_water
            } else {
                self.next_send
            },
            down_acked: self.acked,
            up_received: self.up_safe(),
        }
    }

    fn reconnect(&mut self, mv: Move) -> Resplice {
        // The library's snapshot, sent in the RECONNECT request.
        let data_read = counter_at(self.p.read_origin, self.app_read);
        let data_written = counter_at(self.p.write_origin, self.written);

        // What the old connection still does before the proxy detaches it.
        if self.connected {
            match mv {
                Move::Soft => {
                    self.stats.soft += 1;
                    self.down_arrive(usize::MAX);
                    self.down_ack(usize::MAX);
                    self.up_arrive(usize::MAX);
                    self.connected = false;
                }
                Move::Hard {
                    late_down,
                    late_ack,
                    late_up,
                    server_keep,
                } => {
                    self.down_arrive(late_down);
                    self.down_ack(late_ack);
                    self.up_arrive(late_up);
                    self.kill_connection(server_keep);
                }
            }
        }
        // The proxy stops reading the old connection: whatever it did not read is lost.
        self.down_wire.clear();
        self.up_wire.clear();

        let pos = self.position();
        let r = resplice(&pos, data_read, data_written).unwrap_or_else(|e| {
            panic!("honest counters rejected: {e:?}; position {pos:?}, data_read {data_read:#x}, data_written {data_written:#x}")
        });
        check_plan(&pos, data_read, data_written, &r);
        check_perturbations(&pos, data_read, data_written);
        self.count_reconnect(&pos, data_read, data_written, &r);

        // Mobile side, DOWN: exactly `data_salvage` bytes from what the old socket still holds
        // (the library's own unread salvage comes first: it is earlier in the stream), before
        // anything from the new connection. The rest is discarded; the proxy sends it again.
        let salvage = as_usize(r.counters.data_salvage);
        let mut old: VecDeque<Sym> = self.salvage.drain(..).collect();
        old.extend(self.kernel_rcv.drain(..));
        assert!(
            old.len() >= salvage,
            "DOWN: data_salvage is {salvage} but the old socket holds only {} bytes",
            old.len()
        );
        self.stats.discarded += as_u64(old.len() - salvage);
        old.truncate(salvage);
        self.salvage = old;

        // Proxy side, DOWN: resume where the resplice says, on the new connection.
        assert!(
            r.resume_down_at >= self.acked,
            "DOWN: resume at {} but the proxy already freed everything below {}",
            r.resume_down_at,
            self.acked
        );
        assert_eq!(
            self.app_read + as_u64(self.salvage.len()),
            r.resume_down_at,
            "DOWN: the library's next byte after the salvage is not where the proxy resumes"
        );
        self.next_send = r.resume_down_at;
        self.arrived = r.resume_down_at;
        self.acked = r.resume_down_at;

        // Mobile side, UP: rewrite the last `data_write` bytes from the ring.
        let rewrite = as_usize(r.counters.data_write);
        assert!(
            rewrite <= self.ring.len(),
            "UP: data_write is {rewrite} but the ring holds only {} bytes",
            self.ring.len()
        );
        self.up_wire = self
            .ring
            .iter()
            .skip(self.ring.len() - rewrite)
            .copied()
            .collect();
        self.mobile_acked = self.written - as_u64(rewrite);
        // Proxy side, UP: the first byte on the new connection is the safe point.
        self.up_next = self.up_safe();
        assert_eq!(self.mobile_acked, self.up_next);

        self.written_while_down = 0;
        self.connected = true;
        r
    }

    fn count_reconnect(&mut self, pos: &SessionPosition, dr: u64, dw: u64, r: &Resplice) {
        let s = &mut self.stats;
        s.reconnects += 1;
        s.salvaged += u64::from(r.counters.data_salvage > 0);
        s.read_past_ack += u64::from(self.app_read > pos.down_acked);
        s.rewrites += u64::from(r.counters.data_write > 0);
        s.wrote_while_down += u64::from(self.written_while_down > 0);
        s.nested_salvage += u64::from(!self.salvage.is_empty());
        s.wrapped += u64::from(dr < pos.read_origin || dw < pos.write_origin);
        s.crossed_2_32 +=
            u64::from(dr >> 32 != pos.read_origin >> 32 || dw >> 32 != pos.write_origin >> 32);
    }

    /// Ends the run: reconnects if needed, delivers everything, and checks both streams.
    fn finish(&mut self) {
        if !self.connected {
            self.reconnect(HARD);
        }
        loop {
            let before = self.progress();
            self.send(usize::MAX);
            self.down_arrive(usize::MAX);
            self.down_ack(usize::MAX);
            self.read(usize::MAX);
            self.up_arrive(usize::MAX);
            self.up_ack(usize::MAX);
            self.server_arrive(usize::MAX);
            self.server_ack(usize::MAX);
            if self.progress() == before {
                break;
            }
        }
        assert_eq!(
            self.app_read, self.produced,
            "DOWN: the application read {} of the {} bytes the server sent",
            self.app_read, self.produced
        );
        assert_eq!(
            self.server_rcv, self.written,
            "UP: the server received {} of the {} bytes the application wrote",
            self.server_rcv, self.written
        );
        assert!(self.salvage.is_empty() && self.kernel_rcv.is_empty());
        assert!(self.down_wire.is_empty() && self.up_wire.is_empty());
        assert!(self.server_wire.is_empty());
    }

    fn progress(&self) -> [u64; 7] {
        [
            self.next_send,
            self.arrived,
            self.acked,
            self.app_read,
            self.up_next,
            self.mobile_acked,
            self.server_rcv + self.server_acked + as_u64(self.server_wire.len()),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// Checks on a single resplice
// ---------------------------------------------------------------------------------------------

/// Whatever the inputs, a successful resplice must be a plan that loses and duplicates
/// nothing in each side's own accounting:
/// * DOWN: the client delivers `data_read .. data_read + data_salvage` from its old socket and
///   then the new connection, which starts at `resume_down_at`: the two must meet exactly;
///   the proxy must still have that byte (`>= down_acked`) and must have sent up to it
///   (`<= down_sent`), else the client would have to salvage bytes that never arrived;
/// * UP: the client rewrites from `data_written - data_write`, the proxy expects the safe
///   point `up_received`: they must be the same position;
/// * both spans fit a socket buffer.
fn check_plan(pos: &SessionPosition, data_read: u64, data_written: u64, r: &Resplice) {
    let ResumeCounters {
        data_write,
        data_salvage,
    } = r.counters;
    assert!(data_salvage <= MAX_RESPLICE_SPAN, "{r:?}");
    assert!(data_write <= MAX_RESPLICE_SPAN, "{r:?}");
    assert_eq!(
        counter_at(pos.read_origin, r.resume_down_at),
        data_read.wrapping_add(data_salvage),
        "DOWN plan has a gap or overlap: {pos:?} {data_read:#x} {r:?}"
    );
    assert!(
        (pos.down_acked..=pos.down_sent).contains(&r.resume_down_at),
        "DOWN resumes outside [acked, sent]: {pos:?} {r:?}"
    );
    assert_eq!(
        data_written.wrapping_sub(data_write),
        counter_at(pos.write_origin, pos.up_received),
        "UP plan has a gap or overlap: {pos:?} {data_written:#x} {r:?}"
    );
}

/// Spans used to perturb honest counters: small, around the 2^31 limit, around 2^32, huge.
const DELTAS: [u64; 10] = [
    1,
    2,
    17,
    4096,
    MAX_RESPLICE_SPAN,
    MAX_RESPLICE_SPAN + 1,
    1 << 32,
    (1 << 62) + 5,
    1 << 63,
    u64::MAX - 4096,
];

/// Calls `resplice`, checks any success with [`check_plan`], and expects `want`.
fn expect_err(pos: &SessionPosition, dr: u64, dw: u64, want: RespliceError, what: &str) {
    let got = resplice(pos, dr, dw);
    if let Ok(r) = &got {
        check_plan(pos, dr, dw, r);
    }
    assert_eq!(
        got,
        Err(want),
        "{what}: position {pos:?}, data_read {dr:#x}, data_written {dw:#x}"
    );
}

/// Perturbs the honest counters `dr`, `dw` (and the proxy's position) of one RECONNECT in
/// ways no honest client or proxy can produce, and checks each is rejected as it should be.
fn check_perturbations(pos: &SessionPosition, dr: u64, dw: u64) {
    let read = offset(dr, pos.read_origin);
    let sent = pos.down_sent;
    let received = pos.up_received;
    for d in DELTAS {
        // data_read beyond everything the proxy sent.
        if let Some(beyond) = sent.checked_add(d) {
            expect_err(
                pos,
                counter_at(pos.read_origin, beyond),
                dw,
                RespliceError::ReadBeyondSent { read: beyond, sent },
                "data_read beyond sent",
            );
        }
        // data_read before the read origin: a "negative" offset, i.e. 2^64 - d bytes in.
        let negative = 0u64.wrapping_sub(d);
        if negative > sent {
            expect_err(
                pos,
                pos.read_origin.wrapping_sub(d),
                dw,
                RespliceError::ReadBeyondSent {
                    read: negative,
                    sent,
                },
                "data_read before the origin",
            );
            // Same thing seen from the proxy: its read origin is `d` past the client's
            // counter (the two disagree on where the stream starts).
            let shifted = SessionPosition {
                read_origin: dr.wrapping_add(d),
                ..*pos
            };
            expect_err(
                &shifted,
                dr,
                dw,
                RespliceError::ReadBeyondSent {
                    read: negative,
                    sent,
                },
                "proxy read origin past the client's counter",
            );
        }
        // data_written below what the proxy already counts as safe.
        if d <= received {
            expect_err(
                pos,
                dr,
                counter_at(pos.write_origin, received - d),
                RespliceError::WrittenBelowReceived {
                    written: received - d,
                    received,
                },
                "data_written below received",
            );
        }
        // data_written before the write origin: reads as 2^64 - d bytes in, i.e. a rewrite
        // no ring could hold (the implementation names it RewriteTooLarge, not
        // WrittenBelowReceived, because offsets are taken as plain counts from the origin).
        if d <= 1 << 62 {
            let bogus = negative - received;
            expect_err(
                pos,
                dr,
                pos.write_origin.wrapping_sub(d),
                RespliceError::RewriteTooLarge(bogus),
                "data_written before the origin",
            );
            let shifted = SessionPosition {
                write_origin: dw.wrapping_add(d),
                ..*pos
            };
            expect_err(
                &shifted,
                dr,
                dw,
                RespliceError::RewriteTooLarge(bogus),
                "proxy write origin past the client's counter",
            );
        }
        // data_written further ahead of the safe point than any ring holds.
        if let Some(ahead) = (received + MAX_RESPLICE_SPAN).checked_add(d) {
            expect_err(
                pos,
                dr,
                counter_at(pos.write_origin, ahead),
                RespliceError::RewriteTooLarge(ahead - received),
                "data_written too far ahead",
            );
        }
        // The proxy's own position is broken: more acknowledged than sent.
        if let Some(acked) = sent.checked_add(d) {
            expect_err(
                &SessionPosition {
                    down_acked: acked,
                    ..*pos
                },
                dr,
                dw,
                RespliceError::Inconsistent { acked, sent },
                "acked beyond sent",
            );
        }
        // data_read so far behind the acknowledged bytes that no socket holds the gap: the
        // proxy's position moved `MAX_RESPLICE_SPAN + d` further while the client's did not.
        let far = MAX_RESPLICE_SPAN + d.min(1 << 40);
        let behind = SessionPosition {
            down_sent: sent + far,
            down_acked: pos.down_acked.max(read) + far,
            ..*pos
        };
        expect_err(
            &behind,
            dr,
            dw,
            RespliceError::SalvageTooLarge(behind.down_acked - read),
            "data_read far behind acked",
        );
    }
}

/// An independent statement of the rules (docs/PROTOCOL.md section 3.8, with counters taken
/// as offsets from the origins): checks in this order, first failure wins.
fn reference(pos: &SessionPosition, dr: u64, dw: u64) -> Result<Resplice, RespliceError> {
    let (sent, acked, recv) = (
        i128::from(pos.down_sent),
        i128::from(pos.down_acked),
        i128::from(pos.up_received),
    );
    if acked > sent {
        return Err(RespliceError::Inconsistent {
            acked: pos.down_acked,
            sent: pos.down_sent,
        });
    }
    // Offsets in [0, 2^64): a counter "before" its origin is 2^64 - n bytes in.
    let read = (i128::from(dr) - i128::from(pos.read_origin)).rem_euclid(1 << 64);
    let written = (i128::from(dw) - i128::from(pos.write_origin)).rem_euclid(1 << 64);
    let max = i128::from(MAX_RESPLICE_SPAN);
    let narrow = |v: i128| u64::try_from(v).expect("in range");
    if read > sent {
        return Err(RespliceError::ReadBeyondSent {
            read: narrow(read),
            sent: pos.down_sent,
        });
    }
    let salvage = (acked - read).max(0);
    if salvage > max {
        return Err(RespliceError::SalvageTooLarge(narrow(salvage)));
    }
    if written < recv {
        return Err(RespliceError::WrittenBelowReceived {
            written: narrow(written),
            received: pos.up_received,
        });
    }
    if written - recv > max {
        return Err(RespliceError::RewriteTooLarge(narrow(written - recv)));
    }
    Ok(Resplice {
        resume_down_at: narrow(read + salvage),
        counters: ResumeCounters {
            data_write: narrow(written - recv),
            data_salvage: narrow(salvage),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Counter origins: near 0, 2^32, 2^63 or 2^64 (for 2^32 and 2^64 also within 64 bytes
/// below, so that most runs starting there cross them), or anywhere.
fn origin() -> impl Strategy<Value = u64> {
    const W: u64 = 1536;
    prop_oneof![
        0..W,
        (1u64 << 32) - W..(1u64 << 32) + W,
        (1u64 << 32) - 64..1u64 << 32,
        (1u64 << 63) - W..(1u64 << 63) + W,
        u64::MAX - W..=u64::MAX,
        u64::MAX - 64..=u64::MAX,
        any::<u64>(),
    ]
}

fn params() -> impl Strategy<Value = Params> {
    (
        prop_oneof![Just(Engine::Relay), Just(Engine::Splice)],
        origin(),
        origin(),
        1usize..=96,
        1usize..=96,
        0usize..=16,
        any::<bool>(),
    )
        .prop_map(
            |(engine, read_origin, write_origin, rcvbuf, sndbuf, extra, sent_high_water)| Params {
                engine,
                read_origin,
                write_origin,
                rcvbuf,
                sndbuf,
                ring_cap: sndbuf + extra,
                sent_high_water,
            },
        )
}

fn move_strategy() -> impl Strategy<Value = Move> {
    prop_oneof![
        1 => Just(Move::Soft),
        2 => (0usize..=32, 0usize..=32, 0usize..=32, 0usize..=64).prop_map(
            |(late_down, late_ack, late_up, server_keep)| Move::Hard {
                late_down,
                late_ack,
                late_up,
                server_keep,
            }
        ),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let k = || 1usize..=48;
    prop_oneof![
        6 => k().prop_map(Event::Produce),
        6 => k().prop_map(Event::Send),
        6 => k().prop_map(Event::DownArrive),
        5 => k().prop_map(Event::DownAck),
        6 => k().prop_map(Event::Read),
        6 => k().prop_map(Event::Write),
        6 => k().prop_map(Event::UpArrive),
        5 => k().prop_map(Event::UpAck),
        3 => k().prop_map(Event::ServerArrive),
        3 => k().prop_map(Event::ServerAck),
        2 => (0usize..=64).prop_map(|server_keep| Event::Break { server_keep }),
        2 => move_strategy().prop_map(Event::Reconnect),
    ]
}

fn run() -> impl Strategy<Value = (Params, Vec<Event>)> {
    (params(), vec(event(), 0..=300))
}

fn run_model(p: Params, events: &[Event]) -> Stats {
    let mut m = Model::new(p);
    for &e in events {
        m.apply(e);
    }
    m.finish();
    m.stats
}

/// Offsets for the arbitrary-input property: small, near the span limit, or anything.
fn any_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        0u64..1 << 20,
        MAX_RESPLICE_SPAN - 8..MAX_RESPLICE_SPAN + 8,
        u64::MAX - 64..=u64::MAX,
        any::<u64>(),
    ]
}

/// `base` moved by `small`, or one span limit further, or replaced by `arb`.
fn near(sel: u8, base: u64, small: u64, arb: u64) -> u64 {
    match sel % 6 {
        0 => base,
        1 => base.wrapping_add(small),
        2 => base.wrapping_sub(small),
        3 => base.wrapping_add(MAX_RESPLICE_SPAN).wrapping_add(small),
        4 => base.wrapping_sub(MAX_RESPLICE_SPAN).wrapping_sub(small),
        _ => arb,
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Random sessions with breaks, soft and hard moves and reconnects: every byte of both
    /// streams arrives exactly once, in order, and honest counters are never rejected.
    /// (Perturbations of every honest RECONNECT are checked inside `Model::reconnect`.)
    #[test]
    fn sessions_lose_and_duplicate_nothing((p, events) in run()) {
        run_model(p, &events);
    }

    /// Arbitrary positions and counters: `resplice` agrees with the reference rules, and
    /// every success is a gap-free, overlap-free plan.
    #[test]
    fn arbitrary_inputs_match_reference(
        ro in origin(),
        wo in origin(),
        sent in any_offset(),
        sel in any::<[u8; 4]>(),
        small in any::<[u16; 4]>(),
        arb in any::<[u64; 4]>(),
    ) {
        let acked = near(sel[0], sent, u64::from(small[0]), arb[0]);
        let received = any_offset_from(arb[1]);
        let read = near(sel[1], if sel[2] % 2 == 0 { acked } else { sent }, u64::from(small[1]), arb[2]);
        let written = near(sel[3], received, u64::from(small[2]), arb[3]);
        let pos = SessionPosition {
            read_origin: ro,
            write_origin: wo,
            down_sent: sent,
            down_acked: acked,
            up_received: received,
        };
        let (dr, dw) = (counter_at(ro, read), counter_at(wo, written));
        let got = resplice(&pos, dr, dw);
        prop_assert_eq!(got, reference(&pos, dr, dw));
        if let Ok(r) = &got {
            check_plan(&pos, dr, dw, r);
        }
    }
}

/// A received count derived from random bits, biased to small values.
fn any_offset_from(bits: u64) -> u64 {
    match bits % 4 {
        0 => bits >> 54,
        1 => bits >> 34,
        2 => bits >> 2,
        _ => u64::MAX - (bits >> 56),
    }
}

// ---------------------------------------------------------------------------------------------
// The paper's figures, in the model
// ---------------------------------------------------------------------------------------------

fn fig_params(engine: Engine, read_origin: u64, write_origin: u64) -> Params {
    Params {
        engine,
        read_origin,
        write_origin,
        rcvbuf: 8192,
        sndbuf: 8192,
        ring_cap: 8192,
        sent_high_water: false,
    }
}

/// Fig. 8: data arrives faster than the application reads it. The proxy sent 1000 bytes, all
/// arrived, the proxy saw 800 acknowledged, the application read 500: the library salvages
/// bytes 500..800 from the old socket, discards 800..1000, and the proxy resumes at 800.
/// The read counter starts 600 bytes before 2^64, so it wraps between the two.
#[test]
fn fig8_slow_reader_salvages_acknowledged_unread_bytes() {
    let mut m = Model::new(fig_params(Engine::Relay, u64::MAX - 599, 1 << 32));
    for e in [
        Event::Produce(1000),
        Event::Send(1000),
        Event::DownArrive(1000),
        Event::DownAck(800),
        Event::Read(500),
    ] {
        m.apply(e);
    }
    let r = m.reconnect(HARD);
    assert_eq!(r.counters.data_salvage, 300);
    assert_eq!(r.resume_down_at, 800);
    assert_eq!(r.counters.data_write, 0);
    assert_eq!(Vec::from(m.salvage.clone()), syms(DOWN, 500, 800));
    assert_eq!(m.stats.discarded, 200);
    m.apply(Event::Produce(100));
    m.finish();
    assert_eq!(m.app_read, 1100);
}

/// Fig. 9: the application reads faster than its ACKs reach the proxy. The proxy sent 1000,
/// 950 arrived, the proxy saw 600 acknowledged, the application read 900: nothing to salvage,
/// the proxy resumes at `data_read` = 900 (not at 600: bytes 600..900 would be duplicates),
/// and the 50 unread arrived bytes are discarded and sent again.
#[test]
fn fig9_fast_reader_resumes_at_data_read() {
    let mut m = Model::new(fig_params(Engine::Relay, (1 << 63) - 700, 0));
    for e in [
        Event::Produce(1000),
        Event::Send(1000),
        Event::DownArrive(950),
        Event::DownAck(600),
        Event::Read(900),
    ] {
        m.apply(e);
    }
    let r = m.reconnect(HARD);
    assert_eq!(r.counters.data_salvage, 0);
    assert_eq!(r.resume_down_at, 900);
    assert_eq!(m.stats.discarded, 50);
    assert_eq!(m.stats.read_past_ack, 1);
    m.finish();
    assert_eq!(m.app_read, 1000);
}

/// Fig. 10, relay engine: the application wrote 4096 bytes, the proxy read 4000 before the
/// break; the last 96 are the hole, rewritten from the ring into the new connection.
#[test]
fn fig10_hole_is_rewritten_relay() {
    let mut m = Model::new(fig_params(Engine::Relay, 0, u64::MAX - 4000));
    m.apply(Event::Write(4096));
    m.apply(Event::UpArrive(4000));
    let r = m.reconnect(HARD);
    assert_eq!(r.counters.data_write, 96);
    assert_eq!(Vec::from(m.up_wire.clone()), syms(UP, 4000, 4096));
    m.finish();
    assert_eq!(m.server_rcv, 4096);
    assert_eq!(m.stats.server_dups, 0);
}

/// Fig. 10, kernel splice engine: the proxy forwarded 4000 bytes, the server received 3950
/// and the proxy saw 3900 acknowledged; at the break 20 more of the forwarded bytes reach the
/// server and the last 30 are lost. `data_write = 4096 - 3900 = 196`: the rewrite covers the
/// lost bytes, and the 70 the server already has are dropped by its TCP as duplicates.
#[test]
fn fig10_hole_is_rewritten_splice() {
    let mut m = Model::new(fig_params(Engine::Splice, 0, (1 << 32) - 2000));
    for e in [
        Event::Write(4096),
        Event::UpArrive(4000),
        Event::ServerArrive(3950),
        Event::ServerAck(3900),
    ] {
        m.apply(e);
    }
    let r = m.reconnect(Move::Hard {
        late_down: 0,
        late_ack: 0,
        late_up: 0,
        server_keep: 20,
    });
    assert_eq!(r.counters.data_write, 196);
    m.finish();
    assert_eq!(m.server_rcv, 4096);
    assert_eq!(m.stats.server_dups, 70);
}

/// A second break before the application read the salvage of the first: the library's
/// unread salvage is still part of what "the old socket" holds.
#[test]
fn fig8_twice_salvage_still_unread() {
    let mut m = Model::new(fig_params(Engine::Relay, 5, 5));
    for e in [
        Event::Produce(1000),
        Event::Send(1000),
        Event::DownArrive(1000),
        Event::DownAck(800),
        Event::Read(500),
    ] {
        m.apply(e);
    }
    assert_eq!(m.reconnect(HARD).counters.data_salvage, 300);
    for e in [
        Event::Send(150),
        Event::DownArrive(150),
        Event::DownAck(100),
    ] {
        m.apply(e);
    }
    let r = m.reconnect(HARD);
    assert_eq!(r.counters.data_salvage, 400);
    assert_eq!(r.resume_down_at, 900);
    assert_eq!(m.stats.nested_salvage, 1);
    m.finish();
    assert_eq!(m.app_read, 1000);
}

/// The worked example of docs/PROTOCOL.md section 3.11: READ_ORIGIN 0, WRITE_ORIGIN
/// 2^32 - 8, 1600 sent, 1400 acknowledged, 1000 read, 5000 written, 4700 received.
#[test]
fn protocol_worked_example() {
    let mut m = Model::new(fig_params(Engine::Relay, 0, (1 << 32) - 8));
    for e in [
        Event::Produce(1600),
        Event::Send(1600),
        Event::DownArrive(1600),
        Event::DownAck(1400),
        Event::Read(1000),
        Event::Write(5000),
        Event::UpArrive(4700),
    ] {
        m.apply(e);
    }
    assert_eq!(
        counter_at(m.p.write_origin, m.written),
        0x0000_0001_0000_1380
    );
    let r = m.reconnect(HARD);
    assert_eq!(
        r.counters,
        ResumeCounters {
            data_write: 300,
            data_salvage: 400
        }
    );
    assert_eq!(r.resume_down_at, 1400);
    m.finish();
}

/// A soft move loses nothing: all in-flight data is delivered and acknowledged before the
/// proxy detaches the old connection, so everything unread is salvaged and nothing written
/// needs rewriting.
#[test]
fn soft_move_salvages_everything_in_flight() {
    let mut m = Model::new(fig_params(Engine::Relay, 1 << 32, 1 << 63));
    for e in [
        Event::Produce(700),
        Event::Send(700),
        Event::DownArrive(300),
        Event::Read(200),
        Event::Write(90),
        Event::UpArrive(10),
    ] {
        m.apply(e);
    }
    let r = m.reconnect(Move::Soft);
    assert_eq!(r.counters.data_salvage, 500);
    assert_eq!(r.resume_down_at, 700);
    assert_eq!(r.counters.data_write, 0);
    assert_eq!(m.stats.discarded, 0);
    m.finish();
}

/// Inputs on which docs/PROTOCOL.md section 3.8's serial-number rules, read literally,
/// would accept the RECONNECT, while `resplice` (correctly) rejects it: a `data_read` a few
/// bytes before READ_ORIGIN "precedes" `snd_una_C`, so the table would ask for
/// `data_salvage = acked + d` bytes that never existed.
#[test]
fn data_read_before_origin_is_rejected() {
    let pos = SessionPosition {
        read_origin: 1000,
        write_origin: 0,
        down_sent: 300,
        down_acked: 200,
        up_received: 0,
    };
    assert_eq!(
        resplice(&pos, 990, 0),
        Err(RespliceError::ReadBeyondSent {
            read: u64::MAX - 9,
            sent: 300
        })
    );
    // Exactly 2^63 past snd_nxt_C with everything acknowledged: neither "precedes" the
    // other in serial arithmetic, so the table's rules would accept it with no salvage.
    let full = SessionPosition {
        down_acked: 300,
        ..pos
    };
    assert!(matches!(
        resplice(&full, counter_at(1000, 300 + (1 << 63)), 0),
        Err(RespliceError::ReadBeyondSent { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Coverage of the generator
// ---------------------------------------------------------------------------------------------

/// The random sessions must actually reach the interesting situations, or the main property
/// would pass vacuously.
#[test]
fn generator_reaches_every_case() {
    let mut runner = TestRunner::deterministic();
    let strategy = run();
    let mut total = Stats::default();
    for _ in 0..200 {
        let (p, events) = strategy
            .new_tree(&mut runner)
            .expect("generate a run")
            .current();
        total.add(&run_model(p, &events));
    }
    let s = total;
    for (what, n) in [
        ("reconnects", s.reconnects),
        ("soft moves", s.soft),
        ("salvage (Fig. 8)", s.salvaged),
        ("reads past the proxy's ack (Fig. 9)", s.read_past_ack),
        ("rewrites (Fig. 10)", s.rewrites),
        ("writes while disconnected", s.wrote_while_down),
        ("salvage unread at the next reconnect", s.nested_salvage),
        ("discarded old-socket bytes", s.discarded),
        ("server-side duplicates (splice)", s.server_dups),
        ("counters wrapped past 2^64", s.wrapped),
        ("counters crossing 2^32", s.crossed_2_32),
    ] {
        assert!(n > 0, "the generator never produced: {what}; totals {s:?}");
    }
    assert!(s.reconnects >= 200 * 3, "too few reconnects per run: {s:?}");
}
