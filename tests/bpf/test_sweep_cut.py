"""An expiry sweep cut short between chunks for a walk that must run now (docs/datapath.md step
15, sweep.py ``stop``, backend ``walk_wanted``): over real maps the cut walk publishes nothing
(its deltas and endpoint marks dropped: every count stays as it was, high by the pairs it
removed, never low), the recount that follows makes every count exact, and the next sweep
visits the part it did not reach.  Then the daemon: a reload that turns a host limit on while a
sweep is in progress cuts that sweep at its next chunk and recounts, instead of waiting for the
rest of it (asserted on the order of the walks' chunks, not on time), and the sweep after a cut
one is never cut itself (expiry always gets on, whatever the control requests)."""

import contextlib
import ipaddress
import io
import threading
import time

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.backend import ORPHAN_GRACE_NS, BpfBackend
from snatgw.datapath.bpf.loader import Loader, netns
from snatgw.datapath.bpf.maps import monotonic_ns
from snatgw.datapath.bpf.sweep import Sweeper

from test_backend_start import gw  # noqa: F401  (fixture)
from test_loader import mini_obj, pin_dir  # noqa: F401  (fixtures)
from test_sweep import _ENT, _KEY, ADDRS, HOSTS, RULES, SEC, UDP_TIMEOUT, counts, fill, session

pytestmark = pytest.mark.bpf

#: five chunks of keys (2 per session), every third session idle past the timeout
N = 5 * L.SWEEP_CHUNK // 2 - 100
NOW = 10_000 * SEC
TIMEOUTS = {s: UDP_TIMEOUT * SEC for s in range(L.SWEEP_STATES)}


def expired(n: int) -> bool:
    return n % 3 == 1


def table(n_sessions=N, now=NOW):
    return (session(n, now - (UDP_TIMEOUT + 1) * SEC if expired(n) else now - 5 * SEC, now - 30 * SEC)
            for n in range(n_sessions))  # fmt: skip


def true_counts(maps):
    """(by rule, by SNAT address, by inside host) from the table's OUT entries (precompiled
    structs, as test_sweep packs them: the layout's own unpack is slow at this size)."""
    by_rule, by_addr, by_host = {}, {}, {}
    for k, v in maps.ct.items_batch():
        key, e = _KEY.unpack(k), _ENT.unpack(v)
        if key[5] != L.CT_DIR_OUT:
            continue
        addr, host = int.from_bytes(e[1], "big"), int.from_bytes(key[0], "big")
        for d, x in ((by_rule, e[7]), (by_addr, addr), (by_host, host)):
            d[x] = d.get(x, 0) + 1
    return by_rule, by_addr, by_host


def kept_counts(maps):
    return tuple({k: c["sessions"] for k, c in counts(maps, name, order).items() if c["sessions"]}
                 for name, order in ((L.MAP_RULE_LIVE, "little"), (L.MAP_ADDR_STATS, "big"),
                                     (L.MAP_HOST_SESS, "big")))  # fmt: skip


def deltas_left(sw):
    return {name: len(list(sw.obj.map(name).keys())) for name in ("sweep_host", "sweep_addr", "sweep_rule",
                                                                   "sweep_eim")}  # fmt: skip


@pytest.fixture
def walked(pin_dir, mini_obj):  # noqa: F811
    """(maps, Sweeper) over N sessions whose counts a completed walk made exact."""
    ld = Loader(pin_dir, N + 1000, mini_obj)
    maps = ld.load()
    sw = Sweeper(maps)
    try:
        fill(maps.ct, table())
        sw.recount(chunked=True)
        yield maps, sw
    finally:
        sw.close()
        ld.stop()


@pytest.mark.parametrize("k", [0, 2])
def test_a_cut_sweep_publishes_nothing_and_the_recount_after_it_is_exact(walked, k):
    """Cut after k chunks (0: right after SWEEP_BEGIN): the chunks visited removed their expired
    pairs, the rest of the table is untouched, no delta or endpoint mark is left behind, and the
    counts are exactly those before the sweep (never the partial deltas: those would be low by
    every pair not reached).  An old endpoint mapping with no session stays (the END phase that
    would remove it did not run).  The recount then equals the table's true counts, and the next
    sweep removes the rest of the expired pairs and leaves the counts exact again."""
    maps, sw = walked
    eim = maps.maps[L.MAP_EIM]
    ep = L.EIM_KEY.pack(addr=int(ipaddress.IPv4Address("198.18.40.7")), remote=0, port=4242,
                        proto=L.IPPROTO_UDP, dir=L.EIM_DIR_ENDPOINT)  # fmt: skip
    eim.put(ep, L.EIM_ENTRY.pack(addr=int(ipaddress.IPv4Address("198.19.2.64")), port=7000, rule_id=RULES[0],
                                 last_seen=1))  # fmt: skip
    before = kept_counts(maps)
    assert before == tuple(true_counts(maps)) and sum(before[0].values()) == N
    asked = []

    def stop():  # asked before BEGIN, then before each chunk: "stop" before the (k+1)-th chunk
        asked.append(1)
        return len(asked) - 1 > k

    res = sw.expire(NOW, TIMEOUTS, ORPHAN_GRACE_NS, full=True, chunked=True, stop=stop)
    assert res.cut and res.chunks == k and res.visited <= k * L.SWEEP_CHUNK
    n_expired = sum(1 for n in range(N) if expired(n))
    left = len(maps.ct) // 2
    assert left == N - res.removed and (res.removed > 0) == (k > 0) and res.removed < n_expired
    assert deltas_left(sw) == {"sweep_host": 0, "sweep_addr": 0, "sweep_rule": 0, "sweep_eim": 0}
    assert kept_counts(maps) == before  # nothing published: high by res.removed, not low
    assert eim.get(ep) is not None

    r = sw.recount(chunked=True)
    assert not r.cut and r.live == left and kept_counts(maps) == tuple(true_counts(maps))

    done = sw.expire(NOW, TIMEOUTS, ORPHAN_GRACE_NS, full=True, chunked=True, stop=lambda: False)
    assert not done.cut and res.removed + done.removed == n_expired
    assert len(maps.ct) == 2 * (N - n_expired) and kept_counts(maps) == tuple(true_counts(maps))
    assert sum(kept_counts(maps)[0].values()) == N - n_expired and len(kept_counts(maps)[2]) == HOSTS
    assert len(kept_counts(maps)[1]) == ADDRS and eim.get(ep) is None  # the next END judged it


def test_a_failure_mid_walk_leaves_no_delta_for_the_next_walk(walked):
    """A chunk that cannot be written (a failing batch read, here) ends the walk with
    SWEEP_ABORT before the error is raised: the next walk starts from empty deltas and counts
    exactly (leftover deltas of -S0 would have made every count low)."""
    maps, sw = walked
    real = maps.ct.key_batches

    def failing(chunk):
        it = real(chunk)
        yield next(it)
        raise OSError("batch lookup failed")

    maps.ct.key_batches = failing
    try:
        with pytest.raises(OSError, match="batch lookup failed"):
            sw.expire(NOW, TIMEOUTS, ORPHAN_GRACE_NS, full=True, chunked=True)
    finally:
        del maps.ct.key_batches
    assert deltas_left(sw) == {"sweep_host": 0, "sweep_addr": 0, "sweep_rule": 0, "sweep_eim": 0}
    sw.recount(chunked=True)
    assert kept_counts(maps) == tuple(true_counts(maps))


@contextlib.contextmanager
def sweep_held(backend, gc):
    """``gc`` (what runs the backend's expiry sweep: Service.gc, backend.expire) on a thread of
    its own, as the daemon's GC tick, its sweep held between its first and second chunk until
    a walk asks for the table (walk_wanted; bounded: never hangs).  Yields (order, done): the
    walks' chunks as read ("sweep" or "walk"), and {"removed": what gc returned} once the
    thread is joined at the end of the block."""
    maps = backend.maps
    order: list[str] = []
    held, done = threading.Event(), {}
    real = maps.ct.key_batches
    t = threading.Thread(target=lambda: done.setdefault("removed", gc()), name="gc")

    def watched(chunk):
        me = "sweep" if threading.current_thread() is t else "walk"
        for i, batch in enumerate(real(chunk)):
            order.append(me)
            if me == "sweep" and i == 1:  # between the sweep's first and second chunk
                held.set()
                for _ in range(600):  # until the walk asks (bounded: never hangs)
                    if backend.walk_wanted:
                        break
                    time.sleep(0.05)
            yield batch

    maps.ct.key_batches = watched
    backend._next_sweep = 0.0
    t.start()
    try:
        assert held.wait(60), "the sweep did not start"
        yield order, done
    finally:
        t.join(60)
        del maps.ct.key_batches
    assert not t.is_alive()


CONF = """
snatgw {{
    inside lan40
    outside eth1 eth2
    port_range 5000-65535
    max_sessions {max_sessions}
    pin_dir {pin_dir}
    backend bpf
    timeout udp {udp}
    {limit}
}}
virtual_server fwmark 1 {{
    snat_rule {{ from 198.18.0.0/16  snat_ip 198.19.2.71-198.19.2.73  algo sh }}
}}
"""


def test_a_reload_that_turns_a_host_limit_on_cuts_the_sweep_in_progress(gw, pin_dir, mini_obj):  # noqa: F811
    """The daemon (Service over a started BpfBackend in a private netns): its GC thread's sweep
    is in progress, held after its first chunk until the reload's recount asks for the walk;
    the reload (control thread) turns `max_sessions_per_host` on.  The sweep stops at its next
    chunk (it visits one of its five), the recount then walks the whole table, and the reload
    returns with the limit in force and every count exact; the GC tick returns with the cut
    sweep's work (the pairs of its one chunk removed).  The order of the walks' chunks shows it:
    no sweep chunk after the recount's first (without the cut the sweep would have read all five
    before it).  The next sweep runs to its end even with a walk waiting, and removes the
    expired pairs the cut one did not reach."""
    from snatgw.daemon.log import Log
    from snatgw.daemon.service import Service, load_config

    max_sessions = N + 1000
    text = CONF.format(max_sessions=max_sessions, pin_dir=pin_dir, udp=UDP_TIMEOUT, limit="")
    with netns(gw):
        cfg = load_config(None, text)
        backend = BpfBackend(cfg.settings, obj_path=mini_obj)
        service = Service(cfg, backend, Log(stream=io.StringIO()))
        service.start()
        try:
            maps = backend.maps
            fill(maps.ct, table(now=monotonic_ns()))  # every third pair idle past the UDP timeout
            backend.recount()  # counts exact for the fill (it bypassed the datapath's increments)
            assert backend.recounts["last_cut_sweep"] is False
            with sweep_held(backend, service.gc) as (order, removed):
                assert backend.status_extra()["walk_running_seconds"] is not None
                service.reload(text=CONF.format(max_sessions=max_sessions, pin_dir=pin_dir, udp=UDP_TIMEOUT,
                                                limit="max_sessions_per_host 8192"))  # fmt: skip

            first_recount = order.index("walk")
            assert order[:first_recount] == ["sweep", "sweep"]  # its second chunk read, not visited
            assert "sweep" not in order[first_recount:] and order.count("walk") == 5
            sweep = backend.last_sweep
            assert sweep.cut and sweep.chunks == 1 and sweep.visited <= L.SWEEP_CHUNK
            assert removed["removed"] == sweep.removed > 0
            st = backend.status_extra()
            assert st["sweeps"]["cut_short"] == 1 and st["sweeps"]["last_cut"] is True
            rc = st["recounts"]
            assert rc["count"] == 2 and rc["last_cut_sweep"] is True
            assert rc["last_visited"] == len(maps.ct) and rc["last_live"] == N - sweep.removed
            assert st["walk_running_seconds"] is None and not backend.walk_wanted
            assert backend.host_counting()
            assert [L.SNAT_RULE.unpack(r)["host_limit"] for r in maps.current_rules()[1]] == [8192]
            assert kept_counts(maps) == tuple(true_counts(maps))
            assert service.last_reload["ok"]
            # the next sweep resumes: it runs whole and removes what the cut one did not reach,
            # even with a walk waiting (no two sweeps in a row stop early: expiry always gets on)
            backend._next_sweep = 0.0
            n_expired = sum(1 for n in range(N) if expired(n))
            keys = len(maps.ct)
            with backend._urgent_lock:
                backend._urgent += 1  # (as a recount waiting for the walk lock)
            try:
                assert backend.walk_wanted
                assert service.gc() == n_expired - sweep.removed and not backend.last_sweep.cut
            finally:
                with backend._urgent_lock:
                    backend._urgent -= 1
            assert backend.last_sweep.chunks == -(-keys // L.SWEEP_CHUNK) == 5  # the whole table
            assert backend.status_extra()["sweeps"]["cut_short"] == 1
            assert kept_counts(maps) == tuple(true_counts(maps)) and len(maps.ct) == 2 * (N - n_expired)
        finally:
            backend.stop()


SMALL = 3 * L.SWEEP_CHUNK // 2 - 100  # three chunks of keys: the sweep held after its first

#: the flushes (`snatgw flush`): all, by rule, by inside host, by SNAT address (kwargs of
#: BpfBackend.flush) and whether a session's OUT key and entry (unpacked) match them
FLUSHES = {
    "all": ({}, lambda key, e: True),
    "rule": ({"rule_id": RULES[1]}, lambda key, e: e[7] == RULES[1]),
    "inside": ({"inside": ipaddress.IPv4Address("198.18.40.5")},
               lambda key, e: key[0] == ipaddress.IPv4Address("198.18.40.5").packed),
    "nat": ({"nat": ipaddress.IPv4Address("198.19.2.67")},
            lambda key, e: e[1] == ipaddress.IPv4Address("198.19.2.67").packed),
}  # fmt: skip


def test_a_flush_cuts_the_sweep_in_progress_and_its_counts_are_exact(gw, pin_dir, mini_obj):  # noqa: F811
    """For each flush (all, by rule, inside host, SNAT address), a started backend's expiry
    sweep is in progress, held after its first chunk, when the flush comes: the sweep stops at
    its next chunk (no sweep chunk after the flush's first), the flush removes exactly the
    sessions it selects of those the table holds then (both keys of each; every other one
    stays), and the counts it publishes are exact (never low by what the cut sweep removed).
    The next sweep is not cut even with a walk waiting, and removes the expired sessions both
    left."""
    text = CONF.format(max_sessions=SMALL + 1000, pin_dir=pin_dir, udp=UDP_TIMEOUT, limit="")
    with netns(gw):
        from snatgw.daemon.service import load_config

        cfg = load_config(None, text)
        backend = BpfBackend(cfg.settings, obj_path=mini_obj)
        backend.start(cfg)
        try:
            maps = backend.maps
            for i, (name, (kwargs, selects)) in enumerate(FLUSHES.items()):
                backend.flush()  # the last round's leftovers
                filled = monotonic_ns()
                fill(maps.ct, table(SMALL, now=filled))  # every third pair idle past the UDP timeout
                backend.recount()  # counts exact for the fill (it bypassed the datapath's increments)
                with sweep_held(backend, backend.expire) as (order, swept):
                    held = maps.ct.to_dict()  # what the flush meets: the sweep's first chunk done
                    out = {k: _ENT.unpack(v) for k, v in held.items() if _KEY.unpack(k)[5] == L.CT_DIR_OUT}
                    chosen = {k for k, e in out.items() if selects(_KEY.unpack(k), e)}
                    gone = chosen | {out[k][0] for k in chosen}  # each OUT key and its IN key (entry.peer)
                    n = backend.flush(**kwargs)
                sweep = backend.last_sweep
                assert sweep.cut and sweep.chunks == 1 and swept["removed"] == sweep.removed > 0, name
                assert order[:2] == ["sweep", "sweep"] and "sweep" not in order[2:] and "walk" in order, name
                assert backend.status_extra()["sweeps"]["cut_short"] == i + 1
                assert 0 < n == len(chosen) < (len(out) if kwargs else len(out) + 1), name
                assert set(maps.ct.keys()) == set(held) - gone, name
                assert kept_counts(maps) == tuple(true_counts(maps)), name

                left = [_ENT.unpack(v) for k, v in maps.ct.items_batch() if _KEY.unpack(k)[5] == L.CT_DIR_OUT]
                stale = sum(1 for e in left if e[10] < filled - (UDP_TIMEOUT // 2) * SEC)
                backend._next_sweep = 0.0
                with backend._urgent_lock:
                    backend._urgent += 1  # (as a flush or recount waiting for the walk lock)
                try:
                    assert backend.walk_wanted
                    assert backend.expire() == stale and not backend.last_sweep.cut, name
                finally:
                    with backend._urgent_lock:
                        backend._urgent -= 1
                assert len(maps.ct) == 2 * (len(left) - stale)
                assert kept_counts(maps) == tuple(true_counts(maps)), name
        finally:
            backend.stop()
