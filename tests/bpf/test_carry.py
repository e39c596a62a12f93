"""The session table carried over to another max_sessions at a restart (carry.py, the loader's
finish_carry): every entry copied before the programs are attached, what the old table gains
meanwhile copied after (the new table's own entries win), the pins renamed; a table that does
not fit is refused, changing nothing; a start that fails after its programs replaced the old
ones puts those back, with the old pins.  Stand-in object, a namespace and pin dir of our own."""

import os

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import carry
from snatgw.datapath.bpf import libbpf as B
from snatgw.datapath.bpf.backend import BpfBackend
from snatgw.datapath.bpf.loader import REPLACED_SUFFIX, Loader, attached_prog_id, netns
from snatgw.datapath.bpf.maps import monotonic_ns
from snatgw.errors import BackendError

from test_backend import add_session
from test_backend_start import _pin_ids, config, gw  # noqa: F401  (fixtures)
from test_loader import mini_obj, ns, pin_dir  # noqa: F401  (fixtures)

HOOKS = (("lan40", B.BPF_TC_INGRESS), ("eth1", B.BPF_TC_INGRESS), ("eth1", B.BPF_TC_EGRESS),
         ("eth2", B.BPF_TC_INGRESS), ("eth2", B.BPF_TC_EGRESS))  # fmt: skip


def eim_put(m, n: int, seen: int) -> bytes:
    k = L.EIM_KEY.pack(addr=0xC6122800 + n, remote=0, port=40000 + n, proto=L.IPPROTO_UDP, dir=L.EIM_DIR_ENDPOINT)
    m.put(k, L.EIM_ENTRY.pack(addr=0xC6130247, port=5000 + n, rule_id=1, iif=2, last_seen=seen))
    return k


def _old_table(pin_dir, mini_obj, sessions: int, seen: int, max_sessions: int = 64):  # noqa: F811
    """A datapath left running (keep_state) with ``sessions`` pairs and as many mappings."""
    a = Loader(pin_dir, max_sessions, mini_obj)
    m = a.load()
    keys = [add_session(m.ct, n, out_seen=seen, in_seen=seen) for n in range(sessions)]
    eims = [eim_put(m.maps[L.MAP_EIM], n, seen) for n in range(sessions)]
    a.stop(keep_state=True)
    return keys, eims


def _pins(pin_dir):  # noqa: F811
    return sorted(os.listdir(pin_dir))


@pytest.mark.bpf
def test_copy_passes_bring_what_the_old_table_gained_and_keep_what_the_new_one_changed(ns, pin_dir,  # noqa: F811
                                                                                       mini_obj):  # noqa: F811
    """64 -> 128 sessions: the first copy takes every entry; then the old table gains a session
    and a mapping (an old program on a hook not yet replaced), the new table changes one
    session (a new program) and loses another (removed by the start): after attach the passes
    copy the gained ones, keep the changed one as the new table has it, do not bring the removed
    one back, and the new pins take the old names."""
    seen = monotonic_ns() - 600 * 10**9  # last used 10 minutes ago: before any pass
    keys, eims = _old_table(pin_dir, mini_obj, 10, seen)
    old_ids = _pin_ids(pin_dir)
    with netns(ns):
        b = Loader(pin_dir, 128, mini_obj)
        try:
            m = b.load()
            assert L.MAP_CT not in b.reused and L.MAP_EIM not in b.reused and L.MAP_RULES in b.reused
            assert m.ct.max_entries == 256 and m.maps[L.MAP_EIM].max_entries == 256
            assert all(m.ct.get(o) is not None and m.ct.get(i) is not None for o, i in keys)
            assert all(m.maps[L.MAP_EIM].get(k) is not None for k in eims)
            assert b.carried["first"] == {L.MAP_EIM: 10, L.MAP_CT: 20}
            # the old pins are still the old maps, the new ones beside them
            assert _pin_ids(pin_dir)[L.MAP_CT] == old_ids[L.MAP_CT]
            assert L.MAP_CT + REPLACED_SUFFIX in _pins(pin_dir) and L.MAP_EIM + REPLACED_SUFFIX in _pins(pin_dir)
            old_ct = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_CT))
            old_eim = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_EIM))
            try:
                now = monotonic_ns()
                gained = add_session(old_ct, 20, out_seen=now, in_seen=now)  # made by an old program
                gained_eim = eim_put(old_eim, 20, now)
                changed_out, _ = keys[1]
                mine = bytearray(m.ct.get(changed_out))  # the new program's refresh of session 1 (below)
                mine[L.CT_ENTRY.offsets()["state"]] = int(L.CtState.FIN_WAIT)
                b.maps.delete_pair(next(p for p in m.iter_pairs() if p.out_key == keys[2][0]))  # the start's
                assert old_ct.get(keys[2][0]) is None  # ... gone from the old table too
                refreshed = bytearray(old_ct.get(changed_out))  # and the old one's use of it
                refreshed[L.CT_ENTRY.offsets()["last_seen"] : L.CT_ENTRY.offsets()["last_seen"] + 8] = (
                    now.to_bytes(8, "little"))
                old_ct.put(changed_out, bytes(refreshed))
                # ... and the new program's use after it (its packet's state and time)
                mine[L.CT_ENTRY.offsets()["last_seen"] : L.CT_ENTRY.offsets()["last_seen"] + 8] = (
                    (now + 1).to_bytes(8, "little"))
                m.ct.put(changed_out, bytes(mine))
                b.attach(["in0"], ["out0"])
                # a program run begun before the last replace makes one more, which the last pass takes
                late = add_session(old_ct, 30, out_seen=monotonic_ns(), in_seen=monotonic_ns())
                real_copy = carry.copy_new
                calls = []
                later = []

                def copy_new(old, new, how, since):
                    calls.append(old.name)
                    if len(calls) == 3:  # the first pass over (snat_eim, snat_ct): a late run's
                        later.append(add_session(old_ct, 31, out_seen=monotonic_ns(), in_seen=monotonic_ns()))
                    return real_copy(old, new, how, since)

                carry.copy_new = copy_new
                try:
                    done = b.finish_carry(grace=0.01)
                finally:
                    carry.copy_new = real_copy
            finally:
                old_ct.close()
                old_eim.close()
            assert calls == [L.MAP_EIM, L.MAP_CT] * 2
            for o, i in (gained, late, *later):
                assert m.ct.get(o) is not None and m.ct.get(i) is not None
            assert m.maps[L.MAP_EIM].get(gained_eim) is not None
            assert L.CT_ENTRY.unpack(m.ct.get(changed_out))["state"] == int(L.CtState.FIN_WAIT)  # ours won
            assert m.ct.get(keys[2][0]) is None and m.ct.get(keys[2][1]) is None  # not brought back
            ct = done["maps"][L.MAP_CT]
            assert (ct["from"], ct["to"], ct["first"]) == (128, 256, 20)
            assert ct["after_attach"]["copied"] == 4 and ct["after_grace"]["copied"] == 2, done  # 20+30, then 31
            assert done["maps"][L.MAP_EIM]["after_attach"]["copied"] == 1
            assert (done["sessions_from"], done["sessions_to"]) == (64, 128)
            ids = _pin_ids(pin_dir)
            assert ids[L.MAP_CT] == B.map_info(m.ct.fd).id and ids[L.MAP_EIM] == B.map_info(m.maps[L.MAP_EIM].fd).id
            assert not any(p.endswith(REPLACED_SUFFIX) for p in _pins(pin_dir))
            assert len(m.ct.keys()) == 2 * (10 - 1 + 3)
            b.commit()
        finally:
            b.stop()
    assert not os.path.exists(pin_dir)


@pytest.mark.bpf
def test_what_the_old_programs_changed_after_the_first_copy_is_carried_over(ns, pin_dir, mini_obj):  # noqa: F811
    """After the first copy and before their hooks are replaced, the old programs change
    sessions the copy took: one connection is reset (its OUT entry CLOSE, used now), another's
    reply refreshes its IN entry only, and a mapping is used.  After the carry the new table
    has their state and times (the new programs had not used them since): CLOSE (10 s), not the
    copy's ESTABLISHED (7440 s: the closed connection held its port and its host's room for two
    hours).  The passes copied only what the new table lacked: they looked at those entries
    and left them as the first copy had them."""
    seen = monotonic_ns() - 600 * 10**9
    keys, eims = _old_table(pin_dir, mini_obj, 4, seen)
    with netns(ns):
        b = Loader(pin_dir, 128, mini_obj)
        try:
            m = b.load()
            old_ct = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_CT))
            old_eim = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_EIM))
            seen_at = L.CT_ENTRY.offsets()["last_seen"]
            try:
                now = monotonic_ns()
                reset = bytearray(old_ct.get(keys[0][0]))
                reset[L.CT_ENTRY.offsets()["state"]] = int(L.CtState.CLOSE)
                reset[seen_at : seen_at + 8] = now.to_bytes(8, "little")
                old_ct.put(keys[0][0], bytes(reset))
                reply = bytearray(old_ct.get(keys[1][1]))
                reply[seen_at : seen_at + 8] = now.to_bytes(8, "little")
                old_ct.put(keys[1][1], bytes(reply))
                eim_put(old_eim, 2, now)  # (the same mapping, used now)
            finally:
                old_ct.close()
                old_eim.close()
            b.attach(["in0"], ["out0"])
            done = b.finish_carry(grace=0.01)
            out0 = L.CT_ENTRY.unpack(m.ct.get(keys[0][0]))
            assert (out0["state"], out0["last_seen"]) == (int(L.CtState.CLOSE), now), done
            assert L.CT_ENTRY.unpack(m.ct.get(keys[1][1]))["last_seen"] == now
            assert L.CT_ENTRY.unpack(m.ct.get(keys[1][0]))["last_seen"] == seen  # (its OUT entry as it was)
            assert L.EIM_ENTRY.unpack(m.maps[L.MAP_EIM].get(eims[2]))["last_seen"] == now
            assert done["maps"][L.MAP_CT]["after_attach"]["updated"] == 4, done
            assert done["maps"][L.MAP_EIM]["after_attach"]["updated"] == 1, done
            assert L.CT_ENTRY.unpack(m.ct.get(keys[3][0]))["last_seen"] == seen  # untouched
            b.commit()
        finally:
            b.stop()


class Killed(BaseException):
    """The daemon killed (kill -9, the OOM killer) at that point: nothing of the start's cleanup runs."""


@pytest.mark.bpf
def test_a_start_killed_during_the_copies_after_attach_loses_no_session(ns, pin_dir, mini_obj,  # noqa: F811
                                                                        monkeypatch):  # fmt: skip
    """64 -> 128: after attach the new programs make a session in the new table, and an old
    program made one in the old table after the first copy; the daemon is killed in the first
    pass after attach (its fds close, its pins and programs stay: emulated).  The next start
    (128 too) has both sessions, and leaves no pin of the carry behind.  The new table was
    renamed over the old one only after the passes: the next start carried the old table
    again, and the new programs' session was lost (its connection broken at that start's
    attach)."""
    from snatgw.datapath.bpf import loader as loader_mod

    left_suffix = getattr(loader_mod, "CARRIED_SUFFIX", "_carried_from")
    seen = monotonic_ns() - 600 * 10**9
    keys, _ = _old_table(pin_dir, mini_obj, 4, seen)
    with netns(ns):
        b = Loader(pin_dir, 128, mini_obj)
        m = b.load()
        old_ct = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_CT))
        try:
            theirs = add_session(old_ct, 20, out_seen=monotonic_ns(), in_seen=monotonic_ns())  # an old program's
        finally:
            old_ct.close()
        b.attach(["in0"], ["out0"])
        ours = add_session(m.ct, 30, out_seen=monotonic_ns(), in_seen=monotonic_ns())  # a new program's

        def killed(*a, **kw):
            raise Killed()

        monkeypatch.setattr(carry, "copy_new", killed)
        with pytest.raises(Killed):
            b.finish_carry(grace=0.01)
        monkeypatch.undo()
        b.stop(keep_state=True)  # (what the process's end does: its fds close, nothing else)
        c = Loader(pin_dir, 128, mini_obj)
        try:
            mc = c.load()
            for o, i in (*keys, theirs, ours):
                assert mc.ct.get(o) is not None and mc.ct.get(i) is not None, (o, _pins(pin_dir))
            c.attach(["in0"], ["out0"])
            c.finish_carry()
            c.commit()
            assert not any(p.endswith((REPLACED_SUFFIX, left_suffix)) for p in _pins(pin_dir)), _pins(pin_dir)
        finally:
            c.stop()


@pytest.mark.bpf
def test_a_first_copy_that_fails_leaves_every_pin_as_it_was(pin_dir, mini_obj, monkeypatch):  # noqa: F811
    """A start that carries the table over (64 -> 128) and replaces a counter map of another
    layout (an upgrade) fails in its first copy (the table grew past the new size meanwhile,
    a batch write refused): every pin is the map it was, the replaced counter map's too (the
    running programs count into it).  The counter map's new one was renamed over it before
    the copy, and the failure left it there: `stats` read a map nothing counted into."""
    from test_loader import _pin_foreign

    _old_table(pin_dir, mini_obj, 4, monotonic_ns())
    _pin_foreign(os.path.join(pin_dir, L.MAP_ALLOC_CNT), "percpu_array", 4, 8, 2)
    before = _pin_ids(pin_dir)

    def copy_all(*a, **kw):
        raise BackendError("snat_ct: more entries than the new map's (injected)")

    monkeypatch.setattr(carry, "copy_all", copy_all)
    with pytest.raises(BackendError, match="injected"):
        Loader(pin_dir, 128, mini_obj).load()
    assert _pin_ids(pin_dir) == before
    assert not any(p.endswith(REPLACED_SUFFIX) for p in _pins(pin_dir))


@pytest.mark.bpf
def test_shrinking_below_the_live_sessions_is_refused_and_changes_nothing(pin_dir, mini_obj):  # noqa: F811
    """10 sessions (20 entries) and max_sessions 8 (16 entries): refused, saying how many there
    are, what the new size holds and what to do; the pins are the same maps.  max_sessions 10
    (20 entries: they fit) carries them over."""
    keys, _ = _old_table(pin_dir, mini_obj, 10, monotonic_ns())
    before = _pin_ids(pin_dir)
    with pytest.raises(BackendError) as e:
        Loader(pin_dir, 8, mini_obj).load()
    msg = str(e.value)
    assert "holds 20 entries (2 a session), 10 live sessions" in msg, msg
    assert "max_sessions 8 makes room for 16 only" in msg and "Nothing was changed" in msg
    assert "table of 64 sessions" in msg and "snatgw flush" in msg and "max_sessions 10 or more" in msg
    assert _pin_ids(pin_dir) == before
    c = Loader(pin_dir, 10, mini_obj)
    try:
        m = c.load()
        assert m.ct.max_entries == 20 and all(m.ct.get(o) is not None for o, _ in keys)
    finally:
        c.stop()


def _prog_ids():
    return {h: attached_prog_id(*h) for h in HOOKS}


@pytest.mark.bpf
@pytest.mark.parametrize("where", ["attach", "finish"])
def test_a_start_failing_after_its_programs_went_on_puts_the_old_ones_back(gw, pin_dir, mini_obj, where,  # noqa: F811
                                                                          monkeypatch):  # fmt: skip
    """max_sessions 64 -> 128 at a start that fails after some hooks (``attach``: the third
    attach refused) or all (``finish``: the copy after attach fails) got the new programs: every
    hook has its old program again, the pins are the old maps, the new table's pins are gone,
    and the sessions are in the old table.  The next start carries them over."""
    from dataclasses import replace

    from snatgw.config.schema import GatewayConfig
    from snatgw.datapath.bpf import loader as loader_mod

    with netns(gw):
        cfg = config(pin_dir)
        a = BpfBackend(cfg.settings, obj_path=mini_obj)
        a.start(cfg)
        now = monotonic_ns()
        keys = [add_session(a.maps.ct, n, out_seen=now, in_seen=now) for n in range(5)]
        a.stop(keep_state=True)
        progs, pins = _prog_ids(), _pin_ids(pin_dir)
        assert all(progs.values())
        big = GatewayConfig(cfg.rules, replace(cfg.settings, max_sessions=128))
        if where == "attach":
            real, calls = B.tc_attach, []

            def tc_attach(*args, **kw):
                calls.append(args)
                if len(calls) == 3:
                    raise BackendError("bpf_tc_attach ifindex 9: injected")
                return real(*args, **kw)

            monkeypatch.setattr(B, "tc_attach", tc_attach)
        else:
            def copy_new(*args, **kw):
                assert all(attached_prog_id(*h) != progs[h] for h in HOOKS)  # all hooks have the new ones
                raise B.LibbpfError("batch lookup in map snat_ct", 5)

            monkeypatch.setattr(loader_mod.carry, "copy_new", copy_new)
        with pytest.raises(BackendError, match="injected" if where == "attach" else "snat_ct"):
            BpfBackend(big.settings, obj_path=mini_obj).start(big)
        monkeypatch.undo()
        assert _prog_ids() == progs
        assert _pin_ids(pin_dir) == pins
        old = B.Map.open_pinned(os.path.join(pin_dir, L.MAP_CT))
        try:
            assert old.max_entries == 128 and all(old.get(o) is not None for o, _ in keys)
        finally:
            old.close()
        c = BpfBackend(big.settings, obj_path=mini_obj)
        c.start(big)
        try:
            assert c.maps.ct.max_entries == 256 and all(c.maps.ct.get(o) is not None for o, _ in keys)
            assert c.resized["from"] == 64 and c.resized["to"] == 128
            assert c.status_extra()["table_resized"]["maps"][L.MAP_CT]["first"] == 10
            assert all(attached_prog_id(*h) not in (None, progs[h]) for h in HOOKS)
        finally:
            c.stop()
    assert not os.path.exists(pin_dir)
