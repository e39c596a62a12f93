"""The nft backend applies the timeout settings to real flows (issue 12): a TCP connection whose
client sent FIN sits in conntrack's CLOSE_WAIT with the configured close_wait timeout (the
kernel's own is 60 s), established with tcp_established, and ICMP gets the `icmp` setting
through the namespace's nf_conntrack_icmp_timeout (nft 1.0.6 has no ICMP policy)."""

from __future__ import annotations

import socket
import time

import pytest

from snatgw.lab.netns import ns_socket
from snatgw.datapath.nft.backend import parse_conntrack

from tests.nft.conftest import REF

pytestmark = [pytest.mark.nft, pytest.mark.root]

S1 = "203.0.113.10"
TIMEOUTS = "outside eth1 eth2\n    timeout tcp_close_wait 333\n    timeout tcp_established 4444\n    timeout icmp 77"


def _entry(lab, sport: int) -> dict:
    text = lab.run("gw", "cat", "/proc/net/nf_conntrack").stdout
    (e,) = [d for d in parse_conntrack(text) if d["proto"] == "tcp" and d.get("sport") == str(sport)]
    return e


def test_close_wait_established_and_icmp_timeouts_reach_conntrack(lab, backend):
    with backend(REF.replace("outside eth1 eth2", TIMEOUTS)):
        icmp = lab.run("gw", "sysctl", "-n", "net.netfilter.nf_conntrack_icmp_timeout").stdout.strip()
        srv = ns_socket(lab.ns("net"), socket.AF_INET, socket.SOCK_STREAM)
        cli = ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_STREAM)
        try:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind((S1, 9800))
            srv.listen(1)
            cli.bind(("198.18.40.11", 0))
            cli.connect((S1, 9800))
            conn, _ = srv.accept()
            sport = cli.getsockname()[1]
            time.sleep(0.2)
            est = _entry(lab, sport)
            cli.shutdown(socket.SHUT_WR)  # client FIN: the server's side is half-closed
            assert conn.recv(10) == b""
            time.sleep(0.2)
            half = _entry(lab, sport)
            conn.close()
        finally:
            cli.close()
            srv.close()
    assert icmp == "77"
    assert est["state"] == "ESTABLISHED" and 4000 < est["timeout"] <= 4444
    assert half["state"] == "CLOSE_WAIT" and 300 < half["timeout"] <= 333
