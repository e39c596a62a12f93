/* Incremental Internet checksum updates (RFC 1624 eqn. 3, as the kernel's csum_replace*):
 * HC' = ~(~HC + ~m + m').  Values are raw wire-order words; one's-complement sums do not care
 * about byte order as long as every term is in the same order.  L4 checksums of translated
 * TCP/UDP/echo use the bpf_l4_csum_replace helper instead, which also handles
 * CHECKSUM_PARTIAL skbs; these are for the IP header and ICMP error payloads. */
#pragma once
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold32(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* The value of a checksum field, now 0, inside [from, from + len) (len a multiple of 4) that a
 * checksum fill-in over that range (skb_checksum_help, a NIC's or virtio host's offload: F =
 * ~(T + F), T the sum of the rest) leaves as it is: T = ~F + ~F, so F = ~(T halved), and
 * halving in ones' complement is a 16-bit rotate right (byte order does not matter: doubling
 * is an addition).  Never 0: a fill-in writes a 0 sum as 0xffff. */
static __always_inline __u16 csum_fixed_point(const void *from, __u32 len)
{
	__u16 t = csum_fold32((__u64)(__u32)bpf_csum_diff(NULL, 0, (__be32 *)from, len, 0));
	__u16 f = (__u16)~((t >> 1) | (t << 15));

	return f ? f : 0xffff;
}

/* the sum of (~old + new) over one 32-bit word, to accumulate several changes */
static __always_inline __u64 csum_delta4(__be32 from, __be32 to)
{
	return (__u64)(__u32)~from + (__u64)to;
}

static __always_inline __u64 csum_delta2(__be16 from, __be16 to)
{
	return (__u64)(__u16)~from + (__u64)to;
}

/* apply an accumulated delta to a checksum field value */
static __always_inline __u16 csum_apply(__u16 check, __u64 delta)
{
	/* ~check as a 32-bit word (high half all ones), as the kernel's ~csum_unfold(): the sum is
	 * then never zero, so +0/-0 come out as with csum_replace4 applied change by change */
	return (__u16)~csum_fold32((__u64)(__u32)~(__u32)check + delta);
}

/* May the L4 checksum be patched by hand?  Only when the skb is CHECKSUM_NONE or
 * CHECKSUM_UNNECESSARY: a CHECKSUM_PARTIAL field holds only the pseudo-header sum (a port
 * change must not touch it) and CHECKSUM_COMPLETE needs skb->csum adjusted for the
 * pseudo-header, which only bpf_l4_csum_replace does.  By hand saves two helper calls
 * (about 50 ns per packet here); ip_summed is read through bpf_cast_to_kern_ctx (6.3+) with a
 * CO-RE bitfield read.  SNAT_NO_KERN_CTX builds (older kernels) always use the helper. */
#ifndef SNAT_NO_KERN_CTX
#include <bpf/bpf_core_read.h>

struct sk_buff___snat {
	union {
		__u32 csum;
		struct {
			__u16 csum_start; /* CHECKSUM_PARTIAL: where the sum starts, from head */
			__u16 csum_offset; /* and where it goes, from csum_start */
		};
	};
	__u16 mac_header; /* from head: at TC ingress the program's offset 0 */
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline int csum_by_hand(struct __sk_buff *skb)
{
	struct sk_buff___snat *k = bpf_cast_to_kern_ctx(skb);

	return BPF_CORE_READ_BITFIELD(k, ip_summed) < 2; /* CHECKSUM_NONE, _UNNECESSARY */
}

/* A CHECKSUM_PARTIAL skb (a local sender left its L4 checksum to the offload): 1 with
 * *start = where the checksum's sum begins (offset from the Ethernet header, as the program
 * sees the packet) and *off = where the sum is written from there, else 0.  Whoever sends the
 * skb on without that offload (a device with `tx off`, a NIC, a virtio host) fills the sum in
 * there, whatever the bytes then are. */
static __always_inline int csum_partial_at(struct __sk_buff *skb, __u32 *start, __u32 *off)
{
	struct sk_buff___snat *k = bpf_cast_to_kern_ctx(skb);

	if (BPF_CORE_READ_BITFIELD(k, ip_summed) != 3) /* CHECKSUM_PARTIAL */
		return 0;
	*start = (__u16)(k->csum_start - k->mac_header); /* direct CO-RE loads: no stack */
	*off = k->csum_offset;
	return 1;
}
#else
static __always_inline int csum_by_hand(struct __sk_buff *skb)
{
	return 0;
}

static __always_inline int csum_partial_at(struct __sk_buff *skb, __u32 *start, __u32 *off)
{
	return 0; /* not known without kernel context: errors are built as for a finished sum */
}
#endif
