//! The splice arithmetic, without sockets or packets' I/O: what
//! `bpf/splice.bpf.c` does to each segment, written again in Rust so that it
//! can be property-tested. Keep the two in step.
//!
//! Names follow the paper (section III-B.2): a segment arrives on the
//! *incoming* connection and leaves on the *outgoing* one; `in.splice_irs`
//! is the first sequence number of the incoming sender that belongs to the
//! splice (the proxy's `rcv_nxt` when it froze), `out.splice_iss` the
//! proxy's `snd_nxt` on the outgoing connection at that moment.

/// What the proxy's frozen socket knows about one of its two connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnState {
    /// Next sequence number the proxy would send (`snd_nxt` = `write_seq`
    /// with an empty send queue).
    pub snd_nxt: u32,
    /// Next sequence number the proxy expects from the peer.
    pub rcv_nxt: u32,
    /// Shift the peer applies to its window field (`tcpi_snd_wscale`).
    pub snd_wscale: u8,
    /// Shift the proxy announced for its own window (`tcpi_rcv_wscale`).
    pub rcv_wscale: u8,
    /// The proxy's timestamp clock offset on this connection: clock =
    /// `CLOCK_MONOTONIC` in ms + `ts_offset`.
    pub ts_offset: u32,
}

/// Payload bytes after which a direction no longer checks for bytes below
/// its splice point: the largest TCP window (2^30), as in the datapath.
pub const CHOP_WINDOW: u64 = 1 << 30;

/// The rewrite of one direction, incoming connection to outgoing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirMap {
    /// Added to sequence numbers.
    pub seq_delta: u32,
    /// Added to acknowledgement numbers and SACK edges.
    pub ack_delta: u32,
    /// Payload below this sequence number is not part of the splice.
    pub splice_seq: u32,
    /// The sender's window shift.
    pub wscale_in: u8,
    /// The receiver's window shift.
    pub wscale_out: u8,
}

impl DirMap {
    /// The map for segments arriving on `incoming` and leaving on
    /// `outgoing`.
    pub fn new(incoming: &ConnState, outgoing: &ConnState) -> DirMap {
        DirMap {
            // seq - in.splice_irs + out.splice_iss
            seq_delta: outgoing.snd_nxt.wrapping_sub(incoming.rcv_nxt),
            // The sender acknowledges what the proxy sent it on the
            // incoming connection; the receiver wants acknowledgements of
            // its own bytes, which the proxy received on the outgoing one.
            ack_delta: outgoing.rcv_nxt.wrapping_sub(incoming.snd_nxt),
            splice_seq: incoming.rcv_nxt,
            wscale_in: incoming.snd_wscale,
            wscale_out: outgoing.rcv_wscale,
        }
    }

    /// The sequence number on the outgoing connection.
    pub fn seq(&self, seq: u32) -> u32 {
        seq.wrapping_add(self.seq_delta)
    }

    /// The acknowledgement number (or SACK edge) on the outgoing connection.
    pub fn ack(&self, ack: u32) -> u32 {
        ack.wrapping_add(self.ack_delta)
    }

    /// Whether a segment starting at `seq` carries bytes the proxy consumed
    /// before the splice (the datapath chops its payload off), once
    /// `crossed` payload bytes went through this direction. Only near the
    /// splice point: after [`CHOP_WINDOW`] bytes no pre-splice byte can still
    /// be in flight, and the 32-bit comparison would call every byte 2 GiB or
    /// more past the splice point "below" it.
    pub fn below_splice(&self, seq: u32, crossed: u64) -> bool {
        crossed < CHOP_WINDOW && seq_before(seq, self.splice_seq)
    }

    /// The window field on the outgoing connection.
    pub fn window(&self, win: u16) -> u16 {
        rescale_window(win, self.wscale_in, self.wscale_out)
    }
}

/// `a` comes before `b` in wrapping 32-bit sequence space.
pub fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// The window field rescaled from shift `inw` to shift `outw`, rounded down
/// and clamped to 16 bits: the receiver then never believes in more buffer
/// than the real receiver offered.
pub fn rescale_window(win: u16, inw: u8, outw: u8) -> u16 {
    let bytes = u64::from(win) << (inw & 15);
    let w = bytes >> (outw & 15);
    u16::try_from(w).unwrap_or(u16::MAX)
}

/// The TSval offset the datapath picks at the first timestamped segment of
/// a direction: that segment's TSval becomes the proxy's clock on the
/// outgoing connection at that instant.
pub fn tsval_delta(first_tsval: u32, out_clock_now: u32) -> u32 {
    out_clock_now.wrapping_sub(first_tsval)
}

/// TSecr on the outgoing connection: undo the reverse direction's TSval
/// offset, or 0 (no echo) while it has none.
pub fn tsecr(tsecr: u32, reverse_delta: Option<u32>) -> u32 {
    match reverse_delta {
        Some(d) => tsecr.wrapping_sub(d),
        None => 0,
    }
}

/// Why [`map_options`] refused a segment's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadOptions;

/// Rewrites TCP options in place like the datapath: TSval + `ts_delta`,
/// TSecr through [`tsecr`], SACK edges through [`DirMap::ack`]. Malformed
/// options (bad lengths, running past the end) are refused.
pub fn map_options(
    buf: &mut [u8],
    map: &DirMap,
    ts_delta: u32,
    reverse_ts_delta: Option<u32>,
) -> Result<(), BadOptions> {
    let len = buf.len();
    let mut i = 0;
    while i < len {
        match buf[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let olen = usize::from(*buf.get(i + 1).ok_or(BadOptions)?);
                if olen < 2 || i + olen > len {
                    return Err(BadOptions);
                }
                if kind == 8 {
                    if olen != 10 {
                        return Err(BadOptions);
                    }
                    let val = rd32(&buf[i + 2..]).wrapping_add(ts_delta);
                    wr32(&mut buf[i + 2..], val);
                    let ecr = tsecr(rd32(&buf[i + 6..]), reverse_ts_delta);
                    wr32(&mut buf[i + 6..], ecr);
                } else if kind == 5 {
                    if (olen - 2) % 8 != 0 {
                        return Err(BadOptions);
                    }
                    let mut o = i + 2;
                    while o + 8 <= i + olen {
                        let l = map.ack(rd32(&buf[o..]));
                        wr32(&mut buf[o..], l);
                        let r = map.ack(rd32(&buf[o + 4..]));
                        wr32(&mut buf[o + 4..], r);
                        o += 8;
                    }
                }
                i += olen;
            }
        }
    }
    Ok(())
}

fn rd32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn wr32(b: &mut [u8], v: u32) {
    b[..4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn conn() -> impl Strategy<Value = ConnState> {
        (any::<u32>(), any::<u32>(), 0u8..=14, 0u8..=14, any::<u32>()).prop_map(
            |(snd_nxt, rcv_nxt, snd_wscale, rcv_wscale, ts_offset)| ConnState {
                snd_nxt,
                rcv_nxt,
                snd_wscale,
                rcv_wscale,
                ts_offset,
            },
        )
    }

    proptest! {
        /// Byte k of the incoming stream after the splice point is byte k of
        /// the outgoing stream after the proxy's last byte.
        #[test]
        fn stream_offsets_are_preserved(a in conn(), b in conn(), k in any::<u32>()) {
            let m = DirMap::new(&a, &b);
            prop_assert_eq!(m.seq(a.rcv_nxt.wrapping_add(k)), b.snd_nxt.wrapping_add(k));
            prop_assert!(!m.below_splice(a.rcv_nxt, 0));
            // Far from the splice point nothing is below it, even 2 GiB and more past it
            // (where the 32-bit comparison alone would say so).
            prop_assert!(!m.below_splice(a.rcv_nxt.wrapping_add(1 << 31), CHOP_WINDOW));
            prop_assert!(m.below_splice(a.rcv_nxt.wrapping_sub(1), 0));
        }

        /// A byte sent by the server, forwarded to the mobile node and
        /// acknowledged there, arrives back at the server as an
        /// acknowledgement of exactly that byte: the two directions' maps
        /// are inverse.
        #[test]
        fn ack_inverts_the_other_directions_seq(a in conn(), b in conn(), s in any::<u32>()) {
            let to_mobile = DirMap::new(&b, &a);
            let to_server = DirMap::new(&a, &b);
            let seen_by_mobile = to_mobile.seq(s);
            prop_assert_eq!(to_server.ack(seen_by_mobile.wrapping_add(1)), s.wrapping_add(1));
            let back = DirMap::new(&b, &a);
            prop_assert_eq!(back.ack(to_server.seq(s).wrapping_add(1)), s.wrapping_add(1));
        }

        /// The rescaled window never offers more bytes than the real one,
        /// and (unless clamped) less by under one unit of the out scale.
        #[test]
        fn window_is_never_overstated(w in any::<u16>(), i in 0u8..=14, o in 0u8..=14) {
            let out = rescale_window(w, i, o);
            let real = u64::from(w) << i;
            let seen = u64::from(out) << o;
            prop_assert!(seen <= real);
            if out < u16::MAX {
                prop_assert!(real - seen < (1u64 << o));
            }
        }

        /// Mapped TSvals keep the sender's order and start at the proxy's
        /// own clock, so PAWS at the receiver accepts them.
        #[test]
        fn tsvals_stay_monotonic(first in any::<u32>(), now in any::<u32>(), steps in proptest::collection::vec(0u32..100_000, 1..50)) {
            let d = tsval_delta(first, now);
            let mut ts = first;
            let mut prev = first.wrapping_add(d);
            prop_assert_eq!(prev, now);
            for s in steps {
                ts = ts.wrapping_add(s);
                let mapped = ts.wrapping_add(d);
                prop_assert!(!seq_before(mapped, prev));
                prev = mapped;
            }
        }

        /// TSecr undoes the TSval offset of the direction it echoes.
        #[test]
        fn tsecr_echo_round_trips(ts in any::<u32>(), d in any::<u32>()) {
            prop_assert_eq!(tsecr(ts.wrapping_add(d), Some(d)), ts);
            prop_assert_eq!(tsecr(ts, None), 0);
        }

        /// Arbitrary option bytes never panic the parser.
        #[test]
        fn options_parser_is_total(mut buf in proptest::collection::vec(any::<u8>(), 0..=40), a in conn(), b in conn()) {
            let m = DirMap::new(&a, &b);
            let _ = map_options(&mut buf, &m, 7, Some(3));
        }

        /// SACK edges map like ACK numbers; a TS option moves by the deltas.
        #[test]
        fn sack_and_ts_rewrite(a in conn(), b in conn(), l in any::<u32>(), r in any::<u32>(), tv in any::<u32>(), te in any::<u32>(), d in any::<u32>(), rd in any::<u32>()) {
            let m = DirMap::new(&a, &b);
            let mut buf = vec![1, 1, 8, 10];
            buf.extend_from_slice(&tv.to_be_bytes());
            buf.extend_from_slice(&te.to_be_bytes());
            buf.extend_from_slice(&[1, 1, 5, 10]);
            buf.extend_from_slice(&l.to_be_bytes());
            buf.extend_from_slice(&r.to_be_bytes());
            map_options(&mut buf, &m, d, Some(rd)).map_err(|_| TestCaseError::fail("refused"))?;
            prop_assert_eq!(rd32(&buf[4..]), tv.wrapping_add(d));
            prop_assert_eq!(rd32(&buf[8..]), te.wrapping_sub(rd));
            prop_assert_eq!(rd32(&buf[16..]), m.ack(l));
            prop_assert_eq!(rd32(&buf[20..]), m.ack(r));
        }
    }

    #[test]
    fn truncated_options_are_refused() {
        let m = DirMap::new(&ConnState::default(), &ConnState::default());
        assert_eq!(
            map_options(&mut [8, 10, 0, 0], &m, 0, None),
            Err(BadOptions)
        );
        assert_eq!(map_options(&mut [5], &m, 0, None), Err(BadOptions));
        assert_eq!(map_options(&mut [1, 1, 0, 9], &m, 0, None), Ok(()));
    }
}
