/* The audit log: one struct audit_rec per session created (the new-flow path, after the pair
 * is inserted) and per session ended (the sweep: expiry and flush) into the snat_audit ring.
 * Callers test CFG_F_AUDIT first, so a disabled log costs one branch.  A full ring never waits:
 * the record is dropped and counted (AUDIT_CNT_LOST); the daemon reports the count. */
#pragma once
#include "maps.h"
#include "stats.h"

static __always_inline void audit_count(__u32 what)
{
	count_inc(&snat_audit_cnt, &what);
}

/* The config's CFG_F_* flags, for paths that do not hold the config already (one lookup) */
static __always_inline __u32 cfg_flags_now(void)
{
	__u32 zero = 0;
	struct snat_cfg *cfg = bpf_map_lookup_elem(&snat_config, &zero);

	return cfg ? cfg->flags : 0;
}


#define AUDIT_KIND(kind, why) ((kind) | ((why) << 8))

/* A record about the session whose OUT key is ``k`` and OUT entry ``e`` (its SNAT address and
 * port, rule, state); ``kind_why`` is AUDIT_KIND(AUDIT_NEW/AUDIT_END, AUDIT_END_*), ``last``
 * the session's last packet (either direction).  ICMP queries: the inside identifier is
 * k->sport, the SNAT one the entry's rw_port.  Not inlined: the packet path carries one call,
 * not the body. */
static __noinline int audit_fill(struct audit_rec *r, const struct ct_key *k, const struct ct_entry *e,
				  __u32 kind_why, __u64 last) /* (a function of struct audit_rec: its BTF) */
{
	r->inside = k->saddr;
	r->nat = e->rw_addr;
	r->remote = k->daddr;
	r->inside_port = k->sport;
	r->nat_port = e->rw_port;
	r->remote_port = k->dport;
	r->kind = kind_why & 0xff;
	r->proto = k->proto;
	r->rule_id = e->rule_id;
	r->why = (kind_why >> 8) & 0xff;
	r->state = e->state;
	r->pad = 0;
	r->pad2 = 0;
	r->last_seen = last;
	return 0;
}

static __noinline int audit_session(const struct ct_key *k, const struct ct_entry *e, __u32 kind_why,
				    __u64 now, __u64 last)
{
	struct audit_rec *r = bpf_ringbuf_reserve(&snat_audit, sizeof(*r), 0);

	if (!r) {
		audit_count(AUDIT_CNT_LOST);
		return 0;
	}
	r->ts = now;
	audit_fill(r, k, e, kind_why, last);
	bpf_ringbuf_submit(r, 0);
	audit_count(AUDIT_CNT_WRITTEN);
	return 0;
}
