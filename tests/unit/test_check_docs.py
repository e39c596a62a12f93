"""docs/config.md shows real output: every `$ snatgw check|explain ...` example in it is run
and each line it shows (except `...` and shortened --json output) appears, in order."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from snatgw.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"


def examples() -> list[tuple[str, list[str]]]:
    out = []
    for block in re.findall(r"```\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        cmd = None
        for line in block.splitlines():
            if line.startswith("$ "):
                cmd = line[2:]
                out.append((cmd, []))
            elif cmd is not None:
                out[-1][1].append(line)
    return [(c, lines) for c, lines in out if c.startswith("snatgw ") and "--json" not in c]


@pytest.mark.parametrize("cmd, shown", examples(), ids=lambda x: x if isinstance(x, str) else "")
def test_doc_example_output_is_real(cmd, shown, capsys, monkeypatch):
    """The lines the doc shows for a command are lines the command prints, in the same order."""
    monkeypatch.chdir(ROOT)
    argv = shlex.split(cmd.replace("; echo $?", ""))[1:]
    rc = main(argv)
    cap = capsys.readouterr()
    got = (cap.out + cap.err).splitlines()
    want = [line for line in shown if line.strip() != "..."]
    while want and not want[-1].strip():  # the blank line before the block's next command
        want.pop()
    if cmd.endswith("; echo $?"):
        assert want.pop() == str(rc)
    pos = 0
    for line in want:
        assert line in got[pos:], f"doc line not in output (after line {pos}): {line!r}"
        pos = got.index(line, pos) + 1


def test_docs_have_examples_of_both_verbs():
    """The doc has runnable examples of check and explain."""
    cmds = [c for c, _ in examples()]
    assert any(c.startswith("snatgw check") for c in cmds) and any(c.startswith("snatgw explain") for c in cmds)
    assert os.path.exists(DOC)


def test_the_keepalived_drop_in_replaces_every_command_of_the_unit():
    """docs/operations.md's drop-in for running the unit on the combined keepalived.conf clears
    and gives again every Exec line of the shipped unit, each with the keepalived file where the
    unit names /etc/snatgw/snatgw.conf: a drop-in that missed one (the reload's check) would
    check or reload the old file while the daemon ran the new one."""
    from importlib.resources import files

    unit = files("snatgw").joinpath("packaging/snatgw.service").read_text().splitlines()
    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    drop = re.search(r"<!-- keepalived-dropin -->\n```\n(.*?)```", ops, re.S).group(1).splitlines()
    assert drop[0] == "[Service]"
    keys = dict.fromkeys(line.split("=", 1)[0] for line in unit if line.startswith("Exec"))
    want = ["[Service]"]
    for k in keys:
        want += [f"{k}="] + [line.replace("/etc/snatgw/snatgw.conf", "/etc/keepalived/keepalived.conf")
                             for line in unit if line.startswith(f"{k}=")]
    assert drop == want
