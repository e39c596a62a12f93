"""scripts/setup.sh's promtool step on a machine like a fresh Debian 12 one, with apt-get faked
on PATH (nothing downloaded or installed): no apt lists yet (the first download fails, an
update and a second download work), a download that fails (a clear error naming apt's words,
no promtool left behind, so a rerun tries again), a package without promtool, and a rerun
once promtool is there (nothing asked of apt)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_APT = """#!/bin/sh
echo "$*" >> "$CALLS"
case "$1" in
  update) [ "$APT_MODE" = fail ] && { echo "E: cannot reach the mirror" >&2; exit 100; }
          touch "$STATE/lists"; exit 0;;
  download)
    if [ "$APT_MODE" = fail ] || [ ! -e "$STATE/lists" ]; then
      echo "E: Unable to locate package prometheus" >&2; exit 100
    fi
    cp "$DEB" ./prometheus_2.42.0+ds-5+b5_amd64.deb;;
esac
"""


def _deb(tmp: Path, with_promtool: bool) -> Path:
    pkg = tmp / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: prometheus\nVersion: 2.42.0+ds-5+b5\nArchitecture: all\nMaintainer: t <t@example.org>\n"
        "Description: fake\n")  # fmt: skip
    (pkg / "usr" / "bin").mkdir(parents=True)
    name = "promtool" if with_promtool else "prometheus"
    (pkg / "usr" / "bin" / name).write_text("#!/bin/sh\necho fake promtool\n")
    out = tmp / "prometheus.deb"
    subprocess.run(["dpkg-deb", "--build", "-Znone", str(pkg), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def tree(tmp_path):
    """A copy of setup.sh in a tree whose packages and venv are all there already."""
    t = tmp_path / "tree"
    (t / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", t / "scripts" / "setup.sh")
    (t / "pyproject.toml").write_text("")
    (t / ".venv" / "bin").mkdir(parents=True)
    (t / ".venv" / "bin" / "python").symlink_to(shutil.which("true"))
    stamp = t / ".venv" / ".snatgw-installed"
    stamp.touch()
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml: no pip install
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text(FAKE_APT)
    (fake / "dpkg-query").write_text("#!/bin/sh\nprintf 'install ok installed'\n")
    for f in fake.iterdir():
        f.chmod(0o755)
    (tmp_path / "state").mkdir()
    return t


def _setup(tree: Path, mode: str, deb: Path):
    tmp = tree.parent
    env = dict(os.environ, PATH=f"{tmp / 'bin'}:{os.environ['PATH']}", CALLS=str(tmp / "calls"),
               STATE=str(tmp / "state"), APT_MODE=mode, DEB=str(deb))  # fmt: skip
    return subprocess.run(["bash", str(tree / "scripts" / "setup.sh")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def _calls(tree: Path) -> list[str]:
    f = tree.parent / "calls"
    return f.read_text().splitlines() if f.exists() else []


def test_no_apt_lists_then_update_then_a_rerun_asks_apt_nothing(tree):
    deb = _deb(tree.parent, with_promtool=True)
    r = _setup(tree, "ok", deb)
    assert r.returncode == 0, r.stdout + r.stderr
    promtool = tree / ".venv" / "bin" / "promtool"
    assert os.access(promtool, os.X_OK) and "fake promtool" in promtool.read_text()
    assert _calls(tree) == ["download prometheus", "update -qq", "download prometheus"]
    assert not (tree / ".venv" / "bin" / "promtool.part").exists()
    r = _setup(tree, "fail", deb)  # idempotent: promtool is there, apt is not asked
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(_calls(tree)) == 3


def test_a_failed_download_is_a_clear_error_and_leaves_no_promtool(tree):
    r = _setup(tree, "fail", _deb(tree.parent, with_promtool=True))
    assert r.returncode != 0
    assert "could not download Debian's prometheus package" in r.stderr, r.stderr
    assert "cannot reach the mirror" in r.stderr or "Unable to locate package" in r.stderr, r.stderr
    left = sorted(p.name for p in (tree / ".venv" / "bin").iterdir())
    assert left == ["python"], left


def test_a_package_without_promtool_is_a_clear_error_and_leaves_no_promtool(tree):
    r = _setup(tree, "ok", _deb(tree.parent, with_promtool=False))
    assert r.returncode != 0
    assert "no ./usr/bin/promtool in prometheus_" in r.stderr, r.stderr
    left = sorted(p.name for p in (tree / ".venv" / "bin").iterdir())
    assert left == ["python"], left
