"""The kernel-side expiry sweep (datapath/bpf/sweep.py, prog/sweep.bpf.c) over real maps:
at 100k sessions it removes exactly the expired pairs and keeps the rest, recounts the live
counts per rule, SNAT address and inside host (stats read them, not the table), keeps a
session refreshed by the datapath between the first look and the delete, agrees with the
model's expire() on the same table, paces itself by its own cost (the 34 s / 171,629 GC
defect of issue 10), and the streamed listing holds one batch at a time."""

import ipaddress
import itertools
import random
import struct
import time
import tracemalloc

import pytest

from snatgw import layout as L
from snatgw.config.schema import Settings
from snatgw.datapath.bpf import backend as bmod
from snatgw.datapath.bpf.backend import ORPHAN_GRACE_NS, BpfBackend
from snatgw.datapath.bpf.loader import Loader
from snatgw.datapath.bpf.maps import monotonic_ns
from snatgw.datapath.bpf.sweep import SessionFilter

from test_loader import mini_obj, pin_dir  # noqa: F401  (fixtures)

SEC = 10**9
N = 100_000
REMOTE = int(ipaddress.IPv4Address("203.0.113.10"))
INSIDE0 = int(ipaddress.IPv4Address("198.18.40.0"))
SNAT0 = int(ipaddress.IPv4Address("198.19.2.64"))
RULES = (101, 202, 303)
HOSTS, ADDRS = 1000, 8
UDP_TIMEOUT = 20


_KEY, _ENT = struct.Struct(L.CT_KEY.fmt), struct.Struct(L.CT_ENTRY.fmt)
assert [f[0] for f in L.CT_KEY.fields] == ["saddr", "daddr", "sport", "dport", "proto", "dir", "pad"]
assert [f[0] for f in L.CT_ENTRY.fields] == ["peer", "rw_addr", "rw_port", "state", "flags", "ifindex", "nexthop",
                                             "rule_id", "mtu", "iif", "last_seen"]  # fmt: skip


def _be(v, n):
    return v.to_bytes(n, "big")


def session(n, seen_out, seen_in, state=L.CtState.UDP, proto=L.IPPROTO_UDP):
    """(out_key, out_entry, in_key, in_entry) of session n: host n % HOSTS, SNAT addr n % ADDRS,
    rule RULES[n % 3] (packed with precompiled structs: the layout's own pack is slow at 100k)."""
    inside, snat, rule = INSIDE0 + n % HOSTS, SNAT0 + n % ADDRS, RULES[n % 3]
    sport, nport = 1024 + n // HOSTS, 5000 + n // ADDRS % 60000
    out_key = _KEY.pack(_be(inside, 4), _be(REMOTE, 4), _be(sport, 2), _be(53, 2), proto, L.CT_DIR_OUT, 0)
    in_key = _KEY.pack(_be(REMOTE, 4), _be(snat, 4), _be(53 + n // (ADDRS * 60000), 2), _be(nport, 2), proto,
                       L.CT_DIR_IN, 0)  # fmt: skip
    out = _ENT.pack(in_key, _be(snat, 4), _be(nport, 2), int(state), 0, 2, bytes(4), rule, 1500, 0, seen_out)
    inn = _ENT.pack(out_key, _be(inside, 4), _be(sport, 2), int(state), 0, 3, bytes(4), rule, 1500, 0, seen_in)
    return out_key, out, in_key, inn


def fill(ct, sessions, chunk=20000):
    """Insert pairs with bpf_map_update_batch (IN keys first, as the datapath does)."""
    sessions = list(sessions)
    for i in range(0, len(sessions), chunk):
        part = sessions[i : i + chunk]
        ct.put_batch(b"".join(p[2] for p in part), b"".join(p[3] for p in part), len(part))
        ct.put_batch(b"".join(p[0] for p in part), b"".join(p[1] for p in part), len(part))


@pytest.fixture
def big(pin_dir, mini_obj):  # noqa: F811
    """A BpfBackend on loaded maps for 110k sessions (UDP timeout 20 s)."""
    b = BpfBackend(obj_path=mini_obj)
    b.loader = Loader(pin_dir, 110_000, mini_obj)
    b.maps = b.loader.load()
    b.settings = Settings(pin_dir=pin_dir, max_sessions=110_000).with_timeouts(udp=UDP_TIMEOUT)
    try:
        yield b
    finally:
        b.stop()


def counts(maps, name, order="little"):
    return {int.from_bytes(k, order): L.LIVE_COUNT.unpack(v) for k, v in maps.maps[name].items()}


@pytest.mark.bpf
def test_sweep_at_100k_removes_exactly_the_expired_and_recounts(big):
    """100k sessions, every third idle past the UDP timeout: one sweep removes exactly those
    pairs (both keys), keeps the rest, and the live counts (rule, SNAT address, inside host) and
    stats() equal what is left, without reading the table."""
    now = 10_000 * SEC
    expired = {n for n in range(N) if n % 3 == 1}
    fill(big.maps.ct, (session(n, now - (UDP_TIMEOUT + 1) * SEC if n in expired else now - 5 * SEC,
                               now - 30 * SEC) for n in range(N)))  # fmt: skip
    assert len(big.maps.ct) == 2 * N
    assert big.expire(now=now / SEC) == len(expired)
    left = set(big.maps.ct.keys())
    assert len(left) == 2 * (N - len(expired))
    for n in (0, 1, 2, 3, 4, N - 1):
        ok, _, ik, _ = session(n, 0, 0)
        assert (ok in left, ik in left) == ((n not in expired,) * 2)
    kept = [n for n in range(N) if n not in expired]
    want_rule = {r: sum(1 for n in kept if RULES[n % 3] == r) for r in RULES}
    assert {r: c["sessions"] for r, c in counts(big.maps, L.MAP_RULE_LIVE).items()} == {
        r: c for r, c in want_rule.items() if c}
    addr = counts(big.maps, L.MAP_ADDR_STATS, "big")
    assert {a - SNAT0: c["sessions"] for a, c in addr.items()} == {
        i: sum(1 for n in kept if n % ADDRS == i) for i in range(ADDRS)}
    hosts = counts(big.maps, L.MAP_HOST_SESS, "big")
    assert sum(c["sessions"] for c in hosts.values()) == len(kept) and len(hosts) == HOSTS
    assert big.stats().sessions == len(kept) == big.last_sweep.live
    # a second sweep finds nothing to do and leaves the counts as they are
    assert big.expire(now=now / SEC) == 0 and big.stats().sessions == len(kept)


@pytest.mark.bpf
def test_counts_keep_datapath_increments_made_during_a_walk_and_drop_empty_ones(big):
    """The recount ADDS its delta: an increment that arrives between two sweeps (the datapath's
    +1 at creation) survives a sweep that did not see that session only until the next sweep
    recounts; refusals are never touched; a count left at zero with no refusals is removed."""
    now = 10_000 * SEC
    fill(big.maps.ct, (session(n, now, now) for n in range(30)))
    big.expire(now=now / SEC)
    live = big.maps.maps[L.MAP_RULE_LIVE]
    key = struct.pack("<I", RULES[0])
    assert L.LIVE_COUNT.unpack(live.get(key)) == {"sessions": 10, "refusals": 0}
    live.put(key, L.LIVE_COUNT.pack(sessions=11, refusals=7))  # +1 for a session not in the table yet
    ghost = struct.pack("<I", 999)
    live.put(ghost, L.LIVE_COUNT.pack(sessions=5, refusals=0))  # a rule whose sessions are all gone
    big.expire(now=now / SEC)
    assert L.LIVE_COUNT.unpack(live.get(key)) == {"sessions": 10, "refusals": 7}
    assert live.get(ghost) is None


@pytest.mark.bpf
def test_a_refused_host_without_sessions_is_forgotten_at_the_next_sweep(big):
    """Inside hosts refused with no session (no free port, spoofed sources of a big subnet) do
    not stay counted for good: 65,536 of them filled the host map, and new hosts then went
    uncounted and unlimited.  A host at 0 sessions goes at the sweep's end whatever its
    refusals; one with sessions keeps its refusals; a SNAT address keeps its refusals at 0
    sessions (the addresses are a bounded pool)."""
    now = 10_000 * SEC
    fill(big.maps.ct, (session(n, now, now) for n in range(30)))
    big.expire(now=now / SEC)
    hosts, addrs = big.maps.maps[L.MAP_HOST_SESS], big.maps.maps[L.MAP_ADDR_STATS]
    busy = next(k for k, _ in hosts.items())
    hosts.put(busy, L.LIVE_COUNT.pack(sessions=L.LIVE_COUNT.unpack(hosts.get(busy))["sessions"], refusals=3))
    refused = bytes([198, 18, 99, 7])
    hosts.put(refused, L.LIVE_COUNT.pack(sessions=0, refusals=5))
    idle_addr = bytes([198, 19, 9, 9])
    addrs.put(idle_addr, L.LIVE_COUNT.pack(sessions=0, refusals=4))
    big.expire(now=now / SEC)
    assert hosts.get(refused) is None
    assert L.LIVE_COUNT.unpack(hosts.get(busy))["refusals"] == 3
    assert L.LIVE_COUNT.unpack(addrs.get(idle_addr)) == {"sessions": 0, "refusals": 4}


@pytest.mark.bpf
def test_sweep_judges_both_directions_and_keeps_a_refreshed_pair(big):
    """A pair is idle from its newer direction: a recent reply keeps a stale OUT alive; after the
    datapath refreshes a pair (last_seen rewritten) the next sweep keeps it."""
    now = 10_000 * SEC
    fill(big.maps.ct, [session(0, now - 100 * SEC, now - 1 * SEC), session(1, now - 100 * SEC, now - 100 * SEC)])
    assert big.expire(now=now / SEC) == 1
    ok0, _, ik0, _ = session(0, 0, 0)
    assert big.maps.ct.get(ok0) is not None and big.maps.ct.get(ik0) is not None
    fill(big.maps.ct, [session(2, now - 100 * SEC, now - 100 * SEC)])
    fill(big.maps.ct, [session(2, now, now - 100 * SEC)])  # refreshed before the sweep
    assert big.expire(now=now / SEC) == 0


@pytest.mark.bpf
def test_half_pairs_go_after_the_grace_only(big):
    """An IN entry without its OUT (mid-insert) or an OUT without its IN stays within the grace
    and goes after it; neither is counted as a live session."""
    now = 10_000 * SEC
    ok, out, ik, inn = session(0, now, now)
    ok1, out1, ik1, inn1 = session(1, now, now)
    big.maps.ct.put(ik, inn)  # IN only
    big.maps.ct.put(ok1, out1)  # OUT only
    big.expire(now=(now + ORPHAN_GRACE_NS // 2) / SEC)
    assert len(big.maps.ct) == 2 and big.stats().sessions == 0
    big.expire(now=(now + ORPHAN_GRACE_NS + SEC) / SEC)
    assert len(big.maps.ct) == 0 and big.last_sweep.orphans == 2


@pytest.mark.bpf
def test_flush_by_filter_removes_only_those_and_recounts(big):
    now = 10_000 * SEC
    fill(big.maps.ct, (session(n, now, now) for n in range(300)))
    assert big.sweeper().flush(SessionFilter(rule_id=RULES[1])).removed == 100
    # hosts .0-.3 are sessions 0-3, of which 1 (rule 202) is gone already
    assert big.sweeper().flush(SessionFilter(inside=ipaddress.IPv4Network("198.18.40.0/30"))).removed == 3
    assert big.stats().sessions == len(big.maps.ct) // 2
    n = len(big.maps.ct) // 2
    assert big.flush() == n and len(big.maps.ct) == 0 and big.stats().sessions == 0


@pytest.mark.bpf
def test_sweep_agrees_with_the_model_expire_on_the_same_table(big):
    """Differential: a random table (states, both directions' last_seen, idle exactly at the
    timeout) loaded into the model and the map; model.expire(now) and the BPF sweep leave the
    same entries."""
    from snatgw.model.conntrack import CtEntry, CtKey
    from snatgw.model.engine import Engine
    from snatgw.rules import RuleSet

    settings = big.settings
    eng = Engine(RuleSet(()), settings, router=None)
    rnd = random.Random(14)
    now = 100_000
    states = [s for s in L.CtState]
    for n in range(3000):
        state = rnd.choice(states)
        t = settings.timeout(state)
        ages = [rnd.choice([0, t - 1, t, t + 1, rnd.randint(0, 3 * t + 3)]) for _ in range(2)]
        inside, snat = ipaddress.IPv4Address(INSIDE0 + n % 50), ipaddress.IPv4Address(SNAT0 + n % 4)
        ok = CtKey(inside, ipaddress.IPv4Address(REMOTE), 1024 + n, 80, L.IPPROTO_TCP, L.CT_DIR_OUT)
        ik = CtKey(ipaddress.IPv4Address(REMOTE), snat, 80, 5000 + n, L.IPPROTO_TCP, L.CT_DIR_IN)
        eng.table.insert(ik, CtEntry(ok, inside, 1024 + n, "in", None, 7, 1500, now - ages[1], int(state)))
        eng.table.insert(ok, CtEntry(ik, snat, 5000 + n, "out", None, 7, 1500, now - ages[0], int(state)))
    ifx = {"in": 3, "out": 2}
    for k, e in eng.table.entries().items():
        big.maps.ct.put(k.to_bytes(), e.to_bytes(ifx))
    eng.expire(float(now))
    big.expire(now=now)
    assert set(big.maps.ct.keys()) == {k.to_bytes() for k in eng.table.entries()}
    assert big.stats().sessions == len(eng.table)


@pytest.mark.bpf
def test_gc_pace_after_a_mass_expiry_regression(big):
    """Issue 10: after a mass expiry the next sweep came 34 s later (9x the last sweep, done in
    Python) and live sessions reached 171,629 against ~45,000.  Now 100k sessions expire in
    one kernel sweep and the rest after it is GC_DUTY-1 times that sweep (a second or two);
    sessions due later go within the documented margin (max(gc_interval, GC_DUTY*T) + T)."""
    big.sweeper()  # loaded (a first expire() would count the load as sweep time)
    now = monotonic_ns()
    fill(big.maps.ct, (session(n, now - (UDP_TIMEOUT + 5) * SEC, now - (UDP_TIMEOUT + 5) * SEC) for n in range(N)))
    t0 = bmod._clock()
    assert big.expire() == N and len(big.maps.ct) == 0
    t = bmod._clock() - t0
    rest = big._next_sweep - bmod._clock()
    assert rest <= (bmod.GC_DUTY - 1) * t + 0.01 and rest < 10, (rest, t)  # was 34 s
    # 80k sessions (below PRESSURE_FILL of max_sessions: at 100k of 110k every tick swept and
    # the pacing went untested) that fall due 2 s from now (several paced sweeps of them
    # before: the rest after a sweep is (GC_DUTY-1)*T, T a fraction of a second), a GC tick
    # every 0.1 s (the daemon's loop); the bound is the documented one, from the sweep and tick
    # durations measured here (a loaded machine stretches both, not the rule)
    due, live = monotonic_ns() + 2 * SEC, N * 8 // 10
    assert live < bmod.PRESSURE_FILL * big.settings.max_sessions
    fill(big.maps.ct, (session(n, due - UDP_TIMEOUT * SEC, due - UDP_TIMEOUT * SEC) for n in range(live)))
    big._next_sweep = 0.0  # the rest after the mass expiry was checked above
    due = max(due, monotonic_ns())  # (a slow fill: due from now on)
    deadline, tmax, tick, last = time.monotonic() + 2 + 20, 0.0, 0.1, time.monotonic()
    while time.monotonic() < deadline:
        if big.expire() and big.last_sweep.live == 0:
            break
        tmax = max(tmax, big.last_sweep.seconds if big.last_sweep else 0.0)
        time.sleep(0.1)
        tick, last = max(tick, time.monotonic() - last), time.monotonic()
    gone_after = (monotonic_ns() - due) / SEC
    tmax = max(tmax, big.last_sweep.seconds)
    margin = max(tick, bmod.GC_DUTY * tmax) + tmax + tick
    assert big.last_sweep.live == 0 and len(big.maps.ct) == 0
    assert gone_after <= margin + 0.2, (gone_after, margin, tmax, tick)


@pytest.mark.bpf
def test_a_table_under_pressure_is_swept_at_every_tick(big):
    """Issue 14 (no new flow refused over a table of expired sessions): the pacing skips GC
    ticks for (GC_DUTY-1)*T after a sweep, but not while the table is under pressure: a new
    flow refused as DROP_TABLE_FULL since the last look, or live sessions at PRESSURE_FILL of
    max_sessions."""
    big.sweeper()
    now = monotonic_ns()
    fill(big.maps.ct, (session(n, now, now) for n in range(50_000)))  # fresh: nothing to remove
    big.expire()
    sweeps = big._sweeps
    big._next_sweep = bmod._clock() + 3600  # the pacing says: not for an hour
    assert big.expire() == 0 and big._sweeps == sweeps  # paced: skipped
    m = big.maps.reasons_map
    ncpu = len(m.get_percpu(int(L.Reason.DROP_TABLE_FULL)))
    m.put(int(L.Reason.DROP_TABLE_FULL), (7).to_bytes(8, "little") * ncpu)  # refused since the last look
    big.expire()
    assert big._sweeps == sweeps + 1 and big.pressure_sweeps == 1
    big._next_sweep = bmod._clock() + 3600
    assert big.expire() == 0 and big._sweeps == sweeps + 1  # no new refusal, 50k of 110k: paced again
    fill(big.maps.ct, (session(n, now, now) for n in range(50_000, 100_000)))  # 100k of 110k live
    big.expire(now=time.monotonic())  # (recount: the counts see the sessions fill() put directly)
    big._next_sweep = bmod._clock() + 3600
    big.expire()
    assert big.pressure_sweeps == 2 and big.status_extra()["sweeps"]["under_pressure"] == 2


#: the streamed listing's table: 12 of its batches (4096 entries each), so a walk that held
#: more than a batch shows as it would at 100k (tracemalloc makes a 100k walk take ~18 s)
N_LISTED = 25_000


@pytest.mark.bpf
def test_streamed_listing_holds_one_batch_and_filters(big):
    """iter_sessions streams: over a table of 12 batches Python never holds more than one
    (traced allocations stay below 4 MiB, where holding the table's sessions would take ~10 MiB:
    measured on its first 1000); the filters select in the walk."""
    now = monotonic_ns()
    fill(big.maps.ct, (session(n, now, now) for n in range(N_LISTED)))
    tracemalloc.start()
    try:
        n = sum(1 for _ in big.iter_sessions())
        _, peak = tracemalloc.get_traced_memory()
        base = tracemalloc.get_traced_memory()[0]
        walk = big.iter_sessions()
        held = list(itertools.islice(walk, 1000))
        walk.close()
        per_1000 = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert n == N_LISTED and len(held) == 1000
    assert peak < 4 * 2**20 < per_1000 * N_LISTED / 1000, (peak, per_1000)  # a batch: ~1.5 MiB
    flt = SessionFilter(rule_id=RULES[0], nat=ipaddress.IPv4Address(SNAT0 + 1))
    got = list(big.iter_sessions(flt))
    assert len(got) == sum(1 for n in range(N_LISTED) if n % 3 == 0 and n % ADDRS == 1)
    assert all(s.nat.startswith("198.19.2.65:") and s.rule_id == RULES[0] for s in got)
    assert len(list(big.iter_sessions(limit=7))) == 7


@pytest.mark.bpf
def test_conns_cli_streams_the_pins_with_filters_and_stats_reads_counts(big, pin_dir, tmp_path, capsys):  # noqa: F811
    """No daemon: `snatgw conns --json` reads the pinned maps itself (JSON lines, filtered,
    limited) and `snatgw stats` gives the kept count."""
    import json

    from snatgw.cli.main import main as cli

    now = monotonic_ns()
    fill(big.maps.ct, (session(n, now, now) for n in range(3000)))
    big.expire(now=now / SEC)
    sock = str(tmp_path / "none.sock")
    assert cli(["conns", "--json", "--socket", sock, "--pin-dir", pin_dir, "--inside", "198.18.40.7",
                "--limit", "2"]) == 0  # fmt: skip
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(got) == 2 and all(s["inside"].startswith("198.18.40.7:") for s in got)
    assert cli(["conns", "--json", "--socket", sock, "--pin-dir", pin_dir, "--rule", str(RULES[2])]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1000
    assert cli(["stats", "--json", "--socket", sock, "--pin-dir", pin_dir]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 3000


@pytest.mark.bpf
@pytest.mark.parametrize("mode", ["expire", "flush"])
def test_chunked_walk_agrees_with_the_whole_walk(pin_dir, mini_obj, mode):  # noqa: F811
    """The daemon's walk (runs of SWEEP_CHUNK keys from batch lookups, CHUNKED) leaves the same
    table and the same counts as one whole walk, on a random table bigger than a chunk."""
    from snatgw.datapath.bpf.sweep import Sweeper

    rnd = random.Random(7)
    now = 10_000 * SEC
    table = [session(n, now - rnd.choice([0, 25, 400]) * SEC, now - rnd.choice([0, 25, 400]) * SEC)
             for n in range(3 * L.SWEEP_CHUNK // 2)]  # fmt: skip
    timeouts = {s: UDP_TIMEOUT * SEC for s in range(L.SWEEP_STATES)}
    got = []
    for chunked in (False, True):
        ld = Loader(f"{pin_dir}{int(chunked)}", 30_000, mini_obj)
        maps = ld.load()
        sw = Sweeper(maps)
        try:
            fill(maps.ct, table)
            if mode == "expire":
                r = sw.expire(now, timeouts, ORPHAN_GRACE_NS, full=True, chunked=chunked)
            else:
                r = sw.flush(SessionFilter(rule_id=RULES[1]), chunked=chunked)
            got.append((sorted(maps.ct.keys()), counts(maps, L.MAP_RULE_LIVE), counts(maps, L.MAP_HOST_SESS, "big"),
                        r.removed, r.live))
        finally:
            sw.close()
            ld.stop()
    assert got[0] == got[1]
    assert got[0][3] > 0 and got[0][4] > 0
