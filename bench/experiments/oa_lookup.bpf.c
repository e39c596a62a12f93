/* Session-table layouts, measured alone (not part of snatgw; bench/experiments/oa_lookup.py runs it):
 * cold random lookups and inserts in a preallocated hash map of the session table's shape (16 B key,
 * 48 B value) against an open-addressed array of 64 B slots, one cache line per session entry */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct key { __u32 a, b, c, d; };
struct val { __u64 v[6]; };
struct slot { struct key k; struct val v; };
#define HN 2097152
#define ON 4194304
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, HN); __type(key, struct key); __type(value, struct val); } h SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, ON); __type(key, __u32); __type(value, struct slot); } oa SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 8); __type(key, __u32); __type(value, __u64); } res SEC(".maps");
volatile __u32 NKEYS = 720000;
volatile __u32 BASE = 0; /* fill: first key index of this run */

static __always_inline void mk(struct key *k, __u32 i, __u32 salt) { k->a = i * 2654435761u; k->b = i ^ 0x5bd1e995; k->c = i + 7; k->d = 0x11 + salt; }
static __always_inline __u32 mix(const struct key *k) {
	__u32 x = k->a ^ (k->b * 0x85ebca6b) ^ (k->c * 0xc2b2ae35) ^ (k->d * 0x27d4eb2f);
	x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16; return x;
}
static __always_inline __u64 rnd(__u32 i) { __u64 x = i * 0x9E3779B97F4A7C15ull; x ^= x >> 29; return x; }

struct fctx { __u32 n; };
static long fill_cb(__u32 j, void *c) {
	__u32 i = BASE + j; struct key k; struct val v = {}; if (i >= NKEYS) return 1;
	mk(&k, i, 0); v.v[0] = rnd(i);
	bpf_map_update_elem(&h, &k, &v, BPF_NOEXIST);
	__u32 idx = mix(&k) & (ON - 1);
	for (int p = 0; p < 16; p++) {
		__u32 s = (idx + p) & (ON - 1);
		struct slot *sl = bpf_map_lookup_elem(&oa, &s);
		if (!sl) return 1;
		if (sl->k.d == 0) { sl->k = k; sl->v = v; break; }
	}
	return 0;
}
SEC("tc") int fill(struct __sk_buff *skb) { bpf_loop(65536, fill_cb, NULL, 0); return 0; }

struct lctx { __u32 i; __u64 acc; __u32 salt; __u32 hits; };
static long h_cb(__u32 j, void *c) {
	struct lctx *x = c; struct key k; mk(&k, x->i, x->salt);
	struct val *v = bpf_map_lookup_elem(&h, &k);
	__u64 r = v ? v->v[0] : rnd(x->i + 1); x->hits += !!v;
	x->acc += r; x->i = (__u32)((r + j) % NKEYS); return 0;
}
static long oa_cb(__u32 j, void *c) {
	struct lctx *x = c; struct key k; mk(&k, x->i, x->salt);
	__u32 idx = mix(&k) & (ON - 1); __u64 r = rnd(x->i + 1);
	for (int p = 0; p < 16; p++) {
		__u32 s = (idx + p) & (ON - 1);
		struct slot *sl = bpf_map_lookup_elem(&oa, &s);
		if (!sl || sl->k.d == 0) break;
		if (sl->k.a == k.a && sl->k.b == k.b && sl->k.c == k.c && sl->k.d == k.d) { r = sl->v.v[0]; x->hits++; break; }
	}
	x->acc += r; x->i = (__u32)((r + j) % NKEYS); return 0;
}
static __always_inline int run(void *cb, __u32 salt, __u32 slot) {
	struct lctx x = { .i = 12345, .salt = salt };
	bpf_loop(8192, cb, &x, 0);
	__u64 *o = bpf_map_lookup_elem(&res, &slot); if (o) *o = x.hits; return 0;
}
SEC("tc") int h_hit(struct __sk_buff *skb) { return run(h_cb, 0, 0); }
SEC("tc") int h_miss(struct __sk_buff *skb) { return run(h_cb, 1, 1); }
SEC("tc") int oa_hit(struct __sk_buff *skb) { return run(oa_cb, 0, 2); }
SEC("tc") int oa_miss(struct __sk_buff *skb) { return run(oa_cb, 1, 3); }

volatile __u32 IBASE = 0;
static long hins_cb(__u32 j, void *c) {
	struct lctx *x = c; struct key k; struct val v = {}; __u32 i = IBASE + j * 7919;
	mk(&k, i, 2); v.v[0] = i;
	x->hits += bpf_map_update_elem(&h, &k, &v, BPF_NOEXIST) == 0; return 0;
}
static long oains_cb(__u32 j, void *c) {
	struct lctx *x = c; struct key k; struct val v = {}; __u32 i = IBASE + j * 7919;
	mk(&k, i, 2); v.v[0] = i;
	__u32 idx = mix(&k) & (ON - 1);
	for (int p = 0; p < 16; p++) {
		__u32 s = (idx + p) & (ON - 1);
		struct slot *sl = bpf_map_lookup_elem(&oa, &s);
		if (!sl) break;
		if (sl->k.d == 0 && __sync_val_compare_and_swap(&sl->k.d, 0, 0xffffffff) == 0) {
			sl->k.a = k.a; sl->k.b = k.b; sl->k.c = k.c; sl->v = v; sl->k.d = k.d; x->hits++; break;
		}
	}
	return 0;
}
SEC("tc") int h_ins(struct __sk_buff *skb) { return run(hins_cb, 0, 4); }
SEC("tc") int oa_ins(struct __sk_buff *skb) { return run(oains_cb, 0, 5); }
