/* Rule match: the first rule in priority order (slots of snat_rules) whose source/destination
 * nets hold and whose oif/gw, when named, equal the route's.  bpf_loop keeps the verifier's
 * work independent of the rule count, so all SNAT_MAX_RULES slots can be scanned. */
#pragma once
#include "maps.h"

struct rule_scan {
	__be32 saddr;
	__be32 daddr;
	__be32 nexthop; /* route's next hop (the destination when on-link) */
	__u32 oif;      /* route's egress ifindex */
	__u32 slot;     /* out: matching slot, or (u32)-1 */
};

static long rule_scan_cb(__u32 i, void *ctx)
{
	struct rule_scan *s = ctx;
	struct snat_rule *r = bpf_map_lookup_elem(&snat_rules, &i);

	if (!r)
		return 1;
	if ((s->saddr & r->src_mask) != r->src_net || (s->daddr & r->dst_mask) != r->dst_net)
		return 0;
	if ((r->flags & RULE_F_OIF) && r->oif != s->oif)
		return 0;
	if ((r->flags & RULE_F_GW) && r->gw != s->nexthop)
		return 0;
	s->slot = i;
	return 1; /* first match wins */
}

/* the matching rule or NULL */
static __always_inline struct snat_rule *rules_match4(const struct snat_cfg *cfg, struct rule_scan *s)
{
	__u32 n = cfg->nrules;

	if (n > SNAT_MAX_RULES)
		n = SNAT_MAX_RULES;
	s->slot = (__u32)-1;
	bpf_loop(n, rule_scan_cb, s, 0);
	if (s->slot == (__u32)-1)
		return NULL;
	return bpf_map_lookup_elem(&snat_rules, &s->slot);
}
