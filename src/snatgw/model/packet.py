"""IPv4 packet views for the model: parse the bytes once into offsets and fields (TCP, UDP,
ICMP, and the inner header of an ICMP error), with the exact malformed-packet rules of
docs/datapath.md step 2; plus small field writers.  Never raises on any input."""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address

from ..layout import ICMP_ERROR_TYPES, ICMP_QUERY_REPLIES, ICMP_QUERY_REQUESTS, IPPROTO_ICMP, IPPROTO_TCP
from ..layout import IPPROTO_UDP, Reason

ICMP_QUERIES = ICMP_QUERY_REQUESTS + ICMP_QUERY_REPLIES

# offsets inside the IPv4 header
IP_TTL = 8
IP_CHECK = 10
IP_SADDR = 12
IP_DADDR = 16
# offsets of checksums inside the L4 header
TCP_CHECK = 16
UDP_CHECK = 6
ICMP_CHECK = 2
ICMP_ID = 4

#: minimum L4 bytes present in an unfragmented or first fragment (step 2)
L4_MIN = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, IPPROTO_ICMP: 8}


def u16(b: bytes | bytearray, off: int) -> int:
    return (b[off] << 8) | b[off + 1]


def u32(b: bytes | bytearray, off: int) -> int:
    return int.from_bytes(b[off : off + 4], "big")


def ip(v: int) -> IPv4Address:
    return IPv4Address(v)


@dataclass
class IPv4View:
    """Offsets and fields of one IPv4 datagram (addresses as host-order ints)."""

    ihl: int  # header length in bytes
    tot_len: int
    ttl: int
    proto: int
    ipid: int
    frag: int  # fragment offset, 8-byte units
    mf: bool
    df: bool
    saddr: int
    daddr: int
    l4: int  # offset of the L4 header (== ihl)
    sport: int = 0  # TCP/UDP ports; ICMP query (echo, timestamp, ...): identifier in sport
    dport: int = 0
    flags: int = 0  # TCP flags
    icmp_type: int = -1
    icmp_code: int = 0
    opts_kernel: bool = False  # step 2b: a source route or options that do not parse

    @property
    def is_later_fragment(self) -> bool:
        return self.frag > 0

    @property
    def is_first_fragment(self) -> bool:
        return self.frag == 0 and self.mf

    @property
    def is_icmp_error(self) -> bool:
        return self.proto == IPPROTO_ICMP and self.icmp_type in ICMP_ERROR_TYPES

    @property
    def is_query_request(self) -> bool:
        return self.proto == IPPROTO_ICMP and self.icmp_type in ICMP_QUERY_REQUESTS


#: IP options of a source route (RFC 791): loose (LSRR) and strict (SSRR)
IPOPT_SOURCE_ROUTES = (131, 137)


def opts_to_kernel(opts: bytes | bytearray) -> bool:
    """Step 2b: IP options the kernel must judge: a source route, or options that do not parse
    (a length byte missing, below 2, or past the header).  EOL ends the list, NOP is one byte."""
    i, n = 0, len(opts)
    while i < n:
        t = opts[i]
        if t == 0:
            return False
        if t == 1:
            i += 1
            continue
        if i + 1 >= n or opts[i + 1] < 2 or i + opts[i + 1] > n:
            return True
        if t in IPOPT_SOURCE_ROUTES:
            return True
        i += opts[i + 1]
    return False


def parse(buf: bytes | bytearray) -> IPv4View | Reason:
    """Steps 1-2: a view, or PASS_NOT_IPV4 / DROP_MALFORMED.

    The version is read from the first byte when there is one (an empty packet is malformed);
    total length beyond the bytes present, or below the header length, is malformed; bytes
    after the total length (link padding) are ignored and kept."""
    n = len(buf)
    if n >= 1 and buf[0] >> 4 != 4:
        return Reason.PASS_NOT_IPV4
    if n < 20:
        return Reason.DROP_MALFORMED
    ihl = (buf[0] & 0x0F) * 4
    tot_len = u16(buf, 2)
    if ihl < 20 or tot_len < ihl or tot_len > n:
        return Reason.DROP_MALFORMED
    fo = u16(buf, 6)
    v = IPv4View(
        ihl=ihl, tot_len=tot_len, ttl=buf[IP_TTL], proto=buf[9], ipid=u16(buf, 4),
        frag=fo & 0x1FFF, mf=bool(fo & 0x2000), df=bool(fo & 0x4000),
        saddr=u32(buf, IP_SADDR), daddr=u32(buf, IP_DADDR), l4=ihl,
    )  # fmt: skip
    v.opts_kernel = ihl > 20 and opts_to_kernel(buf[20:ihl])
    if v.frag > 0 or v.proto not in L4_MIN:
        return v
    avail = tot_len - ihl
    if avail < L4_MIN[v.proto]:
        return Reason.DROP_MALFORMED
    o = ihl
    if v.proto == IPPROTO_TCP:
        if buf[o + 12] >> 4 < 5:
            return Reason.DROP_MALFORMED
        v.sport, v.dport, v.flags = u16(buf, o), u16(buf, o + 2), buf[o + 13]
    elif v.proto == IPPROTO_UDP:
        v.sport, v.dport = u16(buf, o), u16(buf, o + 2)
    else:
        v.icmp_type, v.icmp_code = buf[o], buf[o + 1]
        if v.icmp_type in ICMP_QUERIES:
            v.sport = u16(buf, o + ICMP_ID)
    return v


@dataclass
class InnerView:
    """The IPv4 header and first L4 bytes quoted by an ICMP error (offsets into the packet)."""

    off: int  # offset of the inner IPv4 header
    ihl: int
    proto: int
    saddr: int
    daddr: int
    l4: int  # offset of the inner L4 header
    avail: int  # inner L4 bytes present (>= 8)
    sport: int  # TCP/UDP ports; ICMP: identifier in sport (echo) and 0
    dport: int
    icmp_type: int = -1

    def l4_check_off(self) -> int | None:
        """Offset of the inner L4 checksum when its bytes are present (TCP needs 18)."""
        if self.proto == IPPROTO_TCP:
            return self.l4 + TCP_CHECK if self.avail >= 18 else None
        if self.proto == IPPROTO_UDP:
            return self.l4 + UDP_CHECK
        if self.proto == IPPROTO_ICMP:
            return self.l4 + ICMP_CHECK
        return None


def parse_inner(buf: bytes | bytearray, v: IPv4View) -> InnerView | Reason:
    """The quoted header of an ICMP error, or DROP_MALFORMED when it lacks the inner IPv4
    header (IHL*4 bytes, IHL >= 5) plus 8 bytes of inner L4 header."""
    off = v.l4 + 8
    avail = v.tot_len - off
    if avail < 20:
        return Reason.DROP_MALFORMED
    ihl = (buf[off] & 0x0F) * 4
    if ihl < 20 or avail < ihl + 8:
        return Reason.DROP_MALFORMED
    l4 = off + ihl
    proto = buf[off + 9]
    iv = InnerView(
        off=off, ihl=ihl, proto=proto, saddr=u32(buf, off + IP_SADDR), daddr=u32(buf, off + IP_DADDR),
        l4=l4, avail=avail - ihl, sport=u16(buf, l4), dport=u16(buf, l4 + 2),
    )  # fmt: skip
    if proto == IPPROTO_ICMP:
        iv.icmp_type = buf[l4]
        iv.sport, iv.dport = u16(buf, l4 + ICMP_ID), 0
    return iv
