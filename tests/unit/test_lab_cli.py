"""`snatgw lab`'s argument errors, without building a lab: each is exit 2 with one line that
says what is wrong (a bad argument, as everywhere else), never a lab that failed (exit 3)."""

from __future__ import annotations

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
])  # fmt: skip
def test_lab_argument_errors_exit_2_saying_what(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "unrecognized arguments" not in err, err
