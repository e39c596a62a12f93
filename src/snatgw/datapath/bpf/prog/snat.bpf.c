// SPDX-License-Identifier: GPL-2.0
/* snatgw TC datapath: snat_inside (ingress of inside devices), snat_outside (ingress of the
 * uplinks) and snat_egress (egress of the uplinks, ICMP errors the gateway generates).
 * Behaviour is docs/datapath.md step by step; the Python model implements the same contract. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "snat_layout.h"
#include "maps.h"
#include "parse.h"
#include "ct.h"
#include "nat.h"
#include "fib.h"
#include "rules.h"
#include "eim.h"
#include "icmp.h"
#include "stats.h"
#include "audit.h"

char LICENSE[] SEC("license") = "GPL"; /* bpf_redirect_neigh and bpf_fib_lookup are GPL-only */

/* A redirected packet leaves with its IP total length's bytes only: link padding after it
 * (the sender's, or its NIC driver's stale memory: "Etherleak") is cut, as the kernel cuts
 * it before forwarding (model: engine.trimmed).  A load and a compare per redirect; the
 * helper only for a padded frame (never a GSO one: its tot_len covers it all). */
static __always_inline void snat_trim(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 end;

	if ((void *)(iph + 1) > data_end)
		return;
	end = ETH_HLEN + bpf_ntohs(iph->tot_len);
	if (skb->len > end && end >= ETH_HLEN + 20 && !skb->gso_size)
		bpf_skb_change_tail(skb, end, 0);
}

/* Count the reason and turn the verdict into a TC action (redirects happen here). */
static __always_inline int snat_emit(struct __sk_buff *skb, struct snat_res *v)
{
	stats_reason(v->reason);
#ifdef SNAT_TEST
	__u32 zero = 0;

	bpf_map_update_elem(&snat_dbg, &zero, v, BPF_ANY);
#endif
	if (v->verdict == VERDICT_DROP)
		return TC_ACT_SHOT;
	if (v->verdict != VERDICT_REDIRECT)
		return TC_ACT_OK;
	snat_trim(skb);
	if (v->reason == REASON_FRAG_HELD) /* to the recirculation device's qdisc (frag_v4_hold) */
		return bpf_redirect(v->ifindex, 0);
	if (v->nexthop) {
		struct bpf_redir_neigh nh = { .nh_family = AF_INET_, .ipv4_nh = v->nexthop };

		return bpf_redirect_neigh(v->ifindex, &nh, sizeof(nh), 0);
	}
	return bpf_redirect_neigh(v->ifindex, NULL, 0, 0);
}

/* Longer than the egress MTU?  A GRO aggregate (gso_size set) leaves as segments of
 * gso_size payload bytes behind the same headers, so it is judged by one segment, not by
 * its total length: otherwise every aggregated segment of an established TCP flow
 * would be handed to the kernel untranslated. */
static __always_inline int snat_over_mtu(struct __sk_buff *skb, const struct pkt *p, __u32 mtu)
{
	__u32 gso = skb->gso_size;

	if (gso)
		return gso + (p->l4 - ETH_HLEN) + p->l4hdr > mtu;
	return p->len > mtu;
}

/* Step 4 and 8: PASS, or DROP_UNMATCHED under `unmatched drop`. */
static __always_inline int snat_unmatched(struct snat_res *v, __u32 reason)
{
	__u32 zero = 0;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);

	if (cfg && (cfg->flags & CFG_F_UNMATCHED_DROP))
		return verdict_set(v, VERDICT_DROP, REASON_DROP_UNMATCHED);
	return verdict_set(v, VERDICT_PASS, reason);
}

#define HAIRPIN_LAST 0x100 /* snat_v4_hairpin's second call: no session there is a drop */

/* The session of the mapping a hairpinned packet is sent to, made (filtering aside: the sender
 * is inside); its own frame keeps the hairpin path within the verifier's stack limit */
static __noinline int eim_hairpin_admit(struct __sk_buff *skb, const struct pkt *p, __be32 nat, __be16 nport)
{
	struct eim_scratch *sc = eim_scratch_get();

	if (!sc || eim_mapping_of(p->daddr, p->dport, p->proto, &sc->h))
		return 1;
	return eim_admit(skb, sc, nat, nport, p->proto | 0x100);
}

/* A packet of a hairpinned session (CT_F_HAIRPIN): the session of the mapping it is sent to
 * (its IN key after the sender's translation; made now when missing, filtering aside: the
 * sender is inside) first, then translated outward by the sender's session (its mapping as
 * source, TTL-1) and inward by that session, and REDIRECTed to its endpoint's device,
 * XLATE_HAIRPIN.  No such session: DROP_NO_SESSION. */
static __noinline int snat_v4_hairpin(struct __sk_buff *skb, struct pkt *p, struct ct_entry *e,
				      struct snat_res *v, __u32 reason)
{
	struct eim_scratch *sc = eim_scratch_get();
	struct ct_entry *in, *o;
	__be32 nat = e->rw_addr, to;
	__be16 nport = e->rw_port, toport;
	__u32 oif;
	__be32 nh;
	__u64 now;
	int made;

	if (!sc)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_NO_SESSION);
	sc->ikey.saddr = nat;
	sc->ikey.daddr = p->daddr;
	sc->ikey.sport = nport;
	sc->ikey.dport = p->dport;
	sc->ikey.proto = p->proto;
	sc->ikey.dir = CT_DIR_IN;
	sc->ikey.pad = 0;
	in = ct_lookup4(&sc->ikey);
	if (!in && !(reason & HAIRPIN_LAST))
		return 1; /* the caller makes it (eim_hairpin_admit) and comes again */
	made = !!(reason & HAIRPIN_LAST); /* (on the second call, the session was just made) */
	reason &= ~HAIRPIN_LAST;
	o = in ? ct_lookup4(&in->peer) : NULL;
	if (!in || !o) { /* the sender's new session stays (and counts): its next packet tries again */
		if (reason == REASON_XLATE_NEW)
			stats_rule_session(e->rule_id);
		return verdict_set(v, VERDICT_DROP, REASON_DROP_NO_SESSION);
	}
	if (p->proto == IPPROTO_TCP_) {
		if (reason == REASON_XLATE_OUT)
			e->state = ct_tcp_next(e->state, (e->flags & CT_F_REPLIED) ? TCP_TBL_IN : TCP_TBL_IN_ONLY,
					       p->tcp_flags);
		o->state = ct_tcp_next(o->state, TCP_TBL_OUT, p->tcp_flags);
	}
	o->flags |= CT_F_REPLIED;
	in->flags |= CT_F_REPLIED;
	now = snat_now();
	e->last_seen = now;
	in->last_seen = now;
	to = in->rw_addr;
	toport = in->rw_port;
	oif = in->ifindex;
	nh = in->nexthop;
	stats_rule(e->rule_id, p->len, reason == REASON_XLATE_NEW);
	stats_rule(in->rule_id, p->len, made);
	if (snat_v4_rewrite(skb, p, 1, nat, nport, 0) < 0 || snat_v4_rewrite(skb, p, 0, to, toport, 1) < 0)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_MALFORMED);
	if (p->frag == FRAG_FIRST)
		frag_remember(p, nat, to, oif, nh, now);
	return verdict_redirect(v, REASON_XLATE_HAIRPIN, oif, nh);
}

static __noinline int snat_refuse_icmp(struct __sk_buff *skb, const struct pkt *p, struct snat_res *v,
				       __u32 frag_mtu);

/* Established outbound packet: session checks, TCP state, translate, send. */
static __always_inline int snat_v4_out_established(struct __sk_buff *skb, struct pkt *p,
						   struct ct_entry *e, struct snat_res *v, __u32 reason)
{
	if (p->ttl <= 1)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_TTL);
	if (e->flags & CT_F_HAIRPIN) {
		if (snat_v4_hairpin(skb, p, e, v, reason) > 0) { /* the mapping's session: not yet */
			eim_hairpin_admit(skb, p, e->rw_addr, e->rw_port);
			snat_v4_hairpin(skb, p, e, v, reason | HAIRPIN_LAST);
		}
		return 0;
	}
	if (snat_over_mtu(skb, p, e->mtu) && p->df) /* new_gw: the kernel's route is not the session's */
		return snat_refuse_icmp(skb, p, v, (e->flags & CT_F_NEW_GW) && e->mtu > 1 ? e->mtu : 1);
	/* a new session's first SYN was applied from NONE already; race: concurrent segments of
	 * one flow may lose a state update, the next segment repairs it */
	if (p->proto == IPPROTO_TCP_ && reason == REASON_XLATE_OUT)
		e->state = ct_tcp_next(e->state, (e->flags & CT_F_REPLIED) ? TCP_TBL_IN : TCP_TBL_IN_ONLY,
				       p->tcp_flags);
	__u64 now = snat_now();
	/* no DF: the kernel fragments it (and decrements TTL).  It then sees a local source
	 * address arriving on an inside device, which it drops as martian unless that device has
	 * accept_local=1 (the bpf backend sets it on every inside device at start). */
	int to_kernel = snat_over_mtu(skb, p, e->mtu);

	e->last_seen = now;
	if (snat_v4_rewrite(skb, p, 1, e->rw_addr, e->rw_port, to_kernel) < 0)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_MALFORMED);
	stats_rule(e->rule_id, p->len, reason == REASON_XLATE_NEW);
	if (p->frag == FRAG_FIRST)
		frag_remember(p, e->rw_addr, p->daddr, e->ifindex, e->nexthop, now);
	if (to_kernel) { /* a new_gw egress's: routed there by its mark, not by the kernel's table */
		snat_gw_mark(skb, e->ifindex, e->nexthop);
		return verdict_set(v, VERDICT_PASS_TRANSLATED, reason);
	}
	return verdict_redirect(v, reason, e->ifindex, e->nexthop);
}

/* When this program last left a refusal marker (programs' clock), so that step 6 looks
 * markers up only while one can be younger than SNAT_REFUSED_SECS: a new flow when nothing was
 * refused lately (the common case) spares the marker map's cold bucket.  1 (.data): not known
 * yet, a marker of a program loaded before this one may be young: the first look takes its
 * own time as the last refusal, so markers left before this program are honoured in full. */
static __u64 refused_last = 1;

/* 1 when a marker may be younger than SNAT_REFUSED_SECS at `now` (step 6), else 0 */
static __always_inline int refusal_may_be_young(__u64 now)
{
	return may_be_young(&refused_last, now, SNAT_REFUSED_SECS * 1000000000ULL);
}

/* A refused new flow (step 13): +1 refusal for its host and its chosen address, and a
 * refusal marker under its OUT key so its next packets cost one lookup.  Returns reason. */
static __noinline int snat_refuse(const struct ct_key *out, __be32 addr, __u32 reason)
{
	struct refusal m = { .at = snat_now(), .addr = addr, .reason = reason };
	__be32 host = out->saddr, a = addr;

	refused_last = m.at; /* before the marker: a reader that misses it raced the insert */
	live_add(&snat_host_sess, &host, 1);
	live_add(&snat_addr_stats, &a, 1);
	bpf_map_update_elem(&snat_refused, out, &m, BPF_ANY);
	return reason;
}

/* `refuse_icmp yes` (step 13): the packet of a host over its limit becomes an ICMP host
 * unreachable (type 3 code 1, RFC 6888 REQ-11) from the gateway's address toward the host
 * (bpf_fib_lookup's preferred source), quoting its IP header and 8 bytes, redirected back out
 * of the device it came in by (skb->ingress_ifindex); at most SNAT_REFUSE_ICMP_PER_SEC a
 * second (all CPUs; a race may let one more through).  Without a source, or over the rate,
 * the packet is dropped.  `frag_mtu` not 0: a packet over a route's MTU with DF (step 11, the
 * established path): 1, PASS_FRAG_NEEDED (the kernel routes it the same way and answers);
 * else the MTU of a new_gw route, which the kernel's own route is not (handed to it, the
 * packet left by a wider route or met the leak guard, and the host never learnt the path's
 * MTU): a fragmentation needed (code 4) with that next-hop MTU, the same rate for both kinds;
 * without a source or over the rate, PASS_FRAG_NEEDED. */
struct icmp_buf {
	__u8 b[28 + 80]; /* IPv4 + ICMP header, then the quoted header (<= 60) and 8 (or 20) bytes */
	struct bpf_fib_lookup f; /* (verifier: off the stack, the call chain's frames are full) */
	__u32 frag_mtu;  /* (the same: the argument kept here across the helper calls) */
	__u32 cs_start;  /* CHECKSUM_PARTIAL: csum_start, from the Ethernet header */
	__u32 cs_off;    /* and csum_offset */
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct icmp_buf);
} snat_icmp_buf SEC(".maps");

static __u32 icmp_buf_key;  /* 0: snat_icmp_buf's key, off the stack (verifier: frames full) */
static __u64 icmp_rl_sec;   /* the second being counted (snat_now() / 1e9) */
static __u32 icmp_rl_count; /* ICMP errors sent in it */

static __noinline int snat_refuse_icmp(struct __sk_buff *skb, const struct pkt *p, struct snat_res *v,
				       __u32 frag_mtu)
{
	__u64 sec = snat_now() / 1000000000ULL;
	struct icmp_buf *b = bpf_map_lookup_elem(&snat_icmp_buf, &icmp_buf_key);
	struct bpf_fib_lookup *f;
	struct iphdr *ip;
	__u32 q;

	if (frag_mtu)
		verdict_set(v, VERDICT_PASS, REASON_PASS_FRAG_NEEDED);
	else
		verdict_set(v, VERDICT_DROP, REASON_DROP_HOST_LIMIT);
	if (frag_mtu == 1 || !b) /* over the MTU of the kernel's own route: its answer */
		return 0;
	b->frag_mtu = frag_mtu;
	if (sec != icmp_rl_sec) {
		icmp_rl_sec = sec;
		icmp_rl_count = 0;
	}
	__sync_fetch_and_add(&icmp_rl_count, 1); /* (clang 14 -mcpu=v1: no fetch result) */
	if (icmp_rl_count > SNAT_REFUSE_ICMP_PER_SEC)
		return 0;
	q = p->l4 - ETH_HLEN + 8; /* the IP header and 8 bytes after it */
	/* A CHECKSUM_PARTIAL packet (its sender's L4 checksum still to be filled in): whoever
	 * sends our error on without checksum offload fills a sum in at the packet's csum_start +
	 * csum_offset, over everything from csum_start on.  Built in place that lands in the
	 * error (its MTU field, or the quoted header's TTL and protocol) and breaks its checksum.
	 * So such an error is built around the quoted packet where it lies (28 bytes inserted
	 * after the Ethernet header: csum_start still marks the quoted L4 header), quotes the L4
	 * header up to its checksum field (TCP: 20 bytes), and that field gets the one value the
	 * fill-in leaves as it is (csum_fixed_point): filled in or not, the error is the same. */
	b->cs_start = 0;
	if (csum_partial_at(skb, &b->cs_start, &b->cs_off)) {
		if (b->cs_start != p->l4 || (b->cs_off & 1) || b->cs_off > 18 || skb->gso_size)
			return 0; /* not a plain L4 sum: no error rather than a broken one */
		if (b->cs_off + 2 > 8) /* (a whole number of 32-bit words: bpf_csum_diff) */
			q = p->l4 - ETH_HLEN + ((b->cs_off + 2 + 3) & ~3U);
		if (ETH_HLEN + q > p->end)
			return 0;
	}
	if (q < 28 || q > 80)
		return 0;
	f = &b->f;
	__builtin_memset(f, 0, sizeof(*f));
	f->family = AF_INET_;
	f->tot_len = 28 + q; /* the error's length: without it the lookup judges the packet's, and
			      * one over the MTU (a frag-needed's) fails with FRAG_NEEDED */
	f->ipv4_dst = p->saddr;
	f->ifindex = skb->ingress_ifindex;
	if (bpf_fib_lookup(skb, f, sizeof(*f), BPF_FIB_LOOKUP_OUTPUT | BPF_FIB_LOOKUP_SRC |
					     BPF_FIB_LOOKUP_SKIP_NEIGH) != BPF_FIB_LKUP_RET_SUCCESS || !f->ipv4_src)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, b->b + 28, q) < 0)
		return 0;
	if (b->cs_start) { /* the quoted L4 checksum: the fill-in's fixed point */
		__u32 l4 = 28 + b->cs_start - ETH_HLEN, at = l4 + b->cs_off;

		if (at + 2 > 28 + q || l4 >= 28 + q || at > sizeof(b->b) - 2)
			return 0;
		*(__u16 *)&b->b[at & 0x7f] = 0;
		*(__u16 *)&b->b[at & 0x7f] = csum_fixed_point(b->b + (l4 & 0x7f), (28 + q - l4) & 0x1c);
	}
	__builtin_memset(b->b, 0, 28);
	ip = (struct iphdr *)b->b;
	ip->version = 4;
	ip->ihl = 5;
	ip->tot_len = bpf_htons(28 + q);
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP_;
	ip->saddr = f->ipv4_src;
	ip->daddr = p->saddr;
	ip->check = ~csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)b->b, 20, 0));
	b->b[20] = 3; /* destination unreachable */
	b->b[21] = b->frag_mtu ? 4 : 1; /* fragmentation needed, host unreachable */
	/* the next-hop MTU (RFC 1191), 0 for a host unreachable */
	*(__be16 *)&b->b[26] = bpf_htons(b->frag_mtu > 0xffff ? 0xffff : b->frag_mtu);
	*(__u16 *)&b->b[22] = ~csum_fold32(bpf_csum_diff(NULL, 0, (__be32 *)(b->b + 20), 8 + q, 0));
	if (b->cs_start) { /* around the packet where it lies (above): 28 bytes in front of it */
		if (bpf_skb_adjust_room(skb, 28, BPF_ADJ_ROOM_MAC, 0) < 0)
			return 0;
	}
	if (bpf_skb_change_tail(skb, ETH_HLEN + 28 + q, 0) < 0)
		return 0;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, b->b, 28 + q, 0) < 0)
		return 0;
	return verdict_redirect(v, v->reason, skb->ingress_ifindex, 0);
}

/* Step 9: what may make a session: a TCP pure SYN, a UDP datagram, an ICMP query request, a
 * packet of a protocol without ports */
static __always_inline int snat_can_start(const struct pkt *p)
{
	if (p->proto == IPPROTO_TCP_)
		return (p->tcp_flags & (TCP_SYN_ | TCP_ACK_ | TCP_FIN_ | TCP_RST_)) == TCP_SYN_;
	if (p->proto == IPPROTO_ICMP_)
		return is_icmp_query_request(p->icmp_type);
	return 1;
}

/* An endpoint-independent rule's new session, before the search (the IN entry and its key
 * are in the port search's scratch): 1 when the inside endpoint has a live mapping under this
 * rule (sp->in then names it: its one candidate); 0: a new mapping, whose port search claims
 * each winner's owner (sp->eim).  A stale endpoint (another rule's, or its address out of the
 * pool) is forgotten first. */
static __noinline int eim_begin(const struct snat_rule *r)
{
	struct port_search *sp = port_search_get();
	struct eim_entry *ep;

	if (!sp)
		return 0;
	eim_key_set(&sp->ekey, sp->val.peer.saddr, sp->val.peer.sport, sp->val.peer.proto, EIM_DIR_ENDPOINT, 0);
	ep = bpf_map_lookup_elem(&snat_eim, &sp->ekey);
	if (ep && (ep->rule_id != r->rule_id || !eim_in_pool(r, ep->addr))) {
		eim_forget(&sp->ekey);
		ep = NULL;
	}
	if (ep) {
		sp->in.daddr = ep->addr;
		sp->in.dport = ep->port;
		return 1;
	}
	sp->eim = 1;
	eim_key_set(&sp->okey, 0, 0, sp->val.peer.proto, EIM_DIR_OWNER, 0);
	sp->oval.addr = sp->val.peer.saddr;
	sp->oval.port = sp->val.peer.sport;
	sp->oval.rule_id = r->rule_id;
	sp->oval.last_seen = sp->val.last_seen;
	return 0;
}

/* After the session pair of an endpoint-independent rule went in: a new mapping's endpoint
 * (no room: the pair and owner go again, REASON_DROP_TABLE_FULL), or the reused one's
 * last_seen; with address-dependent filtering, the remote's permit.  0 when done. */
static __noinline int eim_done(const struct ct_key *out, const struct snat_rule *r, __u32 iif)
{
	struct port_search *sp = port_search_get();
	struct eim_entry *ep;
	long rc;

	if (!sp)
		return 0;
	if (sp->eim) {
		sp->oval.addr = sp->in.daddr;
		sp->oval.port = sp->in.dport;
		sp->oval.iif = iif;
		rc = bpf_map_update_elem(&snat_eim, &sp->ekey, &sp->oval, BPF_NOEXIST);
		if (rc && rc != -EEXIST) { /* no room: nothing left behind (EEXIST: a race, kept) */
			bpf_map_delete_elem(&snat_ct, out);
			bpf_map_delete_elem(&snat_ct, &sp->in);
			bpf_map_delete_elem(&snat_eim, &sp->okey);
			return REASON_DROP_TABLE_FULL;
		}
	} else {
		ep = bpf_map_lookup_elem(&snat_eim, &sp->ekey);
		if (ep)
			ep->last_seen = sp->val.last_seen;
	}
	if (r->flags & RULE_F_ADF) { /* address-dependent filtering: this remote's permit */
		sp->ekey.dir = EIM_DIR_PERMIT;
		sp->ekey.remote = out->daddr;
		sp->oval.addr = 0;
		sp->oval.port = 0;
		sp->oval.iif = 0;
		sp->oval.rule_id = r->rule_id;
		sp->oval.last_seen = sp->val.last_seen;
		bpf_map_update_elem(&snat_eim, &sp->ekey, &sp->oval, BPF_ANY);
	}
	return 0;
}

/* Hairpinning, new flow: a UDP datagram or TCP SYN from inside to a local address that is a live
 * endpoint-independent mapping, from a source in its rule's `from` net: the slot of that rule
 * (the sender gets its own mapping under it), else -1 (PASS_LOCAL as before). */
static __noinline int eim_hairpin_slot(const struct pkt *p)
{
	struct eim_scratch *sc = eim_scratch_get();
	struct snat_rule *r;

	if (!sc || !snat_can_start(p) || p->ttl <= 1)
		return -1;
	if (eim_mapping_of(p->daddr, p->dport, p->proto, &sc->h))
		return -1;
	r = bpf_map_lookup_elem(&snat_rules, &sc->h.slot);
	if (!r || (p->saddr & r->src_mask) != r->src_net)
		return -1;
	return sc->h.slot;
}

/* Steps 12-14: the SNAT address, the host limit, the port search over the chosen address and
 * (on_exhausted spill) the pool's next ones, and the session pair (IN key first: the port
 * search inserts it; then OUT, removing IN again when OUT fails).  0 when created, -2 when
 * another CPU created the same session meanwhile, else the DROP reason. */
static __always_inline int snat_v4_new_mapping(struct __sk_buff *skb, const struct pkt *p,
					       const struct snat_rule *r, const struct snat_cfg *cfg,
					       const struct route *eg, __u32 iif, int hairpin)
{
	struct port_search *sp = port_search_get();
	struct route back = {};
	struct ct_key out;
	__be32 snat;
	__u32 tries, naddr, seed, mtu = 0;
	int eim = (r->flags & RULE_F_EIM) && is_eim_proto(p->proto);
	long rc;

	if (!sp)
		return REASON_DROP_TABLE_FULL;
	ct_key_out(&out, p);
	__builtin_memset(sp, 0, sizeof(*sp));
	sp->pool_min = r->pool_min;
	sp->pool_n = r->pool_max - r->pool_min + 1;
	sp->idx = snat_v4_select_index(r, p);
	snat = bpf_htonl(r->pool_min + sp->idx); /* the chosen address */
	if (r->host_limit) {
		struct live_count *hc = bpf_map_lookup_elem(&snat_host_sess, &out.saddr);

		if (hc && hc->sessions >= r->host_limit)
			return snat_refuse(&out, snat, REASON_DROP_HOST_LIMIT);
	}
	sp->in.saddr = p->daddr;
	sp->in.sport = out.dport;
	sp->in.proto = p->proto;
	sp->in.dir = CT_DIR_IN;
	sp->val.peer = out;
	sp->val.rw_addr = p->saddr;
	sp->val.rw_port = p->sport;
	/* IN entry: the initial state (TCP: NONE; the session's state lives in the OUT entry) */
	sp->val.state = p->proto == IPPROTO_TCP_ ? CT_NONE : p->proto == IPPROTO_ICMP_ ? CT_ICMP : CT_UDP;
	sp->val.ifindex = iif;
	sp->val.rule_id = r->rule_id;
	/* Where replies go: the route back to the inside host, looked up once per session (as a
	 * reply would arrive: from the remote, on the uplink), so that replies hand their next
	 * hop to bpf_redirect_neigh instead of making it route every packet.  When that route
	 * does not lead back to the device the flow came from, leave the next hop to the kernel.
	 * While no policy rule selects on the input device and every device forwards
	 * (CFG_F_BACK_FROM_RPF) that lookup's answer is the reverse-path check's (same source
	 * and destination, from the loopback; its route leaves by iif): reused, no FIB lookup. */
	if ((cfg->flags & CFG_F_BACK_FROM_RPF) && p->back_mtu) {
		sp->val.nexthop = p->back_nh;
		sp->val.mtu = p->back_mtu;
	} else if (fib_route4(skb, p->saddr, p->daddr, eg->oif, &back) < 0 && back.oif == iif) {
		sp->val.nexthop = back.nexthop;
		sp->val.mtu = ct_mtu(back.mtu);
	} else {
		bpf_check_mtu(skb, iif, &mtu, 0, 0); /* sets mtu to the inside device's MTU */
		sp->val.mtu = ct_mtu(mtu);
	}
	sp->val.last_seen = snat_now(); /* also the creation time of a half-inserted pair (GC) */
	sp->min = cfg->port_min;
	sp->n = cfg->port_max >= cfg->port_min ? (__u32)cfg->port_max - cfg->port_min + 1 : 0;
	tries = cfg->port_tries < SNAT_PORT_TRIES ? cfg->port_tries : SNAT_PORT_TRIES;
	if (tries > sp->n)
		tries = sp->n; /* never more tries than ports */
	sp->tries = tries;
	naddr = 1;
	if ((r->flags & RULE_F_SPILL) && tries) {
		naddr = SNAT_SEARCH_TRIES / tries; /* the whole search stays within SNAT_SEARCH_TRIES */
		if (naddr > sp->pool_n)
			naddr = sp->pool_n;
	}
	/* rules.port_seed: the whole OUT key seeds the sequence after the first candidate */
	seed = jhash_3words(out.saddr, out.daddr, ((__u32)(__u16)out.sport << 16) | (__u16)out.dport,
			    out.proto);
	if (sp->n) {
		sp->first = ((__u32)(__u16)p->sport + 1) % sp->n;
		sp->start = (__u32)(((__u64)seed * sp->n) >> 32);
		sp->stride = port_strides[seed & (PORT_STRIDE_COUNT - 1)] % sp->n;
		if (r->flags & RULE_F_PRESERVE) { /* port_preserve: the inside port first, in range */
			__u32 sport = bpf_ntohs(p->sport);

			if (sport >= sp->min && sport - sp->min < sp->n)
				sp->pres = sport - sp->min + 1;
		}
	}
	if (!has_ports(p->proto)) { /* ports 0: one inside host per (protocol, remote, address),
				     * the chosen address then the pool's next ones in order */
		sp->n = 1;
		sp->min = 0;
		sp->first = 0;
		sp->pres = 0;
		tries = sp->tries = 1;
		naddr = sp->pool_n < SNAT_ADDR_TRIES ? sp->pool_n : SNAT_ADDR_TRIES;
	}
	sp->err = -EEXIST;
#ifdef SNAT_TEST_RACE
	sp->race = p->ipid == bpf_htons(SNAT_TEST_RACE); /* a new flow with this IP id is raced */
#endif
	if (eim && eim_begin(r)) { /* the endpoint's live mapping: its one candidate */
		sp->tried = 1;
		if (!bpf_map_lookup_elem(&snat_ct, &sp->in)) {
			walk_stamp(sp);
			sp->err = bpf_map_update_elem(&snat_ct, &sp->in, &sp->val, BPF_NOEXIST);
		}
	} else {
		sp->total = naddr * tries;
		bpf_loop(sp->total, port_try_cb, NULL, 0);
	}
	alloc_searched(sp);
	if (sp->err == -EEXIST)
		return snat_refuse(&out, snat, REASON_DROP_PORT_EXHAUSTED);
	if (sp->err) /* -E2BIG: the table is full */
		return REASON_DROP_TABLE_FULL;

	/* OUT entry: reuse the IN entry's buffer, now describing the outbound direction */
	snat = sp->in.daddr; /* the address the search found a port on */
	sp->val.peer = sp->in;
	sp->val.rw_addr = sp->in.daddr; /* the address whose IN key inserted */
	sp->val.rw_port = sp->in.dport;
	sp->val.ifindex = eg->oif;
	sp->val.nexthop = eg->nexthop;
	sp->val.mtu = ct_mtu(eg->mtu);
	sp->val.flags = ((r->flags & RULE_F_NEW_GW) ? CT_F_NEW_GW : 0) | (eim ? CT_F_EIM : 0) |
			(hairpin ? CT_F_HAIRPIN : 0) | sp->walk_flag;
	sp->val.iif = (__u16)iif; /* the device whose reverse path vouched for the source */
	/* TCP: the first SYN from NONE with the IN_ONLY rows (a new session is SYN_RECV) */
	if (p->proto == IPPROTO_TCP_)
		sp->val.state = ct_tcp_next(CT_NONE, TCP_TBL_IN_ONLY, p->tcp_flags);
	rc = bpf_map_update_elem(&snat_ct, &out, &sp->val, BPF_NOEXIST);
	if (rc) {
		bpf_map_delete_elem(&snat_ct, &sp->in); /* never leave half a pair */
		if (sp->eim)
			bpf_map_delete_elem(&snat_eim, &sp->okey);
		return rc == -EEXIST ? -2 : REASON_DROP_TABLE_FULL; /* race: another CPU was first */
	}
	if (eim && eim_done(&out, r, iif))
		return REASON_DROP_TABLE_FULL;
	/* the inside host's count only while some rule has a host limit: with many inside hosts
	 * its bucket and entry are a cold miss per new flow (~0.5 us); else the sweep recounts it */
	if (cfg->flags & CFG_F_HOST_COUNT)
		live_add(&snat_host_sess, &out.saddr, 0);
	live_add(&snat_addr_stats, &snat, 0);
	live_add(&snat_rule_live, &r->rule_id, 0);
	if (cfg->flags & CFG_F_AUDIT) /* the audit log: one branch when it is off */
		audit_session(&out, &sp->val, AUDIT_KIND(AUDIT_NEW, 0), sp->val.last_seen, sp->val.last_seen);
	return 0;
}

/* Steps 7-14 of a new flow.  Returns 0 with the verdict set, -3 when the session was created
 * (the caller translates the packet, step 15), or -2 when another CPU created the same
 * session meanwhile (the caller takes the established path).  The caller translating keeps
 * this frame small (verifier: combined stack limit). */
static __noinline int snat_v4_new(struct __sk_buff *skb, struct pkt *p, struct snat_res *v)
{
	__u32 zero = 0, iif = skb->ingress_ifindex;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);
	struct route rt = {}, eg;
	struct rule_scan scan;
	struct snat_rule *r;
	__u32 *role;
	int rc;

	if (!cfg)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_NO_RULE);
	/* multicast and the limited broadcast are never forwarded (VRRP, IGMP, mDNS, DHCP), though
	 * the FIB, blind to address classes, may name a route for them: the kernel's, like local */
	if (is_multi_or_broadcast(p->daddr))
		return verdict_set(v, VERDICT_PASS, REASON_PASS_LOCAL);
	rc = fib_route4(skb, p->daddr, p->saddr, iif, &rt);
	if (rc == REASON_PASS_LOCAL && (cfg->flags & CFG_F_EIM) && is_eim_proto(p->proto))
		return -5; /* perhaps a live mapping's address: the caller asks (hairpinning) */
	if (rc >= 0)
		return verdict_set(v, VERDICT_PASS, rc);
	role = bpf_map_lookup_elem(&snat_ifaces, &rt.oif);
	if (role && *role == IFACE_INSIDE) /* between inside networks: never translated */
		return verdict_set(v, VERDICT_PASS, REASON_PASS_INTERNAL);
	scan.saddr = p->saddr;
	scan.daddr = p->daddr;
	scan.nexthop = rt.nexthop;
	scan.oif = rt.oif;
	r = rules_match4(cfg, &scan);
	if (!r)
		return snat_unmatched(v, REASON_PASS_NO_RULE);
	if (!snat_can_start(p)) /* step 9 */
		return verdict_set(v, VERDICT_DROP, REASON_DROP_NO_SESSION);
	if (p->ttl <= 1)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_TTL);
	eg = rt;
	if (r->flags & RULE_F_NEW_GW) {
		/* next hop = new_gw when on-link, else the route's gateway toward it */
		if (fib_route4(skb, r->new_gw, p->saddr, iif, &eg) >= 0)
			return verdict_set(v, VERDICT_PASS, REASON_PASS_NO_ROUTE);
	}
	if (snat_over_mtu(skb, p, eg.mtu) && p->df) {
		/* new_gw: the kernel's route is not this one; the caller answers with its MTU (this
		 * frame is at the verifier's combined stack limit) */
		v->ifindex = (r->flags & RULE_F_NEW_GW) ? eg.mtu : 0;
		return verdict_set(v, VERDICT_PASS, REASON_PASS_FRAG_NEEDED);
	}
	rc = snat_v4_new_mapping(skb, p, r, cfg, &eg, iif, 0);
	if (rc == REASON_DROP_HOST_LIMIT && (cfg->flags & CFG_F_REFUSE_ICMP))
		return snat_refuse_icmp(skb, p, v, 0);
	if (rc > 0)
		return verdict_set(v, VERDICT_DROP, rc);
	return rc == 0 ? -3 : -2;
}

/* Hairpinning, new flow (snat_v4_new said -5 and eim_hairpin_slot found the rule of the
 * mapping at ``slot``): the sender's session under that rule, its egress the device it came in
 * by, marked CT_F_HAIRPIN.  Returns as snat_v4_new.  A frame of its own, apart from
 * snat_v4_new's (verifier: combined stack). */
static __noinline int snat_v4_hairpin_new(struct __sk_buff *skb, struct pkt *p, struct snat_res *v, __u32 slot)
{
	__u32 zero = 0, iif = skb->ingress_ifindex, mtu = 0;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);
	struct snat_rule *r = bpf_map_lookup_elem(&snat_rules, &slot);
	struct route eg = {};
	int rc;

	if (!cfg || !r)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_LOCAL);
	bpf_check_mtu(skb, iif, &mtu, 0, 0);
	eg.oif = iif;
	eg.mtu = mtu;
	rc = snat_v4_new_mapping(skb, p, r, cfg, &eg, iif, 1);
	if (rc == REASON_DROP_HOST_LIMIT && (cfg->flags & CFG_F_REFUSE_ICMP))
		return snat_refuse_icmp(skb, p, v, 0);
	if (rc > 0)
		return verdict_set(v, VERDICT_DROP, rc);
	return rc == 0 ? -3 : -2;
}

#define LOOPBACK_IFINDEX 1

/* Edge invariant 3 (no injection), step 2a: strict reverse path.  The route back to the
 * source, looked up as the kernel's rp_filter does (from the loopback: iif-based policy rules
 * of the forward direction do not apply), must leave by the device the packet came in by; a
 * local source (a pool address, the gateway's own) is never routed anywhere.  So an inside
 * host cannot send as another network's host or as the gateway, and the kernel never sees a
 * local source arriving on an inside device except in packets we translated (accept_local). */
static __noinline int guard_v4_spoof(struct __sk_buff *skb, struct pkt *p) /* verifier: stack */
{
	struct lpm_v4 k = { .prefixlen = 32, .addr = p->saddr };
	struct route r;
	__u32 *kind;

	p->back_mtu = 0; /* no route to reuse (a new session's route back: snat_v4_new_mapping) */
	if (p->saddr == 0 && p->daddr == 0xffffffff) /* DHCP: a host without an address yet */
		return 0;
	/* a pool address the egress guard passes at once (FROM_NET_POOL), held by the gateway or
	 * not: its fast pass rests on no inside host sending with it, whatever the routes say */
	kind = bpf_map_lookup_elem(&snat_from_nets, &k);
	if (kind && *kind == FROM_NET_POOL)
		return 1;
	if (fib_route4(skb, p->saddr, p->daddr, LOOPBACK_IFINDEX, &r) >= 0 || r.oif != skb->ingress_ifindex)
		return 1;
	p->back_nh = r.nexthop; /* the route to the source, leaving by the ingress device */
	p->back_mtu = ct_mtu(r.mtu);
	return 0;
}

/* Step 6: a refusal marker younger than SNAT_REFUSED_SECS under this OUT key (looked up only
 * while one can be young) */
static __always_inline int refused_recently(const struct ct_key *k)
{
	__u64 now = snat_now();
	struct refusal *m;

	if (!refusal_may_be_young(now))
		return 0;
	m = bpf_map_lookup_elem(&snat_refused, k);
	return m && now - m->at < SNAT_REFUSED_SECS * 1000000000ULL;
}

/* Step 2a's fast way: the OUT entry `e` was made on the device this packet came in by.
 * ct_entry.iif keeps the ifindex's low 16 bits: when two inside devices share them
 * (CFG_F_IIF_AMBIGUOUS, kept by the control plane from the devices present) no session vouches
 * and every packet takes the full check. */
static __always_inline int iif_vouches(const struct ct_entry *e, const struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct snat_cfg *cfg;

	if (e->iif != (__u16)skb->ingress_ifindex)
		return 0;
	cfg = bpf_map_lookup_elem(&snat_config, &zero);
	return cfg && !(cfg->flags & CFG_F_IIF_AMBIGUOUS);
}

/* Steps 2a-6 of the inside program; the new-flow steps are in snat_v4_new. */
static __always_inline int snat_v4_inside(struct __sk_buff *skb, struct pkt *p, struct snat_res *v)
{
	struct ct_key k;
	struct ct_entry *e = NULL;

	/* step 2a, fast: the session of this OUT key, made on this device, vouches for the source
	 * (it passed the reverse-path check when it was made): no FIB lookup per packet */
	if (p->frag != FRAG_LATER && (p->proto != IPPROTO_ICMP_ || is_icmp_query_request(p->icmp_type))) {
		ct_key_out(&k, p);
		e = ct_lookup4(&k);
		if (e && iif_vouches(e, skb))
			return snat_v4_out_established(skb, p, e, v, REASON_XLATE_OUT);
		/* step 6's refusal marker, before the full check: a flow refused moments ago costs
		 * this lookup and no FIB lookup (only a flow that passed the check was ever marked;
		 * from elsewhere its packets are dropped all the same, counted as refused) */
		if (!e && refused_recently(&k))
			return verdict_set(v, VERDICT_DROP, REASON_DROP_REFUSED_RECENTLY);
	}
	if (guard_v4_spoof(skb, p))
		return verdict_set(v, VERDICT_DROP, REASON_DROP_SPOOFED);
	if (p->frag == FRAG_LATER)
		return frag_v4_later(skb, p, v);
	ct_key_out(&k, p);
	if (p->proto == IPPROTO_ICMP_ && !is_icmp_query_request(p->icmp_type)) {
		/* step 5: an error about a session, else (no session to belong to) steps 7-9 judge it */
		if (is_icmp_error(p->icmp_type) && icmp_err_v4_reply(skb, p, v, 0) == 0)
			return 0;
		if (snat_v4_new(skb, p, v) == -5) /* cannot make a session (step 9) */
			verdict_set(v, VERDICT_PASS, REASON_PASS_LOCAL);
		return 0;
	}
	/* step 6 reuses the lookup of step 2a and met its refusal marker there: every packet that
	 * gets here had both (later fragments and ICMP errors returned above); a session made
	 * meanwhile by another CPU is met by the insert (EEXIST, -2, the established path) */
	if (e)
		return snat_v4_out_established(skb, p, e, v, REASON_XLATE_OUT);
	int rc = snat_v4_new(skb, p, v);

	if (rc == -5) { /* local: a live endpoint-independent mapping's address? (hairpinning) */
		int slot = eim_hairpin_slot(p);

		if (slot < 0)
			return verdict_set(v, VERDICT_PASS, REASON_PASS_LOCAL);
		rc = snat_v4_hairpin_new(skb, p, v, slot);
	}
	if (rc >= 0) {
		if (v->reason == REASON_PASS_FRAG_NEEDED && v->ifindex > 1) /* new_gw's MTU (snat_v4_new) */
			return snat_refuse_icmp(skb, p, v, v->ifindex);
		return 0;
	}
	if (rc == -3) { /* created: the OUT entry as inserted is still in the per-CPU scratch */
		struct port_search *sp = port_search_get();

		if (sp)
			return snat_v4_out_established(skb, p, &sp->val, v, REASON_XLATE_NEW);
	}
	e = ct_lookup4(&k);
	if (!e) /* removed in between (GC): refuse rather than guess */
		return verdict_set(v, VERDICT_DROP, REASON_DROP_TABLE_FULL);
	return snat_v4_out_established(skb, p, e, v, rc == -3 ? REASON_XLATE_NEW : REASON_XLATE_OUT);
}

/* The outside program: replies to sessions and ICMP errors about them. */
static __always_inline int snat_v4_outside(struct __sk_buff *skb, struct pkt *p, struct snat_res *v)
{
	struct ct_key k;
	struct ct_entry *e, *o;
	int isnew = 0;

	if (p->frag == FRAG_LATER)
		return frag_v4_later(skb, p, v);
	if (p->proto == IPPROTO_ICMP_) {
		if (is_icmp_error(p->icmp_type))
			return icmp_err_v4_outside(skb, p, v);
		if (!is_icmp_query_reply(p->icmp_type))
			return verdict_set(v, VERDICT_PASS, REASON_PASS_ICMP_OTHER);
	}
	ct_key_in(&k, p);
	e = ct_lookup4(&k);
	if (!e && is_eim_proto(p->proto)) { /* step 6a: a live mapping's filtering may let it in */
		__u32 zero = 0;
		struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);

		if (cfg && (cfg->flags & CFG_F_EIM)) {
			int rc = eim_inbound(skb, p);

			if (rc > 1)
				return verdict_set(v, VERDICT_DROP, rc);
			if (rc == 0) {
				e = ct_lookup4(&k);
				isnew = 1;
			}
		}
	}
	if (!e)
		return verdict_set(v, VERDICT_PASS, has_ports(p->proto) ? REASON_PASS_NO_SESSION_IN : REASON_PASS_PROTO);
	/* The inside link is the narrow hop: a reply whose TTL runs out, or over the inside MTU
	 * with DF, is translated and handed to the kernel, which answers the remote as an
	 * untranslated gateway would (snat_egress shows it the SNAT address and port); without
	 * DF the kernel fragments it.  The kernel forwards it, so the TTL is left to it. */
	int over = snat_over_mtu(skb, p, e->mtu);
	__u32 reason = p->ttl <= 1 ? REASON_XLATE_IN_TTL :
		       over && p->df ? REASON_XLATE_IN_FRAG_NEEDED : REASON_XLATE_IN;
	int to_kernel = over || reason != REASON_XLATE_IN;

	if (isnew && reason == REASON_XLATE_IN)
		reason = REASON_XLATE_IN_NEW;
	/* TCP state and the REPLIED flag live in the OUT entry; the IN entry keeps a copy of the
	 * flag so non-TCP replies look the OUT entry up only once */
	if (p->proto == IPPROTO_TCP_ || !(e->flags & CT_F_REPLIED)) {
		o = ct_lookup4(&e->peer);
		if (o) {
			if (p->proto == IPPROTO_TCP_) /* race: as on the outbound side */
				o->state = ct_tcp_next(o->state, TCP_TBL_OUT, p->tcp_flags);
			o->flags |= CT_F_REPLIED;
		}
		e->flags |= CT_F_REPLIED;
	}
	__u64 now = snat_now();

	e->last_seen = now;
	if (snat_v4_rewrite(skb, p, 0, e->rw_addr, e->rw_port, to_kernel) < 0)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_MALFORMED);
	stats_rule(e->rule_id, p->len, isnew);
	if (p->frag == FRAG_FIRST)
		frag_remember(p, p->saddr, e->rw_addr, e->ifindex, e->nexthop, now);
	if (to_kernel)
		return verdict_set(v, VERDICT_PASS_TRANSLATED, reason);
	return verdict_redirect(v, reason, e->ifindex, e->nexthop);
}

/* Edge invariant 2 (no way in): a packet the outside program hands to the kernel (no session,
 * nothing of ours to translate) may only be for the gateway itself; one the FIB would forward
 * (to the inside, or back out) is dropped, DROP_INBOUND, unless `inbound routed`.  Not inlined:
 * replies to sessions never come here. */
static __noinline int guard_v4_inbound(struct __sk_buff *skb, const struct pkt *p, struct snat_res *v)
{
	__u32 zero = 0;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);
	struct route r;

	if (cfg && (cfg->flags & CFG_F_INBOUND_ROUTED))
		return 0;
	/* multicast and the limited broadcast are never forwarded (VRRP, routing protocols on an
	 * uplink must still reach us), though the FIB, blind to address classes, may route them */
	if (is_multi_or_broadcast(p->daddr))
		return 0;
	if (fib_route4(skb, p->daddr, p->saddr, skb->ingress_ifindex, &r) >= 0)
		return 0; /* local, broadcast, multicast, or no route: the kernel's to answer */
	return verdict_set(v, VERDICT_DROP, REASON_DROP_INBOUND);
}

/* parse_v4, making the headers linear first when they are not (paged or GRO skbs) */
static __always_inline int parse_v4_pulled(struct __sk_buff *skb, struct pkt *p)
{
	int r = parse_v4(skb, p);

	if (r == PARSE_PULL) {
		parse_pull(skb);
		r = parse_v4(skb, p);
	}
	return r == PARSE_PULL ? REASON_DROP_MALFORMED : r;
}

/* A first fragment left untranslated (a PASS of FRAG_PASS_REASON_MASK): a pass marker lets
 * its later fragments pass too.  Not inlined: the established path pays only the test. */
static __noinline int frag_pass_mark(const struct pkt *p, __u32 reason)
{
	if (reason < 64 && ((FRAG_PASS_REASON_MASK >> reason) & 1))
		frag_remember(p, p->saddr, p->daddr, 0, 0, snat_now());
	return 0;
}

#define PACKET_HOST_ 0 /* linux/if_packet.h: a frame sent to the device's own MAC */
#define PACKET_OTHERHOST_ 3 /* linux/if_packet.h: a frame sent to another host's MAC */

/* Step 1a: 1 when the frame was sent to this device: to its own MAC, or to a VRRP virtual MAC
 * (RFC 5798 7.3: 00-00-5E-00-01-{VRID}; keepalived's use_vmac puts the VIP on a macvlan device
 * with it, which takes such frames from this one only after TC: the gateway's own frames). */
static __always_inline int frame_for_us(struct __sk_buff *skb)
{
	__u8 *d = (void *)(long)skb->data;

	if (skb->pkt_type == PACKET_HOST_)
		return 1;
	if (skb->pkt_type != PACKET_OTHERHOST_ || (void *)(d + 6) > (void *)(long)skb->data_end)
		return 0; /* an L2 broadcast or multicast */
	return d[0] == 0 && d[1] == 0 && d[2] == 0x5e && d[3] == 0 && d[4] == 1;
}

static __always_inline int snat_entry(struct __sk_buff *skb, int outside)
{
	struct snat_res v = {};
	struct pkt p;
	int r;

	r = parse_v4_pulled(skb, &p);
	if (r != REASON_PASS_NOT_IPV4 && !frame_for_us(skb)) {
		/* step 1a: an IPv4 frame not sent to this device's MAC (another host's, flooded by a
		 * bridge or seen in promiscuous mode; or an L2 broadcast or multicast): the kernel's,
		 * which drops another host's frames and forwards none of them (ip_forward forwards
		 * only PACKET_HOST).  Translated here, a gateway beside the one a frame was meant
		 * for would send a copy of the flow out under its own mapping. */
		verdict_set(&v, VERDICT_PASS, REASON_PASS_NOT_FOR_US);
	} else if (r >= 0) {
		verdict_set(&v, r == REASON_DROP_MALFORMED ? VERDICT_DROP : VERDICT_PASS, r);
	} else if (p.opts_kernel) { /* step 2b: a source route, or options that do not parse */
		verdict_set(&v, VERDICT_PASS, REASON_PASS_IP_OPTIONS);
		if (outside)
			guard_v4_inbound(skb, &p, &v);
	} else {
		if (outside)
			snat_v4_outside(skb, &p, &v);
		else
			snat_v4_inside(skb, &p, &v);
		if (outside && v.verdict == VERDICT_PASS)
			guard_v4_inbound(skb, &p, &v);
		if (v.verdict == VERDICT_PASS && p.frag == FRAG_FIRST)
			frag_pass_mark(&p, v.reason);
	}
	return snat_emit(skb, &v);
}

SEC("tc")
int snat_inside(struct __sk_buff *skb)
{
	return snat_entry(skb, 0);
}

SEC("tc")
int snat_outside(struct __sk_buff *skb)
{
	return snat_entry(skb, 1);
}

/* Ingress of the recirculation device: held later fragments coming back (frag_v4_hold) are
 * judged again; nothing else comes this way, and anything else is dropped. */
SEC("tc")
int snat_recirc(struct __sk_buff *skb)
{
	struct snat_res v = {};
	struct pkt p;
	int r = parse_v4_pulled(skb, &p);

	if (r >= 0 || p.frag != FRAG_LATER)
		verdict_set(&v, VERDICT_DROP, REASON_DROP_FRAG_UNKNOWN);
	else
		frag_v4_later(skb, &p, &v);
	return snat_emit(skb, &v);
}

/* The egress guard (edge invariant 1): a packet leaving an uplink with its source in a rule's
 * `from` net, unless that source is an address of the gateway itself, never leaves, whoever
 * sent it (a PASS of ours, the kernel's own routing, a window without our ingress programs).
 * -1 when it may go, else REASON_DROP_LEAK.  Cost for a translated packet: one LPM trie
 * lookup, whose longest match is either no `from` net or a prefix of its pool
 * (FROM_NET_POOL, written where a pool lies inside a `from` net: rules.leak_guard_nets). */
static __always_inline int guard_v4_leak(struct __sk_buff *skb, __be32 saddr)
{
	struct lpm_v4 k = { .prefixlen = 32, .addr = saddr };
	struct route r;
	__u32 *kind = bpf_map_lookup_elem(&snat_from_nets, &k);

	if (!kind || *kind == FROM_NET_POOL)
		return -1;
	if (bpf_map_lookup_elem(&snat_inside_addrs, &saddr)) /* ours, but inside-facing */
		return REASON_DROP_LEAK;
	/* a local source (a pool address under a catch-all `from`, the gateway's own traffic) */
	if (fib_route4(skb, saddr, 0, skb->ifindex, &r) == REASON_PASS_LOCAL)
		return -1;
	return REASON_DROP_LEAK;
}

/* The IPv4 source and protocol of an Ethernet frame, when there is an IPv4 header (-1: not IPv4) */
static __always_inline int egress_v4_saddr(struct __sk_buff *skb, __be32 *saddr, __u8 *proto)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	__be16 l2proto;
	__u8 ver;

	if ((void *)(iph + 1) <= data_end) {
		if (eth->h_proto != bpf_htons(ETH_P_IP) || iph->version != 4)
			return -1;
		*saddr = iph->saddr;
		*proto = iph->protocol;
		return 0;
	}
	/* headers not linear (or a short frame): read them through the helper */
	if (bpf_skb_load_bytes(skb, 12, &l2proto, 2) || l2proto != bpf_htons(ETH_P_IP) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN, &ver, 1) || (ver >> 4) != 4 ||
	    skb->len < ETH_HLEN + 20 || bpf_skb_load_bytes(skb, ETH_HLEN + 12, saddr, 4) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + 9, proto, 1))
		return -1;
	return 0;
}

/* Egress of the uplinks: the leak guard first (counted DROP_LEAK); then ICMP errors about
 * translated replies are translated (and counted); everything else, including our own
 * redirected packets, passes uncounted. */
static __always_inline int snat_egress_body(struct __sk_buff *skb)
{
	struct snat_res v = {};
	struct pkt p;
	__be32 saddr;
	__u8 proto;
	int r;

	if (egress_v4_saddr(skb, &saddr, &proto) < 0)
		return TC_ACT_OK;
	r = guard_v4_leak(skb, saddr);
	if (r >= 0) {
		verdict_set(&v, VERDICT_DROP, r);
		return snat_emit(skb, &v);
	}
	/* only an ICMP error is judged further: any other protocol (every translated packet of
	 * ours) passes here, without the whole parse */
	if (proto != IPPROTO_ICMP_)
		return TC_ACT_OK;
	if (parse_v4_pulled(skb, &p) >= 0 || p.proto != IPPROTO_ICMP_ || p.frag == FRAG_LATER ||
	    !is_icmp_error(p.icmp_type))
		return TC_ACT_OK;
	/* an ICMP error leaving an uplink is judged (and counted) as the model does */
	icmp_err_v4_reply(skb, &p, &v, 1);
	return snat_emit(skb, &v);
}

SEC("tc")
int snat_egress(struct __sk_buff *skb)
{
	return snat_egress_body(skb);
}

#ifdef SNAT_BENCH
#include "bench.h"
#endif
