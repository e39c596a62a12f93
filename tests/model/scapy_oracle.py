"""scapy as the independent checksum oracle: every checksum of a packet the model emits must
equal scapy's own recomputation (0x0000 and 0xFFFF being the same one's-complement zero)."""

from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import raw
from scapy.utils import checksum


def _same(a: int, b: int) -> bool:
    return a == b or {a, b} == {0, 0xFFFF}


def _zeroed(b: bytes, off: int) -> bytes:
    return b[:off] + b"\0\0" + b[off + 2 :]


def problems(pkt: bytes) -> list[str]:
    """Checksum mismatches of an IPv4 packet (IP header, TCP/UDP of unfragmented packets,
    ICMP, and an ICMP error's inner IP header); [] when all verify."""
    out = []
    ihl = (pkt[0] & 0x0F) * 4
    tot = int.from_bytes(pkt[2:4], "big")
    pkt = pkt[:tot]
    p = IP(pkt)
    q = p.copy()
    del q.chksum
    if not _same(p.chksum, IP(raw(q)).chksum):
        out.append(f"ip {p.chksum:#06x} != {IP(raw(q)).chksum:#06x}")
    fragmented = p.frag > 0 or p.flags.MF
    if fragmented:
        return out
    if p.proto in (6, 17):
        layer = TCP if p.proto == 6 else UDP
        if layer in p:
            field = p[layer].chksum
            if not (p.proto == 17 and field == 0):
                q = p.copy()
                del q[layer].chksum
                want = IP(raw(q))[layer].chksum
                if not _same(field, want):
                    out.append(f"{layer.__name__.lower()} {field:#06x} != {want:#06x}")
    elif p.proto == 1:
        icmp = pkt[ihl:]
        field = int.from_bytes(icmp[2:4], "big")
        want = checksum(_zeroed(icmp, 2))
        if not _same(field, want):
            out.append(f"icmp {field:#06x} != {want:#06x}")
        if icmp[0] in (3, 4, 11, 12) and len(icmp) >= 28:
            inner = icmp[8:]
            iihl = (inner[0] & 0x0F) * 4
            if len(inner) >= iihl:
                f = int.from_bytes(inner[10:12], "big")
                w = checksum(_zeroed(inner[:iihl], 10))
                if not _same(f, w):
                    out.append(f"inner ip {f:#06x} != {w:#06x}")
    return out


def inner_l4_problems(pkt: bytes) -> list[str]:
    """For an ICMP error quoting a *complete* datagram: the quoted TCP/UDP/ICMP checksum."""
    ihl = (pkt[0] & 0x0F) * 4
    inner = pkt[ihl + 8 :]
    ip_in = IP(inner)
    return problems(raw(ip_in)) if ip_in.len == len(inner) else ["inner datagram incomplete"]


__all__ = ["problems", "inner_l4_problems", "ICMP"]
