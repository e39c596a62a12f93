/* Packet parsing: Ethernet + IPv4 + the first bytes of TCP/UDP/ICMP into struct pkt.
 * Contract (datapath.md steps 1-2): returns -1 when the packet is a well-formed IPv4 packet,
 * PARSE_PULL when its headers are not linear yet, else the reason (PASS_NOT_IPV4 or
 * DROP_MALFORMED).  Every read is bounds-checked right
 * before it; offsets are from skb->data. */
#pragma once
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "snat_layout.h"

#define IPPROTO_ICMP_ 1
#define IPPROTO_TCP_ 6
#define IPPROTO_UDP_ 17
#define IP_MF 0x2000
#define IP_DF 0x4000
#define IP_OFFMASK 0x1fff

/* Bytes made linear up front: Ethernet, IP with options, ICMP header, inner IP with
 * options and 18 bytes of inner TCP (the most any path reads). */
#define SNAT_PULL_LEN (ETH_HLEN + 60 + 8 + 60 + 20)

enum { FRAG_NONE = 0, FRAG_FIRST = 1, FRAG_LATER = 2 };

struct pkt {
	__u32 l4;         /* offset of the L4 header (ETH_HLEN + IHL*4) */
	__u32 end;        /* offset just past the IP datagram (ETH_HLEN + total length) */
	__u32 len;        /* IP total length */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;     /* TCP/UDP source port; ICMP echo: identifier */
	__be16 dport;     /* TCP/UDP destination port; ICMP: 0 */
	__be16 ipid;
	__u8 proto;
	__u8 ttl;
	__u8 frag;        /* FRAG_* */
	__u8 df;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 l4hdr;       /* TCP header length (data offset * 4), UDP 8, else 0 */
	__u8 opts_kernel; /* IP options the kernel must judge (ip_opts_to_kernel) */
	/* the reverse-path check's route to the source (step 2a, guard_v4_spoof), which a new
	 * session's route back reuses under CFG_F_BACK_FROM_RPF: its MTU (ct_mtu) or 0 when the
	 * check made no FIB lookup, and its next hop; not parse_v4's */
	__u16 back_mtu;
	__be32 back_nh;
};

static __always_inline int is_icmp_error(__u8 type)
{
	return type == 3 || type == 4 || type == 11 || type == 12;
}

/* ICMP queries with an identifier, translated like echo: echo 8, timestamp 13, information 15,
 * address mask 17, and their replies 0, 14, 16, 18 */
static __always_inline int is_icmp_query_request(__u8 type)
{
	return type == 8 || type == 13 || type == 15 || type == 17;
}

static __always_inline int is_icmp_query_reply(__u8 type)
{
	return type == 0 || type == 14 || type == 16 || type == 18;
}

/* multicast (224.0.0.0/4) or the limited broadcast: never forwarded */
static __always_inline int is_multi_or_broadcast(__be32 daddr)
{
	return (daddr & bpf_htonl(0xf0000000)) == bpf_htonl(0xe0000000) || daddr == 0xffffffff;
}

/* TCP, UDP, ICMP: translated with ports or identifiers; any other protocol: address only */
static __always_inline int has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_ || proto == IPPROTO_ICMP_;
}

/* A parser returns PARSE_PULL when the bytes it needs are in the skb but not in its linear
 * part (a paged/GRO skb); the caller then makes up to SNAT_PULL_LEN bytes linear and parses
 * again, so the pull is paid only by such packets. */
#define PARSE_PULL (-2)

/* bytes [ptr, ptr + n) must be readable, else return PARSE_PULL or ``fail`` */
#define PARSE_NEED(ptr, n, fail)                                                                \
	do {                                                                                    \
		if ((void *)(ptr) + (n) > data_end)                                             \
			return skb->len > (__u32)(data_end - data) ? PARSE_PULL : (fail);       \
	} while (0)

static __always_inline void parse_pull(struct __sk_buff *skb)
{
	bpf_skb_pull_data(skb, skb->len < SNAT_PULL_LEN ? skb->len : SNAT_PULL_LEN);
}

/* Step 2b: IP options the kernel must judge, 1 or 0 (called only when IHL > 5): a source route (LSRR 131, SSRR 137: the kernel drops it unless accept_source_route
 * is on, as forwarding would; translated, it would carry the sender's route through the
 * gateway) or options that do not parse (a length byte missing, below 2 or past the header:
 * the kernel answers a parameter problem).  At most 40 steps, each at least one byte on; the
 * options are copied (bpf_skb_load_bytes): a rare packet's cost, and no pull needed. */
struct opt_scan {
	__u8 o[64]; /* the options (up to 40 bytes), indices masked to 63 (verifier) */
	__u32 i; /* offset of the next option */
	__u32 n; /* bytes of options */
	int res; /* the answer */
};

/* one option of ip_opts_to_kernel's scan (bpf_loop: verified once, not per step) */
static long ip_opt_step(__u32 k, void *ctx)
{
	struct opt_scan *s = ctx;
	__u32 i = s->i, len;
	__u8 type;

	if (i >= s->n)
		return 1;
	type = s->o[i & 63];
	if (type == 0) /* end of the options list */
		return 1;
	if (type == 1) { /* no-operation */
		s->i = i + 1;
		return 0;
	}
	if (i + 1 >= s->n) {
		s->res = 1;
		return 1;
	}
	len = s->o[(i + 1) & 63];
	if (len < 2 || i + len > s->n || type == 131 || type == 137) {
		s->res = 1;
		return 1;
	}
	s->i = i + len;
	return 0;
}

static __noinline int ip_opts_to_kernel(struct __sk_buff *skb, __u32 ihl)
{
	struct opt_scan s = {};

	s.n = ihl - 20;
	if (s.n == 0 || s.n > 40 || bpf_skb_load_bytes(skb, ETH_HLEN + 20, s.o, s.n))
		return 1;
	bpf_loop(40, ip_opt_step, &s, 0);
	return s.res;
}

static __always_inline int parse_v4(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 present, ihl, off;

	PARSE_NEED(eth, sizeof(*eth), REASON_PASS_NOT_IPV4);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return REASON_PASS_NOT_IPV4;
	/* as the model: the version decides when there is a byte; an empty packet is malformed */
	if (skb->len > ETH_HLEN)
		PARSE_NEED(iph, 1, REASON_DROP_MALFORMED);
	if ((void *)iph + 1 <= data_end && (*(__u8 *)iph >> 4) != 4)
		return REASON_PASS_NOT_IPV4;
	PARSE_NEED(iph, sizeof(*iph), REASON_DROP_MALFORMED);
	ihl = iph->ihl * 4;
	p->len = bpf_ntohs(iph->tot_len);
	present = skb->len - ETH_HLEN;
	if (ihl < 20 || p->len < ihl || p->len > present)
		return REASON_DROP_MALFORMED;
	p->l4 = ETH_HLEN + ihl;
	p->end = ETH_HLEN + p->len;
	p->saddr = iph->saddr;
	p->daddr = iph->daddr;
	p->ipid = iph->id;
	p->proto = iph->protocol;
	p->ttl = iph->ttl;
	off = bpf_ntohs(iph->frag_off);
	p->df = !!(off & IP_DF);
	p->frag = (off & IP_OFFMASK) ? FRAG_LATER : ((off & IP_MF) ? FRAG_FIRST : FRAG_NONE);
	p->sport = p->dport = 0;
	p->tcp_flags = p->icmp_type = p->l4hdr = 0;
	p->opts_kernel = 0;
	if (ihl > 20) {
		p->opts_kernel = ip_opts_to_kernel(skb, ihl);
	}
	if (p->frag == FRAG_LATER)
		return -1;

	off = p->l4;
	if (off > ETH_HLEN + 60) /* verifier: bound the variable offset */
		return REASON_DROP_MALFORMED;
	if (p->proto == IPPROTO_TCP_) {
		__u8 *t = data + off;

		if (off + 20 > p->end)
			return REASON_DROP_MALFORMED;
		PARSE_NEED(t, 20, REASON_DROP_MALFORMED);
		if ((t[12] >> 4) < 5)
			return REASON_DROP_MALFORMED;
		p->sport = *(__be16 *)t;
		p->dport = *(__be16 *)(t + 2);
		p->tcp_flags = t[13];
		p->l4hdr = (t[12] >> 4) * 4;
	} else if (p->proto == IPPROTO_UDP_) {
		__u8 *u = data + off;

		if (off + 8 > p->end)
			return REASON_DROP_MALFORMED;
		PARSE_NEED(u, 8, REASON_DROP_MALFORMED);
		p->sport = *(__be16 *)u;
		p->dport = *(__be16 *)(u + 2);
		p->l4hdr = 8;
	} else if (p->proto == IPPROTO_ICMP_) {
		__u8 *c = data + off;

		if (off + 8 > p->end)
			return REASON_DROP_MALFORMED;
		PARSE_NEED(c, 8, REASON_DROP_MALFORMED);
		p->icmp_type = c[0];
		if (is_icmp_query_request(c[0]) || is_icmp_query_reply(c[0]))
			p->sport = *(__be16 *)(c + 4); /* query identifier */
	}
	return -1;
}
