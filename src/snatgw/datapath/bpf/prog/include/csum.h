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
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline int csum_by_hand(struct __sk_buff *skb)
{
	struct sk_buff___snat *k = bpf_cast_to_kern_ctx(skb);

	return BPF_CORE_READ_BITFIELD(k, ip_summed) < 2; /* CHECKSUM_NONE, _UNNECESSARY */
}
#else
static __always_inline int csum_by_hand(struct __sk_buff *skb)
{
	return 0;
}
#endif
