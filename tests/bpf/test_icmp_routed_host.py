"""ICMP errors about a reply to a ROUTED inside host (docs/datapath.md "ICMP errors"): the REF
corpus's inside hosts are all on-link, where every error must come from the host itself; here
E (198.18.44.10) sits behind an inside router (198.18.40.254 on lan40), so the router kinds
(host unreachable, frag needed, TTL exceeded) from that router, or from anything on lan40,
are translated, while the kinds only E sends (port unreachable, reassembly time exceeded) are
held to E.  BPF against the model, the route added to the REF namespace for this test only."""

import subprocess

import pytest

from snatgw.layout import Reason, Verdict
from snatgw.model import Engine, StaticRouter

from tests.bpf.test_differential import run_scenario
from tests.cases.corpus import REF_ADDRESSES, REF_ROUTES, Scenario, inside
from tests.cases.pkts import B, R1, icmp_error, udp

pytestmark = pytest.mark.bpf

E, RTR = "198.18.44.10", "198.18.40.254"
ROUTED = ("198.18.44.0/24", "lan40", RTR)
RED, DROP, R = Verdict.REDIRECT, Verdict.DROP, Reason


@pytest.fixture
def routed(refnet):
    """The REF namespace with 198.18.44.0/24 behind an inside router on lan40, for one test."""
    def ip(*a):
        subprocess.run(["ip", "-n", refnet.name, "route", *a, ROUTED[0], "via", RTR, "dev", "lan40"], check=True)

    ip("add")
    try:
        yield refnet
    finally:
        ip("del")


@pytest.mark.parametrize("back_from_rpf", [False, True], ids=["looked-up", "from-rpf"])
def test_router_kinds_about_a_routed_hosts_reply_still_leave(routed, make_prog, back_from_rpf):
    """E's session; the inside router's host unreachable, frag needed and TTL exceeded about
    E's reply are translated, so are B's (nothing at L3 tells B from a router when the host is
    routed); the router's and B's port unreachable and reassembly time exceeded are not,
    DROP_ICMP_NOT_FROM_HOST; E's own port unreachable is."""
    from snatgw import layout as L

    reply = udp(R1, E, 53, 5353, ttl=62)  # as E received it
    sc = Scenario("icmp_error_about_a_routed_host", "", [
        inside(udp(E, R1, 5353, 53), RED, R.XLATE_NEW),
        inside(icmp_error(RTR, R1, reply, 3, 1), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(RTR, R1, reply, 3, 4), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(RTR, R1, reply, 11, 0), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(B, R1, reply, 11, 0), RED, R.XLATE_ICMP_ERR_OUT),
        inside(icmp_error(RTR, R1, reply, 3, 3), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(B, R1, reply, 11, 1), DROP, R.DROP_ICMP_NOT_FROM_HOST),
        inside(icmp_error(E, R1, reply, 3, 3), RED, R.XLATE_ICMP_ERR_OUT),
    ])  # fmt: skip
    engine = Engine(sc.make_rules(), sc.make_settings(), StaticRouter(list(REF_ROUTES) + [ROUTED], REF_ADDRESSES))
    prog = make_prog(sc.make_rules(), sc.make_settings(), cfg_flags=L.CFG_F_BACK_FROM_RPF if back_from_rpf else 0)
    run_scenario(sc, prog, engine)  # BPF against the model, step by step
    model = Engine(sc.make_rules(), sc.make_settings(), StaticRouter(list(REF_ROUTES) + [ROUTED], REF_ADDRESSES))
    got = [(r.verdict, r.reason) for r in (model.process(s.packet, s.side, s.ingress, s.when(i))
                                           for i, s in enumerate(sc.steps))]
    assert got == [(s.verdict, s.reason) for s in sc.steps]  # and the model meets the steps
