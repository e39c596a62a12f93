"""The ICMP errors the datapath builds itself, in place of a packet, sent back out of the device
it came in by: host unreachable (type 3, code 1) to a host over its max_sessions_per_host with
`refuse_icmp yes` (RFC 6888 REQ-11, docs/datapath.md step 13), and fragmentation needed (code
4) with the next-hop MTU of a `new_gw` route, which the kernel's own route cannot know (steps
11 and the established path).  The BPF builds the same bytes."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from ..layout import ICMP_DEST_UNREACH, IPPROTO_ICMP
from .checksum import csum16

HOST_UNREACHABLE = 1  # ICMP codes
FRAG_NEEDED = 4
TTL = 64


def host_unreachable(pkt: bytes, ihl: int, src: IPv4Address, code: int = HOST_UNREACHABLE,
                     mtu: int = 0) -> bytes:  # fmt: skip
    """IPv4 + ICMP destination unreachable (host unreachable; ``code`` FRAG_NEEDED: with the
    next-hop ``mtu``, RFC 1191) from ``src`` to the packet's source, quoting its IP header and
    the first 8 bytes after it; IP id 0, no DF, TTL 64."""
    quoted = pkt[: ihl + 8]
    icmp = struct.pack("!BBHHH", ICMP_DEST_UNREACH, code, 0, 0, mtu) + quoted
    icmp = icmp[:2] + struct.pack("!H", csum16(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, TTL, IPPROTO_ICMP, 0, src.packed, pkt[12:16])
    ip = ip[:10] + struct.pack("!H", csum16(ip)) + ip[12:]
    return ip + icmp
