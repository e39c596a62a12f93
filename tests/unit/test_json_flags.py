"""`-j` is `--json` on every verb that prints JSON, and `snatgw adm --json` prints listings as
JSON (and refuses it, changing nothing, where there is nothing to format)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from snatgw.cli.main import build_parser, main

LAB = str(Path(__file__).resolve().parents[2] / "examples" / "lab.conf")


def _subparsers(parser: argparse.ArgumentParser, path=()):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield path + (name,), p
                yield from _subparsers(p, path + (name,))


def test_every_json_option_has_the_short_form_j():
    """Every verb (and sub-verb) with --json also takes -j."""
    with_json = [(path, p) for path, p in _subparsers(build_parser())
                 if any("--json" in a.option_strings for a in p._actions)]
    assert len(with_json) >= 6  # check explain conns stats flush lab status ...
    for path, p in with_json:
        opt = next(a for a in p._actions if "--json" in a.option_strings)
        assert "-j" in opt.option_strings, " ".join(path)


def test_check_j_prints_the_same_json_as_check_json(capsys):
    """`check -j` and `check --json` print the same object."""
    assert main(["check", "-j", LAB]) == 0
    short = json.loads(capsys.readouterr().out)
    assert main(["check", "--json", LAB]) == 0
    assert json.loads(capsys.readouterr().out) == short and short["valid"]


def test_stats_and_conns_take_j(running, capsys):
    """stats -j and conns -j print JSON from the daemon (conns: JSON lines, one per session)."""
    running.syn()
    assert main(["stats", "-j", "--socket", running.sock]) == 0
    assert json.loads(capsys.readouterr().out)["sessions"] == 1
    assert main(["conns", "-j", "--socket", running.sock]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["proto"] == "tcp"


def test_adm_list_json_gives_rules_in_precedence_order_with_session_counts(running, capsys):
    """adm -L -n --json (and -j): service, max_sessions, rules with priority, fields, sessions."""
    a = running.syn()
    for flag in ("--json", "-j"):
        assert main(["adm", "-L", "-n", flag, "--socket", running.sock]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["service"] is True and [r["priority"] for r in d["rules"]] == [1, 2, 3]
        counts = {r["rule_id"]: r["sessions"] for r in d["rules"]}
        assert counts[a.rule.rule_id] == 1 and sum(counts.values()) == 1
        assert d["rules"][0]["from"] == "198.18.40.0/24" and "snat_ip" in d["rules"][0]


def test_adm_list_connections_stats_and_rate_as_json(running, capsys):
    """-L -c --json lists sessions; --stats and --rate carry the counters and the rules."""
    running.syn()
    assert main(["adm", "-L", "-n", "-c", "-j", "--socket", running.sock]) == 0
    (s,) = json.loads(capsys.readouterr().out)["sessions"]
    assert s["proto"] == "tcp" and s["inside"] == "198.18.40.10:40000"
    assert main(["adm", "-L", "--stats", "-j", "--socket", running.sock]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stats"]["reasons"]["XLATE_NEW"] == 1 and len(d["rules"]) == 3
    assert main(["adm", "-L", "--rate", "--json", "--socket", running.sock]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"service", "rules", "rate"}


@pytest.mark.parametrize("argv", [
    ["-K", "-f", "1", "-F", "198.18.60.0/24", "-U", "198.19.2.71", "--json"],
    ["-S", "-j"],
    ["-Z", "--json"],
])
def test_adm_json_where_nothing_is_printed_is_refused_and_changes_nothing(running, capsys, argv):
    """--json on -K, -S, -Z: exit 2 naming the command; the rules stay as they were."""
    before = running.req(op="rules")["rules"]
    assert main(["adm", *argv, "--socket", running.sock]) == 2
    err = capsys.readouterr().err
    assert "--json: only listings" in err and argv[0] in err
    assert running.req(op="rules")["rules"] == before
