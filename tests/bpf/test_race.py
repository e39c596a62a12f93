"""Two CPUs creating sessions at once through one SNAT address (root, bpf): the port search's
lookup-then-insert races (two inserts for one port), the live counts' first insert races, and
the table stays consistent: whole pairs only, each external tuple once, every packet one
reason, and the live counts equal to what the table and the reasons say.  Invariants, not
timing: the interleaving differs on every run, the outcome may not.  And the same race on
demand (build SNAT_TEST_RACE), step by step beside the model: byte for byte."""

from __future__ import annotations

import os
import threading
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from snatgw import layout as L
from snatgw.config.schema import Settings
from snatgw.rules import Rule, RuleSet

pytestmark = pytest.mark.bpf

R1 = "203.0.113.10"
HOSTS = ("198.18.40.10", "198.18.40.11")
SNAT = "198.19.2.71"
PAD = b"p" * 60  # bench packets must cover the wrappers' saved 96 bytes


def race(h, rounds: int) -> None:
    """HOSTS[0] on the first CPU and HOSTS[1] on the last (this machine kind has 2; on one, the
    threads interleave) each send ``rounds`` new flows (bench_new: a new source port per round,
    from a shared counter) at once."""
    cpus = sorted(os.sched_getaffinity(0))
    cpus = [cpus[0], cpus[-1]]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def run(cpu: int, host: str) -> None:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
            pkt = raw(IP(src=host, dst=R1) / UDP(sport=10000, dport=53) / PAD)
            start.wait()
            for _ in range(rounds // 500):
                h.bench("bench_new", pkt, "lan40", 500)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c, host)) for c, host in zip(cpus, HOSTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_two_cpus_racing_for_one_address_leave_a_consistent_table(bench_prog):
    rounds = 12000  # per CPU; bench_new gives each round a new source port (10000 + a shared counter)
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": SNAT})])
    # 8000 ports for 24,000 flows toward one server port: both CPUs fill it, then refuse (and
    # a host limit no host reaches: the datapath counts per host, so those atomic adds race too)
    settings = Settings(port_min=5000, port_max=12999, port_tries=64, max_sessions_per_host=1_000_000)
    h = bench_prog  # SNAT_BENCH, 16,384 sessions, as a fresh load
    h.apply(rules, settings)
    race(h, rounds)

    ct = h.ct()
    outs = {k: e for k, e in ct.items() if k[5] == L.CT_DIR_OUT}
    ins = {k: e for k, e in ct.items() if k[5] == L.CT_DIR_IN}
    # whole pairs only: each OUT's IN points back at it, and no IN is left alone
    assert all(ins.get(e["peer"], {}).get("peer") == k for k, e in outs.items())
    assert len(ins) == len(outs)
    # each external tuple once (the IN keys), all on the one address within the range
    assert {k[1] for k in ins} == {IPv4Address(SNAT)} and all(5000 <= k[3] <= 12999 for k in ins)
    reasons = h.reasons()
    assert sum(reasons.values()) == 2 * rounds  # every packet counted once
    assert reasons.get(L.Reason.XLATE_NEW, 0) == len(outs)
    assert set(reasons) <= {L.Reason.XLATE_NEW, L.Reason.XLATE_OUT, L.Reason.DROP_PORT_EXHAUSTED,
                            L.Reason.DROP_REFUSED_RECENTLY}  # fmt: skip
    assert len(outs) > 0.95 * 8000  # the range filled (a 64-try search may miss the last few)
    live = h.live_counts()
    refused = reasons.get(L.Reason.DROP_PORT_EXHAUSTED, 0)
    assert live[L.MAP_ADDR_STATS] == {IPv4Address(SNAT): (len(outs), refused)}
    hosts = live[L.MAP_HOST_SESS]
    assert sum(s for s, _ in hosts.values()) == len(outs) and sum(r for _, r in hosts.values()) == refused
    by_host = {IPv4Address(hh): sum(1 for k in outs if k[0] == IPv4Address(hh)) for hh in HOSTS}
    assert {a: s for a, (s, _) in hosts.items()} == {a: n for a, n in by_host.items() if n or a in hosts}
    (rule_sessions,) = (s for s, _ in live[L.MAP_RULE_LIVE].values())
    assert rule_sessions == len(outs)


def test_two_cpus_making_endpoint_independent_mappings_never_share_one(bench_prog):
    """mapping endpoint-independent under the same race: both CPUs make new endpoints whose
    source ports (shared counter) give the same first candidates on one address, so they fight
    for the same owners.  Afterwards every endpoint owns its (address, port) alone (its OWNER
    points back, no two endpoints share one), every session uses its endpoint's mapping, and
    nothing is left half made."""
    rounds = 3000  # per CPU
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": SNAT, "algo": "sh",
                                     "mapping": "endpoint-independent"})])  # fmt: skip
    settings = Settings(port_min=5000, port_max=12999, port_tries=64)
    h = bench_prog  # SNAT_BENCH, 16,384 sessions, as a fresh load
    h.apply(rules, settings)
    race(h, rounds)

    outs = {k: e for k, e in h.ct().items() if k[5] == L.CT_DIR_OUT}
    eim = h.eim()
    endpoints = {(k[0], k[2]): (v[0], v[1]) for k, v in eim.items() if k[4] == L.EIM_DIR_ENDPOINT}
    owners = {(k[0], k[2]): (v[0], v[1]) for k, v in eim.items() if k[4] == L.EIM_DIR_OWNER}
    assert len(outs) > 1000 and len(endpoints) == len(outs)  # one session per new endpoint here
    assert len(set(endpoints.values())) == len(endpoints)  # no two endpoints share a mapping
    assert owners == {m: ep for ep, m in endpoints.items()}  # each owner points back, none extra
    for k, e in outs.items():
        assert endpoints[(k[0], k[2])] == (IPv4Address(e["rw_addr"]), e["rw_port"])
        assert e["flags"] & L.CT_F_EIM
    reasons = h.reasons()
    assert sum(reasons.values()) == 2 * rounds
    assert reasons.get(L.Reason.XLATE_NEW, 0) == len(outs)


#: the IP id of a new flow that the SNAT_TEST_RACE build races (snat.bpf.c, nat.h port_try)
RACE_ID = 0xACE5


def _racing_engine(rules, settings):
    """The model with the race of test_model_state's test, on demand: while ``armed``, the
    next IN insert (the first free candidate: the model looks up before it inserts) is beaten
    by another CPU's insert of the same key (peer itself, rewrite (remote, 1)), as the
    SNAT_TEST_RACE programs do for a packet with IP id RACE_ID."""
    from snatgw.model import Engine, StaticRouter
    from snatgw.model.conntrack import CtEntry, CtTable

    from tests.cases.corpus import REF_ADDRESSES, REF_ROUTES

    class Racing(CtTable):
        armed = False

        def insert(self, key, entry):
            if key.dir == L.CT_DIR_IN and self.armed:
                self.armed = False
                super().insert(key, CtEntry(peer=key, rw_addr=key.saddr, rw_port=1, oif="other-cpu", nexthop=None,
                                            rule_id=0, mtu=1500, last_seen=0.0))  # fmt: skip
            return super().insert(key, entry)

    e = Engine(rules, settings, StaticRouter(REF_ROUTES, REF_ADDRESSES))
    e.table = e.nat.ct = Racing(settings.max_sessions)
    return e


@pytest.mark.parametrize("case", ["spill", "drop"])
def test_a_port_lost_to_another_cpu_between_lookup_and_insert_as_the_model(make_prog, case):
    """Two CPUs, one port, deterministically (the build SNAT_TEST_RACE: another CPU inserts
    the IN key a new flow found free, between its lookup and its insert) beside the model
    racing the same way: the flow moves on to its next candidate, spills to the next address
    when the race took an address's last free port, or (drop, one port) is refused and
    marked; the loser leaves nothing on the lost port.  Verdicts, bytes, session tables,
    live counts, markers, memos and allocator counters agree byte for byte."""
    from dataclasses import replace

    from tests.bpf.test_differential import (bpf_sessions, compare_step, model_alloc_counts, model_live,
                                             model_refused, model_sessions, model_spill_memos)
    from tests.cases.corpus import REF_RULES, REF_SETTINGS, ruleset
    from tests.cases.pkts import A, B, R1, udp

    R = L.Reason
    raced = {"id": RACE_ID}
    if case == "spill":  # 2 ports on each of .72 (sdh's choice for A -> R1), .73, .71
        s = replace(REF_SETTINGS, port_min=6000, port_max=6001)
        steps = [(udp(A, R1, 1, 53, **raced), R.XLATE_NEW),  # first free candidate lost: the other
                 (udp(A, R1, 2, 53, **raced), R.XLATE_NEW),  # .72 full; .73's first free lost
                 (udp(A, R1, 3, 53, **raced), R.XLATE_NEW),  # .71's likewise
                 (udp(A, R1, 4, 53, **raced), R.DROP_PORT_EXHAUSTED),  # nothing free: no race
                 (udp(A, R1, 1, 53), R.XLATE_OUT)]  # fmt: skip
    else:  # one port, on_exhausted drop: the race takes the only free port
        s = replace(REF_SETTINGS, port_min=6000, port_max=6000, on_exhausted="drop")
        steps = [(udp(B, R1, 1, 53, **raced), R.DROP_PORT_EXHAUSTED),
                 (udp(B, R1, 1, 53), R.DROP_REFUSED_RECENTLY),
                 (udp(A, R1, 2, 53, **raced), R.DROP_PORT_EXHAUSTED)]  # .72: the only port is the other's: no race
    rules = ruleset(REF_RULES)
    prog = make_prog(rules, s, defines={"SNAT_TEST_RACE": RACE_ID})
    e = _racing_engine(rules, s)
    for i, (pkt, want) in enumerate(steps):
        e.table.armed = pkt[4:6] == RACE_ID.to_bytes(2, "big")
        res = e.process(pkt, "inside", "lan40", float(i))
        e.table.armed = False  # the programs race one packet's search at most: so does the model
        run = prog.run("inside", pkt, "lan40", now=float(i))
        assert res.reason == want, f"step {i}: model {res.reason.name}"
        compare_step(i, type("Step", (), {"side": "inside", "ingress": "lan40", "packet": pkt})(), res, run)
    assert bpf_sessions(prog) == model_sessions(e), "session tables differ"
    ct = prog.ct()
    other = [k for k, v in ct.items() if v["peer"] == k]  # the other CPU's entries (peer: itself)
    # one per race that found a free port; the losers left nothing on them (the tables agree)
    assert len(other) == (3 if case == "spill" else 1) and len(ct) == len(other) + 2 * (3 if case == "spill" else 0)
    assert prog.live_counts() == model_live(e), "live counts differ"
    assert prog.refused() == model_refused(e), "refusal markers differ"
    assert prog.spill_memos() == model_spill_memos(e), "spill memos differ"
    assert prog.alloc_counts() == model_alloc_counts(e), "allocator counters differ"
