"""The per-host live count only while a host limit needs it (CFG_F_HOST_COUNT, docs/datapath.md
step 15): the real programs (BPF_PROG_TEST_RUN) against the model through reloads that turn a
limit on and off, in the control plane's order (flag, recount, rules; rules, then the flag off),
and the sweep's SWEEP_RECOUNT walk over real maps."""

from ipaddress import IPv4Address

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.backend import install_rules
from snatgw.datapath.bpf.maps import DatapathMaps
from snatgw.datapath.bpf.prog_maps import compile_rules
from snatgw.datapath.bpf.sweep import Sweeper
from snatgw.layout import Reason

from tests.cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from tests.cases.pkts import A, B, R1, udp
from test_differential import bpf_sessions, compare_step, model_live, model_refused, model_sessions

pytestmark = pytest.mark.bpf

LIMITED = [REF_RULES[0], dict(REF_RULES[1], max_sessions_per_host=3), REF_RULES[2]]


def cfg_flags(dm) -> int:
    return L.SNAT_CFG.unpack(dm.current_rules()[0])["flags"]


def host_limits(dm) -> list[int]:
    return [L.SNAT_RULE.unpack(r)["host_limit"] for r in dm.current_rules()[1]]


@pytest.fixture
def pair(make_prog):
    """(program harness, model engine, DatapathMaps over the harness's maps, Sweeper) on the
    reference rules without a host limit."""
    prog = make_prog(ruleset(REF_RULES), REF_SETTINGS)
    from snatgw.model import Engine, StaticRouter

    engine = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    dm = DatapathMaps(prog.maps)
    sw = Sweeper(dm)
    try:
        yield prog, engine, dm, sw
    finally:
        sw.close()


def step(prog, engine, pkt, now, want):
    res = engine.process(pkt, "inside", "lan40", now)
    run = prog.run("inside", pkt, "lan40", now=now)
    from tests.cases.corpus import Step

    compare_step(int(now), Step("inside", "lan40", pkt, res.verdict, res.reason), res, run)
    assert res.reason == want


def reload(prog, engine, dm, rules, recount):
    cfg, slots = compile_rules(ruleset(rules), REF_SETTINGS, lambda n: prog.net.ifindex.get(n, 0))
    install_rules(dm, cfg, slots, recount)
    engine.apply(ruleset(rules))


def test_a_limit_turned_on_by_reload_judges_a_recounted_count_bpf_and_model(pair):
    """Without a limit A's three sessions count for no host (only rule and address); the reload
    that brings a limit of 3 sets the flag, recounts (before the rules with the limit are
    visible), then writes them: A's fourth flow is DROP_HOST_LIMIT, B's is made, in both; the
    reload that removes the limit writes the rules first, then clears the flag: A's next flow is
    made and not counted.  Live counts and refusal markers agree at every point."""
    prog, engine, dm, sw = pair
    for sp in (1, 2, 3):
        step(prog, engine, udp(A, R1, sp, 53), float(sp), Reason.XLATE_NEW)
    assert prog.live_counts() == model_live(engine)
    assert prog.live_counts()[L.MAP_HOST_SESS] == {} and not cfg_flags(dm) & L.CFG_F_HOST_COUNT
    assert sum(c[0] for c in prog.live_counts()[L.MAP_RULE_LIVE].values()) == 3

    seen = {}

    def recount():
        seen["flags"], seen["limits"] = cfg_flags(dm), host_limits(dm)
        seen["res"] = sw.recount()

    reload(prog, engine, dm, LIMITED, recount)
    assert seen["flags"] & L.CFG_F_HOST_COUNT and seen["limits"] == [0, 0, 0]  # flag, recount, rules
    assert seen["res"].live == 3 and seen["res"].removed == 0
    assert host_limits(dm) == [0, 3, 0] and cfg_flags(dm) & L.CFG_F_HOST_COUNT
    assert prog.live_counts()[L.MAP_HOST_SESS] == {IPv4Address(A): (3, 0)}
    assert prog.live_counts() == model_live(engine)

    step(prog, engine, udp(A, R1, 4, 53), 4.0, Reason.DROP_HOST_LIMIT)
    step(prog, engine, udp(B, R1, 4, 53), 5.0, Reason.XLATE_NEW)
    assert prog.live_counts()[L.MAP_HOST_SESS] == {IPv4Address(A): (3, 1), IPv4Address(B): (1, 0)}
    assert prog.live_counts() == model_live(engine) and prog.refused() == model_refused(engine)

    reload(prog, engine, dm, REF_RULES, lambda: pytest.fail("no recount when a limit goes"))
    assert host_limits(dm) == [0, 0, 0] and not cfg_flags(dm) & L.CFG_F_HOST_COUNT
    step(prog, engine, udp(A, R1, 5, 53), 6.0, Reason.XLATE_NEW)
    assert prog.live_counts()[L.MAP_HOST_SESS][IPv4Address(A)] == (3, 1)  # not counted any more
    assert prog.live_counts() == model_live(engine)
    sw.recount()  # the sweep's recount (here: engine.recount) counts it again
    engine.recount()
    assert prog.live_counts()[L.MAP_HOST_SESS][IPv4Address(A)] == (4, 1)
    assert prog.live_counts() == model_live(engine)


def test_recount_keeps_every_session_and_drops_empty_counts(pair):
    """SWEEP_RECOUNT removes nothing (not even a session long past its timeout) and leaves the
    counts exact: a stale count of a host without sessions goes, its refusals with it (a host
    with sessions keeps its refusals)."""
    prog, engine, dm, sw = pair
    for sp in (1, 2):
        step(prog, engine, udp(A, R1, sp, 53), float(sp), Reason.XLATE_NEW)
    hosts = prog.maps[L.MAP_HOST_SESS]
    ghost, refused = IPv4Address("198.18.40.99"), IPv4Address("198.18.40.98")
    hosts.put(ghost.packed, L.LIVE_COUNT.pack(sessions=7, refusals=0))
    hosts.put(refused.packed, L.LIVE_COUNT.pack(sessions=5, refusals=2))
    hosts.put(IPv4Address(A).packed, L.LIVE_COUNT.pack(sessions=2, refusals=3))
    before = len(prog.maps[L.MAP_CT])
    res = sw.recount()
    assert (res.removed, res.live, len(prog.maps[L.MAP_CT])) == (0, 2, before)
    assert prog.live_counts()[L.MAP_HOST_SESS] == {IPv4Address(A): (2, 3)}
    rule = L.SNAT_RULE.unpack(dm.current_rules()[1][1])["rule_id"]
    assert prog.live_counts()[L.MAP_RULE_LIVE] == {rule: (2, 0)}


@pytest.mark.parametrize("walk", ["recount", "expire", "expire-full"])
def test_sessions_made_during_a_walk_are_counted_once(pair, walk):
    """Three sessions the datapath makes while a chunked walk counts (after SWEEP_BEGIN, before
    the first batch of keys is read, so the walk comes by them) are counted by the datapath and
    not again by the walk: every count, inside hosts' included, is the model's at the end (the
    walk used to count them a second time until the next one, so a host limit refused early).
    They carry the walk's stamp (CT_F_WALK, its number in the IN entry's iif) until the next walk
    settles it, after which the table is the model's again, flags included."""
    prog, engine, dm, sw = pair
    reload(prog, engine, dm, LIMITED, sw.recount)
    for sp in (1, 2):
        step(prog, engine, udp(A, R1, sp, 53), float(sp), Reason.XLATE_NEW)
    real = dm.ct.key_batches

    def made_meanwhile(chunk):
        step(prog, engine, udp(B, R1, 3, 53), 3.0, Reason.XLATE_NEW)
        step(prog, engine, udp(B, R1, 4, 53), 4.0, Reason.XLATE_NEW)
        step(prog, engine, udp(A, R1, 5, 53), 5.0, Reason.XLATE_NEW)
        return real(chunk)

    def run_walk():
        if walk == "recount":
            return sw.recount(chunked=True)
        timeouts = {s: 600 * 10**9 for s in range(L.SWEEP_STATES)}
        return sw.expire(6 * 10**9, timeouts, 10 * 10**9, full=walk == "expire-full", chunked=True)

    dm.ct.key_batches = made_meanwhile
    try:
        res = run_walk()
    finally:
        del dm.ct.key_batches
    assert (res.live, res.made_during, res.removed) == (5, 3, 0)
    assert prog.live_counts() == model_live(engine)
    assert prog.live_counts()[L.MAP_HOST_SESS] == {IPv4Address(A): (3, 0), IPv4Address(B): (2, 0)}
    number = L.WALK_STATE.unpack(prog.maps[L.MAP_WALK].get(0))
    assert number["current"] == 0  # no walk counting now
    ct = prog.ct()
    stamped = {k for k, e in ct.items() if k[5] == L.CT_DIR_OUT and e["flags"] & L.CT_F_WALK}
    assert len(stamped) == 3 and all(k[0] == IPv4Address(B) or k[2] == 5 for k in stamped)
    assert sorted(e["iif"] for k, e in ct.items() if k[5] == L.CT_DIR_IN) == [0, 0] + [number["last"]] * 3
    assert bpf_sessions(prog) != model_sessions(engine)  # the stamps, until the next walk

    res = run_walk()
    assert (res.live, res.made_during) == (5, 0) and prog.live_counts() == model_live(engine)
    assert bpf_sessions(prog) == model_sessions(engine)
    assert all(e["iif"] == 0 for k, e in prog.ct().items() if k[5] == L.CT_DIR_IN)


def test_stamps_left_by_a_daemon_killed_mid_walk_are_counted_and_settled(pair):
    """A daemon killed between SWEEP_BEGIN and SWEEP_END leaves its walk's number published
    (snat_walk.current): the datapath goes on stamping new sessions with it.  The next daemon's
    walk takes the next number, so it counts those sessions (the datapath's increments are in
    its snapshot, not counted again) and settles their stamps: counts exact, table the model's."""
    prog, engine, dm, sw = pair
    reload(prog, engine, dm, LIMITED, sw.recount)
    prog.maps[L.MAP_WALK].put(0, L.WALK_STATE.pack(current=7, last=7))  # as the killed walk left it
    for sp in (1, 2, 3):
        step(prog, engine, udp(A, R1, sp, 53), float(sp), Reason.XLATE_NEW)
    stamped = [e for k, e in prog.ct().items() if k[5] == L.CT_DIR_IN and e["iif"] == 7]
    assert len(stamped) == 3
    res = sw.recount(chunked=True)
    assert (res.live, res.made_during) == (3, 0) and prog.live_counts() == model_live(engine)
    assert L.WALK_STATE.unpack(prog.maps[L.MAP_WALK].get(0)) == {"current": 0, "last": 8}
    assert bpf_sessions(prog) == model_sessions(engine)
    assert all(e["iif"] == 0 for k, e in prog.ct().items() if k[5] == L.CT_DIR_IN)
