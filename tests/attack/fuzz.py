"""Hostile packet generators for the attack tier (seeded, so a failure can be replayed with
ATTACK_SEED): from inside, every IP protocol, every ICMP type, fragments, truncated and garbage
headers, ICMP errors with bogus quoted packets; from outside, unsolicited packets to inside and
pool addresses and spoofed replies.  Every generator returns IPv4 bytes (no Ethernet)."""

from __future__ import annotations

import random

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

SERVERS = ("203.0.113.10", "198.51.100.10")
REMOTES = SERVERS + ("203.0.113.77", "198.51.100.77", "192.0.2.2", "192.0.2.130")
POOL = tuple(f"198.19.{n}.{i}" for n in (2, 3) for i in (71, 72, 73))
GATEWAY = ("198.19.2.2", "198.19.3.2", "198.18.40.1", "198.18.50.1")
INSIDE = {"in40": ("198.18.40.10", "198.18.40.11", "198.18.40.12"), "in50": ("198.18.50.10", "198.18.50.11")}
OUTSIDERS = ("203.0.113.66", "198.51.100.66", "192.0.2.99")
MARK_ID = 0xF00D  # IP id of every packet of the outside fuzz (counted on the inside hosts)


def _payload(rng: random.Random, lo: int = 0, hi: int = 64) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def _l4(rng: random.Random, proto: int) -> bytes:
    """Some bytes that look like (or not) a header of ``proto``."""
    if proto == 6:
        flags = rng.choice(["S", "A", "SA", "F", "R", "PA", "", "FSRPAUEC", "SE"])
        return raw(TCP(sport=rng.randint(0, 65535), dport=rng.choice([80, 443, 7007, rng.randint(0, 65535)]),
                       flags=flags, dataofs=rng.choice([5, 5, 5, 4, 15]))) + _payload(rng, 0, 32)
    if proto == 17:
        return raw(UDP(sport=rng.randint(0, 65535), dport=rng.choice([53, 7007, rng.randint(0, 65535)]))) + _payload(rng)
    if proto == 1:
        t = rng.choice([rng.randint(0, 255), 0, 8, 13, 14, 15, 16, 17, 18, 5, 9, 10])
        return raw(ICMP(type=t, code=rng.randint(0, 15), id=rng.randint(0, 65535))) + _payload(rng)
    return _payload(rng, 0, 80)


def _bogus_error(rng: random.Random, src: str, dst: str) -> bytes:
    """An ICMP error whose quoted packet matches nothing (random addresses, protocol, cut)."""
    quoted = raw(IP(src=rng.choice(REMOTES + POOL + (src,)), dst=rng.choice(REMOTES + (src,)),
                    proto=rng.choice([6, 17, 1, 47, rng.randint(0, 255)])) / Raw(_payload(rng, 0, 40)))
    quoted = quoted[: rng.randint(0, len(quoted))]
    t = rng.choice([3, 4, 11, 12])
    return raw(IP(src=src, dst=dst) / ICMP(type=t, code=rng.randint(0, 15)) / Raw(quoted))


def _mangle(rng: random.Random, pkt: bytes) -> bytes:
    """Truncate or corrupt the IPv4 header: bad IHL, lengths, cut L4."""
    b = bytearray(pkt)
    how = rng.randint(0, 4)
    if how == 0 and len(b) > 20:
        b = b[: rng.randint(20, len(b) - 1)]  # total length now exceeds the bytes
    elif how == 1:
        b[0] = 0x40 | rng.randint(0, 15)  # any IHL
    elif how == 2:
        b[2:4] = rng.randint(0, 0xFFFF).to_bytes(2, "big")
    elif how == 3 and len(b) > 20:
        b[2:4] = rng.randint(20, len(b)).to_bytes(2, "big")  # cut the L4 header short
        b = b[: int.from_bytes(b[2:4], "big")]
    else:
        b += rng.randbytes(rng.randint(1, 16))  # trailing garbage (link padding)
    return bytes(b)


def inside_packet(rng: random.Random, node: str) -> bytes:
    """One hostile packet from an inside host of ``node`` (mostly its own addresses)."""
    src = rng.choice(INSIDE[node])
    dst = rng.choice(REMOTES * 4 + POOL + GATEWAY + INSIDE["in40"] + INSIDE["in50"])
    kind = rng.randint(0, 9)
    ttl = rng.choice([64, 64, 64, 1, 2, 255])
    if kind <= 2:  # any protocol, well formed enough
        proto = rng.choice([rng.randint(0, 255), 47, 50, 51, 132, 136, 33, 4, 41, 6, 17, 1])
        return raw(IP(src=src, dst=dst, proto=proto, ttl=ttl, id=rng.randint(0, 65535)) / Raw(_l4(rng, proto)))
    if kind <= 4:  # ICMP of any type
        return raw(IP(src=src, dst=dst, ttl=ttl) / Raw(_l4(rng, 1)))
    if kind == 5:  # an error quoting nothing we know
        return _bogus_error(rng, src, dst)
    if kind <= 7:  # fragments: first, later, or overlapping, of any protocol
        proto = rng.choice([6, 17, 1, 47, 50, rng.randint(0, 255)])
        ident = rng.randint(0, 65535)
        flags, frag = rng.choice([("MF", 0), ("MF", rng.randint(1, 100)), (0, rng.randint(1, 8191)), ("MF+DF", 0)])
        return raw(IP(src=src, dst=dst, proto=proto, id=ident, flags=flags, frag=frag, ttl=ttl)
                   / Raw(_l4(rng, proto)[: rng.randint(0, 48)]))
    if kind == 8:  # malformed headers
        return _mangle(rng, raw(IP(src=src, dst=dst, proto=rng.choice([6, 17, 1, 47])) / Raw(_l4(rng, 6))))
    # spoofed sources: another net, a pool or gateway address, an outsider
    fake = rng.choice(POOL + GATEWAY + OUTSIDERS + INSIDE["in50" if node == "in40" else "in40"])
    proto = rng.choice([6, 17, 1, 47])
    return raw(IP(src=fake, dst=dst, proto=proto) / Raw(_l4(rng, proto)))


def outside_packet(rng: random.Random) -> bytes:
    """One unsolicited packet from an ISP's side: to inside addresses, pool addresses, the
    gateway, transit; spoofed replies from the servers to pool addresses at random ports."""
    src = rng.choice(OUTSIDERS * 3 + SERVERS)
    inside = INSIDE["in40"] + INSIDE["in50"]
    dst = rng.choice(inside * 3 + POOL * 2 + GATEWAY + REMOTES)
    proto = rng.choice([6, 6, 17, 17, 1, 1, 47, 50, rng.randint(0, 255)])
    ip = IP(src=src, dst=dst, proto=proto, id=MARK_ID, ttl=rng.choice([64, 1, 2]))
    kind = rng.randint(0, 5)
    if kind == 0:
        ip.flags, ip.frag = rng.choice([("MF", 0), (0, rng.randint(1, 8191))])
    if kind == 1 and proto == 1:  # an error from a "router" quoting an inside or pool tuple
        quoted = raw(IP(src=rng.choice(inside + POOL), dst=rng.choice(REMOTES), proto=rng.choice([6, 17, 1]))
                     / Raw(_payload(rng, 8, 20)))
        return raw(ip / ICMP(type=rng.choice([3, 11, 12]), code=rng.randint(0, 4)) / Raw(quoted))
    pkt = raw(ip / Raw(_l4(rng, proto)))
    return _mangle(rng, pkt) if kind == 2 else pkt
