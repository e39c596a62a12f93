"""Endpoint-independent mappings over time: the BPF sweep (prog/sweep.bpf.c) and the model's
Engine.expire remove an endpoint with its last session (and its owner and permits with it),
never one a live session uses, and agree entry for entry; a mapping that is gone lets nothing
in any more.  (The per-packet behaviour is in the corpus: tests/cases/corpus.py "eim_*".)"""

from ipaddress import IPv4Address
from types import SimpleNamespace

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.testrun import CLOCK_BASE
from snatgw.layout import Reason

from tests.bpf.test_differential import bpf_sessions, model_eim, model_sessions
from tests.cases.corpus import NAT, R1B, Scenario, eim_rules
from tests.cases.pkts import A, B, R1, R2, udp

pytestmark = pytest.mark.bpf


def _sweeper(prog):
    from snatgw.datapath.bpf.sweep import Sweeper

    return Sweeper(SimpleNamespace(maps=prog.maps, ct=prog.maps[L.MAP_CT]))


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_endpoint_goes_with_its_last_session_in_sweep_and_model(make_prog, chunked):
    sc = Scenario("eim_expiry", "", [], rules=eim_rules(filtering="address-dependent"))
    settings = sc.make_settings()
    prog, eng = make_prog(sc.make_rules(), settings), sc.make_engine()
    sweep = _sweeper(prog)
    timeouts = {int(s): settings.timeout(s) * 10**9 for s in L.CtState}

    def send(t, side, pkt, dev):
        res = eng.process(pkt, side, dev, float(t))
        run = prog.run(side, pkt, dev, now=float(t))
        assert (run.verdict, run.reason, run.packet) == (res.verdict, res.reason, res.packet)
        return res

    def expire(t):
        eng.expire(float(t))
        sweep.expire(int((t + CLOCK_BASE) * 1e9), timeouts, L.EIM_GRACE * 10**9, full=True, chunked=chunked)
        assert bpf_sessions(prog) == model_sessions(eng)
        assert prog.eim() == model_eim(eng)
        return {(k.addr, k.dir, k.remote) for k in eng.eim.entries()}

    try:
        pa = send(0, "inside", udp(A, R1, 40000, 3478), "lan40").nat[1]
        send(1, "inside", udp(A, R2, 40000, 3478), "lan40")
        pb = send(2, "inside", udp(B, R1, 40001, 3478), "lan40").nat[1]
        assert pa != pb
        send(200, "inside", udp(A, R2, 40000, 3478, payload=b"keep"), "lan40")  # refreshes A->R2 only
        left = expire(320)  # A->R1 and B->R1 idle 320 s > 300: gone; A->R2 lives
        a, b, nat, any_ = IPv4Address(A), IPv4Address(B), IPv4Address(NAT), IPv4Address(0)
        assert left == {(a, L.EIM_DIR_ENDPOINT, any_), (nat, L.EIM_DIR_OWNER, any_),
                        (a, L.EIM_DIR_PERMIT, IPv4Address(R2))}  # fmt: skip
        # A's mapping still holds toward a new remote; R1 (its permit gone) is not let in any more
        assert send(321, "inside", udp(A, R1B, 40000, 53), "lan40").nat == (nat, pa)
        assert send(322, "outside", udp(R1, NAT, 3478, pa), "eth1").reason == Reason.PASS_NO_SESSION_IN
        # B's mapping is gone with its owner: B's port is free for anyone, B's old port lets nothing in
        assert send(323, "outside", udp(R1, NAT, 3478, pb), "eth1").reason == Reason.PASS_NO_SESSION_IN
        assert expire(700) == set()  # everything idle: the last endpoint went with its sessions
        assert send(701, "outside", udp(R2, NAT, 3478, pa), "eth2").reason == Reason.PASS_NO_SESSION_IN
    finally:
        sweep.close()


def test_a_fresh_endpoint_outlives_a_sweep_within_the_grace(make_prog):
    """An endpoint made moments before a walk (its session not seen by it: here, flushed) is
    kept for the grace, so a walk never takes a mapping from under a session being made."""
    sc = Scenario("eim_grace", "", [], rules=eim_rules())
    prog, eng = make_prog(sc.make_rules(), sc.make_settings()), sc.make_engine()
    sweep = _sweeper(prog)
    timeouts = {int(s): sc.make_settings().timeout(s) * 10**9 for s in L.CtState}
    try:
        pkt = udp(A, R1, 40000, 3478)
        eng.process(pkt, "inside", "lan40", 100.0)
        prog.run("inside", pkt, "lan40", now=100.0)
        eng.flush()
        sweep.flush()
        for t, kept in ((105, 2), (111, 0)):
            eng.expire(float(t))
            sweep.expire(int((t + CLOCK_BASE) * 1e9), timeouts, L.EIM_GRACE * 10**9, full=True)
            assert prog.eim() == model_eim(eng) and len(eng.eim) == kept
    finally:
        sweep.close()


def test_a_mapping_follows_its_rule_to_another_slot_and_dies_with_it(make_prog):
    """Reloads: a rule placed before the mapping's moves it to another slot (snat_rule_slots
    follows, the mapping still admits); with its rule gone the mapping lets nothing in and a new
    flow of the endpoint takes the remaining rule; model and BPF alike."""
    from snatgw.rules import Rule, RuleSet

    from tests.cases.corpus import EIM_RULE

    eif = dict(EIM_RULE, filtering="endpoint-independent")
    first = RuleSet([Rule.from_dict(eif)])
    sc = Scenario("eim_reload", "", [], rules=[eif])
    settings = sc.make_settings()
    prog, eng = make_prog(first, settings), sc.make_engine()

    def send(t, side, pkt, dev):
        res = eng.process(pkt, side, dev, float(t))
        run = prog.run(side, pkt, dev, now=float(t))
        assert (run.verdict, run.reason, run.packet) == (res.verdict, res.reason, res.packet)
        return res

    pa = send(0, "inside", udp(A, R1, 40000, 3478), "lan40").nat[1]
    before = Rule.from_dict({"from": "198.18.40.0/24", "to": "192.0.2.0/24", "snat_ip": "198.19.3.71"})
    moved = RuleSet([before, Rule.from_dict(eif)])  # the EIM rule now in slot 1
    eng.apply(moved)
    prog.apply(moved, settings)
    assert send(1, "outside", udp(R2, NAT, 3478, pa), "eth2").reason == Reason.XLATE_IN_NEW
    gone = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.72"})])  # another identity
    eng.apply(gone)
    prog.apply(gone, settings)
    assert send(2, "outside", udp(R1B, NAT, 3478, pa), "eth1").reason == Reason.PASS_NO_SESSION_IN
    send(3, "inside", udp(A, R1B, 40000, 3478), "lan40")
    assert bpf_sessions(prog) == model_sessions(eng) and prog.eim() == model_eim(eng)
