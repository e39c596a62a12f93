"""`snatgw lab`'s argument errors, without building a lab: each is exit 2 with one line that
says what is wrong (a bad argument, as everywhere else), never a lab that failed (exit 3)."""

from __future__ import annotations

import os

import pytest

from snatgw.cli.main import main

NOLAB = "op18-no-such-lab"


@pytest.mark.parametrize("argv, needle", [
    # a bad --name or --prefix is a bad argument: exit 2 (it was 3, "the lab could not be built")
    (["lab", "up", "--name", "../../etc/x"], "--name: expected 1..32 of [A-Za-z0-9_.-]"),
    (["lab", "up", "--name", "op18x", "--prefix", "BAD"], "--prefix: expected 'sg' then"),
    # the command's own options are the command's (`gw ip -br a`): argparse took -br for one of
    # snatgw's and printed the top-level usage, "unrecognized arguments: -br a"
    (["lab", "exec", "--name", NOLAB, "gw", "ip", "-br", "a"], f"no lab named '{NOLAB}' is up"),
    (["lab", "exec", "--name", NOLAB, "gw", "--", "ip", "-br", "a"], f"no lab named '{NOLAB}' is up"),
    (["lab", "exec", "--name", NOLAB, "gw"], "exec: no command to run in gw"),
    (["lab", "exec", "--name", NOLAB, "gw", "--"], "exec: no command to run in gw"),
    # the other verbs check --name as up does: `status --name ../x` read /run/snatgw/x.json and
    # answered "no lab named '../x' is up; `snatgw lab up --name ../x`" (which up refuses);
    # `status --name ''` listed every lab
    (["lab", "status", "--name", "../x"], "--name: expected 1..32 of [A-Za-z0-9_.-], got '../x'"),
    (["lab", "status", "--name", ""], "--name: expected 1..32 of [A-Za-z0-9_.-], got ''"),
    (["lab", "down", "--name", "a/b"], "--name: expected 1..32 of [A-Za-z0-9_.-], got 'a/b'"),
    (["lab", "exec", "--name", "../../etc/x", "gw", "true"], "--name: expected 1..32"),
])  # fmt: skip
def test_lab_argument_errors_exit_2_saying_what(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "unrecognized arguments" not in err, err


class _Up:
    """`lab up` without building anything: a lab 'op21-up' (prefix sgop21a) whose state says up,
    with the namespaces listed as given; Lab.up fails the test if it is reached."""

    def __init__(self, monkeypatch, namespaces):
        from snatgw.lab import topology

        self.built = []
        lab = topology.Lab(name="op21-up", prefix="sgop21a")
        def load(cls, name="default"):
            return lab if name == lab.name else None

        monkeypatch.setattr(topology.Lab, "load", classmethod(load))
        monkeypatch.setattr(topology, "list_netns", lambda: list(namespaces))
        monkeypatch.setattr(topology, "list_labs", lambda unreadable=None: [lab])
        built = self.built
        monkeypatch.setattr(topology.Lab, "_build", lambda lab: built.append(lab.prefix) or 1 / 0)


ALL_UP = [f"sgop21a-{n}" for n in ("in40", "in50", "gw", "isp1", "isp2", "net")]


@pytest.mark.parametrize("extra", [[], ["--prefix", "sgop21a"]])
def test_lab_up_of_a_lab_that_is_up_says_so_and_exits_0(extra, monkeypatch, capsys):
    """The same lab asked for again (same name, same or no --prefix) is up: exit 0, nothing
    built (it was exit 3, "lab failed", as a build that failed)."""
    up = _Up(monkeypatch, ALL_UP)
    assert main(["lab", "up", "--name", "op21-up", *extra]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lab op21-up is up already: prefix sgop21a, namespaces sgop21a-in40 ") and \
        "(nothing done)" in out and not up.built  # fmt: skip


@pytest.mark.parametrize("argv, code, needle", [
    # the name is up with another prefix: a conflict named, a bad argument
    (["--name", "op21-up", "--prefix", "sgop21b"], 2,
     "lab 'op21-up' is up already with prefix sgop21a, not sgop21b: `snatgw lab down --name op21-up` first"),
    # the prefix is another lab's
    (["--name", "op21-other", "--prefix", "sgop21a"], 2,
     "--prefix sgop21a: namespaces sgop21a-in40, sgop21a-in50, sgop21a-gw, sgop21a-isp1, sgop21a-isp2, "
     "sgop21a-net exist already: lab 'op21-up' has it"),
])  # fmt: skip
def test_lab_up_conflicts_exit_2_naming_them(argv, code, needle, monkeypatch, capsys):
    if os.geteuid() != 0:
        pytest.skip("Lab.up asks for root before it looks at the prefix")
    up = _Up(monkeypatch, ALL_UP)
    assert main(["lab", "up", *argv]) == code
    err = capsys.readouterr().err
    assert needle in err and "\n" not in err.strip() and not up.built, err


def test_lab_up_of_a_broken_lab_names_what_is_gone_exit_3(monkeypatch, capsys):
    """Up in its state, but namespaces gone: the lab failed (exit 3), and what to do is said."""
    up = _Up(monkeypatch, ALL_UP[:2])
    assert main(["lab", "up", "--name", "op21-up"]) == 3
    err = capsys.readouterr().err
    assert ("lab 'op21-up' (prefix sgop21a) is up but broken: namespaces sgop21a-gw, sgop21a-isp1, "
            "sgop21a-isp2, sgop21a-net are gone; `snatgw lab down --name op21-up`, then up again") in err
    assert not up.built
