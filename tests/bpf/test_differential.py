"""BPF vs the model on the shared corpus: every step of every scenario gives the same verdict,
reason, output IPv4 bytes and redirect target, and afterwards the session tables (both keys,
rewrite, next hop, OUT state and flags), the reason counters and the per-rule counters agree.  The
model (snatgw.model) is the oracle."""

import subprocess
from collections import Counter
from ipaddress import IPv4Address

import pytest

from snatgw.datapath.bpf.testrun import MIN_TESTABLE_IPV4
from snatgw import layout as L
from snatgw.layout import CT_DIR_OUT, Reason, Verdict

from tests.cases.corpus import OTHER_MAC, SCENARIOS

pytestmark = pytest.mark.bpf


def model_sessions(engine) -> dict:
    out = {}
    for k, e in engine.table.entries().items():
        key = (k.saddr, k.daddr, k.sport, k.dport, k.proto, k.dir)
        d = {"peer": tuple(e.peer), "rw": (e.rw_addr, e.rw_port), "nexthop": IPv4Address(e.nexthop or 0)}
        if k.dir == CT_DIR_OUT:
            d.update(state=e.state, flags=e.flags)
        out[key] = d
    return out


def bpf_sessions(prog) -> dict:
    from ipaddress import IPv4Address

    out = {}
    for key, e in prog.ct().items():
        d = {"peer": e["peer"], "rw": (IPv4Address(e["rw_addr"]), e["rw_port"]), "nexthop": IPv4Address(e["nexthop"])}
        if key[5] == CT_DIR_OUT:
            d.update(state=e["state"], flags=e["flags"])
        out[key] = d
    return out


def compare_step(i, step, res, run):
    where = f"step {i} ({step.side} on {step.ingress})"
    if step.side == "egress" and run.verdict is None:
        # BPF leaves egress packets that are not ICMP errors alone and uncounted (they are all
        # forwarded traffic); the model counts them PASS_ICMP_OTHER.  Same verdict and bytes.
        assert (res.verdict, res.reason) == (Verdict.PASS, Reason.PASS_ICMP_OTHER), where
        assert run.retval == 0 and run.packet == res.packet == step.packet, where
        return
    assert (run.verdict, run.reason) == (res.verdict, res.reason), f"{where}: bpf vs model"
    assert run.packet == res.packet, (
        f"{where}: output bytes differ\nbpf   {run.packet.hex()}\nmodel {res.packet.hex()}"
    )
    assert run.mark == res.mark, f"{where}: skb->mark bpf 0x{run.mark:x} vs model 0x{res.mark:x}"
    if res.verdict == Verdict.REDIRECT:
        # None means "the route to the destination": BPF resolves that route once per session
        # for replies (on-link in REF: the destination itself), the model leaves it None
        dst = IPv4Address(res.packet[16:20])
        assert (run.oif, run.nexthop or dst) == (res.oif, res.nexthop or dst), f"{where}: redirect target"


def model_live(engine) -> dict:
    """The model's live counts and refusal markers as ProgHarness.live_counts/refused say them."""
    out = {L.MAP_HOST_SESS: engine.host_live, L.MAP_ADDR_STATS: engine.addr_live, L.MAP_RULE_LIVE: engine.rule_live}
    return {name: {k: (c.sessions, c.refusals) for k, c in d.items()} for name, d in out.items()}


def model_refused(engine) -> dict:
    return {tuple(k): (m.at, m.addr, m.reason) for k, m in engine.refused.items()}


def model_eim(engine) -> dict:
    """The model's snat_eim as ProgHarness.eim says it."""
    return {tuple(k): (e.addr, e.port, e.rule_id, e.iif, round(e.last_seen, 6)) for k, e in engine.eim.entries().items()}


def model_spill_memos(engine) -> dict:
    """The model's snat_spill_memo as ProgHarness.spill_memos says it."""
    return {tuple(k): at for k, at in engine.spill.memos.items()}


def model_alloc_counts(engine) -> dict:
    """The model's allocator counters as ProgHarness.alloc_counts says them (by layout.ALLOC_CNT_NAMES)."""
    return engine.alloc_counts()


def _route(net, op: str, route: tuple[str, str, str | None], check: bool = True) -> None:
    dst, dev, via = route
    cmd = ["ip", "-n", net.name, "route", op, dst, *(["via", via] if via else []), "dev", dev]
    subprocess.run(cmd, check=check, capture_output=True)


def run_scenario(sc, prog, engine):
    """The scenario's steps through ``prog`` and ``engine``, compared step by step and after;
    a route change of the scenario (Scenario.reroute) is made in both, and the REF namespace
    has its own routes back afterwards, whatever happened."""
    added: list[tuple[str, str, str | None]] = []  # routes the scenario has added to the namespace
    try:
        _run_steps(sc, prog, engine, added)
    finally:
        for r in added:
            _route(prog.net, "del", r, check=False)


def _run_steps(sc, prog, engine, added: list) -> None:
    judged = Counter()  # the model's reasons for the packets BPF ran and judged
    for i, step in enumerate(sc.steps):
        extra = sc.rerouted(engine, i)
        if extra is not None:  # the same routes in the namespace as in the model's router
            for r in [r for r in added if r not in extra]:
                _route(prog.net, "del", r)
                added.remove(r)
            for r in [r for r in extra if r not in added]:
                added.append(r)
                _route(prog.net, "add", r)
        res = engine.process(step.packet, step.side, step.ingress, step.when(i), for_us=step.for_us)
        if len(step.packet) < MIN_TESTABLE_IPV4:
            continue  # the kernel's test-run refuses it (EINVAL); see testrun.Untestable
        run = prog.run(step.side, step.packet, step.ingress, now=step.when(i), dst_mac=None if step.for_us else OTHER_MAC)
        compare_step(i, step, res, run)
        if run.verdict is not None:
            judged[res.reason] += 1
    assert bpf_sessions(prog) == model_sessions(engine), "session tables differ"
    assert prog.live_counts() == model_live(engine), "live counts differ"
    assert prog.refused() == model_refused(engine), "refusal markers differ"
    assert prog.eim() == model_eim(engine), "endpoint-independent mappings differ"
    assert prog.spill_memos() == model_spill_memos(engine), "spill memos differ"
    assert prog.alloc_counts() == model_alloc_counts(engine), "allocator counters differ"
    if sc.alloc is not None:  # and what the scenario says they are
        a = prog.alloc_counts()
        assert (a["port_searches"], a["port_search_tries"]) == sc.alloc, "port search counts"
    assert prog.reasons() == dict(judged), "reason counters differ"
    if all(len(s.packet) >= MIN_TESTABLE_IPV4 for s in sc.steps):
        model_rules = {rid: {"packets": c.packets, "bytes": c.bytes, "sessions": c.sessions}
                       for rid, c in engine.rule_stats.items()}  # fmt: skip
        assert prog.rule_stats() == model_rules, "rule counters differ"


#: the L4 checksum by hand (test-run skbs are CHECKSUM_NONE) and by bpf_l4_csum_replace only
BUILDS = {"csum-by-hand": {}, "csum-helpers": {"SNAT_NO_KERN_CTX": 1}}
#: the build that runs with CFG_F_BACK_FROM_RPF set (the route back reused from the
#: reverse-path check: REF has no iif rules and forwards everywhere, as the control plane would
#: judge it); the other runs with it clear (looked up): the model must agree with both
BACK_FROM_RPF_BUILD = "csum-helpers"
#: the build that runs with the audit log on (it must change nothing the model sees) and
#: checks its create records against the model's sessions; the other runs with it off
AUDIT_BUILD = "csum-by-hand"


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_corpus_scenario_matches_model(sc, build, make_prog):
    """Each corpus scenario: same verdicts, reasons, bytes, targets and sessions as the model
    (one build with the audit log on: the same, and a create record per model session)."""
    from dataclasses import replace

    settings = sc.make_settings()
    if build == AUDIT_BUILD:
        settings = replace(settings, audit_log="/var/log/snatgw/audit.jsonl")
    max_sessions = min(settings.max_sessions, 4096)
    flags = L.CFG_F_BACK_FROM_RPF if build == BACK_FROM_RPF_BUILD else 0
    prog = make_prog(sc.make_rules(), settings, defines=BUILDS[build], max_sessions=max_sessions, cfg_flags=flags)
    engine = sc.make_engine()
    run_scenario(sc, prog, engine)
    if build == AUDIT_BUILD:
        check_audit_records(prog, engine)


def model_out_sessions(engine) -> dict:
    """(inside, remote, inside port, remote port, proto) -> (SNAT address, port) of every OUT entry."""
    return {(str(k.saddr), str(k.daddr), k.sport, k.dport, k.proto): (str(e.rw_addr), e.rw_port)
            for k, e in engine.table.entries().items() if k.dir == CT_DIR_OUT}  # fmt: skip



def check_audit_records(prog, engine) -> None:
    """The ring holds one create record per session the model made, with its mapping (no
    corpus step removes a session)."""
    from snatgw.datapath.bpf.audit import decode
    from snatgw.datapath.bpf.libbpf import RingBuffer

    with RingBuffer(prog.maps[L.MAP_AUDIT].fd) as ring:
        recs = [decode(r) for r in ring.drain(100_000)]
    assert {r["event"] for r in recs} <= {"create"}
    got = {(r["inside_addr"], r["remote_addr"], r["inside_port"], r["remote_port"], r["proto"]):
           (r["nat_addr"], r["nat_port"]) for r in recs}  # fmt: skip
    proto = {L.IPPROTO_TCP: "tcp", L.IPPROTO_UDP: "udp", L.IPPROTO_ICMP: "icmp"}
    want = {(i, rm, sp, dp, proto.get(p, str(p))): v for (i, rm, sp, dp, p), v in model_out_sessions(engine).items()}
    assert got == want and len(recs) == len(want), "audit records differ from the model's sessions"
