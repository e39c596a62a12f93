/* A tiny stand-in for the snatgw datapath: the same maps (names, types, layouts) as
 * snatgw.layout and three TC programs that count a reason and pass.  Used by the loader and
 * libbpf tests so they do not depend on the real programs. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include "snat_layout.h"

struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, SNAT_MAX_RULES);
	 __type(key, __u32); __type(value, struct snat_rule); } snat_rules SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct snat_cfg); } snat_config SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_SESSIONS * 2);
	 __type(key, struct ct_key); __type(value, struct ct_entry); } snat_ct SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, SNAT_MAX_FRAGS);
	 __type(key, struct frag_key); __type(value, struct frag_entry); } snat_frags SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, REASON_MAX);
	 __type(key, __u32); __type(value, __u64); } snat_reasons SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_HASH); __uint(max_entries, SNAT_MAX_RULES);
	 __type(key, __u32); __type(value, struct rule_stats); } snat_rule_stats SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_IFACES);
	 __type(key, __u32); __type(value, __u32); } snat_ifaces SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_HOSTS);
	 __type(key, __be32); __type(value, struct live_count); } snat_host_sess SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_POOL_ADDRS);
	 __type(key, __be32); __type(value, struct live_count); } snat_addr_stats SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_RULES);
	 __type(key, __u32); __type(value, struct live_count); } snat_rule_live SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __uint(max_entries, SNAT_MAX_FROM_NETS);
	 __uint(map_flags, BPF_F_NO_PREALLOC);
	 __type(key, struct lpm_v4); __type(value, __u32); } snat_from_nets SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, SNAT_MAX_REFUSED);
	 __type(key, struct ct_key); __type(value, struct refusal); } snat_refused SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_INSIDE_ADDRS);
	 __type(key, __be32); __type(value, __u32); } snat_inside_addrs SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_MAX_RULES);
	 __type(key, __u32); __type(value, __u32); } snat_rule_slots SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_GW_SLOTS);
	 __type(key, struct gw_key); __type(value, __u32); } snat_gw_marks SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, SNAT_EIM_PER_SESSION * SNAT_MAX_SESSIONS);
	 __uint(map_flags, BPF_F_NO_PREALLOC);
	 __type(key, struct eim_key); __type(value, struct eim_entry); } snat_eim SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, SNAT_AUDIT_RING_BYTES); } snat_audit SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, AUDIT_CNT_N);
	 __type(key, __u32); __type(value, __u64); } snat_audit_cnt SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, SNAT_MAX_SPILL_MEMO);
	 __type(key, struct spill_key); __type(value, struct spill_memo); } snat_spill_memo SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, ALLOC_CNT_N);
	 __type(key, __u32); __type(value, __u64); } snat_alloc_cnt SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct walk_state); } snat_walk SEC(".maps");

static __always_inline int count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&snat_reasons, &reason);
	if (c)
		*c += 1;
	return TC_ACT_OK;
}

SEC("tc") int snat_inside(struct __sk_buff *skb) { return count(REASON_PASS_NO_RULE); }
SEC("tc") int snat_outside(struct __sk_buff *skb) { return count(REASON_PASS_NO_SESSION_IN); }
SEC("tc") int snat_egress(struct __sk_buff *skb) { return count(REASON_PASS_LOCAL); }
SEC("tc") int snat_recirc(struct __sk_buff *skb) { return count(REASON_DROP_FRAG_UNKNOWN); }

/* Keep every layout struct in BTF even if no map used it. */
struct snat_layout_all { struct ct_key a; struct ct_entry b; struct snat_rule c;
	struct snat_cfg d; struct frag_key e; struct frag_entry f; struct rule_stats g;
	struct live_count h; struct lpm_v4 i; struct audit_rec j; };
struct snat_layout_all snat_layout_all_ SEC(".data.layout");

char _license[] SEC("license") = "GPL";
