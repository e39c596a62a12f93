/* Bob Jenkins' lookup2 jhash_3words as in Linux 2.6.32 include/linux/jhash.h, which the
 * original used to pick SNAT addresses (spec "Choosing the SNAT address").  NOT today's
 * kernel lookup3: the choice must stay bit-identical to rules.jhash_3words. */
#pragma once
#include <linux/types.h>

#define JHASH_GOLDEN_RATIO 0x9e3779b9

#define __jhash_mix(a, b, c)                                                                    \
	{                                                                                       \
		a -= b; a -= c; a ^= (c >> 13);                                                 \
		b -= c; b -= a; b ^= (a << 8);                                                  \
		c -= a; c -= b; c ^= (b >> 13);                                                 \
		a -= b; a -= c; a ^= (c >> 12);                                                 \
		b -= c; b -= a; b ^= (a << 16);                                                 \
		c -= a; c -= b; c ^= (b >> 5);                                                  \
		a -= b; a -= c; a ^= (c >> 3);                                                  \
		b -= c; b -= a; b ^= (a << 10);                                                 \
		c -= a; c -= b; c ^= (b >> 15);                                                 \
	}

static __always_inline __u32 jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += JHASH_GOLDEN_RATIO;
	b += JHASH_GOLDEN_RATIO;
	c += initval;
	__jhash_mix(a, b, c);
	return c;
}
