"""The daemon survives what its backend chokes on (issue 10): on the nft backend one GRE packet
put a conntrack line with `timeout=30,` in front of the reader, whose ValueError ended the
daemon from its GC loop.  Whatever the reader makes of such lines now, the daemon must stay up
and keep answering."""

import socket
import time

import pytest

from snatgw.daemon.control import request
from snatgw.lab.netns import ns_socket

from .conftest import scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]


def test_gre_and_other_protocols_do_not_kill_the_daemon(agw):
    lab = agw.lab
    proc = lab.gateway_proc
    for proto in (47, 50, 132, 253):  # GRE, ESP, SCTP, experimental
        with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, proto) as s:
            for _ in range(scaled(3)):
                s.sendto(b"\0\0\x08\x00" + b"snatgw" * 4, ("203.0.113.10", 0))
    settle()
    time.sleep(2.5)  # a few GC ticks read the table (stats sample) with those entries in it
    assert proc.poll() is None, "the daemon died"
    for op in ("status", "sessions", "stats"):
        resp = request(lab.socket_path, {"op": op}, timeout=20)
        assert isinstance(resp, dict) and "ok" in resp, resp
    assert request(lab.socket_path, {"op": "status"})["ok"]
    assert proc.poll() is None
