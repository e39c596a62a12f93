"""`snatgw conns` and `snatgw stats` against an in-process daemon on the FakeBackend, and their
behaviour when no daemon runs.  No root."""

from __future__ import annotations

import json

import pytest


from snatgw.cli.main import main as cli
from snatgw.layout import Reason




def test_conns_table_has_the_documented_columns_and_rule_numbers(running, capsys):
    """The table shows proto, inside, remote, nat, state, idle, expires and the rule's priority."""
    res = running.syn()
    running.clock.t += 5
    assert cli(["conns", "--socket", running.sock]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["proto", "inside", "remote", "nat", "state", "idle", "expires", "rule"]
    nat = f"{res.nat[0]}:{res.nat[1]}"
    assert out[1].split() == ["tcp", "198.18.40.10:40000", "203.0.113.10:80", nat, "SYN_RECV", "5s", "235s", "#2"]
    assert "#2: from 198.18.40.0/24 gw 198.19.2.1 oif eth1" in "\n".join(out)


def jsonl(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_conns_json_lists_sessions_with_both_tuples(running, capsys):
    """--json streams JSON lines: one session per line with inside, remote, nat, state, rule."""
    a, b = running.syn(), running.udp()
    assert cli(["conns", "--json", "--socket", running.sock]) == 0
    got = jsonl(capsys.readouterr().out)
    assert {s["inside"] for s in got} == {"198.18.40.10:40000", "198.18.50.10:5353"}
    assert {s["rule_id"] for s in got} == {a.rule.rule_id, b.rule.rule_id}
    assert {s["rule"] for s in got} == {"#2", "#3"}


def test_conns_of_one_rule(running, capsys):
    """--rule N keeps only the sessions of the rule with priority N."""
    running.syn(), running.udp()
    assert cli(["conns", "--json", "--rule", "3", "--socket", running.sock]) == 0
    assert [s["proto"] for s in jsonl(capsys.readouterr().out)] == ["udp"]


def test_conns_filters_and_limit(running, capsys):
    """--inside, --remote, --rport, --proto, --state, --nat select; --limit bounds the count."""
    a = running.syn()
    running.syn(sport=40001), running.udp()
    for argv, want in ((["--proto", "tcp"], 2), (["--proto", "udp"], 1), (["--inside", "198.18.50.0/24"], 1),
                       (["--state", "syn_recv"], 2), (["--rport", "80"], 2), (["--remote", "198.51.100.0/24"], 1), (["--remote", "192.0.2.0/24"], 0),
                       (["--nat", str(a.nat[0]), "--proto", "tcp"], 2), (["--limit", "1"], 1), (["--limit", "0"], 0)):
        assert cli(["conns", "--json", "--socket", running.sock, *argv]) == 0
        assert len(jsonl(capsys.readouterr().out)) == want, argv


def test_conns_limit_0_does_not_say_there_are_no_sessions(running, capsys):
    """The text listing with --limit 0 says it listed none, not that there are none."""
    running.syn()
    assert cli(["conns", "--socket", running.sock, "--limit", "0"]) == 0
    assert capsys.readouterr().out.strip() == "no sessions listed (--limit 0)"


def test_conns_bad_filter_is_a_clear_error(running, capsys):
    for argv, msg in ((["--state", "nope"], "--state: expected one of"), (["--inside", "1.2.3"], "bad filter"),
                      (["--rule", "x7"], "--rule: expected"), (["--rport", "70000"], "--rport")):
        assert cli(["conns", "--socket", running.sock, *argv]) == 2
        assert msg in capsys.readouterr().err


def test_an_empty_address_filter_is_an_error_not_every_session(running, capsys):
    """`conns --inside "$HOST"` with HOST unset listed every session, as if no filter were given."""
    running.syn(), running.udp()
    for opt, what in (("--inside", "address or net"), ("--nat", "address"), ("--remote", "address or net")):
        assert cli(["conns", "--socket", running.sock, opt, ""]) == 2
        cap = capsys.readouterr()
        assert cap.err == f"snatgw conns: {opt}: expected an {what}, got nothing\n" and cap.out == ""


def test_stats_json_counts_per_rule_with_its_text_and_per_reason(running, capsys):
    """stats --json: packets/bytes/sessions (made) and live per rule in priority order, reasons
    by Reason name."""
    running.syn(), running.syn(sport=40001), running.udp()
    running.clock.t += 250  # the SYNs expire (240 s), the UDP session stays (300 s): rule #2 made 2, has 0
    assert running.backend.expire() == 2
    assert cli(["stats", "--json", "--socket", running.sock]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_prio = {r["priority"]: r for r in doc["rules"]}
    assert by_prio[2]["sessions"] == 2 and by_prio[2]["packets"] == 2 and by_prio[2]["bytes"] == 80
    assert (by_prio[2]["live"], by_prio[3]["live"], by_prio[1]["live"]) == (0, 1, 0)
    assert by_prio[2]["rule"].startswith("from 198.18.40.0/24 gw 198.19.2.1 oif eth1")
    assert by_prio[3]["sessions"] == 1 and by_prio[1]["packets"] == 0
    assert doc["reasons"] == {Reason.XLATE_NEW.name: 3} and doc["sessions"] == 1


def test_stats_table_lists_rules_and_reasons(running, capsys):
    """The text form has a rule table and a reason table."""
    running.udp()
    assert cli(["stats", "--socket", running.sock]) == 0
    out = capsys.readouterr().out
    assert "rule  packets  bytes  sessions  text" in out and "XLATE_NEW  1" in out


def test_adm_connection_listing_shows_the_snat_address_as_local(running, capsys):
    """adm -L -n -c prints the session with local = SNAT address:port, expire as mm:ss."""
    res = running.syn()
    assert cli(["adm", "-Lnc", "--socket", running.sock]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line.split() == ["TCP", "04:00", "SYN_RECV", "198.18.40.10:40000", "203.0.113.10:80",
                            f"{res.nat[0]}:{res.nat[1]}", "203.0.113.10:80"]


def test_no_daemon_and_no_pins_is_a_clear_error(tmp_path, capsys):
    """Without a daemon or pinned maps, conns exits 4 naming both places it looked."""
    sock, pins = str(tmp_path / "none.sock"), str(tmp_path / "nopins")
    assert cli(["conns", "--socket", sock, "--pin-dir", pins]) == 4
    err = capsys.readouterr().err
    assert "no snatgw daemon on" in err and "nopins" in err


def test_daemon_sessions_op_is_bounded_and_says_when_it_cut(running):
    """The `sessions` op filters and limits on the daemon's side and never carries more than
    MAX_SESSIONS_REPLY sessions; `truncated` says when there were more."""
    from snatgw.daemon.client import RemoteError, call
    from snatgw.daemon.service import MAX_SESSIONS_REPLY

    running.syn(), running.syn(sport=40001), running.udp()
    r = call(running.sock, {"op": "sessions", "limit": 2})
    assert len(r["sessions"]) == 2 and r["truncated"] is True
    r = call(running.sock, {"op": "sessions", "filter": {"proto": 17}})
    assert [s["proto"] for s in r["sessions"]] == ["udp"] and r["truncated"] is False
    with pytest.raises(RemoteError, match="unknown session filter field"):
        call(running.sock, {"op": "sessions", "filter": {"bogus": 1}})
    assert MAX_SESSIONS_REPLY <= 100_000


def test_nft_lists_an_echo_sessions_remote_with_port_0_as_bpf_and_the_audit_log_do():
    """conntrack gives an echo's identifier as both its ports; the remote end has none: nft's
    listing showed `203.0.113.10:2501` (and `--rport 2501` matched it) where bpf's and nft's own
    audit records say port 0.  The inside and SNAT ends keep the identifier."""
    from snatgw.config.schema import Settings
    from snatgw.datapath.nft import render as R
    from snatgw.datapath.nft.backend import NftBackend

    b = NftBackend.reader(Settings(), {})
    d = {"proto": "icmp", "state": None, "assured": False, "timeout": 50, "src": "198.18.40.10", "sport": "2501",
         "dst": "203.0.113.10", "dport": "2501", "rsrc": "203.0.113.10", "rdst": "198.19.2.73", "rsport": "2501",
         "rdport": "2501", "mark": R.MARK_TAG}
    s = b._session(d, {"ICMP": 60})
    assert (s.inside, s.remote, s.nat) == ("198.18.40.10:2501", "203.0.113.10:0", "198.19.2.73:2501")


@pytest.mark.parametrize("form", ["names", "numbers"])
def test_session_readers_take_the_status_timeouts_by_name_and_by_old_numbers(running, monkeypatch, form):
    """`status` answers the timeouts by the `timeout` keyword's names (tcp_established, udp, ...);
    the CLI's readers of pinned maps (bpf) and of conntrack (nft), which give each session's
    `expires` from them, take that form and the state numbers an older daemon answers during an
    upgrade, with the same result."""
    from snatgw.config.schema import TIMEOUT_NAMES, Settings
    from snatgw.daemon import client
    from snatgw.datapath.bpf import backend as bpf_backend
    from snatgw.datapath.nft.backend import NftBackend
    from snatgw.layout import CtState

    st = running.req(op="status")["timeouts"]
    assert set(st) == set(TIMEOUT_NAMES) and st["udp"] == 300 and st["tcp_established"] == 7440
    answer = {**st, "udp": 20, "tcp_time_wait": 7}
    if form == "numbers":
        answer = {str(int(TIMEOUT_NAMES[k])): v for k, v in answer.items()}
    seen = []

    class Reader:
        def iter_sessions(self, flt, limit):
            return iter(())

        def stop(self):
            pass

    def reader(*args):  # read_pinned(pin_dir, settings), NftBackend.reader(settings, marks, netns)
        seen.extend(a for a in args if isinstance(a, Settings))
        return Reader()

    monkeypatch.setattr(bpf_backend, "read_pinned", reader)
    monkeypatch.setattr(NftBackend, "reader", staticmethod(reader))
    assert list(client._pinned_sessions("/nonexistent", None, None, answer)) == []
    assert list(client._conntrack_sessions({"timeouts": answer, "marks": {}}, None, None)) == []
    for settings in seen:
        assert (settings.timeout(CtState.UDP), settings.timeout(CtState.TIME_WAIT),
                settings.timeout(CtState.ESTABLISHED)) == (20, 7, 7440)
    assert len(seen) == 2


def test_a_rule_number_out_of_range_that_is_no_rule_or_session_id_is_an_error(running, capsys):
    """With 3 rules, `--rule 9` is no rule number; taken as a rule id it named no rule and no
    session, and conns listed nothing, exit 0, as if there were no sessions: a mistyped rule
    number.  Now exit 2 (a bad filter) saying so, with nothing on stdout, in both forms; with
    other filters or --limit 0 as well."""
    running.syn(), running.udp()
    for extra in ([], ["--json"], ["--proto", "udp"], ["--limit", "0"]):
        assert cli(["conns", "--socket", running.sock, "--rule", "9", *extra]) == 2, extra
        out, err = capsys.readouterr()
        assert out == "" and "--rule 9: no rule #9 (there are 3 rules) and no sessions of rule id 9" in err, extra
    assert cli(["conns", "--socket", running.sock, "--rule", "id:0000beef"]) == 2
    assert "no running rule has id id:0000beef (there are 3 rules) and no sessions of it" in capsys.readouterr().err
    assert cli(["conns", "--socket", running.sock, "--rule", "3", "--proto", "tcp"]) == 0  # a rule: empty is fine
    assert capsys.readouterr().out.strip() == "no sessions"


def test_a_deleted_rules_id_lists_its_sessions_and_is_no_error_while_other_filters_leave_none(running, capsys):
    """A rule deleted with live sessions: its id names no running rule but sessions in the table,
    so `--rule id:<hex>` lists them, and with a filter that leaves none it says "no sessions"."""
    a = running.syn()
    assert running.req(op="adm", commands=[["-H", "-f", "1", "-F", "198.18.40.0/24", "-W", "198.19.2.1",
                                            "--oif", "eth1"]])["ok"]
    label = f"id:{a.rule.rule_id:08x}"
    assert cli(["conns", "--json", "--socket", running.sock, "--rule", label]) == 0
    assert [json.loads(x)["rule_id"] for x in capsys.readouterr().out.splitlines()] == [a.rule.rule_id]
    for extra in (["--proto", "udp"], ["--limit", "0"]):
        assert cli(["conns", "--socket", running.sock, "--rule", str(a.rule.rule_id), *extra]) == 0, extra
        assert capsys.readouterr().out.strip() in ("no sessions", "no sessions listed (--limit 0)")


@pytest.mark.parametrize("backend", ["bpf", "nft"])
def test_the_unknown_rule_error_on_the_bpf_and_nft_daemons_streams(running, monkeypatch, capsys, tmp_path, backend):
    """The check is the CLI's, whoever streams: a bpf daemon's sessions come from its pinned maps
    read here, an nft daemon's from conntrack read here (session_stream picks the reader from the
    daemon's status; stand-ins for the readers, filtering a table of one session of rule id 9)."""
    from snatgw.daemon import client

    pins = tmp_path / "pins"
    pins.mkdir()
    real_call = client.call

    def call(sock, req, timeout=30.0):
        resp = real_call(sock, req, timeout)
        if req["op"] == "status":
            resp.update(backend=backend, pin_dir=str(pins), marks={})
        return resp

    table = [{"proto": "udp", "inside": "198.18.40.10:5000", "remote": "203.0.113.10:53", "nat": "198.19.2.71:5000",
              "state": "UDP", "idle": 0.0, "expires": 300.0, "rule_id": 9}]
    asked = []

    def stream(flt):
        asked.append(flt)
        return iter([s for s in table if flt.rule_id in (None, s["rule_id"])])

    monkeypatch.setattr(client, "call", call)
    monkeypatch.setattr(client, "_pinned_sessions", lambda d, flt, limit, t=None: stream(flt))
    monkeypatch.setattr(client, "_conntrack_sessions", lambda st, flt, limit: stream(flt))
    assert cli(["conns", "--json", "--socket", running.sock, "--rule", "9"]) == 0  # a deleted rule's session
    assert [json.loads(x)["rule"] for x in capsys.readouterr().out.splitlines()] == ["id:00000009"]
    assert cli(["conns", "--socket", running.sock, "--rule", "8"]) == 2
    assert "--rule 8: no rule #8 (there are 3 rules) and no sessions of rule id 8" in capsys.readouterr().err
    assert [f.rule_id for f in asked] == [9, 8]
