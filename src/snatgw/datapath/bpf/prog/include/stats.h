/* Counters: one reason per packet (per-CPU array) and per-rule packets/bytes/sessions
 * (per-CPU hash by rule_id, entry made on the rule's first session). */
#pragma once
#include "maps.h"

/* +n at ``key`` of a per-CPU array of __u64 counters (per-CPU: no atomics needed); the
 * reasons, the audit log's and the port allocator's counters */
static __always_inline void count_add(void *map, const void *key, __u64 n)
{
	__u64 *c = bpf_map_lookup_elem(map, key);

	if (c)
		*c += n;
}

static __always_inline void count_inc(void *map, const void *key)
{
	count_add(map, key, 1);
}

static __always_inline void stats_reason(__u32 reason)
{
	count_inc(&snat_reasons, &reason);
}

static __always_inline void stats_rule(__u32 rule_id, __u32 bytes, int new_session)
{

	struct rule_stats *s = bpf_map_lookup_elem(&snat_rule_stats, &rule_id);

	if (s) {
		s->packets += 1;
		s->bytes += bytes;
		s->sessions += new_session;
		return;
	}
	struct rule_stats init = { .packets = 1, .bytes = bytes, .sessions = new_session };

	/* race: two CPUs may both insert; NOEXIST lets one win and the other packet goes
	 * uncounted, which is cheaper than a lock on every packet */
	bpf_map_update_elem(&snat_rule_stats, &rule_id, &init, BPF_NOEXIST);
}

/* A new session of the rule whose first packet was not translated (a hairpinned packet whose
 * receiver is gone): sessions +1 only */
static __always_inline void stats_rule_session(__u32 rule_id)
{
	struct rule_stats *s = bpf_map_lookup_elem(&snat_rule_stats, &rule_id);
	struct rule_stats init = { .sessions = 1 };

	if (s) {
		s->sessions += 1;
		return;
	}
	bpf_map_update_elem(&snat_rule_stats, &rule_id, &init, BPF_NOEXIST);
}

/* The number of the walk counting now (snat_walk; 0: none), read BEFORE a new session's entries
 * are inserted and its counts incremented: the walk takes its snapshot of the counts before it
 * publishes its number, so a session stamped with it was counted after the snapshot, by the
 * datapath, and the walk leaves it out of its own count (sweep.bpf.c, count_pair).  A frame of
 * its own: the new-flow frames have no stack to spare (verifier: 512 bytes for the chain). */
static __noinline __attribute__((unused)) __u16 walk_now(void) /* (the sweep includes this) */
{
	__u32 zero = 0;
	struct walk_state *w = bpf_map_lookup_elem(&snat_walk, &zero);

	return w ? (__u16)w->current : 0;
}

/* Live counts (struct live_count) of an inside host, SNAT address or rule: +1 session or +1
 * refusal, atomically; the entry is made (NOEXIST) on first use.  The expiry sweep recounts
 * sessions.  A full map (or a lost race on the first insert, retried once) drops the count. */
static __always_inline void live_add(void *map, const void *key, int refusal)
{
	struct live_count *c = bpf_map_lookup_elem(map, key);

	if (!c) {
		struct live_count init = { .sessions = !refusal, .refusals = !!refusal };

		if (bpf_map_update_elem(map, key, &init, BPF_NOEXIST) == 0)
			return;
		c = bpf_map_lookup_elem(map, key); /* another CPU made it first */
		if (!c)
			return;
	}
	if (refusal)
		__sync_fetch_and_add(&c->refusals, 1);
	else
		__sync_fetch_and_add(&c->sessions, 1);
}

/* What a program decided about a packet: enum verdict, enum reason, redirect target. */
struct snat_res {
	__u32 verdict;
	__u32 reason;
	__u32 ifindex;
	__be32 nexthop; /* 0: let bpf_redirect_neigh find the next hop */
};

static __always_inline int verdict_set(struct snat_res *v, __u32 verdict, __u32 reason)
{
	v->verdict = verdict;
	v->reason = reason;
	return 0;
}

static __always_inline int verdict_redirect(struct snat_res *v, __u32 reason, __u32 ifindex, __be32 nh)
{
	v->verdict = VERDICT_REDIRECT;
	v->reason = reason;
	v->ifindex = ifindex;
	v->nexthop = nh;
	return 0;
}

/* The session clock: CLOCK_MONOTONIC like bpf_ktime_get_ns, but the tick-coarse variant (at
 * most one jiffy behind), which costs a fraction of a clock read on the per-packet path; the
 * timeouts it feeds are whole seconds.  SNAT_FINE_CLOCK builds use the precise clock. */
static __always_inline __u64 snat_now(void)
{
#ifdef SNAT_TEST
	__u32 zero = 0;
	__u64 *fake = bpf_map_lookup_elem(&snat_clock, &zero);

	if (fake && *fake)
		return *fake;
#endif
#ifdef SNAT_FINE_CLOCK
	return bpf_ktime_get_ns();
#else
	return bpf_ktime_get_coarse_ns();
#endif
}
