// SPDX-License-Identifier: GPL-2.0
/* The expiry sweep: a BPF_PROG_TYPE_SYSCALL program the daemon runs with BPF_PROG_RUN.  A walk
 * is one run over the whole of snat_ct with bpf_for_each_map_elem (phase SWEEP_WHOLE), or
 * SWEEP_BEGIN, then one SWEEP_KEYS run per chunk of keys the control plane read by batch lookup
 * (sweep_keys), then SWEEP_END: no run holds the CPU long.  A chunked walk may be cut short
 * between chunks (a reload that turns a host limit on must recount now, not after the sweep):
 * SWEEP_ABORT then ends it instead of SWEEP_END (walk_abort).  Three modes (sweep_args.mode):
 *
 *   SWEEP_EXPIRE  remove pairs idle longer than their state's timeout (both keys, OUT first,
 *                 judged again on the live entries right before the delete, so a pair refreshed
 *                 during the walk stays), recount the live counts (snat_rule_live,
 *                 snat_addr_stats, snat_host_sess); with args.full also look up the other half
 *                 of every entry and remove half pairs older than the grace (without it, only
 *                 entries that look expired cost a lookup: the common walk reads each entry once);
 *   SWEEP_FLUSH   remove the pairs the filters select (no filter: every entry), recount;
 *   SWEEP_RECOUNT remove nothing, recount (each OUT entry counts, no lookup): the control plane
 *                 runs it when a reload turns a host limit on, after setting CFG_F_HOST_COUNT
 *                 and before the rules with the limit (docs/datapath.md step 15).
 *
 * Recount without losing the datapath's increments: at the start of a walk, each count's
 * sessions value S0 is put into a private delta map as -S0; every pair the walk keeps adds 1;
 * at the end each delta d is ADDED atomically to the count (S0 + increments during the walk +
 * d = pairs kept + increments during the walk).  A session the datapath creates during the walk
 * is counted by the datapath, so the walk must not count it again when it comes by it: after
 * its snapshot the walk publishes its number (snat_walk.current, 1-65535), the datapath stamps
 * a session it makes meanwhile with the number it read before inserting and counting
 * (CT_F_WALK on the OUT entry, the number in the IN entry's iif), and the walk leaves a pair
 * stamped with its own number out of the counts the datapath keeps (count_pair); a stamp of an
 * earlier walk is settled (the pair counts, the stamp goes).  Left over: a session whose
 * datapath read the number before the walk published it but counted after its host's snapshot
 * (the hosts' counts are read last, in a fraction of a millisecond) is counted twice until the
 * next walk; high, never low.
 * The order (snapshot loads, then the store of the number; the datapath's load of the number,
 * then its atomic add) holds on x86 (TSO), where this runs.  Counts whose sessions and refusals are both 0 are removed
 * (bounded maps); a datapath increment racing with that removal is lost until the next walk.
 * Refusals are never touched.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "snat_layout.h"
#include "maps.h"
#include "audit.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweep_args);
} sweep_args SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweep_res);
} sweep_res SEC(".maps");

/* SWEEP_KEYS: the keys one run visits (written by the control plane from a batch lookup) */
struct sweep_keys {
	__u32 n;
	__u32 pad;
	struct ct_key keys[SWEEP_CHUNK];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sweep_keys);
} sweep_keys SEC(".maps");

/* timeout in ns by ct_state (states >= SWEEP_STATES use entry 0, NONE's) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SWEEP_STATES);
	__type(key, __u32);
	__type(value, __u64);
} sweep_timeouts SEC(".maps");

/* deltas of the recount, by the live-count maps' keys; private to the walk */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_HOSTS);
	__type(key, __be32);
	__type(value, __s64);
} sweep_host SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_POOL_ADDRS);
	__type(key, __be32);
	__type(value, __s64);
} sweep_addr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_RULES);
	__type(key, __u32);
	__type(value, __s64);
} sweep_rule SEC(".maps");

/* endpoint-independent mappings: at the start of an expiry walk each endpoint and permit gets a
 * mark 0 here; every kept pair of an endpoint-independent session adds 1 to its endpoint's and
 * permit's mark; at the end an entry whose mark is still 0 and which is older than the grace
 * goes (an endpoint with its owner, when that points back).  One made or reused during the walk
 * has no mark or a fresh last_seen: kept.  (SNAT_MAX_EIM: maps.h, beside snat_eim.) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SNAT_MAX_EIM);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct eim_key);
	__type(value, __s64);
} sweep_eim SEC(".maps");

/* what the callbacks share: the run's args and result (bpf_for_each_map_elem takes a pointer
 * to the stack as the callbacks' context) */
struct walk {
	struct sweep_args *a;
	struct sweep_res *res;
	__u32 audit; /* CFG_F_AUDIT: a record per removed session (audit.h) */
	__u32 number; /* this walk's number (snat_walk.current), stamped on the sessions made meanwhile */
	__u32 host_counted; /* CFG_F_HOST_COUNT: the datapath counts inside hosts too */
};

static __always_inline int key_eq(const struct ct_key *a, const struct ct_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline void bump(void *map, const void *key, __s64 by, struct sweep_res *res)
{
	__s64 *v = bpf_map_lookup_elem(map, key);

	if (v) {
		*v += by;
		return;
	}
	if (bpf_map_update_elem(map, key, &by, BPF_NOEXIST)) {
		v = bpf_map_lookup_elem(map, key);
		if (v)
			*v += by;
		else
			res->count_errors++;
	}
}

/* ---- start of a walk: delta = -sessions of every count (the deltas are empty: the end of
 * the previous walk, SWEEP_END or SWEEP_ABORT, removed each one) */

#define SNAP_CB(name, delta)                                                                      \
	static long name(void *map, const __u32 *key, struct live_count *lc, struct walk *w)      \
	{                                                                                         \
		bump(&delta, key, -(__s64)lc->sessions, w->res);                                  \
		return 0;                                                                         \
	}
SNAP_CB(snap_host, sweep_host)
SNAP_CB(snap_addr, sweep_addr)
SNAP_CB(snap_rule, sweep_rule)

/* ---- end of a walk: add each delta to its count and remove the delta; a count left with
 * sessions and refusals both 0 goes too (every count has a delta: the start made one).  An
 * inside host's count goes at 0 sessions whatever its refusals (keep_refused 0): hosts are
 * as many as the inside nets' addresses, and refused ones with no session kept for good
 * would fill the map (a host spoofing its subnet's addresses could), after which new hosts
 * went uncounted and unlimited; the SNAT addresses' and rules' (bounded) keep theirs. */

#define PUB_CB(name, live, keep_refused)                                                          \
	static long name(void *map, const __u32 *key, __s64 *d, struct walk *w)                   \
	{                                                                                         \
		struct live_count *lc = NULL;                                                     \
		__s64 by = *d;                                                                    \
		if (by) {                                                                         \
			lc = bpf_map_lookup_elem(&live, key);                                     \
			if (!lc && by > 0) {                                                      \
				struct live_count n = { .sessions = (__u32)by };                  \
				if (!bpf_map_update_elem(&live, key, &n, BPF_NOEXIST))            \
					by = 0;                                                   \
				else                                                              \
					lc = bpf_map_lookup_elem(&live, key);                     \
			}                                                                         \
			if (lc && by)                                                             \
				__sync_fetch_and_add(&lc->sessions, (__u32)by);                   \
			else if (by > 0)                                                          \
				w->res->count_errors++;                                           \
		}                                                                                 \
		bpf_map_delete_elem(map, key);                                                    \
		lc = bpf_map_lookup_elem(&live, key);                                             \
		if (lc && !lc->sessions && !(keep_refused && lc->refusals))                       \
			bpf_map_delete_elem(&live, key);                                          \
		return 0;                                                                         \
	}
PUB_CB(pub_host, snat_host_sess, 0)
PUB_CB(pub_addr, snat_addr_stats, 1)
PUB_CB(pub_rule, snat_rule_live, 1)

static __always_inline int old(__u64 now, __u64 seen, __u64 grace);

/* start: marks 0 for endpoints and permits; owners whose endpoint is gone or points elsewhere
 * go once older than the grace */
static long snap_eim(void *map, const struct eim_key *key, struct eim_entry *e, struct walk *w)
{
	struct eim_key k = *key, ek;
	struct eim_entry *ep;
	__s64 zero = 0;

	if (k.dir != EIM_DIR_OWNER) {
		if (bpf_map_update_elem(&sweep_eim, &k, &zero, BPF_NOEXIST) && bpf_map_lookup_elem(&sweep_eim, &k) == NULL)
			w->res->count_errors++;
		return 0;
	}
	if (!old(w->a->now, e->last_seen, w->a->grace))
		return 0;
	ek.addr = e->addr;
	ek.remote = 0;
	ek.port = e->port;
	ek.proto = k.proto;
	ek.dir = EIM_DIR_ENDPOINT;
	ep = bpf_map_lookup_elem(&snat_eim, &ek);
	if (!ep || ep->addr != k.addr || ep->port != k.port)
		bpf_map_delete_elem(&snat_eim, &k);
	return 0;
}

/* end: unmarked and old -> removed (an endpoint with its owner, when that points back) */
static long pub_eim(void *map, const struct eim_key *key, __s64 *mark, struct walk *w)
{
	struct eim_key k = *key, ok;
	struct eim_entry *e, *o;

	if (*mark == 0) {
		e = bpf_map_lookup_elem(&snat_eim, &k);
		if (e && old(w->a->now, e->last_seen, w->a->grace)) {
			ok.addr = e->addr;
			ok.remote = 0;
			ok.port = e->port;
			ok.proto = k.proto;
			ok.dir = EIM_DIR_OWNER;
			bpf_map_delete_elem(&snat_eim, &k);
			if (k.dir == EIM_DIR_ENDPOINT) {
				o = bpf_map_lookup_elem(&snat_eim, &ok);
				if (o && o->addr == k.addr && o->port == k.port)
					bpf_map_delete_elem(&snat_eim, &ok);
			}
		}
	}
	bpf_map_delete_elem(&sweep_eim, &k);
	return 0;
}

/* The walk's number: the next one, published once the snapshot is taken (0 while no walk
 * counts: the end and the abort of a walk put it back) */
static __always_inline void walk_number(struct walk *w, int begin)
{
	__u32 zero = 0;
	struct walk_state *ws = bpf_map_lookup_elem(&snat_walk, &zero);

	if (!ws)
		return;
	if (begin) {
		ws->last = ws->last % 65535 + 1;
		ws->current = ws->last;
	} else {
		ws->current = 0;
	}
	w->number = ws->current;
}

static __always_inline void walk_begin(struct walk *w)
{
	if (w->a->mode == SWEEP_EXPIRE)
		bpf_for_each_map_elem(&snat_eim, snap_eim, w, 0);
	bpf_for_each_map_elem(&snat_rule_live, snap_rule, w, 0);
	bpf_for_each_map_elem(&snat_addr_stats, snap_addr, w, 0);
	/* the hosts' last, right before the number: theirs are the counts a limit judges */
	bpf_for_each_map_elem(&snat_host_sess, snap_host, w, 0);
	walk_number(w, 1); /* after the snapshot: see the header */
}

static __always_inline void walk_end(struct walk *w)
{
	bpf_for_each_map_elem(&sweep_eim, pub_eim, w, 0);
	bpf_for_each_map_elem(&sweep_host, pub_host, w, 0);
	bpf_for_each_map_elem(&sweep_addr, pub_addr, w, 0);
	bpf_for_each_map_elem(&sweep_rule, pub_rule, w, 0);
	walk_number(w, 0);
}

/* ---- a chunked walk cut short (SWEEP_ABORT): its deltas and marks are dropped, nothing is
 * published.  The deltas hold -S0 plus the pairs kept in the chunks visited: adding them would
 * make every count low by the pairs not reached.  Without them each count stays as the last
 * completed walk left it plus the datapath's increments since: high by the pairs this walk
 * removed, never low, until the next walk (the recount the cut was made for) counts again.
 * An endpoint or permit with no mark stays (the next expiry walk judges it); owners the BEGIN
 * phase removed were dangling whatever else the walk did. */

static long drop_delta(void *map, const void *key, void *v, struct walk *w)
{
	bpf_map_delete_elem(map, key);
	return 0;
}

static __always_inline void walk_abort(struct walk *w)
{
	bpf_for_each_map_elem(&sweep_eim, drop_delta, w, 0);
	bpf_for_each_map_elem(&sweep_host, drop_delta, w, 0);
	bpf_for_each_map_elem(&sweep_addr, drop_delta, w, 0);
	bpf_for_each_map_elem(&sweep_rule, drop_delta, w, 0);
	walk_number(w, 0);
}

/* ---- one entry */

static __always_inline int selected(const struct sweep_args *a, const struct ct_key *k,
				    const struct ct_entry *e)
{
	__u32 f = a->flags;

	if ((f & SWEEP_F_RULE) && e->rule_id != a->rule_id)
		return 0;
	if ((f & SWEEP_F_INSIDE) && (k->saddr & a->inside_mask) != a->inside)
		return 0;
	if ((f & SWEEP_F_NAT) && e->rw_addr != a->nat)
		return 0;
	if ((f & SWEEP_F_REMOTE) && (k->daddr & a->remote_mask) != a->remote)
		return 0;
	if ((f & SWEEP_F_RPORT) && k->dport != a->remote_port)
		return 0;
	if ((f & SWEEP_F_PROTO) && k->proto != a->proto)
		return 0;
	if ((f & SWEEP_F_STATE) && e->state != a->state)
		return 0;
	return 1;
}

static __always_inline __u64 timeout_of(__u8 state)
{
	__u32 i = state < SWEEP_STATES ? state : 0;
	__u64 *t = bpf_map_lookup_elem(&sweep_timeouts, &i);

	return t ? *t : 0;
}

/* idle longer than its timeout (a last_seen after `now` is not idle at all) */
static __always_inline int expired(__u64 now, const struct ct_entry *out, const struct ct_entry *in)
{
	__u64 last = out->last_seen > in->last_seen ? out->last_seen : in->last_seen;

	return now > last && now - last > timeout_of(out->state);
}

static __always_inline int old(__u64 now, __u64 seen, __u64 grace)
{
	return now > seen && now - seen > grace;
}

/* OUT first (a racing outbound packet then makes a new session, whose port search skips the
 * still-present IN key), then IN if it is still this pair's */
static __always_inline void delete_pair(const struct ct_key *k, const struct ct_key *peer)
{
	struct ct_entry *in;

	bpf_map_delete_elem(&snat_ct, k);
	in = bpf_map_lookup_elem(&snat_ct, peer);
	if (in && key_eq(&in->peer, k))
		bpf_map_delete_elem(&snat_ct, peer);
}

/* A kept pair's part in the counts (by_datapath: made during this walk, so the datapath counted
 * it in the rule's and the address's counts, and in its host's while CFG_F_HOST_COUNT is on) */
static __always_inline void count_live(const struct ct_key *k, const struct ct_entry *e,
				       struct walk *w, int by_datapath)
{
	struct sweep_res *res = w->res;
	__u32 rule = e->rule_id;
	__be32 nat = e->rw_addr, host = k->saddr;

	res->live++;
	if (e->flags & CT_F_EIM) { /* its endpoint and permit are still in use */
		struct eim_key ek = { .addr = k->saddr, .port = k->sport, .proto = k->proto, .dir = EIM_DIR_ENDPOINT };
		__s64 *m = bpf_map_lookup_elem(&sweep_eim, &ek);

		if (m)
			*m += 1;
		ek.dir = EIM_DIR_PERMIT;
		ek.remote = k->daddr;
		m = bpf_map_lookup_elem(&sweep_eim, &ek);
		if (m)
			*m += 1;
	}
	if (by_datapath) {
		res->made_during++;
		if (!w->host_counted)
			bump(&sweep_host, &host, 1, res);
		return;
	}
	bump(&sweep_rule, &rule, 1, res);
	bump(&sweep_addr, &nat, 1, res);
	bump(&sweep_host, &host, 1, res);
}

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "count_pair clears CT_F_WALK as a bit of the little-endian word at rw_port"
#endif
#define WALK_BIT_IN_WORD ((__u32)CT_F_WALK << 24) /* rw_port (2 bytes), state, flags */

/* A pair the walk keeps.  One the datapath made during this walk (CT_F_WALK, and its IN entry
 * holds this walk's number) was counted by the datapath: count_live leaves it out of those
 * counts.  A stamp of an earlier walk (one cut short, or the previous one) is settled: the
 * pair counts, its IN entry's number goes back to 0 and the flag is cleared by an atomic add
 * on its word (only a walk clears it, one walk at a time, and the flag is set, checked again
 * right before on the same key: no borrow but in a recycled element's nanoseconds; a
 * datapath store of the flags byte racing with it may set it again, and the next walk clears
 * it again).  Unflagged pairs, all but those made during a walk, cost no lookup. */
static __always_inline void count_pair(struct walk *w, const struct ct_key *k, struct ct_entry *e)
{
	struct ct_key peer;
	struct ct_entry *in;

	if (!(e->flags & CT_F_WALK)) {
		count_live(k, e, w, 0);
		return;
	}
	peer = e->peer;
	in = bpf_map_lookup_elem(&snat_ct, &peer);
	if (in && key_eq(&in->peer, k)) {
		if (w->number && in->iif == w->number) {
			count_live(k, e, w, 1);
			return;
		}
		in->iif = 0;
	}
	/* checked again on the entry as it is now: its element may have been recycled for another
	 * key since (a pair removed by the datapath, a session moved by a reload), and a subtract
	 * on a clear bit would set the flags' unused high bits */
	if ((e->flags & CT_F_WALK) && key_eq(&e->peer, &peer))
		__sync_fetch_and_add((__u32 *)&e->rw_port, -WALK_BIT_IN_WORD);
	count_live(k, e, w, 0);
}

/* the audit record of a pair about to be removed (OUT key and entry, the newer last_seen) */
static __always_inline void audit_end(const struct ct_key *k, const struct ct_entry *out,
				      const struct ct_entry *in, __u32 why, __u64 now)
{
	__u64 last = out->last_seen > in->last_seen ? out->last_seen : in->last_seen;

	audit_session(k, out, AUDIT_KIND(AUDIT_END, why), now ? now : bpf_ktime_get_ns(), last);
}

static __always_inline void visit_out(struct walk *w, const struct ct_key *k, struct ct_entry *e)
{
	const struct sweep_args *a = w->a;
	struct sweep_res *res = w->res;
	struct ct_key peer = e->peer;
	struct ct_entry *in, *out;

	if (a->mode == SWEEP_RECOUNT) {
		count_pair(w, k, e);
		return;
	}
	/* the common case costs no lookup: an OUT entry seen within its timeout keeps the pair
	 * (idleness counts from the newer direction); only a full walk checks its IN entry */
	if (a->mode == SWEEP_EXPIRE && !a->full &&
	    !(a->now > e->last_seen && a->now - e->last_seen > timeout_of(e->state))) {
		count_pair(w, k, e);
		return;
	}
	in = bpf_map_lookup_elem(&snat_ct, &peer);
	if (!in || !key_eq(&in->peer, k)) { /* half pair: its IN entry is gone */
		if (!old(a->now, e->last_seen, a->grace))
			return;
		if (a->mode == SWEEP_FLUSH && a->flags)
			return;
		if (!bpf_map_delete_elem(&snat_ct, k))
			res->orphans++;
		return;
	}
	if (a->mode == SWEEP_FLUSH) {
		if (selected(a, k, e)) {
			if (w->audit)
				audit_end(k, e, in, AUDIT_END_FLUSH, a->now);
			delete_pair(k, &peer);
			res->removed++;
			return;
		}
	} else if (expired(a->now, e, in)) {
		/* judged again on the entries as they are now, right before the delete */
		out = bpf_map_lookup_elem(&snat_ct, k);
		in = bpf_map_lookup_elem(&snat_ct, &peer);
		if (out && in && key_eq(&out->peer, &peer) && expired(a->now, out, in)) {
			if (w->audit)
				audit_end(k, out, in, AUDIT_END_EXPIRED, a->now);
			delete_pair(k, &peer);
			res->removed++;
			return;
		}
		res->fresh++;
	}
	count_pair(w, k, e);
}

static __always_inline void visit_in(const struct sweep_args *a, struct sweep_res *res,
				     const struct ct_key *k, const struct ct_entry *e)
{
	struct ct_key peer = e->peer;
	struct ct_entry *out;

	if ((a->mode == SWEEP_FLUSH && a->flags) || (a->mode == SWEEP_EXPIRE && !a->full) ||
	    a->mode == SWEEP_RECOUNT)
		return;
	/* an IN entry without its OUT: mid-insert (IN goes in first) for microseconds, or left
	 * behind; removed once older than the grace (flush of everything: at once) */
	if (a->mode == SWEEP_EXPIRE && !old(a->now, e->last_seen, a->grace))
		return;
	out = bpf_map_lookup_elem(&snat_ct, &peer);
	if (out && key_eq(&out->peer, k))
		return;
	if (!bpf_map_delete_elem(&snat_ct, k)) /* the walk may come by an entry it just removed */
		res->orphans++;
}

static long visit_cb(void *map, const struct ct_key *kp, struct ct_entry *e, struct walk *w)
{
	struct ct_key k = *kp; /* the walk may delete this entry */

	w->res->visited++;
	if (k.dir == CT_DIR_OUT)
		visit_out(w, &k, e);
	else
		visit_in(w->a, w->res, &k, e);
	return 0;
}

/* SWEEP_KEYS: visit the i-th key of sweep_keys as the whole walk visits an entry (it may be
 * gone since the batch read it: then nothing) */
static long key_cb(__u32 i, struct walk *w)
{
	__u32 zero = 0;
	struct sweep_keys *ks = bpf_map_lookup_elem(&sweep_keys, &zero);
	struct ct_entry *e;
	struct ct_key k;

	if (!ks)
		return 1;
	k = ks->keys[i & (SWEEP_CHUNK - 1)];
	e = bpf_map_lookup_elem(&snat_ct, &k);
	if (!e)
		return 0;
	w->res->visited++;
	if (k.dir == CT_DIR_OUT)
		visit_out(w, &k, e);
	else
		visit_in(w->a, w->res, &k, e);
	return 0;
}

SEC("syscall")
int snat_sweep(void *ctx)
{
	__u32 zero = 0;
	struct snat_cfg *cfg;
	struct walk w = {
		.a = bpf_map_lookup_elem(&sweep_args, &zero),
		.res = bpf_map_lookup_elem(&sweep_res, &zero),
	};

	if (!w.a || !w.res)
		return -1;
	cfg = bpf_map_lookup_elem(&snat_config, &zero);
	w.audit = cfg && (cfg->flags & CFG_F_AUDIT);
	w.host_counted = cfg && (cfg->flags & CFG_F_HOST_COUNT);
	if (w.a->phase == SWEEP_KEYS) { /* the number SWEEP_BEGIN published */
		struct walk_state *ws = bpf_map_lookup_elem(&snat_walk, &zero);

		w.number = ws ? ws->current : 0;
	}
	switch (w.a->phase) {
	case SWEEP_BEGIN:
		walk_begin(&w);
		return 0;
	case SWEEP_KEYS: {
		__u32 zero2 = 0;
		struct sweep_keys *ks = bpf_map_lookup_elem(&sweep_keys, &zero2);

		if (!ks)
			return -1;
		bpf_loop(ks->n < SWEEP_CHUNK ? ks->n : SWEEP_CHUNK, key_cb, &w, 0);
		return 0;
	}
	case SWEEP_END:
		walk_end(&w);
		return 0;
	case SWEEP_ABORT:
		walk_abort(&w);
		return 0;
	}
	walk_begin(&w);
	bpf_for_each_map_elem(&snat_ct, visit_cb, &w, 0);
	walk_end(&w);
	return 0;
}

/* The control plane's sessions (a peer's records installed by the session sync) counted for
 * their inside host as the datapath counts its own (stats.h live_add): ctx->sessions added to
 * the host's count by an atomic add, the entry made (NOEXIST) when missing.  A read and a
 * write from user space lost a datapath increment made between them.  Its own program and
 * context (no map of the walk's): it runs beside a walk on another thread; a walk counting then
 * may count such a session twice until the next walk (as a datapath session whose number it
 * read before the walk published its own): high, never low.  Returns 0, 1 when the map is full. */
SEC("syscall")
int snat_host_add(struct sweep_host_add *ctx)
{
	__be32 host = ctx->host;
	__u32 n = ctx->sessions;
	struct live_count *c = bpf_map_lookup_elem(&snat_host_sess, &host);

	if (!c) {
		struct live_count init = { .sessions = n };

		if (bpf_map_update_elem(&snat_host_sess, &host, &init, BPF_NOEXIST) == 0)
			return 0;
		c = bpf_map_lookup_elem(&snat_host_sess, &host); /* the datapath made it first */
		if (!c)
			return 1;
	}
	__sync_fetch_and_add(&c->sessions, n);
	return 0;
}
