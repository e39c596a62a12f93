/* Incremental Internet checksum updates (RFC 1624 eqn. 3, as the kernel's csum_replace*):
 * HC' = ~(~HC + ~m + m').  Values are raw wire-order words; one's-complement sums do not care
 * about byte order as long as every term is in the same order.  L4 checksums of translated
 * TCP/UDP/echo use the bpf_l4_csum_replace helper instead, which also handles
 * CHECKSUM_PARTIAL skbs; these are for the IP header and ICMP error payloads. */
#pragma once
#include <linux/types.h>

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
