"""`snatgw flush`: the verb over the control socket of an in-process daemon (FakeBackend), by
listing number, stable id, inside address, SNAT address, or all; refusals of unclear requests."""

from __future__ import annotations

import json

import pytest

from snatgw.cli.main import main


def sessions(running) -> list[dict]:
    return running.req(op="sessions")["sessions"]


def test_flush_by_listing_number_removes_that_rules_sessions(running, capsys):
    """--rule N names the rule listed #N (priority order of the running rules)."""
    a, b = running.syn(), running.udp()
    n = next(r["priority"] for r in running.req(op="rules")["rules"] if r["rule_id"] == a.rule.rule_id)
    assert main(["flush", "--socket", running.sock, "--rule", str(n)]) == 0
    assert capsys.readouterr().out.strip() == "flushed 1 session"
    assert [s["rule_id"] for s in sessions(running)] == [b.rule.rule_id]


def test_flush_by_stable_id_inside_and_nat_address(running, capsys):
    """--rule-id, --inside and --nat each remove just their sessions; -j prints the answer."""
    a = running.syn()
    running.syn(src="198.18.40.11")
    u = running.udp()
    assert main(["flush", "--socket", running.sock, "--inside", "198.18.40.11", "-j"]) == 0
    assert json.loads(capsys.readouterr().out) == {"flushed": 1, "inside": "198.18.40.11"}
    assert main(["flush", "--socket", running.sock, "--nat", str(u.nat[0]), "--rule-id", str(u.rule.rule_id)]) == 0
    assert [s["inside"] for s in sessions(running)] == [f"198.18.40.10:40000"]
    assert main(["flush", "--socket", running.sock, "--rule-id", str(a.rule.rule_id)]) == 0
    assert sessions(running) == []


def test_flush_all_removes_every_session(running, capsys):
    """--all empties the table and says how many went."""
    running.syn(), running.udp()
    assert main(["flush", "--socket", running.sock, "--all"]) == 0
    assert "flushed 2 sessions" in capsys.readouterr().out and sessions(running) == []


@pytest.mark.parametrize("argv,msg", [
    ([], "say which sessions"),
    (["--all", "--inside", "198.18.40.10"], "give it alone"),
    (["--rule", "1", "--rule-id", "5"], "not both"),
    (["--inside", "198.18.40"], "--inside: expected an IPv4 address"),
])
def test_unclear_flush_requests_are_refused_and_flush_nothing(running, capsys, argv, msg):
    """No filter, --all with filters, two rule selectors, a bad address: exit 2, nothing removed."""
    running.syn()
    assert main(["flush", "--socket", running.sock, *argv]) == 2
    assert msg in capsys.readouterr().err and len(sessions(running)) == 1


def test_flush_of_a_rule_number_beyond_the_listing_is_refused(running, capsys):
    """--rule 9 with 3 running rules: the daemon refuses, naming the count; nothing removed.
    One line, the verb named once (it said `snatgw flush: flush: no rule #9 ...`)."""
    running.syn()
    assert main(["flush", "--socket", running.sock, "--rule", "9"]) == 2
    assert capsys.readouterr().err == "snatgw flush: no rule #9 (the running config has 3 rules)\n"
    assert len(sessions(running)) == 1


def test_flush_without_a_daemon_exits_with_the_daemon_code(tmp_path, capsys):
    """No daemon on the socket: exit 4 (EXIT_DAEMON) with the socket named."""
    assert main(["flush", "--socket", str(tmp_path / "none.sock"), "--all"]) == 4
    assert "none.sock" in capsys.readouterr().err


def test_flush_help_states_the_exit_status_it_gives_without_a_daemon(tmp_path, capsys):
    """The help said 3 (EXIT_BACKEND) while flush exits 4 (EXIT_DAEMON) with no daemon."""
    with pytest.raises(SystemExit):
        main(["flush", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "4 when no daemon answers" in text and "3 when" not in text
    assert main(["flush", "--socket", str(tmp_path / "none.sock"), "--all"]) == 4


def test_a_deleted_rules_sessions_are_listed_and_flushed_by_the_id_the_listing_shows(running, capsys):
    """A rule deleted with live sessions: `conns` labels them `id:<hex>` (no #N any more); that
    label, as shown, selects them in `conns --rule` and `flush --rule-id` (with the decimal and
    0x forms).  Both refused it (exit 2): flush took decimal only, conns decimal or 0x."""
    a, b = running.syn(), running.udp()
    assert running.req(op="adm", commands=[["-H", "-f", "1", "-F", "198.18.40.0/24", "-W", "198.19.2.1",
                                            "--oif", "eth1"]])["ok"]
    assert main(["conns", "--socket", running.sock]) == 0
    label = f"id:{a.rule.rule_id:08x}"
    assert any(line.split()[-1] == label for line in capsys.readouterr().out.splitlines())
    assert main(["conns", "--json", "--socket", running.sock, "--rule", label]) == 0
    assert [json.loads(x)["rule_id"] for x in capsys.readouterr().out.splitlines()] == [a.rule.rule_id]
    assert main(["flush", "--socket", running.sock, "--rule-id", label]) == 0
    assert capsys.readouterr().out.strip() == "flushed 1 session"
    assert main(["flush", "--socket", running.sock, "--rule-id", hex(b.rule.rule_id)]) == 0
    assert sessions(running) == []


@pytest.mark.parametrize("value", ["id:xyz", "7q", "id:"])
def test_a_rule_id_that_is_no_number_is_refused(running, capsys, value):
    running.syn()
    assert main(["flush", "--socket", running.sock, "--rule-id", value]) == 2
    assert "--rule-id" in capsys.readouterr().err and len(sessions(running)) == 1
