"""The compiled objects' BTF agrees with snatgw.layout: every struct in layout.STRUCTS has the
same size and field offsets, and every map's key/value types have the sizes maps.py expects.
Runs on the stand-in object and on the real datapath (bpf-C's build) when it exists."""

import json
import subprocess

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf.maps import map_specs

from test_loader import compile_mini


C_SIZES = {"__u8": 1, "__u16": 2, "__u32": 4, "__u64": 8, "__be16": 2, "__be32": 4}


def btf_types(obj_path) -> dict[int, dict]:
    r = subprocess.run(["bpftool", "btf", "dump", "file", str(obj_path), "format", "raw", "-j"],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return {t["id"]: t for t in json.loads(r.stdout)["types"]}


#: structs only the sweep program (prog/sweep.bpf.c) uses; the sweep object has every struct
SWEEP_ONLY = frozenset({"sweep_args", "sweep_res", "sweep_host_add"})


@pytest.fixture(scope="module", params=["stand-in", "datapath", "sweep"])
def types(request, tmp_path_factory):
    if request.param == "stand-in":
        return btf_types(compile_mini(tmp_path_factory.mktemp("btf")))
    from snatgw.datapath.bpf import build

    if request.param == "sweep":
        return btf_types(build.compile(source=build.SWEEP_SOURCE))
    return btf_types(build.compile({}))


def resolve(types, tid):
    """Follow typedefs, const/volatile to the underlying type."""
    t = types[tid]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "TYPE_TAG", "RESTRICT"):
        t = types[t["type_id"]]
    return t


def size_of(types, tid) -> int:
    t = resolve(types, tid)
    if t["kind"] == "ARRAY":
        return t["nr_elems"] * size_of(types, t["type_id"])
    return t["size"]


@pytest.mark.parametrize("name", list(L.STRUCTS))
def test_struct_size_and_offsets_match_layout(types, name):
    """Each layout struct exists in BTF with layout.py's size and every field at its offset."""
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t["name"] == name]
    is_sweep = any(t["kind"] == "STRUCT" and t["name"] == "sweep_args" for t in types.values())
    if name in SWEEP_ONLY and not is_sweep:
        assert not found  # the TC objects do not use it
        return
    assert found, f"struct {name} is not in the object's BTF"
    st, spec = found[0], L.STRUCTS[name]
    assert st["size"] == spec.size, f"sizeof(struct {name})"
    btf_off = {m["name"]: m["bits_offset"] // 8 for m in st["members"]}
    assert btf_off == spec.offsets()
    for m in st["members"]:
        ctype = dict((f, c) for f, c, _ in spec.fields)[m["name"]]
        want = L.STRUCTS[ctype[7:]].size if ctype.startswith("struct ") else C_SIZES[ctype]
        assert size_of(types, m["type_id"]) == want, f"{name}.{m['name']} size"


def test_maps_key_and_value_types_have_the_expected_sizes(types):
    """In the .maps section every map of maps.map_specs has key/value of the spec's sizes."""
    datasec = [t for t in types.values() if t["kind"] == "DATASEC" and t["name"] == ".maps"]
    assert datasec, "no .maps section"
    seen = {}
    for v in datasec[0]["vars"]:
        var = types[v["type_id"]]
        st = resolve(types, var["type_id"])
        members = {m["name"]: m["type_id"] for m in st["members"]}
        if "key" not in members:  # a ring buffer: no key or value
            seen[var["name"]] = {"key": 0, "value": 0}
            continue
        sizes = {}
        for field in ("key", "value"):
            ptr = resolve(types, members[field])
            assert ptr["kind"] == "PTR"
            sizes[field] = size_of(types, ptr["type_id"])
        seen[var["name"]] = sizes
    for name, spec in map_specs().items():
        assert name in seen, f"map {name} missing from the object"
        assert seen[name] == {"key": spec.key_size, "value": spec.value_size}, name
