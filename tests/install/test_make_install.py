"""`make install` on this host into a temporary prefix (root, as on a real host): snatgw runs from
the installed path, the installed unit passes `systemd-analyze verify` (its ExecStart exists,
its man page is found), an existing config is kept, the man page renders cleanly, the bash
completion completes, and `make uninstall` removes everything but the config."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from snatgw import __version__
from snatgw.cli.main import VERBS

pytestmark = [pytest.mark.root]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(make_installs):
    """make install into a temporary PREFIX, SNATGW_HOME and SYSCONFDIR holding an operator's
    snatgw.conf (tests/install/conftest.py runs it beside the DESTDIR one)."""
    t, paths, argv, env, rc, out = make_installs["prefix"]
    assert rc == 0, out
    yield t, paths, argv, env


def test_installed_snatgw_runs_from_the_sbin_symlink(installed):
    """PREFIX/sbin/snatgw --help lists every verb; --version names this version."""
    t, paths, _, _ = installed
    exe = paths["PREFIX"] / "sbin/snatgw"
    assert exe.is_symlink() and os.readlink(exe) == str(paths["SNATGW_HOME"] / "bin/snatgw")
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and all(v in p.stdout for v in VERBS)
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == f"snatgw {__version__}"
    assert "snatgw.new" not in (paths["SNATGW_HOME"] / "bin/snatgw").read_text()


def test_installed_unit_passes_systemd_analyze_verify(installed):
    """The installed unit names the installed snatgw and config, and systemd-analyze verify (which
    checks that ExecStart/ExecStartPre exist and that man:snatgw(8) is found) is silent."""
    t, paths, _, _ = installed
    unit = paths["PREFIX"] / "lib/systemd/system/snatgw.service"
    text = unit.read_text()
    exe, conf = paths["PREFIX"] / "sbin/snatgw", paths["SYSCONFDIR"] / "snatgw/snatgw.conf"
    assert f"ExecStart={exe} run {conf}" in text and f"ExecStartPre={exe} check {conf}" in text
    assert "/usr/local/bin/snatgw" not in text
    env = {**os.environ, "MANPATH": str(paths["PREFIX"] / "share/man")}
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env, timeout=60)
    assert (p.returncode, p.stdout + p.stderr) == (0, "")


def test_an_existing_config_is_kept_and_the_example_installed_beside_it(installed):
    """make install never overwrites snatgw.conf; snatgw.conf.example is the shipped example."""
    t, paths, _, _ = installed
    d = paths["SYSCONFDIR"] / "snatgw"
    assert (d / "snatgw.conf").read_text().startswith("# the operator's own config")
    assert (d / "snatgw.conf.example").read_text() == (ROOT / "src/snatgw/packaging/snatgw.conf.example").read_text()
    alerts = paths["PREFIX"] / "share/doc/snatgw/prometheus/snatgw-alerts.yml"  # the example alert rules too
    assert alerts.read_text() == (ROOT / "examples/prometheus/snatgw-alerts.yml").read_text()


def test_man_page_renders_without_warnings_and_names_every_verb(installed):
    """snatgw.8.gz is found by man through MANPATH and renders with groff -ww without a warning."""
    t, paths, _, _ = installed
    page = paths["PREFIX"] / "share/man/man8/snatgw.8.gz"
    roff = gzip.decompress(page.read_bytes()).decode()
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=roff, capture_output=True, text=True)
    assert (p.returncode, p.stderr) == (0, "")
    assert all(f'.SS "{v.replace("-", chr(92) + "-")}"' in roff for v in VERBS)
    env = {**os.environ, "MANPATH": str(paths["PREFIX"] / "share/man")}
    p = subprocess.run(["man", "-w", "snatgw"], capture_output=True, text=True, env=env)
    assert p.stdout.strip() == str(page)


def test_bash_completion_completes_verbs_and_options(installed):
    """The installed completion, sourced in bash, completes a verb and a verb's options."""
    t, paths, _, _ = installed
    comp = paths["PREFIX"] / "share/bash-completion/completions/snatgw"
    script = (f"source {comp}; t() {{ COMP_WORDS=(\"$@\"); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); _snatgw; "
              'echo "${COMPREPLY[*]}"; }; t snatgw fl; t snatgw flush --r; t snatgw stats -')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True).stdout.splitlines()
    assert out[0] == "flush" and out[1] == "--rule --rule-id" and "--json" in out[2].split()


def test_uninstall_removes_everything_but_the_config(installed):
    """make uninstall (same paths) leaves only etc/snatgw/snatgw.conf behind.  Runs last."""
    t, paths, argv, env = installed
    p = subprocess.run(argv + ["uninstall"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    left = sorted(str(f.relative_to(t)) for f in t.rglob("*") if f.is_file() or f.is_symlink())
    assert left == ["etc/snatgw/snatgw.conf"]
