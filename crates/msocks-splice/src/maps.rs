//! The splice table's key and value, mirrored from `bpf/splice.h`.
//!
//! `bpf/splice.h` is the one definition; these `#[repr(C)]` structs copy it
//! field for field, and the `const` assertions at the bottom pin the same
//! sizes and offsets that the C file pins with `_Static_assert`. A change on
//! one side only breaks the build of one of the two.

use std::net::{IpAddr, SocketAddr};

/// `AF_INET` as the datapath stores it in [`SpliceKey::family`].
pub const FAMILY_V4: u8 = 2;
/// `AF_INET6` as the datapath stores it in [`SpliceKey::family`].
pub const FAMILY_V6: u8 = 10;

/// [`SpliceVal::state`]: freeze in progress; no payload reaches the
/// proxy's socket (data segments go up bare, FIN segments without their FIN
/// flag, SYN segments are dropped), ACKs do.
pub const STATE_HOLD: u32 = 1;
/// [`SpliceVal::state`]: segments are rewritten and redirected.
pub const STATE_ACTIVE: u32 = 2;
/// [`SpliceVal::state`]: a resplice is moving this pair; every segment is
/// dropped (and retransmitted by its sender later).
pub const STATE_DROP: u32 = 3;
/// [`SpliceVal::state`]: a moved splice's new connection, held as in
/// [`STATE_HOLD`] until the client acknowledges [`SpliceVal::arm_ack`]; the
/// datapath then makes it [`STATE_ACTIVE`] and clears the splice's
/// `splice_ctl` word, starting the moved splice itself.
pub const STATE_ARMED: u32 = 4;

/// [`SpliceVal::opts`]: both connections use TCP timestamps.
pub const OPT_TS: u32 = 1;
/// [`SpliceVal::opts`]: both connections use SACK.
pub const OPT_SACK: u32 = 2;

/// [`SpliceVal::events`]: a FIN of this direction was forwarded.
pub const EV_FIN: u32 = 1;
/// [`SpliceVal::events`]: the other side acknowledged that FIN.
pub const EV_FIN_ACKED: u32 = 2;
/// [`SpliceVal::events`]: a RST of this direction was forwarded.
pub const EV_RST: u32 = 4;

/// Bit set in [`SpliceVal::tsval_delta`] once the datapath chose the offset.
pub const TS_VALID: u64 = 1 << 32;

/// Names of the global counters (`splice_stats`), by index.
pub const STAT_NAMES: [&str; 16] = [
    "spliced",
    "held_drop",
    "below_splice",
    "ip_options_or_fragment",
    "bad_tcp",
    "fib_fail",
    "syn",
    "held_pass",
    "redirect_neigh",
    "fib_last_failure_code",
    "ip_options_stripped",
    "chopped_below_splice",
    "resplice_drop",
    "held_chopped",
    "armed_start",
    "held_fin_stripped",
];

/// One direction of a spliced pair: the 4-tuple of segments as they arrive
/// at the proxy (`struct splice_key`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpliceKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Always zero: the kernel hashes the key bytewise.
    pub pad: [u8; 3],
    /// Source address, network byte order; IPv4 in word 0.
    pub saddr: [u32; 4],
    /// Destination address, network byte order; IPv4 in word 0.
    pub daddr: [u32; 4],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
}

/// How to rewrite the segments of one direction (`struct splice_val`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpliceVal {
    /// [`STATE_HOLD`] or [`STATE_ACTIVE`].
    pub state: u32,
    /// [`OPT_TS`] | [`OPT_SACK`] as negotiated on both connections.
    pub opts: u32,
    /// New source address (network byte order).
    pub new_saddr: [u32; 4],
    /// New destination address (network byte order).
    pub new_daddr: [u32; 4],
    /// New source port (network byte order).
    pub new_sport: u16,
    /// New destination port (network byte order).
    pub new_dport: u16,
    /// `out.splice_iss - in.splice_irs`, added to every sequence number.
    pub seq_delta: u32,
    /// `out.rcv_nxt - in.snd_nxt`, added to ACK numbers and SACK edges.
    pub ack_delta: u32,
    /// `in.splice_irs`: payload below it was consumed by the proxy.
    pub splice_seq: u32,
    /// Window scale shift the sender applies to its window field.
    pub wscale_in: u8,
    /// Window scale shift the receiver of the rewritten segment applies.
    pub wscale_out: u8,
    /// Zero.
    pub reserved: u16,
    /// The proxy's timestamp clock on the outgoing connection is
    /// `CLOCK_MONOTONIC in ms + out_tsoffset`.
    pub out_tsoffset: u32,
    /// Index of the interface holding the new source address; the
    /// datapath's route lookup is confined to it.
    pub out_ifindex: u32,
    /// Datapath: the highest TSval it put on the outgoing connection (a
    /// resplice must not go below it).
    pub last_tsval_out: u32,
    /// Datapath: TSval offset, valid when [`TS_VALID`] is set.
    pub tsval_delta: u64,
    /// Datapath: segments forwarded.
    pub packets: u64,
    /// Datapath: payload bytes forwarded (retransmissions included).
    pub bytes: u64,
    /// Datapath: [`EV_FIN`] | [`EV_FIN_ACKED`] | [`EV_RST`].
    pub events: u32,
    /// Datapath: sequence number past this direction's FIN (outgoing space).
    pub fin_end: u32,
    /// Highest ACK number from this sender (incoming space): set to the
    /// splice point by the control plane, moved only forward by the
    /// datapath.
    pub last_ack: u32,
    /// Datapath: segments refused.
    pub drops: u32,
    /// Highest sequence number past the payload (and FIN) forwarded on
    /// the outgoing connection: set to the splice point by the control
    /// plane, moved only forward by the datapath.
    pub seq_max: u32,
    /// Index of this splice's word in the `splice_ctl` array, through
    /// which the control plane stops a live splice in place (rewriting the
    /// value would replace the map element and lose a datapath update
    /// racing with it).
    pub ctl_slot: u32,
    /// [`STATE_ARMED`]: the client's acknowledgement number that starts the
    /// splice (the proxy's `snd_nxt` after its reply).
    pub arm_ack: u32,
    /// Zero.
    pub reserved3: u32,
}

// SAFETY: both types are `#[repr(C)]`, consist only of integers and integer
// arrays, and have no padding (the sizes asserted below equal the sums of
// their fields), so every byte pattern the kernel hands back is a valid
// value and every byte we hand to the kernel is initialised.
#[cfg(target_os = "linux")]
unsafe impl aya::Pod for SpliceKey {}
// SAFETY: as for `SpliceKey` above.
#[cfg(target_os = "linux")]
unsafe impl aya::Pod for SpliceVal {}

const _: () = {
    assert!(std::mem::size_of::<SpliceKey>() == 40);
    assert!(std::mem::size_of::<SpliceVal>() == 128);
    assert!(std::mem::offset_of!(SpliceVal, seq_delta) == 44);
    assert!(std::mem::offset_of!(SpliceVal, out_tsoffset) == 60);
    assert!(std::mem::offset_of!(SpliceVal, out_ifindex) == 64);
    assert!(std::mem::offset_of!(SpliceVal, last_tsval_out) == 68);
    assert!(std::mem::offset_of!(SpliceVal, tsval_delta) == 72);
    assert!(std::mem::offset_of!(SpliceVal, events) == 96);
    assert!(std::mem::offset_of!(SpliceVal, drops) == 108);
    assert!(std::mem::offset_of!(SpliceVal, seq_max) == 112);
    assert!(std::mem::offset_of!(SpliceVal, ctl_slot) == 116);
    assert!(std::mem::offset_of!(SpliceVal, arm_ack) == 120);
};

/// An address as the datapath stores it: network byte order words.
/// Number of words in `splice_ctl`, one per live splice (`SPLICE_MAX_ENTRIES`).
pub const CTL_SLOTS: u32 = 65536;

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn addr_words(ip: IpAddr) -> [u32; 4] {
    let mut w = [0u32; 4];
    match ip {
        IpAddr::V4(a) => w[0] = u32::from_ne_bytes(a.octets()),
        IpAddr::V6(a) => {
            for (i, chunk) in a.octets().chunks_exact(4).enumerate() {
                w[i] = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
    }
    w
}

impl SpliceKey {
    /// The key of segments from `src` to `dst`. Both must be of one family
    /// (the caller checks; a mixed pair gets `src`'s family).
    pub fn new(src: SocketAddr, dst: SocketAddr) -> SpliceKey {
        SpliceKey {
            family: if src.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 },
            pad: [0; 3],
            saddr: addr_words(src.ip()),
            daddr: addr_words(dst.ip()),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_are_network_order() {
        let k = SpliceKey::new(
            "10.77.1.2:4660".parse().unwrap(),
            "10.77.1.1:80".parse().unwrap(),
        );
        // SAFETY-free check through the public fields: the first address
        // byte in memory is the first octet, the port's high byte first.
        assert_eq!(k.saddr[0].to_ne_bytes(), [10, 77, 1, 2]);
        assert_eq!(k.sport.to_ne_bytes(), [0x12, 0x34]);
        assert_eq!(k.family, FAMILY_V4);
    }
}
