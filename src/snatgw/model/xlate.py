"""Byte rewrites of the model datapath, with incremental checksum updates (checksum.py: every
update is normalised, so the order of the changes does not affect the bytes):

- translate (outbound or reply): the address (IP checksum, then L4 checksum with the pseudo
  header), then the port or echo identifier (L4 checksum; echo: no pseudo header), then
  TTL - 1 (IP checksum over the 16-bit word TTL|protocol).  UDP: BPF_F_MARK_MANGLED_0 per call.
- later fragment: saddr and daddr (each replaced unconditionally), then TTL.
- ICMP error: outer address (if any); inner address (inner IP checksum; ICMP checksum for the
  address and the inner IP checksum); inner port/identifier (ICMP checksum); inner L4
  checksum when present (TCP/UDP: address and port, a zero UDP checksum stays zero and a
  computed zero becomes 0xFFFF; echo: identifier; then the ICMP checksum for it); outer TTL.
Every field named by a step is replaced (and its checksum updated) even when unchanged."""

from __future__ import annotations

from ipaddress import IPv4Address

from ..layout import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, PSEUDO_HDR_PROTOS
from .checksum import l3_replace, l4_replace
from .packet import ICMP_CHECK, ICMP_ID, IP_CHECK, IP_DADDR, IP_SADDR, IP_TTL, TCP_CHECK, UDP_CHECK
from .packet import InnerView, IPv4View


def _put(buf: bytearray, off: int, new: bytes) -> bytes:
    old = bytes(buf[off : off + len(new)])
    buf[off : off + len(new)] = new
    return old


def ttl_dec(buf: bytearray, ip_off: int = 0) -> None:
    old = bytes(buf[ip_off + IP_TTL : ip_off + IP_TTL + 2])
    buf[ip_off + IP_TTL] = (buf[ip_off + IP_TTL] - 1) & 0xFF
    l3_replace(buf, ip_off + IP_CHECK, old, bytes(buf[ip_off + IP_TTL : ip_off + IP_TTL + 2]))


def translate(buf: bytearray, v: IPv4View, outbound: bool, addr: IPv4Address, port: int,
              dec_ttl: bool = True) -> None:
    """Outbound: saddr/sport (echo: identifier) -> addr/port.  Reply: daddr/dport -> addr/port.
    ``dec_ttl`` False: TTL untouched (a packet handed to the kernel, which forwards it)."""
    aoff = IP_SADDR if outbound else IP_DADDR
    new_a = addr.packed
    old_a = _put(buf, aoff, new_a)
    l3_replace(buf, IP_CHECK, old_a, new_a)
    new_p = port.to_bytes(2, "big")
    if v.proto not in (IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP):
        # a protocol without ports: the address only, and a pseudo-header checksum
        if v.proto in PSEUDO_HDR_PROTOS and v.frag == 0 and v.tot_len - v.l4 >= 8:
            l4_replace(buf, v.l4 + 6, old_a, new_a)
    elif v.proto == IPPROTO_ICMP:
        old_p = _put(buf, v.l4 + ICMP_ID, new_p)
        l4_replace(buf, v.l4 + ICMP_CHECK, old_p, new_p)
    else:
        coff = v.l4 + (TCP_CHECK if v.proto == IPPROTO_TCP else UDP_CHECK)
        mangled0 = v.proto == IPPROTO_UDP
        l4_replace(buf, coff, old_a, new_a, mangled0)
        old_p = _put(buf, v.l4 + (0 if outbound else 2), new_p)
        l4_replace(buf, coff, old_p, new_p, mangled0)
    if dec_ttl:
        ttl_dec(buf)


def rewrite_fragment(buf: bytearray, saddr: IPv4Address, daddr: IPv4Address, dec_ttl: bool = True) -> None:
    for off, a in ((IP_SADDR, saddr), (IP_DADDR, daddr)):
        old = _put(buf, off, a.packed)
        l3_replace(buf, IP_CHECK, old, a.packed)
    if dec_ttl:
        ttl_dec(buf)


def translate_icmp_error(
    buf: bytearray,
    v: IPv4View,
    iv: InnerView,
    *,
    outer_off: int | None,
    inner_off: int,
    addr: IPv4Address,
    port: int,
    ttl: bool,
) -> None:
    """Rewrite an ICMP error about a session.  ``outer_off``: IP_SADDR/IP_DADDR of the outer
    header to set to ``addr`` (None: outer untouched); ``inner_off``: IP_SADDR (error about an
    outbound packet: inner source and source port) or IP_DADDR (about a reply: inner
    destination and destination port); ``ttl``: decrement the outer TTL."""
    icsum = v.l4 + ICMP_CHECK
    new_a = addr.packed
    if outer_off is not None:
        old = _put(buf, outer_off, new_a)
        l3_replace(buf, IP_CHECK, old, new_a)
    # inner address, inner IP checksum, and the ICMP checksum over both
    old_a = _put(buf, iv.off + inner_off, new_a)
    chk = iv.off + IP_CHECK
    old_c = bytes(buf[chk : chk + 2])
    l3_replace(buf, chk, old_a, new_a)
    l4_replace(buf, icsum, old_a, new_a)
    l4_replace(buf, icsum, old_c, bytes(buf[chk : chk + 2]))
    if iv.proto not in (IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP):  # no ports: the address only
        return _outer_ttl(buf, ttl)
    # inner port / echo identifier
    if iv.proto == IPPROTO_ICMP:
        poff = iv.l4 + ICMP_ID
    else:
        poff = iv.l4 + (0 if inner_off == IP_SADDR else 2)
    new_p = port.to_bytes(2, "big")
    old_p = _put(buf, poff, new_p)
    l4_replace(buf, icsum, old_p, new_p)
    # inner L4 checksum, when its bytes are present
    loff = iv.l4_check_off()
    if loff is None:
        return _outer_ttl(buf, ttl)
    old_l = bytes(buf[loff : loff + 2])
    if iv.proto == IPPROTO_ICMP:
        l4_replace(buf, loff, old_p, new_p)
    else:
        mangled0 = iv.proto == IPPROTO_UDP
        l4_replace(buf, loff, old_a, new_a, mangled0)
        l4_replace(buf, loff, old_p, new_p, mangled0)
    l4_replace(buf, icsum, old_l, bytes(buf[loff : loff + 2]))
    return _outer_ttl(buf, ttl)


def _outer_ttl(buf: bytearray, ttl: bool) -> None:
    if ttl:
        ttl_dec(buf)
