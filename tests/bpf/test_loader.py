"""Loader tests in a namespace of our own: attach/detach (only our filters), pins adopted by a
second load, map-size mismatch refused clearly, nothing left behind.  The fixtures here (a
tiny stand-in object with the real map names, a netns, a pin dir) are reused by test_backend*.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import uuid

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import libbpf as B
from snatgw.datapath.bpf.loader import Loader, attached_prog_id, netns
from snatgw.datapath.bpf.maps import map_specs
from snatgw.errors import BackendError

DATA = os.path.join(os.path.dirname(__file__), "data")
INCLUDE = os.path.dirname(L.HEADER_PATH)


def compile_mini(out_dir) -> str:
    """Compile tests/bpf/data/mini.bpf.c (the stand-in datapath) into out_dir."""
    out = os.path.join(str(out_dir), "mini.bpf.o")
    arch = subprocess.run(["gcc", "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    cmd = ["clang", "-O2", "-g", "-target", "bpf", f"-I{INCLUDE}", "-c",
           os.path.join(DATA, "mini.bpf.c"), "-o", out]  # fmt: skip
    if arch:
        cmd.insert(5, f"-I/usr/include/{arch}")
    subprocess.run(cmd, check=True)
    return out


@pytest.fixture(scope="session")
def mini_obj(tmp_path_factory):
    return compile_mini(tmp_path_factory.mktemp("bpfobj"))


def sh(*argv, check=True):
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


@pytest.fixture
def ns():
    """A netns 'sgt<hex>-gw' with veths in0 and out0 (peers in0p/out0p in a second netns;
    this kernel has no dummy driver)."""
    tag = f"sgt{os.getpid():x}{uuid.uuid4().hex[:4]}"
    name, peer = f"{tag}-gw", f"{tag}-pe"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "netns", "add", peer)
        sh("ip", "-n", name, "link", "add", "in0", "type", "veth", "peer", "name", "in0p", "netns", peer)
        sh("ip", "-n", name, "link", "add", "out0", "type", "veth", "peer", "name", "out0p", "netns", peer)
        sh("ip", "-n", name, "addr", "add", "198.18.40.1/24", "dev", "in0")
        sh("ip", "-n", name, "addr", "add", "198.19.2.2/24", "dev", "out0")
        for dev in ("in0", "out0", "lo"):
            sh("ip", "-n", name, "link", "set", dev, "up")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
        sh("ip", "netns", "del", peer, check=False)


@pytest.fixture
def pin_dir():
    d = f"/sys/fs/bpf/sgt{os.getpid():x}-{uuid.uuid4().hex[:6]}"
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        assert not os.path.exists(d)


def tc_filters(ns_name, dev, where):
    r = sh("ip", "netns", "exec", ns_name, "tc", "-j", "filter", "show", "dev", dev, where)
    return json.loads(r.stdout or "[]")


def has_clsact(ns_name, dev):
    r = sh("ip", "netns", "exec", ns_name, "tc", "-j", "qdisc", "show", "dev", dev)
    return any(q.get("kind") == "clsact" for q in json.loads(r.stdout or "[]"))


def ct_key(n: int) -> bytes:
    return L.CT_KEY.pack(saddr=0xC6122800 + n, daddr=0xCB00710A, sport=1000 + n, dport=80,
                         proto=L.IPPROTO_TCP, dir=L.CT_DIR_OUT)  # fmt: skip


@pytest.mark.bpf
def test_attach_puts_each_program_on_its_hook_and_detach_removes_only_ours(ns, pin_dir, mini_obj):
    """inside ingress, outside ingress+egress carry our programs; a foreign filter survives detach."""
    with netns(ns):
        ld = Loader(pin_dir, max_sessions=64, obj_path=mini_obj)
        ld.load()
        try:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "out0", "clsact")
            sh("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "out0", "ingress", "prio", "7",
               "bpf", "obj", mini_obj, "sec", "tc", "da")  # someone else's filter (only cls_bpf here)
            ld.attach(["in0"], ["out0"])
            ids = {(a.ifname, a.point): a.prog_id for a in ld.attachments}
            assert attached_prog_id("in0", B.BPF_TC_INGRESS) == ids[("in0", B.BPF_TC_INGRESS)]
            assert attached_prog_id("out0", B.BPF_TC_INGRESS) == ids[("out0", B.BPF_TC_INGRESS)]
            assert attached_prog_id("out0", B.BPF_TC_EGRESS) == ids[("out0", B.BPF_TC_EGRESS)]
            assert attached_prog_id("in0", B.BPF_TC_EGRESS) is None
            assert len(set(ids.values())) == 3
        finally:
            ld.stop()
        assert attached_prog_id("in0", B.BPF_TC_INGRESS) is None
        assert attached_prog_id("out0", B.BPF_TC_INGRESS) is None
    assert not has_clsact(ns, "in0"), "the hook we created and emptied is removed"
    assert [f.get("pref") for f in tc_filters(ns, "out0", "ingress") if f.get("options")] == [7]
    assert has_clsact(ns, "out0"), "a hook with others' filters stays"
    assert not os.path.exists(pin_dir)


@pytest.mark.bpf
@pytest.mark.parametrize("tc", [True, False], ids=["tc", "no-tc"])
def test_purge_removes_the_hook_snatgw_made_and_keeps_one_with_other_filters(ns, pin_dir, mini_obj, tc, tmp_path,
                                                                             monkeypatch):
    """A daemon exited (keep_state: filters and pins stay); `snatgw purge` (cleanup.remove_bpf)
    then takes our filters off, and with them the clsact qdisc of in0, which the loader made and
    no other filter is on (it was left there, empty); out0's, with someone else's filter, stays.
    Without `tc` on PATH (nothing lists the other filters) both qdiscs stay, and purge still
    removes our filters and pins."""
    from snatgw.datapath.cleanup import remove_bpf

    with netns(ns):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "out0", "clsact")
        sh("ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "out0", "ingress", "prio", "7",
           "bpf", "obj", mini_obj, "sec", "tc", "da")  # fmt: skip
        ld = Loader(pin_dir, max_sessions=64, obj_path=mini_obj)
        ld.load()
        try:
            ld.attach(["in0"], ["out0"])
            assert {a.ifname: a.created_hook for a in ld.attachments} == {"in0": True, "out0": False}
        finally:
            ld.stop(keep_state=True)
        assert has_clsact(ns, "in0") and attached_prog_id("in0", B.BPF_TC_INGRESS) is not None
        if not tc:
            (tmp_path / "ip").symlink_to(shutil.which("ip"))  # (the new_gw routing's cleanup needs it)
            monkeypatch.setenv("PATH", str(tmp_path))
        removed = remove_bpf(pin_dir)
        monkeypatch.undo()
        assert attached_prog_id("in0", B.BPF_TC_INGRESS) is None
    if not tc:
        assert has_clsact(ns, "in0") and not any("clsact" in r for r in removed), removed
        assert not os.path.exists(pin_dir)
        return
    assert "clsact qdisc on in0 (snatgw's, now empty)" in removed, removed
    assert not any("out0 (snatgw" in r for r in removed), removed
    assert not has_clsact(ns, "in0"), "the hook snatgw made is gone with its filter"
    assert has_clsact(ns, "out0")
    assert [f.get("pref") for f in tc_filters(ns, "out0", "ingress") if f.get("options")] == [7]
    assert not os.path.exists(pin_dir)


@pytest.mark.bpf
def test_expected_kernel_errors_stay_out_of_the_log_and_others_reach_it(ns, pin_dir, mini_obj, caplog):
    """A start on hooks that exist (a qdisc someone made, a restart) and queries of filters that
    are not there get an error text from the kernel that libbpf prints as a warning: expected
    and handled, so it is logged at debug level only (a daemon's start logged ten such
    warnings).  The text of a failure nobody expects still reaches the log as a warning."""
    caplog.set_level(logging.DEBUG, logger="snatgw.libbpf")
    with netns(ns):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "out0", "clsact")
        ld = Loader(pin_dir, max_sessions=64, obj_path=mini_obj)
        ld.load()
        try:
            ld.attach(["in0"], ["out0"])
            ld.attach(["in0"], ["out0"])  # a restart: every hook exists, every filter is replaced
            assert attached_prog_id("in0", B.BPF_TC_EGRESS) is None
        finally:
            ld.stop()
    libbpf = [r for r in caplog.records if r.name == "snatgw.libbpf"]
    assert [r.getMessage() for r in libbpf if r.levelno >= logging.WARNING] == []
    assert any("Exclusivity flag on" in r.getMessage() for r in libbpf)  # it was said, at debug
    caplog.clear()

    def failing(err):  # libbpf printing the kernel's text, then failing with -err
        B._emit(logging.WARNING, "libbpf: Kernel error message: something else")
        return -err

    assert B._quiet(failing, (errno.EEXIST,), errno.EEXIST) == -errno.EEXIST
    assert [r.levelno for r in caplog.records if "something else" in r.getMessage()] == [logging.DEBUG]
    caplog.clear()
    assert B._quiet(failing, (errno.EEXIST,), errno.EPERM) == -errno.EPERM
    assert [r.levelno for r in caplog.records if "something else" in r.getMessage()] == [logging.WARNING]
    B._emit(logging.WARNING, "libbpf: outside a held call")  # nothing is held after the call
    assert any(r.levelno == logging.WARNING and "outside a held call" in r.getMessage() for r in caplog.records)


@pytest.mark.bpf
def test_attach_twice_replaces_our_filter_in_place(ns, pin_dir, mini_obj):
    """A second loader (a restarted daemon) replaces our filter instead of adding another."""
    with netns(ns):
        a, b = Loader(pin_dir, 64, mini_obj), Loader(pin_dir, 64, mini_obj)
        try:
            a.load()
            a.attach(["in0"], ["out0"])
            b.load()
            b.attach(["in0"], ["out0"])
            assert attached_prog_id("in0", B.BPF_TC_INGRESS) == next(x.prog_id for x in b.attachments if x.ifname == "in0")
            bpf = [f for f in tc_filters(ns, "in0", "ingress") if f.get("kind") == "bpf" and f.get("options")]
            assert len(bpf) == 1
        finally:
            a.obj.close()  # a's filters were replaced by b's: only close a's object
            b.stop()


@pytest.mark.bpf
def test_attach_to_missing_device_fails_clearly_and_attaches_nothing(ns, pin_dir, mini_obj):
    """A missing interface is named in the error and no filter is left on the others."""
    with netns(ns):
        ld = Loader(pin_dir, 64, mini_obj)
        ld.load()
        try:
            with pytest.raises(BackendError, match="'nope0' does not exist"):
                ld.attach(["in0"], ["nope0"])
            assert attached_prog_id("in0", B.BPF_TC_INGRESS) is None
        finally:
            ld.stop()


@pytest.mark.bpf
def test_session_written_by_first_load_is_seen_by_second(pin_dir, mini_obj):
    """Pins are adopted: a ct entry survives a control-plane restart with keep_state."""
    key, val = ct_key(1), L.CT_ENTRY.pack(rw_addr=0xC6130247, rw_port=5001, state=1, last_seen=7)
    a = Loader(pin_dir, 64, mini_obj)
    a.load().ct.put(key, val)
    a.stop(keep_state=True)
    assert sorted(os.listdir(pin_dir)) == sorted(
        [L.MAP_RULES, L.MAP_CONFIG, L.MAP_CT, L.MAP_FRAGS, L.MAP_REASONS, L.MAP_RULE_STATS, L.MAP_IFACES,
         L.MAP_HOST_SESS, L.MAP_ADDR_STATS, L.MAP_RULE_LIVE, L.MAP_FROM_NETS, L.MAP_REFUSED,
         L.MAP_INSIDE_ADDRS, L.MAP_EIM, L.MAP_AUDIT, L.MAP_AUDIT_CNT, L.MAP_RULE_SLOTS, L.MAP_SPILL_MEMO,
         L.MAP_ALLOC_CNT, L.MAP_GW_MARKS, L.MAP_WALK])
    b = Loader(pin_dir, 64, mini_obj)
    try:
        maps = b.load()
        assert L.MAP_CT in b.reused and len(b.reused) == len(map_specs())
        assert maps.ct.get(key) == val
        prog = b.obj.prog_fd("snat_inside")
        B.test_run(prog, bytes(60))  # the program of load 2 writes the adopted map
        assert maps.reasons()["PASS_NO_RULE"] >= 1
    finally:
        b.stop()
    assert not os.path.exists(pin_dir)


@pytest.mark.bpf
def test_pinned_session_table_of_another_entry_layout_is_refused_with_clear_error(pin_dir, mini_obj):
    """A pinned snat_ct whose entries no conversion covers (another value size; another size
    alone, a changed max_sessions, is carried over: test_carry.py): the error names the map,
    the field and the values; the pins are kept."""
    a = Loader(pin_dir, 64, mini_obj)
    a.load().ct.put(ct_key(2), bytes(L.CT_ENTRY.size))
    a.stop(keep_state=True)
    path = os.path.join(pin_dir, L.MAP_CT)
    _pin_foreign(path, "hash", L.CT_KEY.size, L.CT_ENTRY.size + 8, 128)
    fd = B.obj_get(path)
    want = B.map_info(fd).id
    os.close(fd)
    with pytest.raises(BackendError) as e:
        Loader(pin_dir, 100, mini_obj).load()
    msg = str(e.value)
    assert "snat_ct" in msg and f"value_size is {L.CT_ENTRY.size + 8}, expected {L.CT_ENTRY.size}" in msg
    assert "max_entries is 128, expected 200" in msg and pin_dir in msg
    fd = B.obj_get(path)  # nothing was changed by the refused load
    try:
        assert B.map_info(fd).id == want
    finally:
        os.close(fd)


@pytest.mark.bpf
def test_pinned_map_of_other_type_is_refused(pin_dir, mini_obj):
    """A foreign map pinned under our name (wrong type/sizes) is refused, not clobbered."""
    os.makedirs(pin_dir)
    with B.BpfObject.open(mini_obj) as o:
        o.load()
        o.map(L.MAP_REASONS).pin(os.path.join(pin_dir, L.MAP_CT))
    with pytest.raises(BackendError, match=r"snat_ct.*type is percpu_array, expected hash"):
        Loader(pin_dir, 64, mini_obj).load()
    assert os.path.exists(os.path.join(pin_dir, L.MAP_CT))


@pytest.mark.bpf
def test_map_sizes_follow_max_sessions(pin_dir, mini_obj):
    """snat_ct holds two entries per session; the rest keep layout.py's sizes."""
    ld = Loader(pin_dir, 1000, mini_obj)
    try:
        m = ld.load()
        assert m.ct.max_entries == 2000
        assert m.rules.max_entries == L.MAX_RULES and m.cfg.max_entries == 1
        assert (m.ct.key_size, m.ct.value_size) == (L.CT_KEY.size, L.CT_ENTRY.size)
    finally:
        ld.stop()


@pytest.fixture(scope="session")
def datapath_obj():
    """The real datapath object (bpf-C's build), skipped while it does not exist."""
    try:
        from snatgw.datapath.bpf import build
    except ImportError:
        pytest.skip("the datapath build (snatgw.datapath.bpf.build) is not there yet")
    return str(build.compile({}))


@pytest.mark.bpf
def test_real_datapath_loads_attaches_adopts_pins_and_leaves_nothing(ns, pin_dir, datapath_obj):
    """The real object: pinned, attached on every hook, adopted by a second load, then gone."""
    with netns(ns):
        a = Loader(pin_dir, 128, datapath_obj)
        a.load().ct.put(ct_key(5), bytes(L.CT_ENTRY.size))
        a.attach(["in0"], ["out0"])
        assert attached_prog_id("out0", B.BPF_TC_EGRESS) is not None
        first = attached_prog_id("out0", B.BPF_TC_EGRESS)
        a.stop(keep_state=True)  # a daemon exiting: the programs stay attached (no dark window)
        assert attached_prog_id("out0", B.BPF_TC_EGRESS) == first
        b = Loader(pin_dir, 128, datapath_obj)
        try:
            assert b.load().ct.get(ct_key(5)) is not None and len(b.reused) == len(map_specs())
            b.attach(["in0"], ["out0"])  # replaced in place by the new daemon's program
            assert attached_prog_id("out0", B.BPF_TC_EGRESS) not in (None, first)
        finally:
            b.stop()
    assert not has_clsact(ns, "in0") and not has_clsact(ns, "out0")
    assert not os.path.exists(pin_dir)


@pytest.mark.root
def test_netns_restores_the_callers_namespace(ns):
    """After the netns() body, the thread is back in its own namespace."""
    before = os.readlink("/proc/thread-self/ns/net")
    with netns(ns):
        assert os.readlink("/proc/thread-self/ns/net") != before
    assert os.readlink("/proc/thread-self/ns/net") == before




@pytest.mark.bpf
@pytest.mark.parametrize("how", ["other-user", "loose-mode", "symlink"])
def test_a_pin_dir_made_by_someone_else_is_refused(pin_dir, mini_obj, how, tmp_path):
    """A pin dir that another user made beforehand (or anyone may write, or a symlink) could hold
    maps placed under our names: refused with a clear error, nothing pinned into it."""
    if how == "symlink":
        os.makedirs(pin_dir + "-real", mode=0o700)
        os.symlink(pin_dir + "-real", pin_dir)
    else:
        os.makedirs(pin_dir, mode=0o700)
        if how == "other-user":
            os.chown(pin_dir, 65534, 65534)
        else:
            os.chmod(pin_dir, 0o777)
    try:
        with pytest.raises(BackendError) as e:
            Loader(pin_dir, 64, mini_obj).load()
        msg = str(e.value)
        assert pin_dir in msg
        assert {"other-user": "uid 65534", "loose-mode": "mode 0777", "symlink": "not a directory"}[how] in msg
        target = pin_dir + "-real" if how == "symlink" else pin_dir
        assert os.listdir(target) == []
    finally:
        if how == "symlink":
            os.unlink(pin_dir)
            os.rmdir(pin_dir + "-real")


def _pin_foreign(path: str, typ: str, key: int, value: int, entries: int) -> None:
    """Pin at ``path`` a map as another snatgw version would have made it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sh("bpftool", "map", "create", path, "type", typ, "key", str(key), "value", str(value),
       "entries", str(entries), "name", os.path.basename(path)[:15])


@pytest.mark.bpf
def test_pinned_maps_of_another_layout_are_replaced_and_sessions_kept(pin_dir, mini_obj, caplog):
    """An upgrade (or a rollback) whose layout lengthens a counter array, widens a rule or
    resizes a cache: a restart keeping state replaces those maps (each warned, saying what goes
    with it) and adopts the sessions as before.  A session table in a layout no conversion covers
    (another key) is still refused (another size alone is carried over: test_carry.py)."""
    a = Loader(pin_dir, 64, mini_obj)
    a.load().ct.put(ct_key(2), bytes(L.CT_ENTRY.size))
    a.stop(keep_state=True)
    specs = map_specs(64)
    foreign = {  # the map -> (bpftool type, key, value, entries) of an imagined other version
        L.MAP_ALLOC_CNT: ("percpu_array", 4, 8, 2),  # fewer counters (turn 5 had 2)
        L.MAP_REASONS: ("percpu_array", 4, 8, 2 * L.REASON_MAX),  # more (a rollback)
        L.MAP_RULES: ("array", 4, L.SNAT_RULE.size - 4, L.MAX_RULES),  # snat_rule of 44 bytes (turn 4)
        L.MAP_CONFIG: ("array", 4, L.SNAT_CFG.size + 8, 1),
        L.MAP_REFUSED: ("hash", L.CT_KEY.size, L.REFUSAL.size, 16),  # other type and size
    }
    for name, shape in foreign.items():
        _pin_foreign(os.path.join(pin_dir, name), *shape)
    b = Loader(pin_dir, 64, mini_obj)
    try:
        m = b.load()
        assert m.ct.get(ct_key(2)) is not None and L.MAP_CT in b.reused
        for name in foreign:
            assert name not in b.reused
            spec = specs[name]
            fd = B.obj_get(os.path.join(pin_dir, name))
            try:  # the pin is the new one, and the object uses it
                info = B.map_info(fd)
                assert (info.type, info.value_size, info.max_entries) == (spec.type, spec.value_size,
                                                                          spec.max_entries)  # fmt: skip
                assert info.id == B.map_info(m.maps[name].fd).id
            finally:
                os.close(fd)
            assert f"{name}: pinned in another layout" in caplog.text
        assert "its counts start again from zero" in caplog.text
        assert "written afresh from the config before the programs are attached" in caplog.text
        assert "refusal markers forgotten" in caplog.text
    finally:
        b.stop(keep_state=True)
    # a state map of another key: refused, kept
    _pin_foreign(os.path.join(pin_dir, L.MAP_CT), "hash", L.CT_KEY.size + 4, L.CT_ENTRY.size, 128)
    with pytest.raises(BackendError, match=f"snat_ct.*key_size is {L.CT_KEY.size + 4}"):
        Loader(pin_dir, 64, mini_obj).load()
    assert os.path.exists(os.path.join(pin_dir, L.MAP_CT))


@pytest.mark.bpf
def test_a_failed_pin_leaves_the_pinned_maps_it_would_have_replaced(pin_dir, mini_obj, monkeypatch):
    """A start that would replace pinned maps of another layout fails while pinning (ENOSPC, a
    pin dir made read-only): the old pins stay where they were, each still the same map, so the
    next start (or the version rolled back to) finds what the programs still attached use, and
    nothing of this attempt is left behind."""
    a = Loader(pin_dir, 64, mini_obj)
    a.load().ct.put(ct_key(2), bytes(L.CT_ENTRY.size))
    a.stop(keep_state=True)
    foreign = {L.MAP_RULES: ("array", 4, L.SNAT_RULE.size - 4, L.MAX_RULES),
               L.MAP_CONFIG: ("array", 4, L.SNAT_CFG.size + 8, 1)}  # fmt: skip
    ids = {}
    for name, shape in foreign.items():
        path = os.path.join(pin_dir, name)
        _pin_foreign(path, *shape)
        fd = B.obj_get(path)
        ids[name] = B.map_info(fd).id
        os.close(fd)
    before = sorted(os.listdir(pin_dir))
    real = B.obj_pin
    pinned = []

    def pin(fd, path):
        if pinned:  # the first pin works, the second fails
            raise BackendError(f"bpf_obj_pin {path}: No space left on device")
        pinned.append(path)
        real(fd, path)

    monkeypatch.setattr(B, "obj_pin", pin)
    with pytest.raises(BackendError, match="No space left"):
        Loader(pin_dir, 64, mini_obj).load()
    monkeypatch.undo()
    assert sorted(os.listdir(pin_dir)) == before
    for name in foreign:
        fd = B.obj_get(os.path.join(pin_dir, name))
        try:
            assert B.map_info(fd).id == ids[name]
        finally:
            os.close(fd)
    b = Loader(pin_dir, 64, mini_obj)  # and the next start replaces them as before
    try:
        assert b.load().ct.get(ct_key(2)) is not None
    finally:
        b.stop(keep_state=True)


@pytest.mark.bpf
def test_a_pin_dir_not_on_bpffs_is_refused_naming_the_setting(tmp_path):
    """`pin_dir /tmp/...` (not on bpffs, where alone maps can be pinned): `snatgw run` exits 3
    with file:line: pin_dir and what is expected, and makes no directory there; before, the
    directory was made and the first pin failed with `bpf_obj_pin ...: Operation not permitted
    (errno 1: EPERM)`, naming no setting."""
    import sys

    pins = tmp_path / "pins"
    conf = tmp_path / "gw.conf"
    conf.write_text(f"snatgw {{\n  inside lan40\n  outside eth1\n  pin_dir {pins}\n"
                    f"  control_socket {tmp_path / 'c.sock'}\n}}\n"
                    "virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    ns = f"sgpd{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for dev in ("lan40", "eth1"):
            subprocess.run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p"], check=True)
        p = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "snatgw.cli.main",
                            "run", str(conf), "--backend", "bpf"], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert p.returncode == 3, p.stderr
    assert f"{conf}:4: pin_dir: {pins} is on a " in p.stderr and "expected a directory on a bpf filesystem" in p.stderr
    assert not pins.exists()
    from snatgw.datapath.bpf.loader import ensure_bpffs, fs_type

    assert fs_type(L.PIN_DIR) == "bpf" and fs_type(str(tmp_path)) not in ("bpf", None)
    with pytest.raises(BackendError, match=r"expected a directory on a bpf filesystem"):
        ensure_bpffs(str(pins))
    assert not pins.exists()


@pytest.mark.bpf
def test_a_daemon_whose_pins_die_with_it_says_so(tmp_path):
    """`ip netns exec NS snatgw run` (the usual way into a namespace) gives the daemon a mount
    namespace of its own whose /sys has no bpffs: the daemon mounts one there, and its pinned
    sessions go when it exits, so the next daemon adopts none (a restart under traffic drops
    every connection, measured: a ping's session was gone after a SIGTERM and start, with
    nsenter --net it was kept). It warns at start, naming nsenter; before, it said nothing."""
    import signal
    import sys

    ns = f"sgpp{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "gw.conf"
    pin = f"{L.PIN_DIR}-{ns}"
    conf.write_text(f"snatgw {{\n  inside lan40\n  outside eth1\n  pin_dir {pin}\n"
                    f"  control_socket {tmp_path / 'c.sock'}\n}}\n"
                    "virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc = None
    try:
        for dev in ("lan40", "eth1"):
            subprocess.run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p"], check=True)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "snatgw.cli.main", "run", str(conf),
                                 "--backend", "bpf"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1]
        assert "ready" in line, err
        assert "event=pins_private" in err and "nsenter --net=/run/netns/NS" in err, err
        assert not os.path.exists(pin)  # the host's bpffs never had them
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.bpf
def test_purge_says_when_it_cannot_see_the_pins(tmp_path):
    """`ip netns exec NS snatgw purge` (its /sys has no bpffs): the pinned maps of a daemon
    started with nsenter are not seen, so purge says so and names nsenter, instead of listing
    what it removed as if that were all (the session table stayed pinned, unsaid); with
    nsenter, no such note."""
    import sys

    ns = f"sgpu{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "snatgw.cli.main", "purge", "--socket", str(tmp_path / "c.sock")]
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        hidden = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60)
        seen = subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *argv], capture_output=True, text=True,
                              timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert hidden.returncode == 0 and seen.returncode == 0, (hidden.stderr, seen.stderr)
    assert f"the pin directory {L.PIN_DIR} is on no bpf filesystem here" in hidden.stderr, hidden.stderr
    assert "nsenter --net=/run/netns/NS snatgw purge" in hidden.stderr
    assert "pin directory" not in seen.stderr, seen.stderr


@pytest.mark.bpf
def test_the_documented_netns_command_gives_both(capsys):
    """docs/operations.md's one command for a gateway in a namespace ("In a network namespace"),
    run as written with its last words a probe instead of snatgw: the command sees the host's
    bpffs at /sys/fs/bpf (the pins outlive it) and the namespace's own devices under /sys (what
    `rps_cpus` writes and purge puts back), neither of which a plain `ip netns exec` or
    `nsenter --net` gives both of; nothing of it stays mounted or parked on the host.  The purge
    notes and the rps hint name that command's section."""
    import re
    import shlex

    from snatgw.cli.commands import purge
    from snatgw.daemon.rps import FOREIGN_HINT

    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operations.md")).read()
    cmd = re.search(r"<!-- netns-command -->\n```\n(.*?)\n```", docs, re.S).group(1)
    assert cmd.endswith(" sh snatgw run /etc/snatgw/snatgw.conf") and cmd.count("\n") == 0
    ns = f"sgnc{uuid.uuid4().hex[:8]}"
    probe = "stat -f -c %T /sys/fs/bpf; ls /sys/class/net"
    argv = shlex.split(cmd.replace("/run/netns/NS", f"/run/netns/{ns}").removesuffix(
        "snatgw run /etc/snatgw/snatgw.conf") + "sh -c " + shlex.quote(probe))
    parked = set(os.listdir("/run"))
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "sgnc0", "type", "veth", "peer", "name", "sgnc1")
        both = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        plain = subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", probe], capture_output=True, text=True,
                               timeout=30)  # fmt: skip
    finally:
        sh("ip", "netns", "del", ns, check=False)
    assert both.returncode == 0, both.stderr
    assert both.stdout.split() == ["bpf_fs", "lo", "sgnc0", "sgnc1"], both.stdout
    assert plain.stdout.split()[0] != "bpf_fs"  # (what the section says of `ip netns exec`)
    assert {d for d in set(os.listdir("/run")) - parked if d.startswith("snatgw-sysfs.")} == set()
    assert 'docs/operations.md "In a network namespace"' in FOREIGN_HINT
    purge._say_unseen_pins("/tmp")  # (no bpffs there)
    assert 'docs/operations.md "In a network namespace"' in capsys.readouterr().err



def test_a_max_sessions_past_the_kernels_hash_map_limit_is_refused_by_name(pin_dir, mini_obj, monkeypatch):
    """max_sessions 2,000,000,000 failed the start with libbpf's "bpf_object__load: EINVAL" (2 x
    max_sessions wrapped in 32 bits), 134,217,728 with "E2BIG": now the loader names the limit
    before libbpf runs.  The limit is the kernel's: one session past it, let through, meets E2BIG
    (the bucket array's size check comes before any allocation)."""
    from snatgw.datapath.bpf.libbpf import LibbpfError

    over = L.MAX_BPF_SESSIONS + 1
    with pytest.raises(BackendError, match="max_sessions 67,108,865: the bpf backend's session table holds at "
                                           "most 67,108,864"):
        Loader(pin_dir, over, mini_obj).load()
    assert not os.listdir(pin_dir) if os.path.isdir(pin_dir) else True
    monkeypatch.setattr(L, "MAX_BPF_SESSIONS", 1 << 27)
    with pytest.raises(LibbpfError, match="E2BIG"):
        Loader(pin_dir, over, mini_obj).load()
