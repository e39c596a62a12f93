"""Edge invariant 3 in the lab, both backends: an inside host cannot send with a source that
is not its own network's.  The attack of issue 10: host B sends with A's SNAT address and port
as its source, so the server's reply would land in A's session; the gateway refuses it."""

import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from snatgw.lab.clients import ECHO_PORT
from snatgw.lab.netns import ns_socket

from .conftest import FrameSender, scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1 = "203.0.113.10"


def test_spoofed_pool_source_is_refused_and_never_reaches_a_session(agw):
    """A's UDP session to S1; B (same LAN) sends as A's SNAT address:port, as the gateway's own
    addresses and as another network's host: none reaches the server, A's socket gets nothing
    but its own replies, every spoof is counted DROP_SPOOFED."""
    lab, servers = agw.lab, agw.lab.servers
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.settimeout(2)
        a.bind(("198.18.40.10", 0))
        a.sendto(b"hello-from-a", (S1, ECHO_PORT))
        a.recv(65536)
        seen = servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data") == "hello-from-a")
        assert seen is not None
        snat, sport = seen["peer"].rsplit(":", 1)
        n = scaled(10)
        before = agw.reasons().get("DROP_SPOOFED", 0)
        forged = [snat, "198.19.2.2", "198.18.40.1", "198.18.50.10", "192.0.2.77"]
        tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
        for i in range(n):
            for src in forged:
                tx.send(raw(IP(src=src, dst=S1) / UDP(sport=int(sport), dport=ECHO_PORT) / f"spoof-{i}".encode()))
        tx.close()
        settle(0.5)
        spoofed = agw.reasons().get("DROP_SPOOFED", 0) - before
        landed = servers.wait_for(lambda e: str(e.get("data", "")).startswith("spoof-"), timeout=0.5)
        a.settimeout(0.3)
        leaked_to_a = []
        try:
            while True:
                leaked_to_a.append(a.recv(65536))
        except OSError:
            pass
    assert landed is None, landed
    assert not [d for d in leaked_to_a if b"spoof-" in d]
    assert spoofed >= n * len(forged)
