"""Test tiers by privilege: unit and model tests run anywhere; tests marked root, bpf, nft or
lab need root (CI is root, so CI runs every tier)."""

import os

import pytest

PRIVILEGED = {"root", "bpf", "lab", "nft", "attack"}


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: run as root (CI does)")
    for item in items:
        if PRIVILEGED & set(item.keywords):
            item.add_marker(skip)
