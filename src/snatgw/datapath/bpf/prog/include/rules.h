/* Rule match: the first rule in priority order (slots of snat_rules) whose source/destination
 * nets hold and whose oif/gw, when named, equal the route's.  bpf_loop keeps the verifier's
 * work independent of the rule count, so all SNAT_MAX_RULES slots can be scanned. */
#pragma once
#include "maps.h"

/* slots checked per bpf_loop callback: the indirect call costs more than a rule check */
#define RULES_PER_CALL 32

struct rule_scan {
	__be32 saddr;
	__be32 daddr;
	__be32 nexthop; /* route's next hop (the destination when on-link) */
	__u32 oif;      /* route's egress ifindex */
	__u32 n;        /* slots in use */
	__u32 slot;     /* out: matching slot, or (u32)-1 */
};

static __always_inline int rule_matches(const struct snat_rule *r, const struct rule_scan *s)
{
	if ((s->saddr & r->src_mask) != r->src_net || (s->daddr & r->dst_mask) != r->dst_net)
		return 0;
	if ((r->flags & RULE_F_OIF) && r->oif != s->oif)
		return 0;
	if ((r->flags & RULE_F_GW) && r->gw != s->nexthop)
		return 0;
	return 1;
}

static long rule_scan_cb(__u32 i, void *ctx)
{
	struct rule_scan *s = ctx;

#pragma unroll
	for (__u32 j = 0; j < RULES_PER_CALL; j++) {
		__u32 slot = i * RULES_PER_CALL + j;
		struct snat_rule *r;

		if (slot >= s->n)
			return 1;
		r = bpf_map_lookup_elem(&snat_rules, &slot);
		if (!r)
			return 1;
		if (rule_matches(r, s)) {
			s->slot = slot;
			return 1; /* first match wins */
		}
	}
	return 0;
}

/* the matching rule or NULL */
static __always_inline struct snat_rule *rules_match4(const struct snat_cfg *cfg, struct rule_scan *s)
{
	s->n = cfg->nrules;
	if (s->n > SNAT_MAX_RULES)
		s->n = SNAT_MAX_RULES;
	s->slot = (__u32)-1;
	bpf_loop((s->n + RULES_PER_CALL - 1) / RULES_PER_CALL, rule_scan_cb, s, 0);
	if (s->slot == (__u32)-1)
		return NULL;
	return bpf_map_lookup_elem(&snat_rules, &s->slot);
}
