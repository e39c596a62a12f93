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


@pytest.fixture
def make_prog(refnet):
    """Factory: a loaded datapath with rules applied; closed after the test."""
    from snatgw.datapath.bpf.testrun import ProgHarness

    made = []

    def make(rules, settings, defines=None, max_sessions=4096):
        h = ProgHarness(refnet, defines=defines, max_sessions=max_sessions)
        made.append(h)
        h.apply(rules, settings)
        return h

    yield make
    for h in made:
        h.close()
