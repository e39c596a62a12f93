"""ProgHarness.reset() (tests/bpf/conftest.py reuses loaded objects through it): after every
corpus scenario has run through one object, with the audit log on, reset() leaves each of
its maps as a freshly loaded object has them, and its audit ring empty."""

from dataclasses import replace

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import libbpf as B

from tests.cases.corpus import OTHER_MAC, REF_RULES, REF_SETTINGS, SCENARIOS, ruleset

pytestmark = pytest.mark.bpf

AUDIT = replace(REF_SETTINGS, audit_log="/var/log/snatgw/audit.jsonl")


def test_a_reset_object_holds_what_a_fresh_one_holds(refnet):
    from snatgw.datapath.bpf.testrun import MIN_TESTABLE_IPV4, ProgHarness

    with ProgHarness(refnet) as fresh, ProgHarness(refnet) as used:
        fresh.apply(ruleset(REF_RULES), AUDIT)
        want = fresh.snapshot()
        marked = 0  # scenarios that left refusal markers (the next apply empties them)
        for sc in SCENARIOS:  # every scenario's state, one after another, never cleared
            used.apply(sc.make_rules(), replace(sc.make_settings(), audit_log=AUDIT.audit_log))
            for i, step in enumerate(sc.steps):
                if len(step.packet) >= MIN_TESTABLE_IPV4:
                    used.run(step.side, step.packet, step.ingress, now=float(i), dst_mac=None if step.for_us else OTHER_MAC)
            marked += bool(used.maps[L.MAP_REFUSED].keys())
        assert marked
        used.apply(ruleset(REF_RULES), AUDIT)
        dirty = {n for n, v in used.snapshot().items() if v != want.get(n)}
        # the state a scenario leaves behind: so this test can see reset() forget some
        assert {L.MAP_CT, L.MAP_EIM, L.MAP_FRAGS, L.MAP_REASONS, L.MAP_RULE_STATS, L.MAP_HOST_SESS,
                L.MAP_ADDR_STATS, L.MAP_RULE_LIVE, L.MAP_AUDIT_CNT, "snat_dbg", "snat_clock"} <= dirty, sorted(dirty)
        assert {n.rsplit(".", 1)[1] for n in dirty if "." in n} == {"data", "bss"}, sorted(dirty)  # globals
        with B.RingBuffer(used.maps[L.MAP_AUDIT].fd) as ring:
            assert ring.drain(1)  # records of the scenarios' sessions wait in the ring

        used.reset()
        used.apply(ruleset(REF_RULES), AUDIT)
        got = used.snapshot()
        assert set(got) == set(want)
        assert {n: v for n, v in got.items() if v != want[n]} == {}
        with B.RingBuffer(used.maps[L.MAP_AUDIT].fd) as ring:
            assert ring.drain(1) == []
