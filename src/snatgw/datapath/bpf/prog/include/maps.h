/* BTF map definitions of the datapath.  Names are layout.py's MAP_*; sizes are the generated
 * SNAT_MAX_* constants, overridable with -D or, at load, with bpf_map__set_max_entries. */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "snat_layout.h"

/* Rules in priority order; slots [0, cfg.nrules) are in use. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SNAT_MAX_RULES);
	__type(key, __u32);
	__type(value, struct snat_rule);
} snat_rules SEC(".maps");

/* Global settings: one slot. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct snat_cfg);
} snat_config SEC(".maps");

/* Sessions, both directions (two entries per session).  A plain HASH, not LRU: the spec
 * forbids evicting half a pair; when it is full a new flow is refused (DROP_TABLE_FULL). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * SNAT_MAX_SESSIONS);
	__type(key, struct ct_key);
	__type(value, struct ct_entry);
} snat_ct SEC(".maps");

/* Translated first fragments, so later fragments get the same address rewrite, and pass
 * markers (ifindex 0) of first fragments passed untranslated, so the rest passes too.  LRU: a
 * forgotten entry only costs the rest of one datagram. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SNAT_MAX_FRAGS);
	__type(key, struct frag_key);
	__type(value, struct frag_entry);
} snat_frags SEC(".maps");

/* Packets per reason (enum reason), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, REASON_MAX);
	__type(key, __u32);
	__type(value, __u64);
} snat_reasons SEC(".maps");

/* Per-rule counters by rule_id, per CPU; entries are created on a rule's first session. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SNAT_MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule_stats);
} snat_rule_stats SEC(".maps");

/* Roles of the attached devices by ifindex (IFACE_INSIDE / IFACE_OUTSIDE), written by the
 * control plane: a new flow routed out of an inside device is internal (PASS_INTERNAL). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} snat_ifaces SEC(".maps");

/* Live counts (struct live_count): sessions +1 at creation (atomic add), refusals; the
 * expiry sweep recounts sessions.  By inside address, by SNAT address (wire order), by rule. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_HOSTS);
	__type(key, __be32);
	__type(value, struct live_count);
} snat_host_sess SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_POOL_ADDRS);
	__type(key, __be32);
	__type(value, struct live_count);
} snat_addr_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_RULES);
	__type(key, __u32);
	__type(value, struct live_count);
} snat_rule_live SEC(".maps");

/* Every rule's `from` net (value 1), written by the control plane on each apply: the egress
 * guard drops a packet leaving an uplink with such a source unless it is a local address. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SNAT_MAX_FROM_NETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_v4);
	__type(value, __u32);
} snat_from_nets SEC(".maps");
/* The walk in progress (struct walk_state, slot 0): the datapath reads `current` before it
 * makes a session and, when a walk is counting, stamps the session with it (CT_F_WALK on the
 * OUT entry, the number in the IN entry's iif), so the walk counts it once (sweep.bpf.c). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct walk_state);
} snat_walk SEC(".maps");

/* Refusal markers: a refused new flow's OUT key -> when, why, which SNAT address (struct
 * refusal), so its next packets for SNAT_REFUSED_SECS cost one lookup instead of a search.
 * LRU: losing a marker only costs one more search. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SNAT_MAX_REFUSED);
	__type(key, struct ct_key);
	__type(value, struct refusal);
} snat_refused SEC(".maps");

/* The spill memo (step 13): a SNAT address toward a remote endpoint whose full port search
 * found no free port -> when (struct spill_memo); while younger than SNAT_SPILL_MEMO_NS a new
 * flow tries only its first candidate there.  LRU: losing a memo only costs one full search. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SNAT_MAX_SPILL_MEMO);
	__type(key, struct spill_key);
	__type(value, struct spill_memo);
} snat_spill_memo SEC(".maps");

/* Allocator counters (ALLOC_CNT_*: memo hits, memos written), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, ALLOC_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} snat_alloc_cnt SEC(".maps");

/* The gateway's own addresses on its inside devices (value: ifindex), written by the control
 * plane: local, but never a source on an uplink (they answer nothing from outside). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_INSIDE_ADDRS);
	__type(key, __be32);
	__type(value, __u32);
} snat_inside_addrs SEC(".maps");

/* rule_id -> slot of snat_rules (written with the rules; the reader checks the slot's id) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_RULES);
	__type(key, __u32);
	__type(value, __u32);
} snat_rule_slots SEC(".maps");

/* new_gw egresses (device, next hop) -> skb->mark (layout.GW_MARK_BASE + n), written by the
 * control plane with the ip rule and table that route that mark by the egress: looked up only
 * for a translated packet handed to the kernel (snat_gw_mark), never on the redirect path */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_GW_SLOTS);
	__type(key, struct gw_key);
	__type(value, __u32);
} snat_gw_marks SEC(".maps");

/* Endpoint-independent mappings (eim.h): endpoints, their owners, ADF permits.  No prealloc:
 * costs memory only when a rule maps endpoint-independently. */
#ifndef SNAT_MAX_EIM
#define SNAT_MAX_EIM (SNAT_EIM_PER_SESSION * SNAT_MAX_SESSIONS)
#endif
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_EIM);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct eim_key);
	__type(value, struct eim_entry);
} snat_eim SEC(".maps");

/* The audit log (issue 13): a record per session created and ended (struct audit_rec, audit.h),
 * read by the daemon through the ring's epoll fd.  Written only under CFG_F_AUDIT. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, SNAT_AUDIT_RING_BYTES);
} snat_audit SEC(".maps");

/* Audit records by outcome (AUDIT_CNT_WRITTEN, AUDIT_CNT_LOST: the ring was full), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AUDIT_CNT_N);
	__type(key, __u32);
	__type(value, __u64);
} snat_audit_cnt SEC(".maps");

#ifdef SNAT_TEST
/* Test builds only: the clock (ns) the programs read when it is not 0, so the differential
 * tests run the programs at the model's times (refusal markers, fragment timeouts). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} snat_clock SEC(".maps");

/* Test builds only: the last packet's verdict, reason and redirect target, so that
 * BPF_PROG_TEST_RUN (which never performs the redirect) can be checked against the model.
 * Value: u32[4] = {verdict, reason, ifindex, nexthop (wire order)}. */
struct snat_dbg {
	__u32 verdict;
	__u32 reason;
	__u32 ifindex;
	__be32 nexthop;
};
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct snat_dbg);
} snat_dbg SEC(".maps");
#endif
