/* Translation: the SNAT address choice (jhash lookup2, as rules.select_index), the bounded port
 * search (with spill-over to the pool's next addresses) that inserts the session pair, and the rewrite of one address + port with TTL-1 and
 * incremental checksums. */
#pragma once
#include <linux/ip.h>
#include <linux/errno.h>
#include "ct.h"
#include "csum.h"
#include "jhash.h"
#include "stats.h"

/* rules.select_index: h over raw wire words, index = h * n / 2^32 (address = pool_min + index) */
static __always_inline __u32 snat_v4_select_index(const struct snat_rule *r, const struct pkt *p)
{
	__u64 n = (__u64)r->pool_max - r->pool_min + 1;
	__u32 b = 0, c = 0, h;

	if (n <= 1)
		return 0;
	if (r->algo == ALGO_SDH) {
		b = p->daddr;
	} else if (r->algo != ALGO_SH) { /* random: deterministic over (src, dst, sport) */
		__u32 port = (__u16)p->sport;

		b = p->daddr;
		c = (port << 16) | port;
	}
	h = jhash_3words(p->saddr, b, c, 0);
	return (__u32)(((__u64)h * n) >> 32);
}

#ifdef SNAT_TEST_RACE
/* test build: the entry "another CPU" inserts (port_try) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ct_entry);
} snat_race_scratch SEC(".maps");
#endif

struct port_search {
	struct ct_key in;     /* IN key; daddr takes each address, dport each candidate */
	struct ct_entry val;  /* IN entry to insert */
	__u32 n;              /* ports in [port_min, port_max] */
	__u32 min;            /* port_min */
	__u32 first;          /* offset of the first candidate: (c + 1) mod n */
	__u32 start;          /* offset where the per-flow sequence starts */
	__u32 stride;         /* its stride, coprime to n */
	__u32 tries;          /* candidates per address: min(port_tries, n) */
	__u32 pool_min;       /* the rule's first address, host order */
	__u32 pool_n;         /* addresses in the pool */
	__u32 idx;            /* index of the chosen address */
	__u32 pres;           /* port_preserve: 1 + the inside port's offset; 0: no */
	__u32 pos;            /* the next try: candidate pos mod tries of the (pos / tries)-th address */
	__u32 total;          /* tries in all: addresses * tries */
	__u32 tried;          /* candidates looked up (ALLOC_CNT_TRIES; a memo skip is none) */
	__u32 memo;           /* spill memo: 0 off (tries 1, eim), 1 write memos, 2 also look them up */
	struct spill_key mkey; /* spill memo: (remote, the address being searched, rport, proto) */
	struct spill_memo mval; /* spill memo: the one to write (verifier: off the callback's stack) */
	__u32 ckey;           /* snat_alloc_cnt's key (ALLOC_CNT_*), for the same reason */
	__u32 walk_flag;      /* CT_F_WALK when the IN entry inserted carries a walk's number */
	__u32 eim;            /* a new endpoint-independent mapping: claim each winner's owner */
	long err;             /* last insert result */
	struct eim_key okey;  /* eim: the candidate's OWNER key (addr, port follow the candidate) */
	struct eim_key ekey;  /* eim: the inside endpoint's key (ENDPOINT; then its PERMIT) */
	struct eim_entry oval; /* eim: the owner entry (the inside endpoint) */
#ifdef SNAT_TEST_RACE
	__u32 race;           /* test build: "another CPU" takes the next free candidate first */
#endif
};

/* Per-CPU scratch for the port search (verifier: the new-flow frame plus the entry's frame
 * would pass the 512-byte stack limit with it on the stack; bpf_loop's context must be
 * stack, so the callback finds it here itself; programs do not migrate between CPUs). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct port_search);
} snat_scratch SEC(".maps");

static __always_inline struct port_search *port_search_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&snat_scratch, &zero);
}

/* The spill memo's gate (step 13): when this program last wrote a memo (programs' clock), so
 * that memos are looked up only while one can be younger than SNAT_SPILL_MEMO_NS (a new flow
 * pays no memo lookup when no search failed lately).  1 (.data): not known yet, a memo of a
 * program loaded before this one may be young: the first look takes its own time as the last
 * write, as refused_last does. */
static __u64 memo_last = 1;

/* 1 when something last written at *last may be younger than ``life`` ns at ``now``, else 0;
 * *last == 1 (not known yet: left by a program loaded before this one) takes ``now`` as the
 * last write, so that whatever the predecessor left is honoured in full.  The gate of the
 * refusal markers (step 6) and of the spill memos (step 13). */
static __always_inline int may_be_young(__u64 *last, __u64 now, __u64 life)
{
	__u64 t = *last;

	if (t == 1) {
		*last = now;
		return 1;
	}
	return now - t < life;
}

/* 1 when a memo may be younger than SNAT_SPILL_MEMO_NS at `now`, else 0 */
static __always_inline int memo_may_be_young(__u64 now)
{
	return may_be_young(&memo_last, now, SNAT_SPILL_MEMO_NS);
}

/* +1 allocator counter `what` (the key in the scratch: the callback's frame stays empty, since
 * the caller chain's frames fill the 512-byte stack) */
static __always_inline void alloc_count(struct port_search *s, __u32 what)
{
	s->ckey = what;
	count_inc(&snat_alloc_cnt, &s->ckey);
}

/* One port search done (step 13's counters): +1 ALLOC_CNT_SEARCH, +tried ALLOC_CNT_TRIES;
 * two per-CPU adds per new flow that searched, the key in the scratch as above */
static __always_inline void alloc_searched(struct port_search *s)
{
	s->ckey = ALLOC_CNT_SEARCH;
	count_inc(&snat_alloc_cnt, &s->ckey);
	s->ckey = ALLOC_CNT_TRIES;
	count_add(&snat_alloc_cnt, &s->ckey, s->tried);
}

/* rules.port_candidates over rules.spill_order: try pos is candidate j = pos mod tries on the
 * (pos / tries)-th address after the chosen one.  Candidate 0 is the original's (c + 1) mod n;
 * then start + (j - 1) * stride mod n, the first candidate's slot replaced by the sequence's
 * last.  A lock-free lookup before each insert: a taken port costs no bucket lock. */
/* the j-th offset of rules.port_candidates' sequence (without port_preserve) */
static __always_inline __u32 port_offset(const struct port_search *s, __u32 j)
{
	__u32 o;

	if (j == 0)
		return s->first;
	o = (__u32)(((__u64)s->start + (__u64)(j - 1) * s->stride) % s->n);
	if (o == s->first)
		o = (__u32)(((__u64)s->start + (__u64)(s->n - 1) * s->stride) % s->n);
	return o;
}

/* Candidate j on s->in.daddr: 0 taken (the next candidate), 1 done (inserted, or the table full) */
/* Right before the IN entry goes in: the walk counting now, if any, in its iif, and CT_F_WALK
 * for the OUT entry that follows (stats.h, walk_now) */
static __always_inline void walk_stamp(struct port_search *s)
{
	s->val.iif = walk_now();
	s->walk_flag = s->val.iif ? CT_F_WALK : 0;
}

static __always_inline long port_try(struct port_search *s, __u32 j)
{
	__u32 o;

	if (!s->pres) {
		o = port_offset(s, j);
	} else if (j == 0) { /* port_preserve: the inside port itself first */
		o = s->pres - 1;
	} else { /* then the sequence, its candidate tries-1 where the inside port would come */
		o = port_offset(s, j - 1);
		if (o == s->pres - 1)
			o = port_offset(s, s->tries - 1);
	}
	s->in.dport = bpf_htons((__u16)(s->min + o));
	if (s->eim) { /* a port another inside endpoint owns is taken toward every remote */
		s->okey.addr = s->in.daddr;
		s->okey.port = s->in.dport;
		if (bpf_map_lookup_elem(&snat_eim, &s->okey)) {
			s->err = -EEXIST;
			return 0;
		}
	}
	if (bpf_map_lookup_elem(&snat_ct, &s->in)) {
		s->err = -EEXIST;
		return 0; /* taken: the next candidate */
	}
	if (s->eim) { /* claim the owner first; released when the IN key cannot go in */
		s->err = bpf_map_update_elem(&snat_eim, &s->okey, &s->oval, BPF_NOEXIST);
		if (s->err == -EEXIST)
			return 0;
		if (s->err)
			return 1; /* -E2BIG: the mapping table is full */
	}
#ifdef SNAT_TEST_RACE
	if (s->race) { /* test build (tests/bpf/test_race.py): the race of two CPUs for one port,
			* on demand: between this lookup and this insert another CPU inserts the same
			* IN key (its entry as the model's test writes it: peer itself, rewrite
			* (remote, 1)), so the insert below meets EEXIST as a real race would; the
			* entry is built in a scratch map (the verifier's stack limit) */
		__u32 zero = 0;
		struct ct_entry *other = bpf_map_lookup_elem(&snat_race_scratch, &zero);

		s->race = 0;
		if (other) {
			__builtin_memset(other, 0, sizeof(*other));
			other->peer = s->in;
			other->rw_addr = s->in.saddr;
			other->rw_port = bpf_htons(1);
			bpf_map_update_elem(&snat_ct, &s->in, other, BPF_NOEXIST);
		}
	}
#endif
	walk_stamp(s);
	s->err = bpf_map_update_elem(&snat_ct, &s->in, &s->val, BPF_NOEXIST);
	if (s->err && s->eim)
		bpf_map_delete_elem(&snat_eim, &s->okey);
	return s->err != -EEXIST; /* -EEXIST: another CPU took it since the lookup */
}

static long port_try_cb(__u32 i, void *ctx)
{
	struct port_search *s = port_search_get();
	__u32 k, j;
	long done;

	if (!s || s->tries == 0 || s->n == 0 || s->pool_n == 0 || s->pos >= s->total)
		return 1;
	i = s->pos++;
	k = i / s->tries;
	j = i - k * s->tries;
	if (i == 0 && s->tries > 1 && !s->eim) { /* the spill memo: not for eim, nor one try */
		s->memo = memo_may_be_young(s->val.last_seen) ? 2 : 1;
		s->mkey.remote = s->in.saddr;
		s->mkey.rport = s->in.sport;
		s->mkey.proto = s->in.proto;
	}
	if (j == 0) {
		s->in.daddr = bpf_htonl(s->pool_min + (s->idx + k) % s->pool_n);
	} else if (j == 1 && s->memo == 2) { /* the first candidate was taken: is the rest too? */
		struct spill_memo *m;

		s->mkey.addr = s->in.daddr;
		m = bpf_map_lookup_elem(&snat_spill_memo, &s->mkey);
		if (m && s->val.last_seen - m->at < SNAT_SPILL_MEMO_NS) {
			alloc_count(s, ALLOC_CNT_MEMO_HIT);
			s->pos = (k + 1) * s->tries; /* judged full moments ago: the next address */
			return 0;
		}
	}
	s->tried++;
	done = port_try(s, j);
	if (!done && j == s->tries - 1 && s->memo) { /* none free here: remember it */
		s->mval.at = s->val.last_seen;
		memo_last = s->mval.at; /* before the memo: a reader that misses it raced the write */
		s->mkey.addr = s->in.daddr;
		bpf_map_update_elem(&snat_spill_memo, &s->mkey, &s->mval, BPF_ANY);
		alloc_count(s, ALLOC_CNT_MEMO_SET);
	}
	return done;
}

/* Rewrite saddr+sport (is_src) or daddr+dport, TTL-1 (unless to_kernel: the kernel forwards
 * it and decrements), IP and L4 checksums.  The IP header is
 * written directly (its checksum is never offloaded); the L4 checksum too when the skb allows
 * it (csum_by_hand), else through bpf_l4_csum_replace so PARTIAL/COMPLETE skbs stay right.  -1 when headers are missing. */
static __always_inline int snat_v4_rewrite(struct __sk_buff *skb, const struct pkt *p, int is_src,
					   __be32 addr, __be16 port, int to_kernel)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__be32 old_addr;
	__be16 old_port, old_w;
	__u32 off = p->l4, csum_off;
	__u64 flags;

	if (off > ETH_HLEN + 60) /* verifier: bound the variable offset */
		return -1;
	if ((void *)(iph + 1) > data_end)
		return -1;
	old_w = *(__be16 *)&iph->ttl;
	if (is_src) {
		old_addr = iph->saddr;
		iph->saddr = addr;
	} else {
		old_addr = iph->daddr;
		iph->daddr = addr;
	}
	if (!to_kernel)
		iph->ttl--;
	iph->check = csum_apply(iph->check, csum_delta4(old_addr, addr) +
						csum_delta2(old_w, *(__be16 *)&iph->ttl));
	if (p->frag == FRAG_LATER)
		return 0;
	if (!has_ports(p->proto)) { /* address only; DCCP and UDP-Lite: their pseudo-header sum */
		if ((p->proto != 33 && p->proto != 136) || off + 8 > p->end || off > ETH_HLEN + 60)
			return 0;
		if (csum_by_hand(skb)) {
			__u16 *cs = data + off + 6;

			if ((void *)(cs + 1) > data_end)
				return -1;
			*cs = csum_apply(*cs, csum_delta4(old_addr, addr));
			return 0;
		}
		bpf_l4_csum_replace(skb, off + 6, old_addr, addr, BPF_F_PSEUDO_HDR | 4);
		return 0;
	}
	if (off > ETH_HLEN + 60) /* verifier: bound the variable offset */
		return -1;
	if (p->proto == IPPROTO_ICMP_) {
		__be16 *id = data + off + 4;

		if ((void *)(id + 1) > data_end)
			return -1;
		old_port = *id;
		*id = port;
		/* echo: the identifier only, no pseudo-header */
		if (csum_by_hand(skb)) {
			__u16 *cs = data + off + 2;

			*cs = csum_apply(*cs, csum_delta2(old_port, port));
		} else {
			bpf_l4_csum_replace(skb, off + 2, old_port, port, 2);
		}
		return 0;
	}
	__be16 *pp = data + off + (is_src ? 0 : 2);

	if ((void *)(pp + 1) > data_end)
		return -1;
	old_port = *pp;
	*pp = port;
	if (p->proto == IPPROTO_TCP_) {
		csum_off = off + 16;
		flags = 0;
	} else {
		csum_off = off + 6;
		flags = BPF_F_MARK_MANGLED_0; /* zero UDP checksum stays zero; 0 is sent as 0xffff */
	}
	if (csum_by_hand(skb)) {
		__u16 *cs = data + csum_off;
		__u16 c;

		if ((void *)(cs + 1) > data_end)
			return -1;
		if (flags && *cs == 0) /* UDP without checksum */
			return 0;
		c = csum_apply(*cs, csum_delta4(old_addr, addr) + csum_delta2(old_port, port));
		*cs = (flags && c == 0) ? 0xffff : c;
		return 0;
	}
	bpf_l4_csum_replace(skb, csum_off, old_addr, addr, flags | BPF_F_PSEUDO_HDR | 4);
	bpf_l4_csum_replace(skb, csum_off, old_port, port, flags | 2);
	return 0;
}

/* seconds a first fragment is remembered (layout.FRAG_TIMEOUT; checked by a test) */
#ifndef SNAT_FRAG_TIMEOUT
#define SNAT_FRAG_TIMEOUT 30
#endif

/* Remember a translated first fragment so later fragments get the same addresses (ifindex 0:
 * a pass marker, the first fragment was passed untranslated). */
static __always_inline void frag_remember(const struct pkt *p, __be32 saddr, __be32 daddr,
					  __u32 ifindex, __be32 nexthop, __u64 now)
{
	struct frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->ipid, .proto = p->proto };
	struct frag_entry e = { .saddr = saddr, .daddr = daddr, .ifindex = ifindex,
				.nexthop = nexthop, .created = now };

	bpf_map_update_elem(&snat_frags, &k, &e, BPF_ANY);
}

/* A translated packet handed to the kernel (PASS_TRANSLATED: it fragments it) leaving by
 * `ifindex` via `nexthop`: when that is a new_gw egress (snat_gw_marks), skb->mark routes it
 * there by the backend's ip rule, not by the kernel's main table (which may name another uplink,
 * and the packet would leave there with this one's SNAT address).  0 when marked. */
static __noinline int snat_gw_mark(struct __sk_buff *skb, __u32 ifindex, __be32 nexthop)
{
	struct gw_key k = { .ifindex = ifindex, .nexthop = nexthop };
	__u32 *mark = bpf_map_lookup_elem(&snat_gw_marks, &k);

	if (!mark)
		return -1;
	skb->mark = *mark;
	return 0;
}

/* A later fragment before its first (no entry, or a held marker): hold it for a while.  It is
 * redirected, untouched, to the recirculation device's egress (a TAP: the backend's holder
 * waits and writes it back, datapath/bpf/recirc.py) and comes back on that device's ingress
 * (snat_recirc), which judges it again: by then the first fragment has usually been
 * translated or passed.  Bounded: SNAT_FRAG_HOLD_NS since the datagram's first hold, the
 * holder's capacity, the LRU frag map.  Without a recirculation device (snat_ifaces[RECIRC_KEY])
 * it is dropped, as before. */
static __noinline int frag_v4_hold(const struct pkt *p, struct snat_res *v, __u64 since, int fresh)
{
	__u32 key = RECIRC_KEY;
	__u32 *rc = bpf_map_lookup_elem(&snat_ifaces, &key);
	__u64 now = snat_now();

	if (!rc || !*rc || (!fresh && now - since > SNAT_FRAG_HOLD_NS))
		return verdict_set(v, VERDICT_DROP, REASON_DROP_FRAG_UNKNOWN);
	if (fresh)
		frag_remember(p, p->saddr, p->daddr, FRAG_HELD_IFINDEX, 0, now);
	return verdict_redirect(v, REASON_FRAG_HELD, *rc, 0);
}

/* Step 3: a non-first fragment takes its first fragment's rewrite, passes after a passed
 * first fragment, is held while its first has not come (frag_v4_hold), or is dropped. */
static __always_inline int frag_v4_later(struct __sk_buff *skb, const struct pkt *p, struct snat_res *v)
{
	struct frag_key k = { .saddr = p->saddr, .daddr = p->daddr, .id = p->ipid, .proto = p->proto };
	struct frag_entry *e = bpf_map_lookup_elem(&snat_frags, &k);
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__u32 mtu = 0;
	int to_kernel;
	__be16 old_w;
	__u64 d;

	if (e && snat_now() - e->created > SNAT_FRAG_TIMEOUT * 1000000000ULL) {
		bpf_map_delete_elem(&snat_frags, &k); /* too old: the datagram is gone */
		e = NULL;
	}
	if (!e)
		return frag_v4_hold(p, v, 0, 1);
	if (e->ifindex == FRAG_HELD_IFINDEX)
		return frag_v4_hold(p, v, e->created, 0);
	if (!e->ifindex) /* pass marker: the first fragment was passed untranslated */
		return verdict_set(v, VERDICT_PASS, REASON_PASS_FRAG_UNTRANSLATED);
	if (p->ttl <= 1)
		return verdict_set(v, VERDICT_PASS, REASON_PASS_TTL);
	/* longer than the egress device's MTU (a host's 1500-byte fragments toward a narrower
	 * uplink): redirected, the device dropped it; translated and handed to the kernel, which
	 * fragments it again and decrements its TTL, as a first fragment's PASS_TRANSLATED */
	bpf_check_mtu(skb, e->ifindex, &mtu, 0, 0);
	to_kernel = mtu && p->len > mtu;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	iph = data + ETH_HLEN;
	if ((void *)(iph + 1) > data_end)
		return verdict_set(v, VERDICT_DROP, REASON_DROP_MALFORMED);
	old_w = *(__be16 *)&iph->ttl;
	d = csum_delta4(iph->saddr, e->saddr) + csum_delta4(iph->daddr, e->daddr);
	iph->saddr = e->saddr;
	iph->daddr = e->daddr;
	if (!to_kernel)
		iph->ttl--;
	d += csum_delta2(old_w, *(__be16 *)&iph->ttl);
	iph->check = csum_apply(iph->check, d);
	if (to_kernel) {
		snat_gw_mark(skb, e->ifindex, e->nexthop);
		return verdict_set(v, VERDICT_PASS_TRANSLATED, REASON_XLATE_FRAG);
	}
	return verdict_redirect(v, REASON_XLATE_FRAG, e->ifindex, e->nexthop);
}
