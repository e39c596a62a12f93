"""Fixtures shared by the daemon, adm and conns tests: an in-process daemon (test_daemon.Running:
Service + FakeBackend + control socket) in a short temp directory."""

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def tmpdir_short():
    d = tempfile.mkdtemp(prefix="sgd")  # AF_UNIX paths must stay short
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def running(tmpdir_short):
    from test_daemon import Running  # tests/unit is on sys.path (pytest prepend import mode)

    r = Running(tmpdir_short)
    try:
        yield r
    finally:
        r.close()
