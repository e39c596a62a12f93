"""The route back of new sessions, live (docs/datapath.md step 13, "The route back"): the bpf
daemon reuses the reverse-path check's route while no IPv4 policy rule selects on the input
device, and notices at once (its netlink socket's rule events) when one is added or removed.
An `iif eth1` rule sending replies toward lan40 via a next hop that does not answer ARP
(table 100) clears the flag: status says so and names the rule, and a session made then sends
its replies to that next hop (they are lost: its neighbour entry on lan40 is made, the echo is
not answered), as the kernel would route a reply arriving on eth1.  Removed: the flag is set
again and a new session's replies reach the host."""

from __future__ import annotations

import os
import socket
import time

import pytest

from snatgw.lab import clients
from snatgw.lab.demo import REF_RULES, config_text
from snatgw.lab.gateway import snatgw_json
from snatgw.lab.topology import Lab

pytestmark = [pytest.mark.root, pytest.mark.lab]

SERVER = "203.0.113.10"  # via eth1
DEAD_HOP = "198.18.40.99"  # no host has it: a reply sent there never arrives


@pytest.fixture(scope="module")
def rlab():
    lab = Lab.up(f"pytest-{os.getpid()}-rback{time.monotonic_ns() % 10**6}",
                 prefix=f"sgr{os.getpid() % 0xFFFF:04x}{time.monotonic_ns() % 100}")
    try:
        lab.start_servers()
        conf = os.path.join(lab.workdir, "rback.conf")
        with open(conf, "w") as f:
            f.write(config_text(REF_RULES))
        lab.add_snat_addresses(conf)
        lab.start_gateway(conf, "bpf")
        yield lab
    finally:
        lab.down()


def route_back(lab, want_reused: bool, timeout: float = 5.0) -> dict:
    """The daemon's route-back report once it says ``want_reused`` (or the last one seen)."""
    deadline = time.monotonic() + timeout
    while True:
        st = snatgw_json(lab, "status") or {}
        rb = (st.get("datapath") or {}).get("route_back") or {}
        if rb.get("reused") == want_reused or time.monotonic() > deadline:
            return rb
        time.sleep(0.1)


def test_an_iif_rule_added_at_runtime_clears_the_flag_and_replies_follow_its_table(rlab):
    lab = rlab
    rb = route_back(lab, True)
    assert rb["reused"] is True and rb["text"] == "reused from the reverse-path check"
    assert clients.udp_echo(lab, "in40", SERVER, src="198.18.40.10", sport=41000)["peer"]  # replies arrive

    lab.ip("gw", "route", "add", "198.18.40.0/24", "via", DEAD_HOP, "dev", "lan40", "table", "100")
    lab.ip("gw", "rule", "add", "iif", "eth1", "lookup", "100", "pref", "100")
    try:
        rb = route_back(lab, False)
        assert rb["reused"] is False
        assert rb["why"] == "iif rule 100: from all iif eth1 lookup 100", rb
        assert rb["text"] == "looked up per session (iif rule 100: from all iif eth1 lookup 100)"
        # a session made now: its replies go to table 100's next hop, as the kernel routes a
        # reply arriving on eth1, and are lost there
        with pytest.raises(socket.timeout):
            clients.udp_echo(lab, "in40", SERVER, src="198.18.40.10", sport=41001, timeout=1.5)
        neigh = lab.ip("gw", "neigh", "show", DEAD_HOP, "dev", "lan40").stdout
        assert DEAD_HOP in neigh, "the reply was not sent toward table 100's next hop"
        # the session made before the rule keeps the route back it was made with
        assert clients.udp_echo(lab, "in40", SERVER, src="198.18.40.10", sport=41000)["peer"]
    finally:
        lab.ip("gw", "rule", "del", "pref", "100", check=False)
    rb = route_back(lab, True)
    assert rb["reused"] is True, rb
    assert clients.udp_echo(lab, "in40", SERVER, src="198.18.40.10", sport=41002)["peer"]
    with open(os.path.join(lab.workdir, "gateway.log")) as f:
        log = f.read()
    assert "looked up per session: iif rule 100: from all iif eth1 lookup 100" in log
    assert log.count("route back of new sessions looked up per session") == 1  # logged once
