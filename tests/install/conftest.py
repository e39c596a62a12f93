"""The two `make install`s of this tier, started together once per session: each builds a venv
and pip-installs this tree (~11 s, most of it on one CPU), so on two CPUs the pair takes about
as long as one.  They cannot build in one source tree at once (setuptools builds in ./build,
which scripts/install.sh clears first), so the staged (DESTDIR) one runs from a copy of the
tree's files, as a package build does.

In a run that also holds EARLY_START (the whole suite) they start in the background as that test
begins: it and the path tests (tracepath, mtr: ~6 s of waiting for hops) and the NAT traversal
tests after it (~20 s of STUN answers that do not come, their timeouts the client's) leave the
CPUs mostly idle, so the ~25 s of the pair no longer add to the suite (started under CPU-bound
tests instead, they slowed those by half their own time; started at the first NAT traversal
test, once those ran their options two at a time, they ran on into the next module's tests).
This tier's tests then run last, and wait for the installs as before; without EARLY_START in the
run they keep their place and start the installs themselves."""

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


#: the test that starts the installs in the background (see the docstring); tests/lab/test_apps.py
#: names this tier at its path tests
EARLY_START = "tests/lab/test_apps.py::test_tracepath_reaches_the_server_with_its_path_mtu"
_launched: dict = {}  # the installs started (once per session): the state _launch returns


def _launch(t: Path, base: Path) -> dict:
    """Start `make install` into temporary PREFIX/SNATGW_HOME/SYSCONFDIR under ``t`` (with an
    operator's snatgw.conf already there) and `make install DESTDIR=...` (default paths) from a
    copy of the tree under ``base``, at the same time; returns what _collect needs."""
    env = {**os.environ, "SNATGW_NO_APT": "1"}  # make test's setup already installed the packages
    paths = {"PREFIX": t / "usr/local", "SNATGW_HOME": t / "opt/snatgw", "SYSCONFDIR": t / "etc"}
    mine = t / "etc/snatgw/snatgw.conf"
    mine.parent.mkdir(parents=True)
    mine.write_text("# the operator's own config\nvirtual_server fwmark 1 {\n}\n")
    argv = ["make", "-s", "-C", str(ROOT)] + [f"{k}={v}" for k, v in paths.items()]

    dest, tree = base / "stage", base / "src"
    shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".cache", "results"))
    denv = dict(env)
    denv.pop("PREFIX", None)
    before = snapshot(WATCHED)
    staged = _start(["make", "-s", "-C", str(tree), f"DESTDIR={dest}", "install"], denv, base / "make.log")
    try:
        prefixed = _start(argv + ["install"], env, t.parent / f"{t.name}-make.log")
    except BaseException:
        _finish(*staged, 0)
        raise
    return {"t": t, "paths": paths, "argv": argv, "env": env, "dest": dest, "before": before,
            "prefixed": prefixed, "staged": staged}


def _collect(s: dict) -> dict:
    """Wait for both installs (600 s at most each) and give what the fixture yields."""
    try:
        rc, out = _finish(*s["prefixed"], 600)
    finally:
        drc, dout = _finish(*s["staged"], 600)
    return {"prefix": (s["t"], s["paths"], s["argv"], s["env"], rc, out),
            "destdir": (s["dest"], s["before"], snapshot(WATCHED), drc, dout)}


class _EarlyStart:
    """Starts the installs as EARLY_START begins; ends any still running at the session's end (a
    run stopped early by -x or ^C)."""

    def __init__(self, config):
        self.config = config

    def pytest_runtest_setup(self, item):
        if not _launched and item.nodeid == EARLY_START:
            f = self.config._tmp_path_factory
            _launched.update(_launch(f.mktemp("inst"), f.mktemp("destdir")))

    def pytest_sessionfinish(self):
        for key in ("prefixed", "staged"):
            p, _ = _launched.get(key, (None, None))
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def _mine(item) -> bool:
    return Path(item.path).is_relative_to(Path(__file__).parent)


def pytest_collection_modifyitems(session, config, items):
    """Run as root with EARLY_START and this tier selected: this tier's tests go last (in their
    order), after the installs had EARLY_START and the tests after it to run under."""
    if os.geteuid() != 0 or not hasattr(config, "_tmp_path_factory"):
        return
    if any(i.nodeid == EARLY_START for i in items) and any(_mine(i) for i in items):
        items[:] = [i for i in items if not _mine(i)] + [i for i in items if _mine(i)]
        config.pluginmanager.register(_EarlyStart(config), "snatgw-install-early-start")


@pytest.fixture(scope="session")
def make_installs(tmp_path_factory):
    """{"prefix": (tmp root, paths, argv, env, rc, output), "destdir": (DESTDIR, final paths
    before, after, rc, output)}: `make install` into temporary PREFIX/SNATGW_HOME/SYSCONFDIR
    (with an operator's snatgw.conf already there) and `make install DESTDIR=...` (default
    paths), run at the same time (started early in a whole-suite run: see the docstring)."""
    if not _launched:
        _launched.update(_launch(tmp_path_factory.mktemp("inst"), tmp_path_factory.mktemp("destdir")))
    yield _collect(_launched)
