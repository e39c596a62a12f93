"""The ICMP host unreachable (type 3, code 1) a host over its max_sessions_per_host gets with
`refuse_icmp yes` (RFC 6888 REQ-11), built in place of its packet and sent back out of the
device it came in by (docs/datapath.md step 13).  The BPF builds the same bytes."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

from ..layout import ICMP_DEST_UNREACH, IPPROTO_ICMP
from .checksum import csum16

HOST_UNREACHABLE = 1  # ICMP code
TTL = 64


def host_unreachable(pkt: bytes, ihl: int, src: IPv4Address) -> bytes:
    """IPv4 + ICMP host unreachable from ``src`` to the packet's source, quoting its IP header
    and the first 8 bytes after it; IP id 0, no DF, TTL 64."""
    quoted = pkt[: ihl + 8]
    icmp = struct.pack("!BBHI", ICMP_DEST_UNREACH, HOST_UNREACHABLE, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", csum16(icmp)) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, TTL, IPPROTO_ICMP, 0, src.packed, pkt[12:16])
    ip = ip[:10] + struct.pack("!H", csum16(ip)) + ip[12:]
    return ip + icmp
