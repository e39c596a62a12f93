"""The ctypes libbpf binding against the stand-in object: test runs, map semantics (plain and
per-CPU), read-only pins, and errors that carry errno text."""

import ctypes
import errno
import os

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import libbpf as B
from snatgw.errors import BackendError

from test_loader import ct_key, mini_obj, pin_dir  # noqa: F401  (fixtures)


def test_struct_layouts_match_libbpf_1_1_headers():
    """The opts structs have the sizes of /usr/include/bpf (sz fields must be exact)."""
    assert ctypes.sizeof(B.TcHook) == 24 and ctypes.sizeof(B.TcOpts) == 32
    assert ctypes.sizeof(B.RunOpts) == 80 and ctypes.sizeof(B.MapBatchOpts) == 24
    assert B.RunOpts.retval.offset == 56 and B.TcOpts.priority.offset == 24


def test_open_of_missing_object_raises_backend_error_with_errno_text(tmp_path):
    """A missing file is a BackendError naming the file and the errno."""
    with pytest.raises(BackendError, match=r"nothere\.o: No such file or directory \(errno 2"):
        B.BpfObject.open(tmp_path / "nothere.o")


@pytest.fixture
def obj(mini_obj):  # noqa: F811
    o = B.BpfObject.open(mini_obj)
    o.set_max_entries(L.MAP_CT, 16)
    o.load()
    try:
        yield o
    finally:
        o.close()


@pytest.mark.bpf
def test_object_lists_programs_and_maps_by_name(obj):
    """Programs and maps are found by their C names; unknown names raise KeyError."""
    assert {"snat_inside", "snat_outside", "snat_egress"} <= set(obj.program_names())
    assert {L.MAP_CT, L.MAP_RULES, L.MAP_REASONS} <= set(obj.map_names())
    assert obj.prog_fd("snat_inside") > 0
    with pytest.raises(KeyError, match="no program named 'nope'"):
        obj.prog_fd("nope")


@pytest.mark.bpf
def test_test_run_returns_verdict_data_and_counts_on_every_cpu_sum(obj):
    """test_run hands back retval, the frame and ctx; the program's counter moves by repeat."""
    fd = obj.prog_fd("snat_inside")
    frame = bytes(range(60))
    ctx = bytes(192)  # struct __sk_buff
    ret, out, ctx_out, dur = B.test_run(fd, frame, ctx=ctx, repeat=3)
    assert ret == B.TC_ACT_OK and out == frame and len(ctx_out) == 192 and dur >= 0
    per_cpu = obj.map(L.MAP_REASONS).get_percpu(int(L.Reason.PASS_NO_RULE))
    assert len(per_cpu) == B.num_possible_cpus()
    assert sum(int.from_bytes(v, "little") for v in per_cpu) == 3


@pytest.mark.bpf
def test_hash_map_put_get_delete_and_iterate(obj):
    """put/get/delete round-trip bytes; keys() and items_batch() see every entry once, also
    with a chunk smaller than a bucket (the kernel's ENOSPC for a bucket that does not fit: 10
    keys in 16 buckets share one 97% of the time; chunk 4 failed so now and then in CI)."""
    ct = obj.map(L.MAP_CT)
    vals = {ct_key(i): L.CT_ENTRY.pack(rw_port=5000 + i, last_seen=i) for i in range(10)}
    for k, v in vals.items():
        ct.put(k, v)
    assert ct.get(ct_key(3)) == vals[ct_key(3)]
    assert sorted(ct.keys()) == sorted(vals) and dict(ct.items_batch(chunk=4)) == vals
    assert dict(ct.items_batch(chunk=1)) == vals and sum(n for n, _ in ct.key_batches(chunk=1)) == 10
    assert dict(ct.items()) == vals and len(ct) == 10
    assert ct.delete(ct_key(3)) is True and ct.delete(ct_key(3)) is False
    assert ct.get(ct_key(3)) is None
    with pytest.raises(B.LibbpfError) as e:
        ct.put(ct_key(4), vals[ct_key(4)], B.BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST and "EEXIST" in str(e.value)


@pytest.mark.bpf
def test_full_hash_map_refuses_a_new_key(obj):
    """max_entries is enforced: the 17th key of a 16-entry map fails with E2BIG."""
    ct = obj.map(L.MAP_CT)
    for i in range(16):
        ct.put(ct_key(i), bytes(L.CT_ENTRY.size))
    with pytest.raises(B.LibbpfError) as e:
        ct.put(ct_key(16), bytes(L.CT_ENTRY.size))
    assert e.value.errno == errno.E2BIG


@pytest.mark.bpf
def test_wrong_key_or_value_size_is_refused_before_the_kernel(obj):
    """A key or value of the wrong length raises a BackendError naming the map and sizes."""
    ct = obj.map(L.MAP_CT)
    with pytest.raises(BackendError, match="map snat_ct: key is 3 bytes, expected 16"):
        ct.get(b"abc")
    with pytest.raises(BackendError, match="value is 1 bytes, expected 48"):
        ct.put(ct_key(0), b"x")


@pytest.mark.bpf
def test_percpu_put_of_one_value_sets_every_cpu(obj):
    """A single value written to a per-CPU map lands on every CPU."""
    rs = obj.map(L.MAP_RULE_STATS)
    rs.put(7, L.RULE_STATS.pack(packets=2, bytes=100, sessions=1))
    got = [L.RULE_STATS.unpack(v) for v in rs.get_percpu(7)]
    assert len(got) == B.num_possible_cpus() and all(g["bytes"] == 100 for g in got)


@pytest.mark.bpf
def test_readonly_pin_reads_but_cannot_write(obj, pin_dir):  # noqa: F811
    """A map opened read-only from its pin can be read, and writes fail with EPERM."""
    os.makedirs(pin_dir)
    path = os.path.join(pin_dir, L.MAP_CT)
    obj.map(L.MAP_CT).put(ct_key(1), bytes(L.CT_ENTRY.size))
    obj.map(L.MAP_CT).pin(path)
    with B.Map.open_pinned(path, readonly=True) as m:
        assert m.name == L.MAP_CT and m.get(ct_key(1)) is not None
        with pytest.raises(B.LibbpfError) as e:
            m.put(ct_key(2), bytes(L.CT_ENTRY.size))
        assert e.value.errno == errno.EPERM
    os.unlink(path)


def test_libbpf_messages_reach_python_logging(tmp_path, caplog):
    """libbpf's own warning about a broken object arrives as a snatgw.libbpf log record."""
    bad = tmp_path / "bad.o"
    bad.write_bytes(b"this is not an ELF file")
    with caplog.at_level("DEBUG", logger="snatgw.libbpf"):
        with pytest.raises(BackendError):
            B.BpfObject.open(bad)
    msgs = [r.getMessage() for r in caplog.records if r.name == "snatgw.libbpf"]
    assert any("bad.o" in m or "elf" in m.lower() for m in msgs), msgs
