/* The splice table: the one definition of the map layout shared by the
 * datapath (splice.bpf.c) and the control plane (src/maps.rs).
 *
 * src/maps.rs mirrors these structs with #[repr(C)] and asserts the same
 * sizes and field offsets at compile time; the _Static_asserts below pin the
 * C side to the same numbers. Change a field here, and both builds fail until
 * the other side and the numbers agree again.
 *
 * All addresses and ports are in network byte order. Sequence numbers,
 * deltas and timestamps are host-order integers (the datapath converts).
 */
#ifndef MSOCKS_SPLICE_H
#define MSOCKS_SPLICE_H

#include <linux/types.h>

/* One direction of a spliced pair: the TCP 4-tuple of segments as they
 * arrive at the proxy. */
struct splice_key {
	__u8 family;       /* AF_INET (2) or AF_INET6 (10) */
	__u8 pad[3];       /* always zero: the key is hashed bytewise */
	__u32 saddr[4];    /* IPv4 uses saddr[0]; the rest stays zero */
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
};

/* state */
#define SPLICE_HOLD 1   /* freeze in progress: no data into the sockets, ACKs still up */
#define SPLICE_ACTIVE 2 /* rewrite and redirect everything */
#define SPLICE_DROP 3   /* resplice in progress: drop everything, let nothing reach the sockets */
#define SPLICE_ARMED 4  /* a moved splice's new connection: HOLD until the client acknowledges
			 * arm_ack (the proxy's reply), then ACTIVE, and the splice's ctl word
			 * cleared: the datapath itself starts the moved splice */

/* opts: what both connections negotiated (they must agree) */
#define SPLICE_OPT_TS 1
#define SPLICE_OPT_SACK 2

/* events, set by the datapath with atomic or */
#define SPLICE_EV_FIN 1       /* a FIN of this direction was forwarded */
#define SPLICE_EV_FIN_ACKED 2 /* ... and the other side acknowledged it */
#define SPLICE_EV_RST 4       /* a RST of this direction was forwarded */

/* How to rewrite a segment that matches the key. Written whole by the
 * control plane; the fields from tsval_delta on are then updated in place by
 * the datapath. */
struct splice_val {
	__u32 state;
	__u32 opts;
	__u32 new_saddr[4];
	__u32 new_daddr[4];
	__u16 new_sport;
	__u16 new_dport;
	/* seq' = seq + seq_delta, where seq_delta = out.splice_iss - in.splice_irs */
	__u32 seq_delta;
	/* ack' = ack + ack_delta, where ack_delta = out.rcv_nxt - in.snd_nxt */
	__u32 ack_delta;
	/* in.splice_irs: the first sequence number of this sender that belongs
	 * to the splice; payload below it was consumed by the proxy. */
	__u32 splice_seq;
	/* The sender scales its window field by wscale_in; the receiver of the
	 * rewritten segment scales it by wscale_out. */
	__u8 wscale_in;
	__u8 wscale_out;
	__u16 reserved;
	/* The proxy's TCP timestamp clock on the outgoing connection is
	 * ktime_ms + out_tsoffset (mod 2^32). */
	__u32 out_tsoffset;
	/* The interface the rewritten segment leaves by: the proxy's interface
	 * holding the new source address (the FIB lookup is confined to it). */
	__u32 out_ifindex;
	/* Written by the datapath: the highest TSval it put on the outgoing
	 * connection (a resplice must not go below it). */
	__u32 last_tsval_out;
	/* --- written by the datapath --- */
	/* TSval' = TSval + low 32 bits; bit 32 set once initialised (CAS). */
	__u64 tsval_delta;
	__u64 packets;
	__u64 bytes;
	__u32 events;
	/* sequence number just past this direction's FIN, in the outgoing
	 * connection's space (valid with SPLICE_EV_FIN). */
	__u32 fin_end;
	/* highest acknowledgement number from this sender (incoming space):
	 * what the sender has acknowledged, for RECONNECT's snd_una. The
	 * control plane initialises it to the splice point; the datapath only
	 * moves it forward (segments of one direction may be handled on two
	 * CPUs at once, so the latest ACK handled is not always the highest). */
	__u32 last_ack;
	/* segments of this direction the datapath refused to forward */
	__u32 drops;
	/* highest sequence number just past the payload (and FIN) forwarded
	 * on the outgoing connection: the proxy's snd_nxt there, as far as
	 * the splice has sent. Initialised by the control plane. */
	__u32 seq_max;
	/* Index of this splice's word in splice_ctl (both directions share
	 * it). The control plane stops a live splice by writing that word,
	 * in place, instead of rewriting this value: a rewrite replaces the
	 * map element, and a CPU forwarding a segment at that moment would
	 * record its ACK in the old element, lost. */
	__u32 ctl_slot;
	/* SPLICE_ARMED: the acknowledgement number that switches the entry to
	 * SPLICE_ACTIVE (the proxy's snd_nxt after its reply). */
	__u32 arm_ack;
	__u32 reserved3;
};

/* splice_ctl words: 0 = no override, SPLICE_DROP = drop everything. */

/* Indices of the global counters array (splice_stats). */
#define STAT_SPLICED 0      /* segments rewritten and redirected */
#define STAT_HELD_DROP 1    /* data segments dropped in HOLD */
#define STAT_BELOW_SPLICE 2 /* segments below the splice point that could not be chopped, dropped */
#define STAT_IP_OPTIONS 3   /* IPv4 fragments (or options that could not be removed), dropped */
#define STAT_BAD_TCP 4      /* malformed TCP options, dropped */
#define STAT_FIB_FAIL 5     /* no route / MTU: dropped */
#define STAT_SYN 6          /* SYN on a spliced 4-tuple, dropped */
#define STAT_HELD_PASS 7    /* pure ACKs passed to the stack in HOLD */
#define STAT_REDIRECT_NEIGH 8 /* redirected with kernel neighbour resolution */
#define STAT_FIB_LAST_RC 9   /* the last failing bpf_fib_lookup result (not a count) */
#define STAT_IP_OPTIONS_STRIPPED 10 /* IPv4 options removed */
#define STAT_CHOPPED 11      /* payload below the splice point chopped off */
#define STAT_RESPLICE_DROP 12 /* segments dropped while a splice was being moved */
#define STAT_HELD_CHOPPED 13 /* data segments passed up without their payload in HOLD */
#define STAT_ARMED_START 14 /* moved splices the datapath started on the client's ACK */
#define STAT_HELD_FIN_STRIPPED 15 /* FIN segments passed up as ACKs in HOLD (the FIN comes again) */
#define STAT_MAX 16

#define SPLICE_MAX_ENTRIES 65536

#endif
