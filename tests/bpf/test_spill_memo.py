"""The spill memo (docs/datapath.md step 13) in the programs, beside the model: sessions freed
while a memo is young (the accuracy it costs, and what it never costs), a memo left by a
predecessor program honoured (the gate), and the counters."""

from dataclasses import replace
from ipaddress import IPv4Address

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.testrun import CLOCK_BASE
from snatgw.layout import Reason
from snatgw.model.conntrack import out_key
from snatgw.rules import Rule, RuleSet

from tests.bpf.test_differential import model_alloc_counts, model_spill_memos
from tests.cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from tests.cases.pkts import A, R1, udp
from tests.model.test_model_state import _memo_engine, memo_steps

pytestmark = pytest.mark.bpf


def test_freed_ports_while_a_memo_is_young_as_the_model(make_prog):
    """The model's memo steps (a port freed on the full address is not found while the memo
    is young, a freed first candidate is taken, the expired memo searched in full) give the
    same verdicts, addresses, ports, memos and counters in the programs."""
    e = _memo_engine()
    prog = make_prog(ruleset(REF_RULES), e.settings)
    for kind, sport, now in memo_steps():
        if kind == "remove":  # the expiry sweep's work, by hand: both keys of the pair, both sides
            ok = out_key(IPv4Address(A), IPv4Address(R1), sport, 53, 17)
            ik = e.table.lookup(ok).peer
            e.table.remove(ok)
            prog.maps[L.MAP_CT].delete(ok.to_bytes())
            prog.maps[L.MAP_CT].delete(ik.to_bytes())
            continue
        pkt = udp(A, R1, sport, 53)
        want = e.process(pkt, "inside", "lan40", now)
        got = prog.run("inside", pkt, "lan40", now=now)
        assert (got.reason, got.packet) == (want.reason, want.packet), f"sport {sport} at {now}"
    assert prog.spill_memos() == model_spill_memos(e)
    assert prog.alloc_counts() == model_alloc_counts(e)
    assert (e.spill.hits, e.spill.written) == (1, 1)


def test_a_memo_of_a_predecessor_is_honoured_then_forgotten(make_prog):
    """The program looks memos up only while one may be young (it remembers its last write); a
    memo left before it was loaded (a restarted daemon adopting the pinned map) still cuts
    searches short, refusing a flow while the address's other port is free (the memo's cost);
    at SPILL_MEMO_MS the address is searched in full again.  As the model with the same memo."""
    from snatgw.model import Engine, StaticRouter
    from snatgw.model.nat import SpillKey

    s = replace(REF_SETTINGS, port_min=5000, port_max=5001, on_exhausted="drop")
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71"})])
    prog, e = make_prog(rules, s), Engine(rules, s, StaticRouter.ref())
    nat = IPv4Address("198.19.2.71")
    key = L.SPILL_KEY.pack(remote=IPv4Address(R1).packed, addr=nat.packed, rport=(53).to_bytes(2, "big"),
                           proto=17, pad=0)  # fmt: skip
    prog.maps[L.MAP_SPILL_MEMO].put(key, L.SPILL_MEMO.pack(at=int((10 + CLOCK_BASE) * 1e9)))
    e.spill.memos[SpillKey(IPv4Address(R1), nat, 53, 17)] = 10.0
    got = []
    for sport, now in ((1001, 10.2), (1002, 10.3), (1004, 10.4), (1004, 12.5)):
        pkt = udp(A, R1, sport, 53)
        want, run = e.process(pkt, "inside", "lan40", now), prog.run("inside", pkt, "lan40", now=now)
        assert (run.reason, run.packet) == (want.reason, want.packet), f"sport {sport} at {now}"
        got.append(run.reason)
    assert got == [Reason.XLATE_NEW, Reason.DROP_PORT_EXHAUSTED, Reason.DROP_PORT_EXHAUSTED, Reason.XLATE_NEW]
    # searches 4: 1 try, 1 (the memo), 1 (the memo), 2 (in full, after SPILL_MEMO_MS)
    assert prog.alloc_counts() == model_alloc_counts(e) == {"spill_memo_hits": 2, "spill_memos_written": 0,
                                                            "port_searches": 4, "port_search_tries": 5}
    assert prog.spill_memos() == model_spill_memos(e)


def test_port_search_counts_step_by_step_as_the_model(make_prog):
    """The corpus scenario port_search_counts: after every step the programs' searches and
    tries (snat_alloc_cnt, summed over CPUs) are the model's: 1/1, 2/3, 3/6, 4/9 (a memo
    skip is no try), 4/9 (an established packet), 5/10."""
    from tests.cases.corpus import SCENARIOS

    sc = next(s for s in SCENARIOS if s.name == "port_search_counts")
    prog, e = make_prog(sc.make_rules(), sc.make_settings()), sc.make_engine()
    got = []
    for i, st in enumerate(sc.steps):
        e.process(st.packet, st.side, st.ingress, st.when(i))
        prog.run(st.side, st.packet, st.ingress, now=st.when(i))
        a = prog.alloc_counts()
        assert a == model_alloc_counts(e), f"step {i}"
        got.append((a["port_searches"], a["port_search_tries"]))
    assert got == [(1, 1), (2, 3), (3, 6), (4, 9), (4, 9), (5, 10)]


def test_an_apply_forgets_the_refusal_markers_and_memos_as_the_model(make_prog):
    """A reload that raises the host limit, or turns spill on: the flows refused just before
    are judged again by the new settings at their next packet, in the programs as in the model
    (the apply empties snat_refused and snat_spill_memo); one that changes nothing they were
    judged by keeps them, in both.  Before, their markers dropped them
    as DROP_REFUSED_RECENTLY for up to REFUSED_SECS after the reload, and the memo kept the
    full address skipped."""
    from snatgw.model import Engine, StaticRouter

    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71-198.19.2.72",
                                     "algo": "sh"})])  # sh: drop by default
    s = replace(REF_SETTINGS, port_min=5000, port_max=5001, max_sessions_per_host=3)
    prog, e = make_prog(rules, s), Engine(rules, s, StaticRouter.ref())

    def send(sport, now):
        pkt = udp(A, R1, sport, 53)
        want, run = e.process(pkt, "inside", "lan40", now), prog.run("inside", pkt, "lan40", now=now)
        assert (run.reason, run.packet) == (want.reason, want.packet), f"sport {sport} at {now}"
        return run.reason

    # two ports on the sh address, then the port search refuses (sh: drop); the limit of 3 is
    # for after the reload, when the spilled third flow makes the host's third session
    got = [send(sp, now) for sp, now in ((1001, 10.0), (1002, 10.125), (1003, 10.25))]
    assert got == [Reason.XLATE_NEW, Reason.XLATE_NEW, Reason.DROP_PORT_EXHAUSTED]
    assert send(1003, 10.5) == Reason.DROP_REFUSED_RECENTLY
    assert prog.spill_memos() == model_spill_memos(e) != {}
    same = replace(s.with_timeouts(udp=45), refuse_icmp=True)  # the reload: nothing a judgement reads
    e.apply(rules, same)
    prog.apply(rules, same)  # keeps both (every apply emptied them: one more search per refused flow)
    assert prog.spill_memos() == model_spill_memos(e) != {} and len(prog.maps[L.MAP_REFUSED].keys()) == 1
    assert send(1003, 10.5625) == Reason.DROP_REFUSED_RECENTLY
    spill = replace(s, on_exhausted="spill")  # the reload: spill turned on
    e.apply(rules, spill)
    prog.apply(rules, spill)
    assert prog.spill_memos() == model_spill_memos(e) == {} and prog.maps[L.MAP_REFUSED].keys() == []
    assert send(1003, 10.625) == Reason.XLATE_NEW  # spilled to .72 at once, not dropped until 12.25
    assert [send(1004, 10.75), send(1004, 10.875)] == [Reason.DROP_HOST_LIMIT, Reason.DROP_REFUSED_RECENTLY]
    raised = replace(spill, max_sessions_per_host=10)  # the reload: the limit raised
    e.apply(rules, raised)
    prog.apply(rules, raised)
    assert send(1004, 11.0) == Reason.XLATE_NEW


def test_an_apply_empties_full_marker_and_memo_maps_in_batches_and_hands_every_marker_once(make_prog, monkeypatch):
    """Both LRUs full (65,536 refusal markers, 16,384 spill memos): the apply empties them by
    bpf_map_lookup_and_delete_batch, a system call per 4,096 entries, and keeps the markers
    packed until the refusal log looks (refusals(): each one once, a second apply's after the
    first's, one map's worth at most).  Before, a delete per entry and the markers' per-entry
    unpack took 1.4-1.9 s of a reload here (the daemon's lock held: no adm, no stats); now
    ~30 ms."""
    from snatgw.datapath.bpf import libbpf as B
    from snatgw.datapath.bpf.backend import BpfBackend
    from snatgw.datapath.bpf.maps import DatapathMaps, markers_of

    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71-198.19.2.72"})])
    prog = make_prog(rules, REF_SETTINGS)
    ref, memo = prog.maps[L.MAP_REFUSED], prog.maps[L.MAP_SPILL_MEMO]
    reasons = (Reason.DROP_PORT_EXHAUSTED, Reason.DROP_HOST_LIMIT)

    def fill(n, first):  # n markers for hosts 198.18.0.0 + first.., and a full memo map
        keys = b"".join(L.CT_KEY.pack(saddr=0xC6120000 + first + i, daddr=0xC6336402, sport=1000 + i % 50000,
                                      dport=53, proto=17) for i in range(n))  # fmt: skip
        vals = b"".join(L.REFUSAL.pack(at=first + i, addr=0xC6130247, reason=int(reasons[i % 2])) for i in range(n))
        ref.put_batch(keys, vals, n)
        memo.put_batch(b"".join(L.SPILL_KEY.pack(remote=i, addr=0xC6130247, rport=53, proto=17)
                                for i in range(L.MAX_SPILL_MEMO)), bytes(memo.value_size) * L.MAX_SPILL_MEMO,
                       L.MAX_SPILL_MEMO)  # fmt: skip
        # an LRU map may evict before it is full (free entries held on another CPU's list), so
        # "full" is what it holds: nearly all, counted (tests/bpf alone held 65,408 and 16,256)
        held = ref.count(), memo.count()
        assert held[0] >= 0.95 * n and held[1] >= 0.95 * L.MAX_SPILL_MEMO, held
        return held[0]

    b = BpfBackend()
    b.maps = DatapathMaps(prog.maps)
    deletes = []
    monkeypatch.setattr(B.Map, "delete", lambda self, k: deletes.append(k) or True)
    first = fill(L.MAX_REFUSED, 0)
    # refusal_markers reads the map in raw batches: the same answer as a pair per marker (its
    # old read), on the full map and on the empty one
    assert b.maps.refusal_markers() == markers_of([(1, k, v) for k, v in ref.items_batch()])
    b._forget_judgements()
    assert b.maps.refusal_markers() == []
    assert (ref.count(), memo.count(), len(deletes)) == (0, 0, 0)  # batches, no delete per entry
    second = fill(10, L.MAX_REFUSED)  # a second apply before the log looks: its 10 after the first's last
    b._forget_judgements()
    got = b.refusals()
    ats = {m["at"] for m in got}  # one map's worth kept at most, the first's in hash order, then the second's
    assert len(got) == len(ats) == min(first + second, L.MAX_REFUSED)
    assert set(range(L.MAX_REFUSED, L.MAX_REFUSED + 10)) <= ats
    at = min(a for a in ats if a % 2 and a < 256)  # one of the first apply's, a host-limit refusal
    m = next(m for m in got if m["at"] == at)
    assert m == {"host": f"198.18.0.{at}", "remote": "198.51.100.2", "sport": 1000 + at, "dport": 53, "proto": "udp",
                 "addr": "198.19.2.71", "at": at, "reason": "DROP_HOST_LIMIT"}  # fmt: skip
    assert b.refusals() == []  # handed once: the log counts each emptied marker once


def _put_markers(ref, n, first):
    """``n`` refusal markers in map ``ref``, ``at`` first .. first + n - 1 (one host each)."""
    keys = b"".join(L.CT_KEY.pack(saddr=0xC6120000 + first + i, daddr=0xC6336402, sport=1000 + i % 50000, dport=53,
                                  proto=17) for i in range(n))  # fmt: skip
    vals = b"".join(L.REFUSAL.pack(at=first + i, addr=0xC6130247, reason=int(Reason.DROP_PORT_EXHAUSTED))
                    for i in range(n))  # fmt: skip
    ref.put_batch(keys, vals, n)


def test_a_batch_call_failing_partway_still_hands_every_deleted_marker_to_the_log(make_prog, monkeypatch, caplog):
    """The batch call emptying the markers fails after two batches (a fake pop_batches over the
    real one, 1,000 entries a call): the markers those batches deleted still reach the refusal
    log, and the rest are emptied entry by entry (the map empty, each marker handed once).
    With the deletes entry by entry failing too, the failure is logged, the deleted ones are
    still handed and the rest stay in the map (listed from there, expiring as before).  Before,
    the markers the batches had deleted were lost with a warning and the rest kept."""
    import errno

    from snatgw.datapath.bpf import libbpf as B
    from snatgw.datapath.bpf.backend import BpfBackend
    from snatgw.datapath.bpf.maps import DatapathMaps

    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71-198.19.2.72"})])
    prog = make_prog(rules, REF_SETTINGS)
    ref, memo = prog.maps[L.MAP_REFUSED], prog.maps[L.MAP_SPILL_MEMO]
    real = B.Map.pop_batches

    def failing(self, chunk=4096):
        parts = real(self, 1000)
        for _ in range(2):
            part = next(parts, None)
            if part is None:
                return
            yield part
        raise B.LibbpfError(f"batch lookup and delete in map {self.name}", errno.EFAULT)

    monkeypatch.setattr(B.Map, "pop_batches", failing)
    b = BpfBackend()
    b.maps = DatapathMaps(prog.maps)
    _put_markers(ref, 3000, 0)
    memo.put(L.SPILL_KEY.pack(remote=1, addr=0xC6130247, rport=53, proto=17), bytes(memo.value_size))
    b._forget_judgements()
    assert (ref.count(), memo.count()) == (0, 0)
    assert sorted(m["at"] for m in b.refusals()) == list(range(3000)) and b.refusals() == []
    assert "the rest entry by entry" in caplog.text

    def refuse(self, key):
        raise B.LibbpfError(f"delete in map {self.name}", errno.EPERM)

    monkeypatch.setattr(B.Map, "delete", refuse)
    _put_markers(ref, 3000, 3000)
    b._forget_judgements()  # never raises
    assert 0 < ref.count() < 3000 and "kept after the apply" in caplog.text
    assert sorted(m["at"] for m in b.refusals()) == list(range(3000, 6000))  # the deleted ones, then the map's
