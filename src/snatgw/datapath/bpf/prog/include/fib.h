/* Routing through bpf_fib_lookup: the egress device, next hop and MTU of a destination as the
 * kernel would forward it.  We send with bpf_redirect_neigh, so a missing neighbour is not an
 * error (BPF_FIB_LOOKUP_SKIP_NEIGH skips that work where the kernel has it). */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "snat_layout.h"

#define AF_INET_ 2

struct route {
	__u32 oif;
	__be32 nexthop; /* the route's gateway, or the destination when on-link */
	__u32 mtu;
};

/* -1 on a usable route, else REASON_PASS_LOCAL or REASON_PASS_NO_ROUTE */
static __always_inline int fib_route4(struct __sk_buff *skb, __be32 daddr, __be32 saddr,
				      __u32 iif, struct route *r)
{
	struct bpf_fib_lookup f = {};
	long rc;

	f.family = AF_INET_;
	f.ipv4_src = saddr;
	f.ipv4_dst = daddr;
	f.ifindex = iif;
	/* tot_len 0: the kernel fills mtu_result with the egress device's MTU */
	rc = bpf_fib_lookup(skb, &f, sizeof(f), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc < 0) /* older kernel without SKIP_NEIGH */
		rc = bpf_fib_lookup(skb, &f, sizeof(f), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH:
	case BPF_FIB_LKUP_RET_FRAG_NEEDED: /* skb longer than the MTU: judged by the caller */
		break;
	case BPF_FIB_LKUP_RET_NOT_FWDED: /* local, broadcast or multicast destination */
		return REASON_PASS_LOCAL;
	default: /* blackhole, unreachable, prohibit, forwarding disabled, no route */
		return REASON_PASS_NO_ROUTE;
	}
	r->oif = f.ifindex;
	r->nexthop = f.ipv4_dst; /* rewritten to the gateway when the route has one */
	r->mtu = f.mtu_result;
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH || r->mtu == 0) {
		__u32 mtu = 0;

		bpf_check_mtu(skb, r->oif, &mtu, 0, 0); /* sets mtu to the device's MTU */
		r->mtu = mtu;
	}
	return -1;
}

/* fib_route4 in a frame of its own: the new-flow paths call it several times, and inlined its
 * bpf_fib_lookup struct (64 bytes) would sit in their frames (verifier: combined stack) */
static __noinline int fib_route4_call(struct __sk_buff *skb, __be32 daddr, __be32 saddr, __u32 iif,
				      struct route *r)
{
	return fib_route4(skb, daddr, saddr, iif, r);
}
