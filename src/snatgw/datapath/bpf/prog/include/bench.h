/* Bench-only entry points (built with -DSNAT_BENCH; never attached).  BPF_PROG_TEST_RUN with
 * repeat runs the program again on the same skb, which the first round already translated;
 * these wrappers save the first SNAT_BENCH_SAVE bytes, run the real program, and put them back,
 * so every round sees the original packet.  bench_new also sets a fresh source port each round
 * (a new flow every time).  bench_noop is the wrapper alone, to subtract its cost. */
#pragma once

#define SNAT_BENCH_SAVE 96 /* bench packets are at least this long */

static __u32 bench_round; /* rounds so far: the new-flow source port offset */

/* verifier: the saved bytes live in a map, the datapath's call chain leaves no stack for them */
struct bench_buf {
	__u8 b[SNAT_BENCH_SAVE];
};
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct bench_buf);
} snat_bench_buf SEC(".maps");

static __always_inline __u8 *bench_buf(void)
{
	__u32 zero = 0;
	struct bench_buf *b = bpf_map_lookup_elem(&snat_bench_buf, &zero);

	return b ? b->b : NULL;
}

static __always_inline int bench_save(struct __sk_buff *skb, __u8 *save)
{
	if (!save)
		return -1;
	return bpf_skb_load_bytes(skb, 0, save, SNAT_BENCH_SAVE);
}

static __always_inline void bench_restore(struct __sk_buff *skb, __u8 *save)
{
	bpf_skb_store_bytes(skb, 0, save, SNAT_BENCH_SAVE, 0);
}

SEC("tc")
int bench_noop(struct __sk_buff *skb)
{
	__u8 *save = bench_buf();

	if (bench_save(skb, save) < 0)
		return TC_ACT_SHOT;
	bench_restore(skb, save);
	return TC_ACT_OK;
}

SEC("tc")
int bench_inside(struct __sk_buff *skb)
{
	__u8 *save = bench_buf();
	int ret;

	if (bench_save(skb, save) < 0)
		return TC_ACT_SHOT;
	ret = snat_entry(skb, 0);
	bench_restore(skb, save);
	return ret;
}

SEC("tc")
int bench_outside(struct __sk_buff *skb)
{
	__u8 *save = bench_buf();
	int ret;

	if (bench_save(skb, save) < 0)
		return TC_ACT_SHOT;
	ret = snat_entry(skb, 1);
	bench_restore(skb, save);
	return ret;
}

/* a new flow each round: the source port (IHL 5 assumed) becomes 10000 + round */
SEC("tc")
int bench_new(struct __sk_buff *skb)
{
	__u8 *save = bench_buf();
	__be16 port = bpf_htons((__u16)(10000 + bench_round++));
	int ret;

	if (bench_save(skb, save) < 0)
		return TC_ACT_SHOT;
	bpf_skb_store_bytes(skb, ETH_HLEN + 20, &port, 2, 0);
	ret = snat_entry(skb, 0);
	bench_restore(skb, save);
	return ret;
}

SEC("tc")
int bench_egress(struct __sk_buff *skb)
{
	__u8 *save = bench_buf();
	int ret;

	if (bench_save(skb, save) < 0)
		return TC_ACT_SHOT;
	ret = snat_egress_body(skb);
	bench_restore(skb, save);
	return ret;
}
