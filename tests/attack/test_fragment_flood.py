"""Held fragments under a flood, both backends: later fragments whose first never comes, by the
thousand, are never let out (leak watchers on both uplinks).  bpf: they cost bounded memory (the
holder keeps at most its capacity and counts the rest), and once FRAG_HOLD has passed a datagram
whose later fragments come first gets through again.  nft: the kernel's reassembly holds them
(ipfrag_high_thresh, 4 MB) for ipfrag_time (30 s), and refuses every fragment meanwhile, as
kernel SNAT does: that part is bpf only (docs/datapath.md, "Fragments out of order")."""

import os
import socket
import struct
import time

import pytest
from scapy.layers.inet import IP, UDP, fragment

from snatgw.layout import FRAG_HOLD
from snatgw.lab.netns import ns_socket
from snatgw.model.checksum import csum16

from .conftest import scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1, SRC = "203.0.113.10", "198.18.40.10"


def frags(ident: int, payload: bytes, sport: int = 40404, dport: int = 9700) -> list[bytes]:
    return [bytes(f) for f in fragment(IP(src=SRC, dst=S1, id=ident) / UDP(sport=sport, dport=dport) / payload,
                                       fragsize=1000)]


def orphan(ident: int, tail: bytes) -> bytes:
    """frags(ident, payload)[1] for a 1200-byte payload ending in ``tail`` (its last 208 bytes),
    built by hand: scapy takes milliseconds a datagram, most of this test's time at 3000."""
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tail), ident, 1000 // 8, 64, socket.IPPROTO_UDP,
                                0, socket.inet_aton(SRC), socket.inet_aton(S1)))
    struct.pack_into("!H", hdr, 10, csum16(hdr))
    return bytes(hdr) + tail


def test_a_flood_of_orphan_later_fragments_leaks_nothing_and_passes(agw):
    n = scaled(3000)
    sample = os.urandom(1200)
    assert orphan(7, sample[992:]) == frags(7, sample)[1]  # the same bytes scapy makes
    srv = ns_socket(agw.lab.ns("net"), socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((S1, 9700))
    srv.settimeout(3)
    try:
        with agw.watch() as leaks:
            with ns_socket(agw.lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
                for i in range(n):  # the second fragment of datagrams that never had a first
                    raw.sendto(orphan(1 + i % 0xFFFE, os.urandom(208)), (S1, 0))
                if agw.backend == "bpf":
                    settle(FRAG_HOLD + 1.0)  # every flood datagram's hold is over (nft has no holder:
                    # the kernel keeps them ipfrag_time, 30 s, refusing every fragment meanwhile)
                    ask = os.urandom(2500)
                    f = frags(0xFFFF, ask)
                    for x in f[1:][::-1]:
                        raw.sendto(x, (S1, 0))
                    time.sleep(0.05)
                    raw.sendto(f[0], (S1, 0))
                    got, peer = srv.recvfrom(65536)
                    assert got == ask and not peer[0].startswith("198.18.")
            settle()
    finally:
        srv.close()
    assert leaks == [], [str(x) for x in leaks[:5]]
    if agw.backend == "bpf":
        r = agw.reasons()
        assert r.get("FRAG_HELD", 0) >= n and r.get("DROP_FRAG_UNKNOWN", 0) > 0
