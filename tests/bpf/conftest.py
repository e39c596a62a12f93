"""Fixtures for the datapath program tests: the REF gateway in a private namespace (built once
per session, always removed) and a freshly loaded program object per test."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so `tests.cases` imports whatever the rootdir mode
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def refnet():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    from snatgw.datapath.bpf.testrun import RefNet

    with RefNet(prefix=f"sgt{os.getpid():x}p-") as net:
        yield net


@pytest.fixture(scope="session")
def prog_pool(refnet):
    """Loaded datapath objects no test is using, by (defines, max_sessions); closed at the end.
    Loading (the verifier) takes ~1 s, running a scenario ~10 ms: the differential tests alone
    loaded ~140 objects.  A reused object is reset() to a fresh load's state first
    (test_testrun_reset.py holds the two equal)."""
    idle: dict[tuple, list] = {}
    try:
        yield idle
    finally:
        for hs in idle.values():
            for h in hs:
                h.close()


@pytest.fixture
def make_prog(refnet, prog_pool):
    """Factory: a loaded datapath (fresh, or a reused one reset to fresh) with rules applied;
    back to the pool after the test."""
    from snatgw.datapath.bpf.testrun import ProgHarness

    made = []

    def make(rules, settings, defines=None, max_sessions=4096, cfg_flags=0):
        key = (tuple(sorted((defines or {}).items())), max_sessions)
        if prog_pool.get(key):
            h = prog_pool[key].pop()
            made.append((key, h))
            h.reset()
        else:
            h = ProgHarness(refnet, defines=defines, max_sessions=max_sessions)
            made.append((key, h))
        h.apply(rules, settings, cfg_flags)
        return h

    yield make
    for key, h in made:
        prog_pool.setdefault(key, []).append(h)


@pytest.fixture(scope="session")
def _bench_loaded(refnet):
    from snatgw.datapath.bpf.testrun import ProgHarness

    with ProgHarness(refnet, defines={"SNAT_BENCH": 1}, test=False, max_sessions=16384) as h:
        yield h, h.snapshot()


@pytest.fixture
def bench_prog(_bench_loaded):
    """The SNAT_BENCH build (bench_* wrappers, no SNAT_TEST, 16,384 sessions) loaded once per
    session: its load takes ~3 s of verifier, and three tests each loaded their own.  Each test
    gets it reset() and checked equal to the fresh load's snapshot (every map, globals too),
    so nothing an earlier test left can reach it; the test applies its own rules."""
    h, fresh = _bench_loaded
    h.reset()
    assert h.snapshot() == fresh, "reset() left the bench object unlike its fresh load"
    return h
