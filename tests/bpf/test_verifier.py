"""Every compile-time flag set of the datapath (build.FLAG_SETS) builds and passes this
kernel's verifier with the production map sizes; constants the C keeps for itself agree with
snatgw.layout."""

import re

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import build
from snatgw.datapath.bpf import libbpf as B


def _flag_id(defines: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in defines.items()) or "default"


@pytest.mark.bpf
@pytest.mark.parametrize("defines", build.FLAG_SETS, ids=_flag_id)
def test_flag_set_loads_on_this_kernel(defines):
    """The object for this flag set loads: all three programs pass the verifier."""
    obj = B.BpfObject.open(build.compile(defines))
    try:
        obj.load()
        for prog in ("snat_inside", "snat_outside", "snat_egress"):
            assert obj.prog_fd(prog) > 0
        assert obj.max_entries(L.MAP_CT) == 2 * int(defines.get("SNAT_MAX_SESSIONS", L.MAX_SESSIONS))
    finally:
        obj.close()


def test_build_is_cached_by_source_and_defines():
    """The same defines give the same object path; other defines give another."""
    a, b = build.compile({}), build.compile({})
    assert a == b and a.exists()
    assert build.compile({"SNAT_PORT_TRIES": 1}) != a


def test_c_frag_timeout_is_layouts():
    """SNAT_FRAG_TIMEOUT in nat.h equals layout.FRAG_TIMEOUT."""
    text = (build.INCLUDE / "nat.h").read_text()
    assert int(re.search(r"#define SNAT_FRAG_TIMEOUT (\d+)", text).group(1)) == L.FRAG_TIMEOUT


def test_bad_define_name_is_refused():
    """A define that is not an identifier is refused before clang runs."""
    from snatgw.errors import BackendError

    with pytest.raises(BackendError, match="bad define"):
        build.compile({"X; rm": 1})
