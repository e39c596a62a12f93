"""Edge invariant 1 in the lab, both backends: no packet with a source in a rule's `from` net
leaves an uplink untranslated (a leak watcher on the ISP side of each uplink counts them)."""

import socket

import pytest

from snatgw.lab.demo import SETTINGS
from snatgw.lab.netns import ns_socket

from .conftest import scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1 = "203.0.113.10"
#: a rule for 198.18.40.0/24 toward ISP 2's net only: flows to S1 match no rule
PARTIAL = SETTINGS + ("virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24  to 198.51.100.0/24"
                      "  snat_ip 198.19.3.71 }\n}\n")


def test_routed_flow_from_a_from_net_is_stopped_at_the_uplink(agw):
    """A flow from a `from` net that no rule matches is routed by the kernel (unmatched pass)
    and would leave eth1 untranslated: the egress guard drops and counts every packet."""
    agw.reload(PARTIAL)
    try:
        n = scaled(20)
        before = agw.reasons().get("DROP_LEAK", 0)
        with agw.watch(["198.18.40.0/24"]) as leaks:
            with ns_socket(agw.lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("198.18.40.10", 0))
                for i in range(n):
                    s.sendto(b"leak-%d" % i, (S1, 7007))
            settle()
        after = agw.reasons().get("DROP_LEAK", 0)
    finally:
        agw.restore()
    assert leaks == [], [str(f) for f in leaks[:5]]
    assert after - before >= n
