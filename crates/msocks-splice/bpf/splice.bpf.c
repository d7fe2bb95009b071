// SPDX-License-Identifier: GPL-2.0 OR MIT
/* msocks TCP Splice datapath (tc ingress, clsact, direct action).
 *
 * For every TCP segment arriving on an interface of the proxy, look its
 * 4-tuple up in the splice table. No entry: TC_ACT_UNSPEC, the next
 * classifier on the hook (or the stack) handles it.
 * HOLD: the control plane is freezing the proxy's two sockets; no new byte
 * may enter a socket: SYN segments are dropped, data segments go up
 * without their payload and FIN segments without their FIN flag (the sender
 * retransmits both: nobody acknowledged them), pure ACKs and RSTs go up
 * unchanged, so the sockets' send queues can drain. DROP: everything is
 * dropped (a splice being moved). ACTIVE: rewrite the segment into the
 * other connection (addresses, ports, sequence and
 * acknowledgement numbers, window, timestamp and SACK options, checksums)
 * and redirect it out of the interface the FIB names, with the neighbour's
 * MAC address. Whatever cannot be rewritten correctly is dropped and
 * counted, never forwarded wrong.
 *
 * The arithmetic mirrors src/mapping.rs, which has the property tests.
 * GPL because bpf_fib_lookup and bpf_redirect_neigh are GPL-only helpers.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "splice.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

_Static_assert(sizeof(struct splice_key) == 40, "splice_key layout (src/maps.rs)");
_Static_assert(sizeof(struct splice_val) == 128, "splice_val layout (src/maps.rs)");
_Static_assert(offsetof(struct splice_val, seq_delta) == 44, "seq_delta offset");
_Static_assert(offsetof(struct splice_val, out_tsoffset) == 60, "out_tsoffset offset");
_Static_assert(offsetof(struct splice_val, out_ifindex) == 64, "out_ifindex offset");
_Static_assert(offsetof(struct splice_val, last_tsval_out) == 68, "last_tsval_out offset");
_Static_assert(offsetof(struct splice_val, tsval_delta) == 72, "tsval_delta offset");
_Static_assert(offsetof(struct splice_val, events) == 96, "events offset");
_Static_assert(offsetof(struct splice_val, drops) == 108, "drops offset");
_Static_assert(offsetof(struct splice_val, seq_max) == 112, "seq_max offset");
_Static_assert(offsetof(struct splice_val, ctl_slot) == 116, "ctl_slot offset");
_Static_assert(offsetof(struct splice_val, arm_ack) == 120, "arm_ack offset");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SPLICE_MAX_ENTRIES);
	__type(key, struct splice_key);
	__type(value, struct splice_val);
} splice_table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} splice_stats SEC(".maps");

/* One word per live splice, written in place by the control plane (see
 * struct splice_val's ctl_slot). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SPLICE_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, __u32);
} splice_ctl SEC(".maps");

/* A splice's ctl word, read and written in place. Not inlined: the map key's
 * stack slot would otherwise count in the classifier's own frame, which is at
 * the verifier's 512-byte limit. */
static __attribute__((noinline)) __u32 ctl_read(__u32 slot)
{
	__u32 *ctl = bpf_map_lookup_elem(&splice_ctl, &slot);
	return ctl ? *(volatile __u32 *)ctl : 0;
}

static __attribute__((noinline)) void ctl_write(__u32 slot, __u32 word)
{
	__u32 *ctl = bpf_map_lookup_elem(&splice_ctl, &slot);
	if (ctl)
		*(volatile __u32 *)ctl = word;
}

/* Clears the FIN flag of the TCP header at l4_off, checksum kept right (for a
 * CHECKSUM_PARTIAL packet the helper leaves the field alone, as it must).
 * Returns 0, or -1 if the header cannot be rewritten. Not inlined, for the
 * classifier's stack frame (see ctl_read). */
static __attribute__((noinline)) int strip_fin(struct __sk_buff *skb, __u32 l4_off)
{
	/* Bytes 12-13 of the header: data offset and flags; FIN is the low bit. */
	__u32 off = l4_off + 12;
	__be16 old_word, new_word;
	if (bpf_skb_load_bytes(skb, off, &old_word, 2) < 0)
		return -1;
	new_word = old_word & ~bpf_htons(0x0001);
	if (bpf_l4_csum_replace(skb, l4_off + offsetof(struct tcphdr, check), old_word, new_word,
				2) < 0)
		return -1;
	return bpf_skb_store_bytes(skb, off, &new_word, 2, 0) < 0 ? -1 : 0;
}

/* A segment that is not ours: let the next classifier on the hook (another
 * proxy process's splice, say) or the stack have it. TC_ACT_OK would end
 * the chain, and a stale instance left attached would then hide the live
 * one's segments. */
#define NOT_OURS TC_ACT_UNSPEC

struct scratch {
	__u8 b[256];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} splice_scratch SEC(".maps");

#define ETH_HLEN_ 14
#define MAX_OPT 40
#define TS_VALID (1ULL << 32)

static __always_inline void stat(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&splice_stats, &idx);
	if (c)
		__sync_fetch_and_add(c, 1);
}

static __always_inline int drop(struct splice_val *v, __u32 idx)
{
	stat(idx);
	if (v)
		__sync_fetch_and_add(&v->drops, 1);
	return TC_ACT_SHOT;
}

/* Wrapping "a comes before b" on 32-bit sequence space, as the kernel's before(). */
static __always_inline int seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

/* *p = max(*p, v) in sequence space. Two CPUs may handle segments of one
 * direction at once, and a plain store could then move the value back: a
 * compare-and-swap that retries while another CPU moved it, a few times
 * (each retry means the value moved forward, so giving up after several
 * leaves a value no older than what this CPU saw). */
static __always_inline void seq_advance(__u32 *p, __u32 v)
{
	for (int i = 0; i < 4; i++) {
		__u32 old = *(volatile __u32 *)p;
		if (!seq_before(old, v))
			return;
		if (__sync_val_compare_and_swap(p, old, v) == old)
			return;
	}
}

static __always_inline __u32 rd32(const __u8 *p)
{
	return ((__u32)p[0] << 24) | ((__u32)p[1] << 16) | ((__u32)p[2] << 8) | p[3];
}

static __always_inline void wr32(__u8 *p, __u32 v)
{
	p[0] = v >> 24;
	p[1] = v >> 16;
	p[2] = v >> 8;
	p[3] = v;
}

/* Window field rescaled from the sender's shift to the receiver's, clamped:
 * advertising less than the real window is always safe, more never is. */
static __always_inline __u16 rescale_window(__u16 win, __u8 in, __u8 out)
{
	__u64 bytes = (__u64)win << (in & 15);
	__u64 w = bytes >> (out & 15);
	return w > 0xffff ? 0xffff : (__u16)w;
}

/* The proxy's timestamp clock on the outgoing connection, now. */
static __always_inline __u32 out_clock(const struct splice_val *v)
{
	return (__u32)(bpf_ktime_get_ns() / 1000000ULL) + v->out_tsoffset;
}

/* An option data offset x in [2, 32], made provably so for the verifier:
 * ((x - 2) & 31) + 2, with the mask hidden from the optimiser (clang drops
 * a mask it can prove redundant, and may then index with a copy of x the
 * verifier cannot bound). Indexes up to x + 7 <= 40 then stay inside the
 * 48-byte option buffers. */
static __always_inline __u32 bounded(__u32 x)
{
	x -= 2;
	asm volatile("%0 &= 31" : "+r"(x));
	return x + 2;
}

/* Finds the timestamp and SACK options among the TCP options at offset off
 * (length optlen, a multiple of 4 in [4, 40]). Returns ts_at | sack_at << 8
 * | sack_len << 16 (offsets of the options' data within the options, 0 if
 * absent), or -1 if the options are malformed (bad lengths, running past
 * the end, a second timestamp or SACK option).
 *
 * A global (non-static) function: the verifier checks it once, on its own,
 * instead of once per path of the caller, which the loop below would
 * multiply past the verifier's limit. */
__attribute__((noinline)) int scan_options(struct __sk_buff *skb, __u32 off, __u32 optlen)
{
	__u8 buf[MAX_OPT];
	__u32 i = 0, ts_at = 0, sack_at = 0, sack_len = 0;
	if (!skb || optlen < 4 || optlen > MAX_OPT)
		return -1;
	if (bpf_skb_load_bytes(skb, off, buf, optlen) < 0)
		return -1;
	while (i < optlen && i < MAX_OPT) {
		__u8 kind = buf[i];
		if (kind == 0) /* end of options */
			break;
		if (kind == 1) { /* NOP */
			i++;
			continue;
		}
		if (i + 1 >= optlen || i + 1 >= MAX_OPT)
			return -1;
		__u8 len = buf[i + 1];
		if (len < 2 || i + len > optlen)
			return -1;
		if (kind == 8) {
			if (len != 10 || ts_at)
				return -1;
			ts_at = i + 2; /* never 0 */
		} else if (kind == 5) {
			if ((len - 2) % 8 || sack_at)
				return -1;
			sack_at = i + 2;
			sack_len = len - 2;
		}
		i += len;
	}
	return ts_at | sack_at << 8 | sack_len << 16;
}

/* Rewrites the options (already in buf) found by scan_options: TSval
 * forward, TSecr backward through the reverse direction's offset, SACK
 * edges like the acknowledgement number. Returns 0, or -1 if malformed. */
static __always_inline int map_options(__u8 *buf, int found, struct splice_val *v,
				       struct splice_val *rev)
{
	__u32 ts_at = found & 0xff, sack_at = (found >> 8) & 0xff, sack_len = (found >> 16) & 0xff;
	if (ts_at) {
		__u32 o = ts_at;
		if (o < 2 || o > 32) /* cannot be: the option fits in 40 bytes */
			return -1;
		o = bounded(o);
		__u32 tsval = rd32(&buf[o]);
		__u64 d = v->tsval_delta;
		if (!(d & TS_VALID)) {
			/* First timestamp of this direction: choose the offset
			 * that makes this TSval the proxy's clock on the outgoing
			 * connection now. Later TSvals grow with the sender's
			 * clock from there, so they never fall below what the
			 * proxy itself sent before the splice (PAWS holds). CAS:
			 * of two racing CPUs, both use the one that won. */
			__u64 want = TS_VALID | (__u32)(out_clock(v) - tsval);
			__u64 old = __sync_val_compare_and_swap(&v->tsval_delta, 0, want);
			d = old ? old : want;
		}
		wr32(&buf[o], tsval + (__u32)d);
		seq_advance(&v->last_tsval_out, tsval + (__u32)d);
		/* TSecr echoes a TSval the receiver of the other direction got
		 * from us: undo that direction's offset. Until that direction
		 * has one, echo 0 (no RTT sample; RFC 7323 lets a receiver
		 * ignore it). */
		__u64 rd = rev ? rev->tsval_delta : 0;
		__u32 tsecr = rd32(&buf[o + 4]);
		wr32(&buf[o + 4], (rd & TS_VALID) ? tsecr - (__u32)rd : 0);
	}
	if (sack_at) {
		__u32 o = sack_at;
		for (int b = 0; b < 4; b++) {
			if ((__u32)(8 * b + 8) > sack_len)
				break;
			__u32 p = o + 8 * b;
			if (p < 2 || p > 32) /* cannot be: the block fits in 40 bytes */
				return -1;
			p = bounded(p);
			wr32(&buf[p], rd32(&buf[p]) + v->ack_delta);
			wr32(&buf[p + 4], rd32(&buf[p + 4]) + v->ack_delta);
		}
	}
	return 0;
}

/* Removes the optlen (4..40) bytes of IPv4 options after the 20-byte base
 * header, then fixes IHL and total length and recomputes the header
 * checksum. FIXED_GSO: the payload per segment stays what it was. The TCP
 * checksum is unaffected (its pseudo-header holds the TCP length, which
 * does not change). Returns 0 or -1. */
static __always_inline int strip_ip_options(struct __sk_buff *skb, __u32 l3_off, __u32 optlen)
{
	if (optlen < 4 || optlen > 40)
		return -1;
	if (bpf_skb_adjust_room(skb, -(__s32)optlen, BPF_ADJ_ROOM_NET, BPF_F_ADJ_ROOM_FIXED_GSO))
		return -1;
	__u16 h[10];
	if (bpf_skb_load_bytes(skb, l3_off, h, sizeof(h)) < 0)
		return -1;
	/* word 0: version 4, IHL 5, TOS kept (byte order: first byte first) */
	__u8 *b = (__u8 *)h;
	b[0] = 0x45;
	h[1] = bpf_htons(bpf_ntohs(h[1]) - optlen);
	h[5] = 0;
	__u32 sum = 0;
	for (int i = 0; i < 10; i++)
		sum += h[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	h[5] = (__u16)~sum;
	return bpf_skb_store_bytes(skb, l3_off, h, sizeof(h), 0) < 0 ? -1 : 0;
}

/* The ones'-complement sum (as bpf_csum_diff returns it, unfolded) of len
 * bytes at off, read in 256-byte chunks; a final odd chunk is padded with
 * zeros, which is how the TCP checksum pads too, as long as off is even
 * relative to the TCP header (payload starts at doff, a multiple of 4).
 * Returns the sum, or -1 (also for more than 10 KiB). Global, so the
 * verifier checks the loop once, not once per path of the caller. */
#define PAYLOAD_SUM_MAX (40 * 256)

__attribute__((noinline)) long payload_sum(struct __sk_buff *skb, __u32 off, __u32 len)
{
	__u32 zero = 0;
	/* A per-CPU scratch buffer: the stack (512 bytes for all frames)
	 * is already mostly taken by the caller. */
	struct scratch *sc = bpf_map_lookup_elem(&splice_scratch, &zero);
	__s64 acc = 0;
	if (!skb || !sc)
		return -1;
	__u8 *buf = sc->b;
	/* 40 chunks: 10 KiB, more than a jumbo frame's payload. Longer (GSO)
	 * payloads are refused, and the segment dropped instead. */
	if (len > PAYLOAD_SUM_MAX)
		return -1;
	for (int i = 0; i < 40 && len; i++) {
		__u32 n = len > 256 ? 256 : len;
		__u32 padded = (n + 3) & ~3U;
		if (n < 1 || padded > 256)
			return -1;
		if (bpf_skb_load_bytes(skb, off, buf, n) < 0)
			return -1;
		/* zero the (at most 3) pad bytes after the data */
		for (__u32 j = n; j < padded; j++)
			buf[j & 255] = 0;
		acc = bpf_csum_diff(NULL, 0, (__be32 *)buf, padded, (__u32)acc);
		if (acc < 0)
			return -1;
		off += n;
		len -= n;
	}
	return len ? -1 : (long)(__u32)acc;
}

/* Removes a segment's whole payload (len bytes after the TCP header):
 * TCP checksum minus the payload's sum and with the new length in its
 * pseudo-header, IP length fields (and the IPv4 header checksum) fixed,
 * then the packet cut. Returns 0 or -1. */
static __always_inline int chop_payload(struct __sk_buff *skb, __u8 family, __u32 l3_off,
					__u32 l4_off, __u32 doff, __u32 len)
{
	__u32 csum_off = l4_off + offsetof(struct tcphdr, check);
	/* Payloads longer than payload_sum() can add up are GSO packets (a
	 * local sender's TSO over veth, or GRO): their checksum is
	 * CHECKSUM_PARTIAL (the field holds only the pseudo-header's sum) or
	 * already verified, so the payload is not in the field to take out.
	 * Only the length changes below. (A GRO packet with CHECKSUM_COMPLETE
	 * would then fail the stack's check and be dropped, as it was before;
	 * its sender retransmits.) */
	if (len <= PAYLOAD_SUM_MAX) {
		long sum = payload_sum(skb, l4_off + doff, len);
		if (sum < 0)
			return -1;
		/* Subtract the payload: add its complement as a precomputed diff. */
		if (bpf_l4_csum_replace(skb, csum_off, 0, ~(__u32)sum, 0) < 0)
			return -1;
	}
	__be16 old_l4 = bpf_htons(doff + len), new_l4 = bpf_htons(doff);
	if (bpf_l4_csum_replace(skb, csum_off, old_l4, new_l4, BPF_F_PSEUDO_HDR | 2) < 0)
		return -1;
	if (family == AF_INET) {
		__u32 tot_off = l3_off + offsetof(struct iphdr, tot_len);
		__be16 old_tot, new_tot;
		if (bpf_skb_load_bytes(skb, tot_off, &old_tot, 2) < 0)
			return -1;
		new_tot = bpf_htons(bpf_ntohs(old_tot) - len);
		if (bpf_l3_csum_replace(skb, l3_off + offsetof(struct iphdr, check), old_tot,
					new_tot, 2) < 0 ||
		    bpf_skb_store_bytes(skb, tot_off, &new_tot, 2, 0) < 0)
			return -1;
	} else {
		__be16 plen = bpf_htons(doff);
		if (bpf_skb_store_bytes(skb, l3_off + offsetof(struct ipv6hdr, payload_len), &plen,
					2, 0) < 0)
			return -1;
	}
	return bpf_skb_change_tail(skb, l4_off + doff, 0) < 0 ? -1 : 0;
}

static __always_inline void build_key(struct splice_key *k, __u8 family, const __u32 *s,
				      const __u32 *d, __u16 sport, __u16 dport)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->family = family;
	int n = family == AF_INET ? 1 : 4;
	for (int j = 0; j < 4; j++) {
		if (j < n) {
			k->saddr[j] = s[j];
			k->daddr[j] = d[j];
		}
	}
	k->sport = sport;
	k->dport = dport;
}

/* "classifier": the section name aya recognises for cls_bpf programs. */
SEC("classifier")
int splice_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return NOT_OURS;

	__u8 family;
	__u32 l3_off = ETH_HLEN_, l4_off;
	__u32 saddr[4] = {}, daddr[4] = {};
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
			return NOT_OURS;
		family = AF_INET;
		saddr[0] = ip->saddr;
		daddr[0] = ip->daddr;
		l4_off = l3_off + ip->ihl * 4;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + l3_off;
		/* Extension headers are not walked: such segments do not match
		 * and go to the stack (see docs/KERNEL-SPLICE.md, limits). */
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return NOT_OURS;
		family = AF_INET6;
		__builtin_memcpy(saddr, &ip6->saddr, 16);
		__builtin_memcpy(daddr, &ip6->daddr, 16);
		l4_off = l3_off + sizeof(struct ipv6hdr);
	} else {
		return NOT_OURS;
	}

	struct tcphdr *th = data + l4_off;
	if ((void *)(th + 1) > data_end)
		return NOT_OURS;

	struct splice_key key;
	build_key(&key, family, saddr, daddr, th->source, th->dest);
	struct splice_val *v = bpf_map_lookup_elem(&splice_table, &key);
	if (!v)
		return NOT_OURS;

	/* Payload length, from the IP header (skb->len would count padding). */
	__u32 l3_len, ip_hlen;
	if (family == AF_INET) {
		struct iphdr *ip = data + l3_off;
		if ((void *)(ip + 1) > data_end)
			return NOT_OURS;
		ip_hlen = ip->ihl * 4;
		l3_len = bpf_ntohs(ip->tot_len);
		/* Fragments are dropped (Linux peers do not fragment TCP; the
		 * first fragment alone cannot be rewritten right). IP options
		 * are removed below. */
		if (ip_hlen < sizeof(struct iphdr) || (ip->frag_off & bpf_htons(0x3fff)))
			return drop(v, STAT_IP_OPTIONS);
	} else {
		struct ipv6hdr *ip6 = data + l3_off;
		if ((void *)(ip6 + 1) > data_end)
			return NOT_OURS;
		ip_hlen = sizeof(struct ipv6hdr);
		l3_len = ip_hlen + bpf_ntohs(ip6->payload_len);
	}
	__u32 doff = th->doff * 4;
	if (doff < sizeof(struct tcphdr) || doff > 60 || l3_len < ip_hlen + doff)
		return drop(v, STAT_BAD_TCP);
	__u32 payload = l3_len - ip_hlen - doff;
	int syn = th->syn, fin = th->fin, rst = th->rst, has_ack = th->ack;
	__be16 o_win = th->window;

	if (v->state == SPLICE_HOLD || v->state == SPLICE_ARMED) {
		/* ARMED: once the client acknowledges the proxy's reply, the
		 * moved splice starts with the next segment, both directions at
		 * once. The acknowledging segment itself still goes up as in
		 * HOLD (without its payload or FIN), so that the proxy's socket
		 * sees its reply acknowledged and has nothing left to send when
		 * it is frozen. */
		if (v->state == SPLICE_ARMED && has_ack && !syn && !rst &&
		    !seq_before(bpf_ntohl(th->ack_seq), v->arm_ack)) {
			v->state = SPLICE_ACTIVE;
			ctl_write(v->ctl_slot, 0);
			stat(STAT_ARMED_START);
		}
		if (rst)
			return TC_ACT_OK;
		if (syn)
			return drop(v, STAT_HELD_DROP);
		if (fin) {
			/* A FIN may not enter the socket (its state would change
			 * under the freeze), but the ACK it carries may be the one
			 * the socket waits for: a client that closes right after
			 * the reply acknowledges the reply on its FIN. The FIN
			 * goes up as an ACK; nobody acknowledged the FIN, so its
			 * sender sends it again, into the splice by then. */
			if (strip_fin(skb, l4_off) < 0)
				return drop(v, STAT_HELD_DROP);
			stat(STAT_HELD_FIN_STRIPPED);
			if (!payload)
				return TC_ACT_OK;
		}
		if (payload) {
			/* No new byte may enter the socket, but the ACK this
			 * segment carries may be the one the socket's send queue
			 * waits for (a peer that is sending piggybacks its ACKs):
			 * pass the segment up without its payload. Its sender
			 * still retransmits the payload, which nobody
			 * acknowledged. One that cannot be chopped is dropped whole. */
			if (chop_payload(skb, family, l3_off, l4_off, doff, payload) < 0)
				return drop(v, STAT_HELD_DROP);
			stat(STAT_HELD_CHOPPED);
			return TC_ACT_OK;
		}
		stat(STAT_HELD_PASS);
		return TC_ACT_OK;
	}
	if (v->state == SPLICE_DROP)
		return drop(v, STAT_RESPLICE_DROP);
	if (v->state != SPLICE_ACTIVE)
		return NOT_OURS;
	if (ctl_read(v->ctl_slot) == SPLICE_DROP)
		return drop(v, STAT_RESPLICE_DROP);
	if (syn)
		return drop(v, STAT_SYN);

	__u32 seq = bpf_ntohl(th->seq);
	__u32 ack = bpf_ntohl(th->ack_seq);
	/* Payload that starts below the splice point: those bytes were the
	 * proxy's (the SOCKS request, or bytes it relayed before the splice)
	 * and have no place in the other connection. The segment's whole
	 * payload is chopped off and it goes on as a bare ACK carrying its
	 * original (mapped) sequence number. That number lies below what the
	 * receiver has already acknowledged, so the receiver answers with its
	 * current ACK, which reaches the sender through the splice and moves
	 * it past the splice point even if the proxy's own last ACK was lost;
	 * the sender then retransmits whatever lay above the splice point. A
	 * FIN in such a segment is dropped instead (and comes again).
	 *
	 * Only near the splice point: once 1 GiB has crossed this way no
	 * pre-splice byte can still be in flight (a window is at most 1 GiB),
	 * and the 32-bit comparison would call every byte 2 GiB or more past
	 * the splice point "below" it, stalling the stream there. */
	if ((payload || fin) && v->bytes < (1ULL << 30) && seq_before(seq, v->splice_seq)) {
		if (fin)
			return drop(v, STAT_BELOW_SPLICE);
		if (chop_payload(skb, family, l3_off, l4_off, doff, payload) < 0)
			return drop(v, STAT_BELOW_SPLICE);
		stat(STAT_CHOPPED);
		payload = 0;
	}

	/* IPv4 options belong to the incoming hop: removed, as the proxy's own
	 * connection carries none. */
	if (family == AF_INET && ip_hlen != sizeof(struct iphdr)) {
		if (strip_ip_options(skb, l3_off, ip_hlen - sizeof(struct iphdr)) < 0)
			return drop(v, STAT_IP_OPTIONS);
		stat(STAT_IP_OPTIONS_STRIPPED);
		l4_off = l3_off + sizeof(struct iphdr);
	}

	/* The reverse direction: its timestamp offset (for TSecr) and its
	 * FIN (which this segment may acknowledge). */
	struct splice_key rkey;
	build_key(&rkey, family, v->new_daddr, v->new_saddr, v->new_dport, v->new_sport);
	struct splice_val *rev = bpf_map_lookup_elem(&splice_table, &rkey);

	__u32 csum_off = l4_off + offsetof(struct tcphdr, check);
	__u32 new_seq = seq + v->seq_delta;
	__u32 new_ack = ack + v->ack_delta;

	/* Options first (they are read from the packet as it is). Their
	 * checksum delta is folded into the fixed header's below: one
	 * checksum update for the whole TCP header. */
	__s64 odiff = 0;
	__u32 optlen = doff - sizeof(struct tcphdr);
	if (optlen) {
		__u8 old[48] = {}, buf[48] = {};
		/* optlen is a multiple of 4 in [4, 40]; this form keeps the
		 * verifier's bounds at [4, 64] (a plain mask lets clang drop
		 * the non-zero test the verifier needs). */
		optlen = ((optlen - 4) & 0x3c) + 4;
		if (optlen > MAX_OPT)
			return drop(v, STAT_BAD_TCP);
		if (bpf_skb_load_bytes(skb, l4_off + sizeof(struct tcphdr), old, optlen) < 0)
			return drop(v, STAT_BAD_TCP);
		__builtin_memcpy(buf, old, sizeof(buf));
		int found = scan_options(skb, l4_off + sizeof(struct tcphdr), optlen);
		if (found < 0 || map_options(buf, found, v, rev) < 0)
			return drop(v, STAT_BAD_TCP);
		/* One checksum delta over the whole (16-bit aligned) option
		 * area: correct whatever the options' alignment. */
		odiff = bpf_csum_diff((__be32 *)old, optlen, (__be32 *)buf, optlen, 0);
		if (odiff < 0)
			return drop(v, STAT_BAD_TCP);
		if (bpf_skb_store_bytes(skb, l4_off + sizeof(struct tcphdr), buf, optlen, 0) < 0)
			return drop(v, STAT_BAD_TCP);
	}

	/* The fixed TCP header, rewritten whole: one load, one store and one
	 * checksum update (with the options' delta) rather than a helper pair
	 * per field. Both copies carry the same checksum field, so the delta
	 * leaves it out; with size 0 the helper applies a delta exactly as
	 * the per-field form does (ignored for CHECKSUM_PARTIAL, where only
	 * the pseudo-header counts). */
	struct tcphdr oh, nh;
	if (bpf_skb_load_bytes(skb, l4_off, &oh, sizeof(oh)) < 0)
		return drop(v, STAT_BAD_TCP);
	nh = oh;
	nh.seq = bpf_htonl(new_seq);
	if (has_ack)
		nh.ack_seq = bpf_htonl(new_ack);
	nh.window = bpf_htons(rescale_window(bpf_ntohs(o_win), v->wscale_in, v->wscale_out));
	nh.source = v->new_sport;
	nh.dest = v->new_dport;
	__s64 hdiff = bpf_csum_diff((__be32 *)&oh, sizeof(oh), (__be32 *)&nh, sizeof(nh),
				    (__u32)odiff);
	if (hdiff < 0)
		return drop(v, STAT_BAD_TCP);
	if (bpf_skb_store_bytes(skb, l4_off, &nh, sizeof(nh), 0) < 0)
		return drop(v, STAT_BAD_TCP);
	if (bpf_l4_csum_replace(skb, csum_off, 0, (__u32)hdiff, 0) < 0)
		return drop(v, STAT_BAD_TCP);

	/* Addresses: part of the TCP pseudo-header (BPF_F_PSEUDO_HDR, which
	 * also keeps a CHECKSUM_PARTIAL seed right) and, for IPv4, of the IP
	 * header checksum. Source and destination are adjacent in both IP
	 * headers: one delta, one store. */
	if (family == AF_INET) {
		__u32 ip_csum_off = l3_off + offsetof(struct iphdr, check);
		__be32 oa[2] = {saddr[0], daddr[0]};
		__be32 na[2] = {v->new_saddr[0], v->new_daddr[0]};
		__s64 adiff = bpf_csum_diff(oa, sizeof(oa), na, sizeof(na), 0);
		if (adiff < 0)
			return drop(v, STAT_BAD_TCP);
		bpf_l4_csum_replace(skb, csum_off, 0, (__u32)adiff, BPF_F_PSEUDO_HDR);
		bpf_l3_csum_replace(skb, ip_csum_off, 0, (__u32)adiff, 0);
		bpf_skb_store_bytes(skb, l3_off + offsetof(struct iphdr, saddr), na, sizeof(na), 0);
	} else {
		__be32 oa[8], na[8];
		__builtin_memcpy(oa, saddr, 16);
		__builtin_memcpy(oa + 4, daddr, 16);
		__builtin_memcpy(na, v->new_saddr, 16);
		__builtin_memcpy(na + 4, v->new_daddr, 16);
		__s64 adiff = bpf_csum_diff(oa, sizeof(oa), na, sizeof(na), 0);
		if (adiff < 0)
			return drop(v, STAT_BAD_TCP);
		bpf_l4_csum_replace(skb, csum_off, 0, (__u32)adiff, BPF_F_PSEUDO_HDR);
		bpf_skb_store_bytes(skb, l3_off + offsetof(struct ipv6hdr, saddr), na, sizeof(na),
				    0);
	}

	/* Bookkeeping for teardown and RECONNECT. */
	if (payload || fin)
		seq_advance(&v->seq_max, new_seq + payload + (fin ? 1 : 0));
	if (has_ack) {
		seq_advance(&v->last_ack, ack);
		if (rev && (rev->events & SPLICE_EV_FIN) && !seq_before(ack, rev->fin_end))
			__sync_fetch_and_or(&rev->events, SPLICE_EV_FIN_ACKED);
	}
	if (fin) {
		v->fin_end = new_seq + payload + 1;
		__sync_fetch_and_or(&v->events, SPLICE_EV_FIN);
	}
	if (rst)
		__sync_fetch_and_or(&v->events, SPLICE_EV_RST);
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, payload);

	/* Where to: the FIB for the new destination, as if the proxy sent it
	 * from out_ifindex (OUTPUT: an output route lookup, no forwarding
	 * check; the proxy need not be a router). */
	struct bpf_fib_lookup fib = {};
	fib.family = family;
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = v->new_sport;
	fib.dport = v->new_dport;
	fib.ifindex = v->out_ifindex;
	if (family == AF_INET) {
		fib.ipv4_src = v->new_saddr[0];
		fib.ipv4_dst = v->new_daddr[0];
	} else {
		__builtin_memcpy(fib.ipv6_src, v->new_saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, v->new_daddr, 16);
	}
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
		    bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
			return drop(v, STAT_FIB_FAIL);
		stat(STAT_SPLICED);
		return bpf_redirect(fib.ifindex, 0);
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH) {
		/* Let the kernel resolve the neighbour (and queue the packet
		 * meanwhile) instead of guessing a MAC address. */
		stat(STAT_REDIRECT_NEIGH);
		stat(STAT_SPLICED);
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	}
	{
		__u32 k = STAT_FIB_LAST_RC;
		__u64 *c = bpf_map_lookup_elem(&splice_stats, &k);
		if (c)
			*c = rc;
	}
	return drop(v, STAT_FIB_FAIL);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
