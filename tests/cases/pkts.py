"""Packet builders for the corpus and the model tests (scapy builds; checksums are scapy's),
and the REF addresses.  Everything returns IPv4 bytes (no Ethernet header)."""

from __future__ import annotations

from ipaddress import IPv4Address

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

from snatgw.rules import port_candidates, port_seed, select_addr

# REF hosts and remotes (plan.md)
A = "198.18.40.10"  # in40
B = "198.18.40.11"  # in40
A3 = "198.18.40.12"  # in40
C = "198.18.50.10"  # in50
D = "198.18.50.11"  # in50
R1 = "203.0.113.10"  # leaves via eth1 (default via 198.19.2.1)
R2 = "198.51.100.10"  # leaves via eth2 (via 198.19.3.1)
ISP1 = "198.19.2.1"
ISP2 = "198.19.3.1"
ROUTER = "192.0.2.2"  # a router on the path that reports errors
STRANGER = "192.0.2.50"  # an inside source no rule covers


def tcp(src: str, dst: str, sport: int, dport: int, flags: str = "S", ttl: int = 64, payload: bytes = b"",
        **ip_kw) -> bytes:  # fmt: skip
    return raw(IP(src=src, dst=dst, ttl=ttl, **ip_kw) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                                           ack=0 if "A" not in flags else 2000) / payload)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"snatgw-u", ttl: int = 64,
        zero_csum: bool = False, **ip_kw) -> bytes:  # fmt: skip
    u = UDP(sport=sport, dport=dport, chksum=0) if zero_csum else UDP(sport=sport, dport=dport)
    return raw(IP(src=src, dst=dst, ttl=ttl, **ip_kw) / u / payload)


def echo(src: str, dst: str, ident: int, seq: int = 1, reply: bool = False, ttl: int = 64,
         payload: bytes = b"ping-snatgw", **ip_kw) -> bytes:  # fmt: skip
    return raw(IP(src=src, dst=dst, ttl=ttl, **ip_kw) / ICMP(type=0 if reply else 8, id=ident, seq=seq) / payload)


def icmp_error(src: str, dst: str, quoted: bytes, type: int = 3, code: int = 3, ttl: int = 64,
               keep: int | None = None, **ip_kw) -> bytes:  # fmt: skip
    """An ICMP error from ``src`` quoting ``quoted`` (cut to IHL*4 + 8 bytes unless ``keep``)."""
    ihl = (quoted[0] & 0x0F) * 4
    n = ihl + 8 if keep is None else keep
    extra = {"nexthopmtu": 1400} if (type, code) == (3, 4) else {}
    return raw(IP(src=src, dst=dst, ttl=ttl, **ip_kw) / ICMP(type=type, code=code, **extra) / Raw(quoted[:n]))


def other_proto(src: str, dst: str, proto: int = 47, ttl: int = 64) -> bytes:
    return raw(IP(src=src, dst=dst, proto=proto, ttl=ttl) / Raw(b"\x00\x00\x08\x00" + b"g" * 20))


def fragments(src: str, dst: str, sport: int, dport: int, size: int = 64, ident: int = 0x4242,
              proto: str = "udp") -> list[bytes]:  # fmt: skip
    """A UDP (or ICMP echo, sport = id) datagram cut into a first fragment (L4 header + 16
    bytes) and the rest (offset 3)."""
    payload = bytes(range(256))[:size]
    if proto == "udp":
        whole = IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / payload
    else:
        whole = IP(src=src, dst=dst, id=ident) / ICMP(type=8, id=sport, seq=1) / payload
    b = raw(whole)
    l4 = b[20:]
    first = IP(src=src, dst=dst, id=ident, flags="MF", frag=0, proto=whole.proto) / Raw(l4[:24])
    rest = IP(src=src, dst=dst, id=ident, flags=0, frag=3, proto=whole.proto) / Raw(l4[24:])
    return [raw(first), raw(rest)]


def with_options(pkt: bytes) -> bytes:
    """The same datagram with 4 bytes of IP options (NOP NOP NOP EOL): IHL 6."""
    p = IP(pkt)
    q = IP(src=p.src, dst=p.dst, ttl=p.ttl, id=p.id, flags=p.flags, options=[b"\x01\x01\x01\x00"])
    return raw(q / p.payload)


def snat_of(rule, src: str, dst: str, sport: int, port_min: int = 5000, port_max: int = 65535,
            nth: int = 0, dport: int = 0, proto: int = 0) -> tuple[str, int]:  # fmt: skip
    """The SNAT (addr, port) a fresh flow gets: select_addr and the nth port candidate (for
    nth > 0 the flow's remote port and protocol seed the sequence)."""
    addr = select_addr(rule.pool, rule.algo, IPv4Address(src), IPv4Address(dst), sport)
    seed = port_seed(IPv4Address(src), IPv4Address(dst), sport, dport, proto)
    ports = list(port_candidates(sport, port_min, port_max, nth + 1, seed))
    return str(addr), ports[nth]


def zeroing_word(build) -> bytes:
    """Two payload bytes ``w`` such that the L4 checksum of ``build(w)`` computes to zero:
    ``build(b"\\0\\0")``'s checksum c is the one's complement of the sum without w, so w = c
    makes the sum all ones.  ``build`` returns (bytes, checksum offset)."""
    pkt, off = build(b"\0\0")
    c = int.from_bytes(pkt[off : off + 2], "big")
    assert c not in (0, 0xFFFF)
    return c.to_bytes(2, "big")


def pseudo_proto(src: str, dst: str, proto: int = 136, payload: bytes = b"lite-payload", ttl: int = 64) -> bytes:
    """A UDP-Lite (136) or DCCP-like (33) datagram whose checksum at L4 offset 6 covers a
    pseudo-header (addresses, protocol, length) and all of it, computed here."""
    body = bytearray(b"\x13\x88\x00\x35\x00\x00\x00\x00" + payload)
    hdr = raw(IP(src=src, dst=dst, proto=proto, ttl=ttl) / Raw(bytes(body)))[:20]
    data = hdr[12:20] + bytes([0, proto]) + len(body).to_bytes(2, "big") + bytes(body)
    data += b"\0" * (len(data) % 2)
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    body[6:8] = (0xFFFF - s).to_bytes(2, "big")
    return hdr + bytes(body)
