"""The two `make install`s of this tier, started together once per session: each builds a venv
and pip-installs this tree (~11 s, most of it on one CPU), so on two CPUs the pair takes about
as long as one.  They cannot build in one source tree at once (setuptools builds in ./build,
which scripts/install.sh clears first), so the staged (DESTDIR) one runs from a copy of the
tree's files, as a package build does."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: where docs/operations.md ("Installing on a host") says the default install puts things
FINAL = {
    "venv": "/opt/snatgw",
    "sbin": "/usr/local/sbin/snatgw",
    "unit": "/usr/local/lib/systemd/system/snatgw.service",
    "conf": "/etc/snatgw/snatgw.conf",
    "example": "/etc/snatgw/snatgw.conf.example",
    "man": "/usr/local/share/man/man8/snatgw.8.gz",
    "completion": "/usr/local/share/bash-completion/completions/snatgw",
    "doc": "/usr/local/share/doc/snatgw/operations.md",
}
WATCHED = list(FINAL.values()) + ["/opt/snatgw.old", "/etc/snatgw", "/usr/local/share/doc/snatgw"]


def snapshot(paths) -> dict[str, tuple | None]:
    """What each final path on the host is now (None: absent): type, size, mtime, link target."""
    out = {}
    for p in paths:
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            out[p] = None
            continue
        out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, os.readlink(p) if os.path.islink(p) else None)
    return out


def _start(argv: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, Path]:
    f = open(log, "w")
    try:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, text=True, env=env), log
    finally:
        f.close()


def _finish(p: subprocess.Popen, log: Path, timeout: float) -> tuple[int, str]:
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        rc = -9
    return rc, log.read_text()


@pytest.fixture(scope="session")
def final_paths():
    return dict(FINAL)


@pytest.fixture(scope="session")
def make_installs(tmp_path_factory):
    """{"prefix": (tmp root, paths, argv, env, rc, output), "destdir": (DESTDIR, final paths
    before, after, rc, output)}: `make install` into temporary PREFIX/SNATGW_HOME/SYSCONFDIR
    (with an operator's snatgw.conf already there) and `make install DESTDIR=...` (default
    paths), run at the same time."""
    env = {**os.environ, "SNATGW_NO_APT": "1"}  # make test's setup already installed the packages
    t = tmp_path_factory.mktemp("inst")
    paths = {"PREFIX": t / "usr/local", "SNATGW_HOME": t / "opt/snatgw", "SYSCONFDIR": t / "etc"}
    mine = t / "etc/snatgw/snatgw.conf"
    mine.parent.mkdir(parents=True)
    mine.write_text("# the operator's own config\nvirtual_server fwmark 1 {\n}\n")
    argv = ["make", "-s", "-C", str(ROOT)] + [f"{k}={v}" for k, v in paths.items()]

    base = tmp_path_factory.mktemp("destdir")
    dest, tree = base / "stage", base / "src"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".cache", "results"))
    denv = dict(env)
    denv.pop("PREFIX", None)
    before = snapshot(WATCHED)
    staged = _start(["make", "-s", "-C", str(tree), f"DESTDIR={dest}", "install"], denv, base / "make.log")
    try:
        rc, out = _finish(*_start(argv + ["install"], env, t.parent / f"{t.name}-make.log"), 600)
    finally:
        drc, dout = _finish(*staged, 600)
    yield {"prefix": (t, paths, argv, env, rc, out), "destdir": (dest, before, snapshot(WATCHED), drc, dout)}
