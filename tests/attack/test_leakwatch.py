"""The leak watcher itself: it must see a private source (outer or quoted in an ICMP error)
and stay quiet about public ones, or the attack tests that rely on it prove nothing."""

import os
import socket
import subprocess
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from snatgw.lab import leakwatch
from snatgw.lab.netns import ns_socket

pytestmark = [pytest.mark.root, pytest.mark.attack]
NETS = ["198.18.0.0/16"]


def test_offends_judges_outer_and_quoted_sources():
    """Pure check of one frame: outer source, an ICMP error's quoted addresses, or neither."""
    nets = tuple(leakwatch.IPv4Network(n) for n in NETS)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    assert leakwatch.offends(raw(eth / IP(src="198.18.40.10", dst="203.0.113.10") / UDP()), nets) == "src"
    quoted = raw(IP(src="203.0.113.10", dst="198.18.40.10") / UDP(sport=53, dport=5353))[:28]
    err = eth / IP(src="198.19.2.71", dst="203.0.113.10") / ICMP(type=3, code=3) / quoted
    assert leakwatch.offends(raw(err), nets) == "inner"
    assert leakwatch.offends(raw(eth / IP(src="198.19.2.71", dst="203.0.113.10") / UDP()), nets) is None
    assert leakwatch.offends(raw(eth / IP(src="198.19.2.71", dst="198.18.40.10") / UDP()), nets) is None
    assert leakwatch.offends(b"\x00" * 20, nets) is None


@pytest.fixture
def veth_pair():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    a, b = f"sgw{os.getpid() % 0xFFFF:04x}a", f"sgw{os.getpid() % 0xFFFF:04x}b"
    for ns in (a, b):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", a, "link", "add", "x", "type", "veth", "peer", "name", "y", "netns", b],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "-n", a, "link", "set", "x", "up"], check=True)
        subprocess.run(["ip", "-n", b, "link", "set", "y", "up"], check=True)
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False)


def test_watcher_catches_private_sources_only(veth_pair):
    """Frames sent across a veth: the private-source ones are reported, the rest only counted."""
    a, b = veth_pair
    w = leakwatch.start(b, "y", NETS)
    s = ns_socket(a, socket.AF_PACKET, socket.SOCK_RAW)
    s.bind(("x", 0))
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for src in ("198.19.2.71", "198.18.40.10", "203.0.113.5", "198.18.50.11"):
        s.send(raw(eth / IP(src=src, dst="203.0.113.10") / UDP(sport=1, dport=2)))
    s.close()
    time.sleep(0.2)
    leaks = w.stop()
    assert sorted(str(f.src) for f in leaks) == ["198.18.40.10", "198.18.50.11"]
    assert w.seen >= 4 and w.dropped == 0
