/* ICMP errors about sessions (datapath.md "ICMP errors"): outside -> inside (a router's error
 * about an outbound packet), inside -> outside (a host's error about a reply) and egress (the
 * gateway's own error about a translated reply).  The embedded packet is rewritten together
 * with the outer header; every changed word of the ICMP payload is folded into the ICMP
 * checksum, so a wrong checksum stays wrong. */
#pragma once
#include "nat.h"

struct icmp_inner {
	__u32 ip;       /* offset of the embedded IP header */
	__u32 l4;       /* offset of the embedded L4 header */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;   /* TCP/UDP source port; echo: identifier */
	__be16 dport;
	__u8 proto;
	__u8 type;      /* embedded ICMP type */
};

/* -1 when the embedded header and 8 bytes of its L4 are present, PARSE_PULL when they are not
 * linear yet, else DROP_MALFORMED */
static __always_inline int icmp_parse_inner(struct __sk_buff *skb, const struct pkt *p, struct icmp_inner *in)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 off = p->l4 + 8, ihl;
	struct iphdr *ih;
	__u8 *l4;

	if (off > ETH_HLEN + 60 + 8) /* verifier: bound the variable offset */
		return REASON_DROP_MALFORMED;
	ih = data + off;
	if (off + 20 > p->end)
		return REASON_DROP_MALFORMED;
	PARSE_NEED(ih, sizeof(*ih), REASON_DROP_MALFORMED);
	ihl = ih->ihl * 4;
	if (ihl < 20 || off + ihl + 8 > p->end) /* the quoted version is not checked */
		return REASON_DROP_MALFORMED;
	in->ip = off;
	in->l4 = off + ihl;
	if (in->l4 > ETH_HLEN + 60 + 8 + 60)
		return REASON_DROP_MALFORMED;
	l4 = data + in->l4;
	PARSE_NEED(l4, 8, REASON_DROP_MALFORMED);
	if (ih->protocol == IPPROTO_TCP_ && in->l4 + 18 <= p->end) /* its checksum is rewritten too */
		PARSE_NEED(l4, 18, REASON_DROP_MALFORMED);
	in->saddr = ih->saddr;
	in->daddr = ih->daddr;
	in->proto = ih->protocol;
	in->type = 0;
	in->sport = in->dport = 0;
	if (in->proto == IPPROTO_ICMP_) {
		in->type = l4[0];
		in->sport = *(__be16 *)(l4 + 4);
	} else {
		in->sport = *(__be16 *)l4;
		in->dport = *(__be16 *)(l4 + 2);
	}
	return -1;
}

static __always_inline int icmp_parse_inner_pulled(struct __sk_buff *skb, const struct pkt *p,
						   struct icmp_inner *in)
{
	int r = icmp_parse_inner(skb, p, in);

	if (r == PARSE_PULL) {
		parse_pull(skb);
		r = icmp_parse_inner(skb, p, in);
	}
	return r == PARSE_PULL ? REASON_DROP_MALFORMED : r;
}

/* Key of the session an error is about.  about_reply=0: the embedded packet left through us
 * (SNAT:port -> remote:rport): IN key.  about_reply=1: it is a translated reply
 * (remote:rport -> inside:port): OUT key.  0 on success, -1 when it cannot be ours. */
static __always_inline int icmp_inner_key(const struct icmp_inner *in, int about_reply, struct ct_key *k)
{
	k->saddr = in->daddr;
	k->daddr = in->saddr;
	k->proto = in->proto;
	k->dir = about_reply ? CT_DIR_OUT : CT_DIR_IN;
	k->pad = 0;
	if (in->proto == IPPROTO_TCP_ || in->proto == IPPROTO_UDP_) {
		k->sport = in->dport;
		k->dport = in->sport;
		return 0;
	}
	if (in->proto != IPPROTO_ICMP_) { /* a protocol without ports: its session has ports 0 */
		k->sport = k->dport = 0;
		return 0;
	}
	/* a query: outbound request (echo 8, 13, 15, 17) or reply (0, 14, 16, 18) toward the inside */
	if (about_reply ? !is_icmp_query_reply(in->type) : !is_icmp_query_request(in->type))
		return -1;
	k->sport = about_reply ? in->sport : 0;
	k->dport = about_reply ? 0 : in->sport;
	return 0;
}

/* Rewrite an ICMP error.  outer: 1 = outer saddr, 0 = outer daddr, -1 = leave the outer
 * addresses (egress).  inner_src: rewrite the embedded saddr+sport (1) or daddr+dport (0). */
static __always_inline int icmp_err_rewrite(struct __sk_buff *skb, const struct pkt *p,
					    const struct icmp_inner *in, int outer, int inner_src,
					    __be32 addr, __be16 port, int dec_ttl)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	struct iphdr *ih;
	__u32 ioff = in->ip, l4 = in->l4, coff = p->l4;
	__be32 old_a;
	__be16 old_w, old_c, new_c, old_p;
	__u64 d = 0, cd, ld;
	__be16 *pp, *cs, *ic;

	if ((void *)(iph + 1) > data_end)
		return -1;
	if (outer >= 0) {
		if (outer) {
			old_a = iph->saddr;
			iph->saddr = addr;
		} else {
			old_a = iph->daddr;
			iph->daddr = addr;
		}
		d += csum_delta4(old_a, addr);
	}
	if (dec_ttl) {
		old_w = *(__be16 *)&iph->ttl;
		iph->ttl--;
		d += csum_delta2(old_w, *(__be16 *)&iph->ttl);
	}
	if (d)
		iph->check = csum_apply(iph->check, d);

	/* verifier: bound every variable offset */
	if (ioff > ETH_HLEN + 60 + 8 || l4 > ETH_HLEN + 60 + 8 + 60 || coff > ETH_HLEN + 60)
		return -1;
	ih = data + ioff;
	if ((void *)(ih + 1) > data_end)
		return -1;
	if (inner_src) {
		old_a = ih->saddr;
		ih->saddr = addr;
	} else {
		old_a = ih->daddr;
		ih->daddr = addr;
	}
	old_c = ih->check;
	ih->check = csum_apply(old_c, csum_delta4(old_a, addr));
	cd = csum_delta4(old_a, addr) + csum_delta2(old_c, ih->check);
	if (!has_ports(in->proto)) /* a protocol without ports: the inner address only */
		goto icmp_sum;

	pp = data + l4 + (in->proto == IPPROTO_ICMP_ ? 4 : (inner_src ? 0 : 2));
	if ((void *)(pp + 1) > data_end)
		return -1;
	old_p = *pp;
	*pp = port;
	cd += csum_delta2(old_p, port);
	ld = csum_delta2(old_p, port);
	if (in->proto == IPPROTO_TCP_) {
		ld += csum_delta4(old_a, addr); /* pseudo-header */
		cs = data + l4 + 16;
		if (l4 + 18 <= p->end && (void *)(cs + 1) <= data_end) {
			old_c = *cs;
			*cs = new_c = csum_apply(old_c, ld);
			cd += csum_delta2(old_c, new_c);
		}
	} else if (in->proto == IPPROTO_UDP_) {
		ld += csum_delta4(old_a, addr);
		cs = data + l4 + 6;
		if ((void *)(cs + 1) <= data_end && *cs != 0) { /* zero: no checksum, stays zero */
			old_c = *cs;
			new_c = csum_apply(old_c, ld);
			*cs = new_c = new_c ? new_c : 0xffff;
			cd += csum_delta2(old_c, new_c);
		}
	} else { /* embedded echo: its own checksum covers the identifier */
		cs = data + l4 + 2;
		if ((void *)(cs + 1) <= data_end) {
			old_c = *cs;
			*cs = new_c = csum_apply(old_c, ld);
			cd += csum_delta2(old_c, new_c);
		}
	}
icmp_sum:
	ic = data + coff + 2;
	if ((void *)(ic + 1) > data_end)
		return -1;
	*ic = csum_apply(*ic, cd);
	return 0;
}

/* outside -> inside: a router's error about a packet that left through us */
static __noinline int icmp_err_v4_outside(struct __sk_buff *skb, struct pkt *p, struct snat_res *v)
{
	struct icmp_inner in = {};
	struct ct_key k;
	struct ct_entry *e;
	int r = icmp_parse_inner_pulled(skb, p, &in);

	if (r >= 0)
		return verdict_set(v, VERDICT_DROP, r);
	/* sent to the quoted packet's source, the SNAT address (the kernel's conntrack checks the
	 * outer destination too): else not about the session, and the inbound guard judges it */
	if (p->daddr != in.saddr || icmp_inner_key(&in, 0, &k) < 0 || !(e = ct_lookup4(&k)))
		return verdict_set(v, VERDICT_PASS, REASON_PASS_NO_SESSION_IN);
	if (p->ttl <= 1)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_TTL);
	if (icmp_err_rewrite(skb, p, &in, 0, 1, e->rw_addr, e->rw_port, 1) < 0)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_MALFORMED);
	stats_rule(e->rule_id, p->len, 0);
	return verdict_redirect(v, REASON_XLATE_ICMP_ERR_IN, e->ifindex, e->nexthop);
}

/* An inside host's error about the reply of session `e` (its OUT entry) that is not that
 * session's to send: it came in by another device than the one the session's replies go to
 * (the IN entry's ifindex, all 32 bits: a host on another inside device would send into that
 * session with its SNAT address, edge invariant 3), or it is not addressed to the reply's
 * source (the kernel's conntrack checks that too).  NULL: foreign (no session), else the
 * session's IN entry.  One lookup more, on this rare path only. */
static __always_inline struct ct_entry *icmp_err_back(struct __sk_buff *skb, const struct pkt *p,
						      const struct icmp_inner *in, struct ct_entry *e)
{
	struct ct_entry *back;

	if (p->daddr != in->saddr)
		return NULL;
	back = ct_lookup4(&e->peer);
	return back && back->ifindex == skb->ingress_ifindex ? back : NULL;
}

/* An error only the quoted packet's destination host sends (RFC 792/1122: protocol and port
 * unreachable, fragment reassembly time exceeded; layout.ICMP_HOST_ONLY_ERRORS).  A router
 * between us and the host never sends these about a packet it forwards, so from inside such
 * an error about a reply is the session's only from the reply's destination (in->daddr, the
 * session's inside host): else a neighbour on the host's link tells the remote that the
 * host's port is closed (edge invariant 3).  The code byte is read here, not kept in pkt.
 * (When the host is on-link no router stands between us at all: icmp_err_v4_reply then
 * holds every kind to the host.) */
static __always_inline int icmp_err_host_only(struct __sk_buff *skb, const struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 off = p->l4;
	__u8 *c;

	if (off > ETH_HLEN + 60) /* verifier: bound the variable offset */
		return 0;
	c = data + off;
	if ((void *)(c + 2) > data_end)
		return 0;
	return (c[0] == 3 && (c[1] == 2 || c[1] == 3)) || (c[0] == 11 && c[1] == 1);
}

/* inside -> outside (egress=0), or the gateway's own error on the way out (egress=1) */
static __noinline int icmp_err_v4_reply(struct __sk_buff *skb, struct pkt *p, struct snat_res *v, int egress)
{
	struct icmp_inner in = {};
	struct ct_key k;
	struct ct_entry *e, *back = NULL;
	int r = icmp_parse_inner_pulled(skb, p, &in);

	if (r >= 0)
		return verdict_set(v, VERDICT_DROP, r);
	if (icmp_inner_key(&in, 1, &k) < 0 || !(e = ct_lookup4(&k)) ||
	    (!egress && !(back = icmp_err_back(skb, p, &in, e)))) {
		verdict_set(v, VERDICT_PASS, REASON_PASS_ICMP_OTHER);
		return !egress; /* inside: the caller classifies an error about no session */
	}
	/* not from the session's inside host: a kind only that host sends, or any kind when the
	 * host is on-link (the IN entry's next hop, the route back found at creation, is the host
	 * itself: no router between us and it could have seen the reply) */
	if (back && p->saddr != in.daddr && (back->nexthop == in.daddr || icmp_err_host_only(skb, p)))
		return verdict_set(v, VERDICT_DROP, REASON_DROP_ICMP_NOT_FROM_HOST);
	if (!egress && p->ttl <= 1)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_TTL);
	if (icmp_err_rewrite(skb, p, &in, egress ? -1 : 1, 0, e->rw_addr, e->rw_port, !egress) < 0)
		return verdict_set(v, egress ? VERDICT_PASS : VERDICT_DROP, REASON_DROP_MALFORMED);
	stats_rule(e->rule_id, p->len, 0);
	if (egress)
		return verdict_set(v, VERDICT_PASS, REASON_XLATE_ICMP_ERR_OUT);
	return verdict_redirect(v, REASON_XLATE_ICMP_ERR_OUT, e->ifindex, e->nexthop);
}
