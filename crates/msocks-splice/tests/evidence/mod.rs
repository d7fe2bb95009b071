//! The capture checker: reads the tcpdump files of the proxy's two links
//! and proves from the packets alone what the splice promises.
//!
//! Conventions: connection A is client ↔ proxy (captured on the proxy's
//! client-side interface), B is proxy ↔ server (captured on its
//! server-side interface). "Up" is client → server, "down" server →
//! client. Offsets are byte positions in a stream (0 = first data byte).
//! The test's proxy relays its prologue byte for byte, so an up offset on A
//! is the same byte's offset on B, and likewise down.

pub mod capture;

use std::fs::File;
use std::io::BufReader;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use pcap_file::pcap::PcapReader;

/// Byte `i` of a test stream: a keyed, position-dependent pattern, so a byte
/// at a wrong offset is caught.
pub fn pattern(seed: u64, i: u64) -> u8 {
    let mut z = (i / 8).wrapping_add(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    z.to_le_bytes()[(i % 8) as usize]
}

/// Fills `buf` with the pattern of `seed` from stream offset `from`.
pub fn fill(seed: u64, from: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern(seed, from + i as u64);
    }
}

/// Reads `s` to EOF; returns the bytes read and their SHA-256.
pub fn recv_all(mut s: &std::net::TcpStream) -> std::io::Result<(u64, Vec<u8>)> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, h.finalize().to_vec()));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

/// SHA-256 of the first `len` bytes of the pattern of `seed`.
pub fn digest(seed: u64, len: u64) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        fill(seed, off, &mut buf[..n]);
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().to_vec()
}

/// One TCP segment from a capture.
#[derive(Debug, Clone)]
pub struct Seg {
    /// Capture time since the epoch.
    pub ts: Duration,
    /// Source.
    pub src: SocketAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (valid if `ack_flag`).
    pub ack: u32,
    /// ACK flag.
    pub ack_flag: bool,
    /// SYN, FIN, RST flags.
    pub syn: bool,
    /// FIN flag.
    pub fin: bool,
    /// RST flag.
    pub rst: bool,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Reads every TCP segment of a pcap file (Ethernet link type).
pub fn read(path: &Path) -> Result<Vec<Seg>, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut r =
        PcapReader::new(BufReader::new(f)).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        let p = p.map_err(|e| format!("{}: {e}", path.display()))?;
        if p.orig_len as usize != p.data.len() {
            return Err(format!("{}: truncated capture (snaplen)", path.display()));
        }
        let Ok(s) = SlicedPacket::from_ethernet(&p.data) else {
            continue;
        };
        let (src_ip, dst_ip): (IpAddr, IpAddr) = match &s.net {
            Some(NetSlice::Ipv4(v4)) => (
                v4.header().source_addr().into(),
                v4.header().destination_addr().into(),
            ),
            Some(NetSlice::Ipv6(v6)) => (
                v6.header().source_addr().into(),
                v6.header().destination_addr().into(),
            ),
            None => continue,
        };
        let Some(TransportSlice::Tcp(t)) = &s.transport else {
            continue;
        };
        out.push(Seg {
            ts: p.timestamp,
            src: SocketAddr::new(src_ip, t.source_port()),
            dst: SocketAddr::new(dst_ip, t.destination_port()),
            seq: t.sequence_number(),
            ack: t.acknowledgment_number(),
            ack_flag: t.ack(),
            syn: t.syn(),
            fin: t.fin(),
            rst: t.rst(),
            payload: t.payload().to_vec(),
        });
    }
    Ok(out)
}

/// A TCP connection's two ends and initial sequence numbers, found from its
/// handshake in a capture.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    /// The end that sent the SYN.
    pub active: SocketAddr,
    /// The end that answered.
    pub passive: SocketAddr,
    /// ISN of the active end.
    pub isn_active: u32,
    /// ISN of the passive end.
    pub isn_passive: u32,
}

impl Conn {
    /// Finds the handshake of `active` → `passive` in `segs`.
    pub fn find(segs: &[Seg], active: SocketAddr, passive: SocketAddr) -> Result<Conn, String> {
        let syn = segs
            .iter()
            .find(|s| s.syn && !s.ack_flag && s.src == active && s.dst == passive)
            .ok_or_else(|| format!("no SYN {active} -> {passive} in capture"))?;
        let synack = segs
            .iter()
            .find(|s| s.syn && s.ack_flag && s.src == passive && s.dst == active)
            .ok_or_else(|| format!("no SYN-ACK {passive} -> {active} in capture"))?;
        Ok(Conn {
            active,
            passive,
            isn_active: syn.seq,
            isn_passive: synack.seq,
        })
    }

    /// Stream offset of a sequence number sent by `from` (wrapping; the
    /// test streams are far below 2^31).
    pub fn offset(&self, from: SocketAddr, seq: u32) -> i64 {
        let isn = if from == self.active {
            self.isn_active
        } else {
            self.isn_passive
        };
        i64::from(seq.wrapping_sub(isn.wrapping_add(1)) as i32)
    }

    /// Stream offset acknowledged by an ACK number sent by `from` (of the
    /// other end's stream).
    pub fn ack_offset(&self, from: SocketAddr, ack: u32) -> i64 {
        let other = if from == self.active {
            self.passive
        } else {
            self.active
        };
        self.offset(other, ack)
    }
}

/// (a): every ACK the server received acknowledges only down bytes the
/// client had already acknowledged. `down_shift` is how many bytes the
/// proxy itself sent the client before the server's first byte (a SOCKS
/// reply; 0 in the splice test). Only ACKs captured after `after` are
/// checked (before the splice a relaying proxy acknowledges by itself).
/// Returns the number of ACKs checked.
pub fn check_acks_follow_client(
    a_segs: &[Seg],
    a: &Conn,
    b_segs: &[Seg],
    b: &Conn,
    down_shift: i64,
    after: Duration,
) -> Result<usize, String> {
    // The client's acknowledgements of the down stream, in capture order.
    let mut client_acks: Vec<(Duration, i64)> = a_segs
        .iter()
        .filter(|s| s.src == a.active && s.ack_flag)
        .map(|s| (s.ts, a.ack_offset(a.active, s.ack) - down_shift))
        .collect();
    client_acks.sort_by_key(|x| x.0);
    let mut best = Vec::with_capacity(client_acks.len());
    let mut m = i64::MIN;
    for (t, o) in &client_acks {
        m = m.max(*o);
        best.push((*t, m));
    }
    let mut checked = 0;
    for s in b_segs
        .iter()
        .filter(|s| s.dst == b.passive && s.ack_flag && !s.syn && s.ts > after)
    {
        let o = b.ack_offset(b.active, s.ack);
        if o <= 0 {
            continue; // acknowledges no server data byte
        }
        let idx = best.partition_point(|(t, _)| *t <= s.ts);
        let had = if idx == 0 { i64::MIN } else { best[idx - 1].1 };
        if had < o {
            return Err(format!(
                "server got an ACK of down offset {o} at {:?}; the client had only acknowledged {had}",
                s.ts
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

type Shape = (i64, i64, usize, bool, bool, bool, bool);

fn shape(c: &Conn, s: &Seg) -> Shape {
    let ack = if s.ack_flag {
        c.ack_offset(s.src, s.ack)
    } else {
        0
    };
    (
        c.offset(s.src, s.seq),
        ack,
        s.payload.len(),
        s.ack_flag,
        s.syn,
        s.fin,
        s.rst,
    )
}

/// (b): after `t_splice`, every segment the proxy put on one connection is
/// a rewritten copy of a segment it received on the other: the proxy
/// originated nothing (no ACK, no data, no window update). Returns the
/// number of segments matched.
pub fn check_nothing_originated(
    a_segs: &[Seg],
    a: &Conn,
    b_segs: &[Seg],
    b: &Conn,
    t_splice: Duration,
) -> Result<usize, String> {
    let mut matched = 0;
    for (in_segs, in_conn, in_from, out_segs, out_conn, out_to) in [
        (a_segs, a, a.active, b_segs, b, b.passive),
        (b_segs, b, b.passive, a_segs, a, a.active),
    ] {
        let mut pool: std::collections::HashMap<Shape, usize> = std::collections::HashMap::new();
        for s in in_segs.iter().filter(|s| s.src == in_from) {
            *pool.entry(shape(in_conn, s)).or_default() += 1;
        }
        for s in out_segs
            .iter()
            .filter(|s| s.dst == out_to && s.ts > t_splice)
        {
            let k = shape(out_conn, s);
            match pool.get_mut(&k) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    matched += 1;
                }
                _ => {
                    return Err(format!(
                        "segment to {out_to} at {:?} after the splice (seq off {}, ack off {}, len {}, flags a{} s{} f{} r{}) \
                         is no copy of a received one: the proxy originated it",
                        s.ts, k.0, k.1, k.2, k.3, k.4, k.5, k.6
                    ))
                }
            }
        }
    }
    Ok(matched)
}

/// (c): the bytes `from` sent, as captured on the receiver's link, put
/// every byte of `expected` at its offset exactly, covering it entirely
/// (retransmissions must carry the same bytes). Returns the number of
/// bytes seen more than once (retransmitted).
pub fn check_stream(
    segs: &[Seg],
    c: &Conn,
    from: SocketAddr,
    expected: &dyn Fn(u64) -> u8,
    len: u64,
) -> Result<u64, String> {
    let mut covered = vec![false; usize::try_from(len).map_err(|_| "stream too long")?];
    let mut dup = 0u64;
    for s in segs
        .iter()
        .filter(|s| s.src == from && !s.payload.is_empty())
    {
        let o = c.offset(from, s.seq);
        for (i, b) in s.payload.iter().enumerate() {
            let off = o + i as i64;
            if off < 0 || off as u64 >= len {
                return Err(format!(
                    "byte at offset {off} outside the stream (0..{len})"
                ));
            }
            let want = expected(off as u64);
            if *b != want {
                return Err(format!(
                    "byte at offset {off} is {b:#04x}, expected {want:#04x}"
                ));
            }
            let slot = &mut covered[off as usize];
            if *slot {
                dup += 1;
            }
            *slot = true;
        }
    }
    if let Some(hole) = covered.iter().position(|c| !c) {
        return Err(format!("byte at offset {hole} never went over the wire"));
    }
    Ok(dup)
}
