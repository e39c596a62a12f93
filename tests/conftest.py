"""Test tiers by privilege: unit and model tests run anywhere; tests marked root, bpf, nft or
lab need root (CI is root, so CI runs every tier)."""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

PRIVILEGED = {"root", "bpf", "lab", "nft", "attack"}


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: run as root (CI does)")
    for item in items:
        if PRIVILEGED & set(item.keywords):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool, which `make setup` puts beside the venv's python."""
    here = Path(sys.executable).parent / "promtool"
    found = str(here) if here.exists() else shutil.which("promtool")
    if not found:
        pytest.fail("promtool not found beside the venv's python or on PATH: run `make setup` (scripts/setup.sh)")
    return found



@pytest.fixture
def tmpdir_short():
    """A temp directory with a short path (AF_UNIX socket paths are at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="sgd")
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def empty_netns(request):
    """A network namespace of our own with nothing in it but lo, removed even when the test
    fails; named sg<NS_TAG of the test module><pid><random> so a leftover says whose it is."""
    tag = getattr(request.module, "NS_TAG", "t")
    name = f"sg{tag}{os.getpid():x}{uuid.uuid4().hex[:4]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
