"""`make install DESTDIR=...` (a staged install, as a package build does): every file lands
under DESTDIR at the path docs/operations.md names, the files name their final paths (never
the staging root), the staged snatgw runs, and nothing is written outside DESTDIR: the final
paths on this host are exactly as they were before."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from snatgw.cli.main import VERBS

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def staged(make_installs):
    """make install DESTDIR=... with the default paths, from a copy of this tree
    (tests/install/conftest.py runs it beside the other install)."""
    dest, before, after, rc, out = make_installs["destdir"]
    assert rc == 0, out
    yield dest, before, after, out


def test_every_file_is_under_destdir_where_the_docs_say(staged, final_paths):
    dest, _, _, out = staged
    for what, path in final_paths.items():
        staged_path = Path(f"{dest}{path}")
        assert staged_path.exists() or staged_path.is_symlink(), f"{what}: {staged_path} missing\n{out}"
    assert os.readlink(f"{dest}/usr/local/sbin/snatgw") == "/opt/snatgw/bin/snatgw"  # the final path
    unit = Path(f"{dest}{final_paths['unit']}").read_text()
    assert "ExecStart=/usr/local/sbin/snatgw run /etc/snatgw/snatgw.conf" in unit
    assert str(dest) not in unit


def test_nothing_names_the_staging_root(staged):
    dest = staged[0]
    hits = subprocess.run(["grep", "-rlI", "--", str(dest), f"{dest}/opt/snatgw/bin", f"{dest}/usr", f"{dest}/etc"],
                          capture_output=True, text=True).stdout.split()  # fmt: skip
    assert hits == []
    cfg = Path(f"{dest}/opt/snatgw/pyvenv.cfg").read_text()
    assert str(dest) not in cfg


def test_the_staged_snatgw_runs(staged):
    dest = staged[0]
    p = subprocess.run([f"{dest}/opt/snatgw/bin/python", "-m", "snatgw.cli.main", "--help"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0 and all(v in p.stdout for v in VERBS)
    # the package is the installed copy in the staged venv, not this checkout
    p = subprocess.run([f"{dest}/opt/snatgw/bin/python", "-c", "import snatgw; print(snatgw.__file__)"],
                       capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})  # fmt: skip
    assert p.stdout.startswith(f"{dest}/opt/snatgw/lib/")


def test_nothing_is_written_outside_destdir(staged):
    _, before, after, _ = staged
    assert after == before
