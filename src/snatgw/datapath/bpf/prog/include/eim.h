/* Endpoint-independent mappings (RFC 4787 REQ-1, docs/datapath.md "Endpoint-independent
 * mapping"): snat_eim holds, per inside endpoint (addr, port, proto), the external (addr, port)
 * all its sessions get (ENDPOINT), per external (addr, port, proto) the endpoint that owns it
 * (OWNER: taken toward every remote for the port search of an EIM rule) and, for
 * `filtering address-dependent`, a PERMIT per (endpoint, remote address).  Filtering admits
 * an outside packet to a live mapping as a new session back to its endpoint; hairpinning
 * delivers an inside packet to a live mapping back inside.  The sweep removes entries that no
 * live session refers to (sweep.bpf.c). */
#pragma once
#include "maps.h"
#include "ct.h"
#include "fib.h"
#include "stats.h"
#include "audit.h"

static __always_inline int is_eim_proto(__u8 proto)
{
	return proto == IPPROTO_TCP_ || proto == IPPROTO_UDP_;
}

static __always_inline void eim_key_set(struct eim_key *k, __be32 addr, __be16 port, __u8 proto, __u8 dir,
					__be32 remote)
{
	k->addr = addr;
	k->remote = remote;
	k->port = port;
	k->proto = proto;
	k->dir = dir;
}

static __always_inline int eim_in_pool(const struct snat_rule *r, __be32 addr)
{
	__u32 a = bpf_ntohl(addr);

	return a >= r->pool_min && a <= r->pool_max;
}

/* What a live mapping resolves to: its endpoint's key and entry, its rule's slot */
struct eim_hit {
	struct eim_key ek;
	struct eim_entry ep;
	__u32 slot;
	__u32 pad;
};

/* Per-CPU scratch of the admission (verifier: stack) */
struct eim_scratch {
	struct eim_hit h;
	struct ct_key okey;
	struct ct_key ikey;
	struct ct_entry out;
	struct ct_entry in;
	struct eim_key pk;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct eim_scratch);
} snat_eim_scratch SEC(".maps");

static __always_inline struct eim_scratch *eim_scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&snat_eim_scratch, &zero);
}

/* The live endpoint-independent mapping (addr, port, proto) -> h; 0 when there is one: an
 * owner whose endpoint points back, of a rule that still maps endpoint-independently and
 * still has the address (its slot from snat_rule_slots, checked).  One lookup when there is
 * no owner, four when there is. */
static __noinline int eim_mapping_of(__be32 addr, __be16 port, __u8 proto, struct eim_hit *h)
{
	struct eim_key k;
	struct eim_entry *o, *e;
	struct snat_rule *r;
	__u32 zero = 0, *slot, s;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);

	if (!cfg)
		return -1;
	eim_key_set(&k, addr, port, proto, EIM_DIR_OWNER, 0);
	o = bpf_map_lookup_elem(&snat_eim, &k);
	if (!o)
		return -1;
	eim_key_set(&h->ek, o->addr, o->port, proto, EIM_DIR_ENDPOINT, 0);
	e = bpf_map_lookup_elem(&snat_eim, &h->ek);
	if (!e || e->addr != addr || e->port != port)
		return -1;
	h->ep = *e;
	slot = bpf_map_lookup_elem(&snat_rule_slots, &e->rule_id); /* (the control plane's index) */
	if (!slot || *slot >= SNAT_MAX_RULES || *slot >= cfg->nrules)
		return -1;
	s = *slot;
	r = bpf_map_lookup_elem(&snat_rules, &s);
	if (!r || r->rule_id != h->ep.rule_id || !(r->flags & RULE_F_EIM) || !eim_in_pool(r, addr))
		return -1;
	h->slot = s;
	return 0;
}

/* A stale endpoint (another rule's, or its address left the pool): forgotten, with its owner
 * when that points back */
static __noinline int eim_forget(const struct eim_key *ek)
{
	struct eim_entry *e = bpf_map_lookup_elem(&snat_eim, ek);
	struct eim_key ok;
	struct eim_entry *o;

	if (!e)
		return 0;
	eim_key_set(&ok, e->addr, e->port, ek->proto, EIM_DIR_OWNER, 0);
	bpf_map_delete_elem(&snat_eim, ek);
	o = bpf_map_lookup_elem(&snat_eim, &ok);
	if (o && o->addr == ek->addr && o->port == ek->port)
		bpf_map_delete_elem(&snat_eim, &ok);
	return 0;
}

/* A session made from the mapping's side (filtering admitted a remote, or a hairpinned
 * packet reached the mapping): OUT (endpoint -> remote) rewriting to the mapping, IN (remote
 * -> mapping) back to the endpoint's device.  0: made; 1: not admitted (the host at its limit,
 * no route to the remote, a key taken); else REASON_DROP_TABLE_FULL. */
static __noinline int eim_admit(struct __sk_buff *skb, struct eim_scratch *sc, __be32 remote, __be16 rport,
				__u32 proto_hairpin) /* IPPROTO_*, | 0x100 for hairpinning (5 arguments at most) */
{
	__u8 proto = proto_hairpin & 0xff;
	int hairpin = proto_hairpin >> 8;
	struct snat_rule *r = bpf_map_lookup_elem(&snat_rules, &sc->h.slot);
	struct route rt = {}, back = {};
	struct eim_entry *ep;
	__be32 host = sc->h.ek.addr, nat = sc->h.ep.addr;
	__u32 iif = sc->h.ep.iif, rule_id, mtu = 0, cfg_flags;
	__u8 flags = CT_F_EIM | (hairpin ? CT_F_HAIRPIN : 0);
	long rc;

	if (!r)
		return 1;
	rule_id = r->rule_id;
	if (r->host_limit) {
		struct live_count *hc = bpf_map_lookup_elem(&snat_host_sess, &host);

		if (hc && hc->sessions >= r->host_limit)
			return 1;
	}
	if (hairpin) { /* the remote is another inside host's mapping: delivered back inside */
		rt.oif = iif;
		bpf_check_mtu(skb, iif, &mtu, 0, 0);
		rt.mtu = mtu;
	} else {
		__u32 *role;

		if (r->flags & RULE_F_NEW_GW) {
			flags |= CT_F_NEW_GW;
			if (fib_route4_call(skb, r->new_gw, host, iif, &rt) >= 0)
				return 1;
		} else if (fib_route4_call(skb, remote, host, iif, &rt) >= 0) {
			return 1;
		}
		role = bpf_map_lookup_elem(&snat_ifaces, &rt.oif);
		if (role && *role == IFACE_INSIDE)
			return 1;
	}
	sc->okey.saddr = host;
	sc->okey.daddr = remote;
	sc->okey.sport = sc->h.ek.port;
	sc->okey.dport = rport;
	sc->okey.proto = proto;
	sc->okey.dir = CT_DIR_OUT;
	sc->okey.pad = 0;
	sc->ikey.saddr = remote;
	sc->ikey.daddr = nat;
	sc->ikey.sport = rport;
	sc->ikey.dport = sc->h.ep.port;
	sc->ikey.proto = proto;
	sc->ikey.dir = CT_DIR_IN;
	sc->ikey.pad = 0;
	__builtin_memset(&sc->out, 0, sizeof(sc->out));
	__builtin_memset(&sc->in, 0, sizeof(sc->in));
	__u8 state = proto == IPPROTO_TCP_ ? CT_NONE : CT_UDP;
	__u64 now = snat_now();

	sc->in.iif = walk_now(); /* before the inserts and the counts (stats.h); OUT: CT_F_WALK */

	sc->out.peer = sc->ikey;
	sc->out.rw_addr = nat;
	sc->out.rw_port = sc->h.ep.port;
	sc->out.state = state;
	sc->out.flags = flags | (sc->in.iif ? CT_F_WALK : 0);
	sc->out.ifindex = rt.oif;
	sc->out.nexthop = rt.nexthop;
	sc->out.rule_id = rule_id;
	sc->out.mtu = ct_mtu(rt.mtu);
	sc->out.iif = (__u16)iif;
	sc->out.last_seen = now;
	sc->in.peer = sc->okey;
	sc->in.rw_addr = host;
	sc->in.rw_port = sc->h.ek.port;
	sc->in.state = state;
	sc->in.ifindex = iif;
	sc->in.rule_id = rule_id;
	sc->in.last_seen = now;
	/* replies' next hop: the route back to the endpoint, when it leads to its device */
	if (fib_route4_call(skb, host, remote, rt.oif, &back) < 0 && back.oif == iif) {
		sc->in.nexthop = back.nexthop;
		sc->in.mtu = ct_mtu(back.mtu);
	} else {
		mtu = 0;
		bpf_check_mtu(skb, iif, &mtu, 0, 0);
		sc->in.mtu = ct_mtu(mtu);
	}
	rc = bpf_map_update_elem(&snat_ct, &sc->ikey, &sc->in, BPF_NOEXIST);
	if (rc)
		return rc == -E2BIG ? REASON_DROP_TABLE_FULL : 1;
	rc = bpf_map_update_elem(&snat_ct, &sc->okey, &sc->out, BPF_NOEXIST);
	if (rc) {
		bpf_map_delete_elem(&snat_ct, &sc->ikey);
		return rc == -E2BIG ? REASON_DROP_TABLE_FULL : 1;
	}
	ep = bpf_map_lookup_elem(&snat_eim, &sc->h.ek);
	if (ep)
		ep->last_seen = now;
	cfg_flags = cfg_flags_now();
	if (cfg_flags & CFG_F_HOST_COUNT) /* only while some rule has a host limit (step 15) */
		live_add(&snat_host_sess, &host, 0);
	live_add(&snat_addr_stats, &nat, 0);
	live_add(&snat_rule_live, &rule_id, 0);
	if (cfg_flags & CFG_F_AUDIT) /* a session made from outside (filtering, hairpinning) is logged too */
		audit_session(&sc->okey, &sc->out, AUDIT_KIND(AUDIT_NEW, 0), now, now);
	return 0;
}

/* Step 6a of the outside program: a UDP datagram or TCP SYN with no session, to a live
 * mapping whose rule's filtering lets its sender in (endpoint-independent: anyone;
 * address-dependent: a remote address the endpoint has a session with, its permit).  0: a
 * session was made (the caller translates it as a reply, XLATE_IN_NEW); 1: not admitted;
 * else a DROP reason. */
static __noinline int eim_inbound(struct __sk_buff *skb, const struct pkt *p)
{
	struct eim_scratch *sc = eim_scratch_get();
	struct snat_rule *r;

	if (!sc)
		return 1;
	if (p->proto == IPPROTO_TCP_ &&
	    (p->tcp_flags & (TCP_SYN_ | TCP_ACK_ | TCP_FIN_ | TCP_RST_)) != TCP_SYN_)
		return 1;
	if (eim_mapping_of(p->daddr, p->dport, p->proto, &sc->h))
		return 1;
	r = bpf_map_lookup_elem(&snat_rules, &sc->h.slot);
	if (!r || !(r->flags & (RULE_F_EIF | RULE_F_ADF)))
		return 1;
	if (!(r->flags & RULE_F_EIF)) {
		eim_key_set(&sc->pk, sc->h.ek.addr, sc->h.ek.port, p->proto, EIM_DIR_PERMIT, p->saddr);
		if (!bpf_map_lookup_elem(&snat_eim, &sc->pk))
			return 1;
	}
	return eim_admit(skb, sc, p->saddr, p->sport, p->proto);
}
