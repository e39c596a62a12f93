"""Fixtures shared by the daemon, adm and conns tests: an in-process daemon (test_daemon.Running:
Service + FakeBackend + control socket) in a short temp directory."""

import pytest


@pytest.fixture
def running(tmpdir_short):
    from test_daemon import Running  # tests/unit is on sys.path (pytest prepend import mode)

    r = Running(tmpdir_short)
    try:
        yield r
    finally:
        r.close()
