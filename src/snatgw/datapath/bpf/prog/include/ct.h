/* Sessions: ct_key building, lookup, the TCP state machine (the generated tcp_fsm table) and
 * the pair insert (IN key first, then OUT; the IN key is removed again if OUT fails). */
#pragma once
#include "maps.h"
#include "parse.h"

#define TCP_FIN_ 0x01
#define TCP_SYN_ 0x02
#define TCP_RST_ 0x04
#define TCP_ACK_ 0x10

/* OUT key of a packet leaving through the gateway (inside host -> remote) */
static __always_inline void ct_key_out(struct ct_key *k, const struct pkt *p)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	k->sport = p->sport; /* echo: identifier */
	k->dport = p->dport; /* echo: 0 */
	k->proto = p->proto;
	k->dir = CT_DIR_OUT;
	k->pad = 0;
}

/* IN key of a reply (remote -> SNAT addr); echo reply: (remote, SNAT, 0, SNAT id) */
static __always_inline void ct_key_in(struct ct_key *k, const struct pkt *p)
{
	k->saddr = p->saddr;
	k->daddr = p->daddr;
	if (p->proto == IPPROTO_ICMP_) {
		k->sport = 0;
		k->dport = p->sport; /* parse puts the echo identifier in sport */
	} else {
		k->sport = p->sport;
		k->dport = p->dport;
	}
	k->proto = p->proto;
	k->dir = CT_DIR_IN;
	k->pad = 0;
}

/* event by priority RST > SYN > FIN > ACK; -1 when no flag is set */
static __always_inline int ct_tcp_event(__u8 flags)
{
	if (flags & TCP_RST_)
		return TCP_EV_RST;
	if (flags & TCP_SYN_)
		return TCP_EV_SYN;
	if (flags & TCP_FIN_)
		return TCP_EV_FIN;
	if (flags & TCP_ACK_)
		return TCP_EV_ACK;
	return -1;
}

static __always_inline __u8 ct_tcp_next(__u8 state, __u32 table, __u8 flags)
{
	int ev = ct_tcp_event(flags);

	if (ev < 0)
		return CT_CLOSE; /* the original closes on a segment with no flag */
	if (state >= TCP_STATE_COUNT || table > TCP_TBL_IN_ONLY) /* verifier: bound the index */
		return CT_CLOSE;
	return tcp_fsm[table][ev & 3][state];
}

static __always_inline struct ct_entry *ct_lookup4(const struct ct_key *k)
{
	return bpf_map_lookup_elem(&snat_ct, k);
}

/* ct_entry.mtu is 16 bits (memory per session); an MTU above 65535 (loopback's 65536) is
 * kept as 65535, which judges every IPv4 packet (tot_len <= 65535) the same way. */
static __always_inline __u16 ct_mtu(__u32 mtu)
{
	return mtu > 0xffff ? 0xffff : mtu;
}
