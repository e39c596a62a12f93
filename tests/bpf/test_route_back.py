"""A new session's route back (docs/datapath.md step 13, "The route back"): looked up from the
uplink, or reused from the reverse-path check's lookup (from the loopback) while
CFG_F_BACK_FROM_RPF says no policy rule selects on the input device.  Here an iif rule makes the
two differ (a reply arriving on eth1 is routed to the inside host by table 100, via another next
hop), in a REF namespace of this test's own: with the flag clear the session gets the route a
reply from the uplink takes (table 100's next hop), and the control plane's judgement of that
namespace clears the flag."""

import os
import subprocess
from ipaddress import IPv4Address

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.backend import route_back_inputs
from snatgw.fibrules import route_back_blocker
from snatgw.layout import Reason

from tests.cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from tests.cases.pkts import A, R1, udp

pytestmark = pytest.mark.bpf

OTHER_HOP = "198.18.40.99"  # table 100's next hop toward lan40's hosts


def _reply_target(prog, sport: int, flags: int):
    """A new flow A:sport -> R1:53 through the inside program under ``flags``, then its reply
    through the outside program: (oif, next hop) the reply is sent to."""
    prog.apply(ruleset(REF_RULES), REF_SETTINGS, cfg_flags=flags)
    out = prog.run("inside", udp(A, R1, sport, 53), "lan40")
    assert out.reason == Reason.XLATE_NEW and out.oif == "eth1"
    nat, nport = str(IPv4Address(out.packet[12:16])), int.from_bytes(out.packet[20:22], "big")
    back = prog.run("outside", udp(R1, nat, 53, nport), "eth1")
    assert back.reason == Reason.XLATE_IN and back.packet[16:20] == IPv4Address(A).packed
    return back.oif, back.nexthop or IPv4Address(A)  # None: the destination itself (on-link)


def test_an_iif_rule_makes_the_route_back_differ_and_the_judgement_clears_the_flag():
    from snatgw.datapath.bpf.testrun import ProgHarness, RefNet

    if os.geteuid() != 0:
        pytest.skip("needs root")
    with RefNet(prefix=f"sgt{os.getpid():x}rb-") as net, ProgHarness(net) as prog:
        # no iif rule: both lookups agree, the flag set or not (A is on-link)
        assert _reply_target(prog, 40000, 0) == ("lan40", IPv4Address(A))
        assert _reply_target(prog, 40001, L.CFG_F_BACK_FROM_RPF) == ("lan40", IPv4Address(A))
        with net.enter():
            assert route_back_blocker(*route_back_inputs()) is None
        ip = ["ip", "-n", net.name]
        subprocess.run(ip + ["route", "add", "198.18.40.0/24", "via", OTHER_HOP, "dev", "lan40", "table", "100"],
                       check=True)  # fmt: skip
        subprocess.run(ip + ["rule", "add", "iif", "eth1", "lookup", "100", "pref", "100"], check=True)
        # flag clear: the route a reply arriving on eth1 takes (table 100)
        assert _reply_target(prog, 40002, 0) == ("lan40", IPv4Address(OTHER_HOP))
        # set (which the control plane never does with this rule): step 2a's route, on-link
        assert _reply_target(prog, 40003, L.CFG_F_BACK_FROM_RPF) == ("lan40", IPv4Address(A))
        with net.enter():
            assert route_back_blocker(*route_back_inputs()) == "iif rule 100: from all iif eth1 lookup 100"
        subprocess.run(ip + ["rule", "del", "pref", "100"], check=True)
        subprocess.run(["ip", "netns", "exec", net.name, "sysctl", "-qw", "net.ipv4.conf.eth2.forwarding=0"],
                       check=True)  # fmt: skip
        with net.enter():
            assert route_back_blocker(*route_back_inputs()) == "forwarding off on eth2"
