"""Test tiers by privilege: unit and model tests run anywhere; tests marked root, bpf, nft or
lab need root (CI is root, so CI runs every tier)."""

import os
import shutil
import sys
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

