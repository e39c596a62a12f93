"""`snatgw explain --live`: the running daemon's rules (an in-process daemon on FakeBackend),
whether and how they differ from the file, and what happens without a daemon."""

from __future__ import annotations

import json

from snatgw.cli.main import main

ARGS = ["--src", "198.18.40.10:40000", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1"]


def explain_live(running, capsys, *extra) -> tuple[int, dict]:
    rc = main(["explain", "--live", "--socket", running.sock, *ARGS, *extra, "-j"])
    return rc, json.loads(capsys.readouterr().out)


def test_live_explain_uses_the_rules_adm_changed_and_names_the_difference(running, capsys):
    """After `adm -k` gives rule 2 ISP2's pool, --live answers with an ISP2 address (the file
    still says ISP1) and lists the edit; the file's explanation still gives ISP1."""
    assert running.req(op="adm", commands=[[
        "-k", "-f", "1", "-F", "198.18.40.0/24", "-W", "198.19.2.1", "--oif", "eth1",
        "-U", "198.19.3.71-198.19.3.73", "-O", "sdh"]])["ok"]
    rc, d = explain_live(running, capsys)
    assert rc == 0 and d["snat"]["addr"].startswith("198.19.3.")
    live = d["live"]
    assert live["differs"] and live["config"] == str(running.conf.resolve())
    assert live["only_running"] == live["only_file"] == []
    (c,) = live["changed"]
    assert "snat_ip 198.19.2.71-198.19.2.73" in c["file"] and "snat_ip 198.19.3.71-198.19.3.73" in c["running"]
    assert any("DIFFER" in n for n in d["notes"])
    assert main(["explain", str(running.conf), *ARGS, "-j"]) == 0
    assert json.loads(capsys.readouterr().out)["snat"]["addr"].startswith("198.19.2.")


def test_live_explain_says_when_the_running_rules_equal_the_file(running, capsys):
    """No change since start: --live matches the file's answer and says the rules are the same."""
    rc, d = explain_live(running, capsys)
    assert rc == 0 and d["live"]["differs"] is False
    assert d["notes"][0].startswith("rules of the running daemon") and "the same as" in d["notes"][0]


def test_live_explain_lists_rules_added_and_deleted_through_adm(running, capsys):
    """A rule added with -K shows as running-only, a deleted one as file-only (with its line)."""
    assert running.req(op="adm", commands=[
        ["-K", "-f", "1", "-F", "198.18.40.10", "-U", "198.19.3.73"],
        ["-H", "-f", "1", "-F", "198.18.0.0/16", "-N", "198.19.2.1"]])["ok"]
    rc, d = explain_live(running, capsys)
    assert rc == 0 and d["snat"]["addr"] == "198.19.3.73"  # the /32 rule wins now
    assert d["live"]["only_running"] == ["from 198.18.40.10/32 snat_ip 198.19.3.73 algo sdh"]
    (gone,) = d["live"]["only_file"]
    assert gone.startswith("from 198.18.0.0/16") and gone.endswith(":19)")


def test_live_explain_in_text_prints_the_difference(running, capsys):
    """The text form carries the difference as notes."""
    running.req(op="adm", commands=[["-K", "-f", "1", "-F", "198.18.40.10", "-U", "198.19.3.73"]])
    assert main(["explain", "--live", "--socket", running.sock, *ARGS]) == 0
    out = capsys.readouterr().out
    assert "which DIFFER from" in out and "running only: from 198.18.40.10/32" in out


def test_live_explain_without_a_daemon_exits_4(tmp_path, capsys):
    """--live with no daemon on the socket: exit 4, the socket named."""
    assert main(["explain", "--live", "--socket", str(tmp_path / "no.sock"), *ARGS]) == 4
    assert "no.sock" in capsys.readouterr().err


def test_explain_without_config_or_live_is_refused(capsys):
    """No CONFIG and no --live: exit 2 saying what to give."""
    assert main(["explain", *ARGS]) == 2
    assert "give CONFIG" in capsys.readouterr().err


def test_live_explain_names_the_spill_memo_that_sent_the_flow_on(tmpdir_short, capsys):
    """Two SNAT ports: the running gateway found the sdh address (.72) full toward R1:80 a
    moment ago (a spill memo); --live says the memo sent the flow on, with its age, in json
    and text; explaining from the file alone mentions the memo's rule only."""
    from scapy.all import IP, UDP
    from test_daemon import LAB, Running

    conf = tmpdir_short / "two-ports.conf"
    conf.write_text(LAB.read_text().replace("port_range 5000-65535", "port_range 6000-6001"))
    r = Running(tmpdir_short, conf=conf)
    try:
        now = r.backend.clock()
        for sp in (1, 2, 3):
            pkt = bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=sp, dport=80))
            r.backend.process(pkt, "inside", "lan40", now=now)
        assert r.req(op="spill_memos", remote="203.0.113.10")["memos"][0]["addr"] == "198.19.2.72"
        assert r.req(op="spill_memos", remote="192.0.2.1")["memos"] == []
        rc = main(["explain", "--live", "--socket", r.sock, *ARGS, "--proto", "udp", "-j"])
        d = json.loads(capsys.readouterr().out)
        assert rc == 0 and d["address"]["chosen"] == "198.19.2.72" and d["snat"]["addr"] != "198.19.2.72"
        (m,) = d["address"]["spill_memo"]
        assert m["addr"] == "198.19.2.72" and 0 <= m["age_s"] < 1
        assert main(["explain", "--live", "--socket", r.sock, *ARGS, "--proto", "udp"]) == 0
        out = capsys.readouterr().out
        assert "spill memo: 198.19.2.72 was found full toward 203.0.113.10:80" in out
        assert "the spill memo sent it on from 198.19.2.72" in out
        assert main(["explain", str(conf), *ARGS, "--proto", "udp"]) == 0
        out = capsys.readouterr().out
        assert "is remembered for 1 s" in out and "spill memo:" not in out
    finally:
        r.close()


def _two_port_daemon(tmpdir_short):
    """A daemon on a 2-port range whose sdh address for 198.18.40.10 -> 203.0.113.10 (.72) has
    both ports taken toward 203.0.113.10:80, and one more session toward another remote."""
    from scapy.all import IP, UDP
    from test_daemon import LAB, Running

    conf = tmpdir_short / "two-ports.conf"
    conf.write_text(LAB.read_text().replace("port_range 5000-65535", "port_range 6000-6001"))
    r = Running(tmpdir_short, conf=conf)
    now = r.backend.clock()
    for src, dst, sp in (("198.18.40.10", "203.0.113.10", 1), ("198.18.40.10", "203.0.113.10", 2),
                         ("198.18.40.11", "192.0.2.1", 7)):
        r.backend.process(bytes(IP(src=src, dst=dst) / UDP(sport=sp, dport=80)), "inside", "lan40", now=now)
    return r, r.conf  # the file the daemon runs


def test_explain_judges_against_the_table_of_a_daemon_running_the_file(tmpdir_short, capsys):
    """Without --live, a daemon that runs CONFIG on the socket: the search meets its table (.72
    is full toward the remote: the flow spills), only the sessions that bear on the flow are
    fetched, and a note says so; --offline and a daemon running another file: an empty table."""
    r, conf = _two_port_daemon(tmpdir_short)
    try:
        udp = [*ARGS, "--proto", "udp", "--socket", r.sock]
        assert main(["explain", str(conf), *udp, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["address"]["chosen"] == "198.19.2.72" and d["snat"]["addr"] != "198.19.2.72"
        assert d["live_sessions"] == 2  # the two toward 203.0.113.10:80, not the one toward 192.0.2.1
        assert d["notes"][0].startswith(f"judged against the running gateway's table ({r.sock}")
        assert main(["explain", str(conf), *udp]) == 0
        assert "spilled over: 198.19.2.72 had no free port in the live table" in capsys.readouterr().out
        assert main(["explain", str(conf), *udp, "--offline", "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["snat"]["addr"] == "198.19.2.72" and d["live_sessions"] is None
        other = tmpdir_short / "other.conf"
        other.write_text(conf.read_text())
        assert main(["explain", str(other), *udp, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["snat"]["addr"] == "198.19.2.72" and d["live_sessions"] is None
        assert d["notes"][0] == (f"a daemon on {r.sock} runs {conf}: judged against an empty table "
                                 "(--live judges against its)")
        assert main(["explain", "--live", "--offline", *udp]) == 2
        assert "give one" in capsys.readouterr().err
    finally:
        r.close()


def test_explain_finds_the_daemon_on_the_control_socket_its_config_names(tmpdir_short, capsys, monkeypatch):
    """A daemon run from a file with `control_socket PATH` answers there: explain CONFIG asked only
    the default socket (--live exited 4, "no snatgw daemon on /run/snatgw/control.sock", and
    without --live the running table went unread). --socket and $SNATGW_SOCKET still win."""
    from test_daemon import LAB, Running

    monkeypatch.delenv("SNATGW_SOCKET", raising=False)
    sock = tmpdir_short / "run" / "ctl.sock"  # where Running serves
    named = tmpdir_short / "named.conf"
    named.write_text(LAB.read_text().replace("snatgw {", f"snatgw {{\n    control_socket {sock}", 1))
    r = Running(tmpdir_short, named)
    try:
        assert main(["explain", "--live", str(r.conf), *ARGS, "-j"]) == 0
        assert json.loads(capsys.readouterr().out)["live"]["socket"] == str(sock)
        assert main(["explain", str(r.conf), *ARGS, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["notes"][0].startswith(f"judged against the running gateway's table ({sock}")
        monkeypatch.setenv("SNATGW_SOCKET", str(tmpdir_short / "no.sock"))
        assert main(["explain", "--live", str(r.conf), *ARGS]) == 4
        assert "no.sock" in capsys.readouterr().err
    finally:
        r.close()


def test_explain_says_when_the_daemon_cut_the_listing(tmpdir_short, capsys, monkeypatch):
    """A listing cut at the daemon's reply limit is named in a note, not taken as the table."""
    from snatgw.daemon import service

    monkeypatch.setattr(service, "MAX_SESSIONS_REPLY", 1)
    r, conf = _two_port_daemon(tmpdir_short)
    try:
        assert main(["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["live_sessions"] == 1 and d["snat"]["addr"] == "198.19.2.72"
        assert any(n.startswith("the daemon listed at most 1 of the sessions toward 203.0.113.10") for n in d["notes"])
    finally:
        r.close()


def _host_at_its_limit(tmpdir_short):
    """A daemon (fake backend) whose live table holds two sessions of 198.18.40.10, at its
    max_sessions_per_host 2 with ports 6000-6001: that host's next flow is refused."""
    from scapy.all import IP, UDP
    from test_daemon import LAB, Running

    conf = tmpdir_short / "limit.conf"
    conf.write_text(LAB.read_text().replace("port_range 5000-65535", "port_range 6000-6001\n  max_sessions_per_host 2"))
    r = Running(tmpdir_short, conf=conf)
    try:
        for sp in (1, 2):
            r.backend.process(bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=sp, dport=80)),
                              "inside", "lan40")  # fmt: skip
    except BaseException:
        r.close()
        raise
    return r


def test_a_refused_verdict_says_the_flow_is_remembered_and_for_how_long(tmpdir_short, capsys):
    """A flow explain finds refused (here: its host at max_sessions_per_host 2 in the live
    table) is told what its next packets meet: the refusal marker's REFUSED_SECS, then a new
    judgement; a translated flow is told nothing of it."""
    r = _host_at_its_limit(tmpdir_short)
    try:
        udp = [*ARGS, "--proto", "udp", "--socket", r.sock]
        assert main(["explain", "--live", *udp]) == 0
        out = capsys.readouterr().out
        assert "DROP (DROP_HOST_LIMIT)" in out
        assert "refused: a refusal marker remembers the flow for 2 s: its later packets" in out
        assert main(["explain", "--live", *udp[:1], "198.18.40.11:40000", *udp[2:]]) == 0
        out = capsys.readouterr().out
        assert "XLATE_NEW" in out and "refusal marker" not in out
    finally:
        r.close()


def test_the_refusal_note_is_a_json_field_and_says_what_nft_does_instead(tmpdir_short, capsys):
    """`explain --json` of a refused flow has ``refusal`` (null for a translated one): the bpf
    datapath's marker, its seconds and the reason the later packets get; with the nft backend
    running no marker (nft keeps none: each later packet is judged again, the same reason),
    and the text says so instead of the bpf marker labelled '(bpf)'."""
    r = _host_at_its_limit(tmpdir_short)
    try:
        udp = ["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock]
        assert main([*udp, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["reason"] == "DROP_HOST_LIMIT"
        assert {k: v for k, v in d["refusal"].items() if k != "note"} == {
            "backend": "bpf", "marker": True, "marker_s": 2, "later_packets": "DROP_REFUSED_RECENTLY"}
        assert main([*udp[:3], "198.18.40.11:40000", *udp[4:], "-j"]) == 0
        assert json.loads(capsys.readouterr().out)["refusal"] is None  # translated
        r.backend.name = "nft"  # the daemon runs the nft backend: explain takes its word
        assert main([*udp, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert {k: v for k, v in d["refusal"].items() if k != "note"} == {
            "backend": "nft", "marker": False, "marker_s": None, "later_packets": "DROP_HOST_LIMIT"}
        assert main(udp) == 0
        out = capsys.readouterr().out
        assert "refused: backend nft keeps no refusal marker: each later packet of the flow is judged again" in out
        assert "(bpf)" not in out and "DROP_REFUSED_RECENTLY" not in out
    finally:
        r.close()


def test_live_explain_reads_the_flows_refusal_marker_until_it_ages_out(tmpdir_short, capsys):
    """The flow was refused a moment ago (its host at its limit): --live says its packets are
    dropped now as DROP_REFUSED_RECENTLY by its marker, why it was refused, how long ago and
    how long the marker has left (json ``refusal_marker``); REFUSED_SECS later the marker is
    passed by and explain says what it said before (null, no line); a flow with no marker and
    a daemon on nft get null too.  On main explain never asked for the marker."""
    from scapy.all import IP, UDP

    r = _host_at_its_limit(tmpdir_short)
    try:
        flow = bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=40000, dport=80))
        assert r.backend.process(flow, "inside", "lan40").reason.name == "DROP_HOST_LIMIT"
        r.clock.t += 0.5
        udp = ["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock]
        assert main([*udp, "-j"]) == 0  # (the judgement's exit: a rule matched)
        d = json.loads(capsys.readouterr().out)
        m = d["refusal_marker"]
        assert {k: v for k, v in m.items() if k != "note"} == {
            "reason": "DROP_HOST_LIMIT", "addr": m["addr"], "age_s": 0.5, "left_s": 1.5, "marker_s": 2, "met": True,
            "packets": "DROP_REFUSED_RECENTLY"}
        assert m["addr"].startswith("198.19.2.7") and d["reason"] == "DROP_HOST_LIMIT"
        assert main(udp) == 0
        out = capsys.readouterr().out
        assert "\nnow:       DROP (DROP_REFUSED_RECENTLY) for 1.5 s more: its refusal marker\n" in out
        assert (f"refusal marker: the flow was refused (DROP_HOST_LIMIT, its host at its limit) at {m['addr']} 0.5 s "
                "ago: its packets are dropped as DROP_REFUSED_RECENTLY without a search until the marker ages out "
                "in 1.5 s (it lives 2 s)") in out
        other = [*udp[:3], "198.18.40.10:40001", *udp[4:]]  # the same host, another flow: no marker
        assert main([*other, "-j"]) == 0 and json.loads(capsys.readouterr().out)["refusal_marker"] is None
        r.clock.t += 1.5  # REFUSED_SECS after the refusal: passed by
        assert main([*udp, "-j"]) == 0
        assert json.loads(capsys.readouterr().out)["refusal_marker"] is None
        assert main(udp) == 0
        out = capsys.readouterr().out
        assert "now:" not in out and "refusal marker:" not in out and "DROP (DROP_HOST_LIMIT)" in out
        r.clock.t -= 1.0  # young again, but the daemon runs nft, which keeps no marker (no refusal_marker)
        assert r.req(op="refusal_marker", host="198.18.40.10", sport=40000, remote="203.0.113.10", dport=80,
                     proto=17)["marker"]["reason"] == "DROP_HOST_LIMIT"
        r.backend.name, r.backend.refusal_marker = "nft", None
        assert main([*udp, "-j"]) == 0
        assert json.loads(capsys.readouterr().out)["refusal_marker"] is None
        bad = r.req(op="refusal_marker", host="198.18.40.10", sport=70000, remote="203.0.113.10", dport=80, proto=17)
        assert not bad["ok"] and "0..65535" in bad["error"]
    finally:
        r.close()


def _own_session_past_the_cut(tmpdir_short, monkeypatch):
    """A daemon (fake backend) whose reply limit is 3 (MAX_SESSIONS_REPLY, injected) and whose
    table holds 6 sessions toward 203.0.113.10:80 from 198.18.40.11, then the flow's own
    (198.18.40.10:40000, udp): listed in that order, the own session is past the cut.  Returns
    (daemon, the own session's SNAT address and port)."""
    from scapy.all import IP, UDP
    from snatgw.daemon import service
    from test_daemon import Running

    monkeypatch.setattr(service, "MAX_SESSIONS_REPLY", 3)
    r = Running(tmpdir_short)
    try:
        for sp in range(1, 7):
            r.backend.process(bytes(IP(src="198.18.40.11", dst="203.0.113.10") / UDP(sport=sp, dport=80)),
                              "inside", "lan40")  # fmt: skip
        own = r.backend.process(bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=40000, dport=80)),
                                "inside", "lan40")  # fmt: skip
        assert own.reason.name == "XLATE_NEW"
        listed = r.req(op="sessions", filter={"remote": "203.0.113.10/32", "proto": 17, "remote_port": 80})
        assert listed["truncated"] and "198.18.40.10:40000" not in {x["inside"] for x in listed["sessions"]}
    except BaseException:
        r.close()
        raise
    return r, (str(own.nat[0]), int(own.nat[1]))


def test_live_explain_finds_the_flows_own_session_past_the_listings_cut(tmpdir_short, capsys, monkeypatch):
    """The listing toward the destination is cut at the daemon's reply limit before the flow's
    own session: explain looks that session up by the flow's 5-tuple (op session) and judges
    the packet as the session's (XLATE_OUT at its SNAT address and port), and the note on the
    cut says the own session was looked up.  On main it was judged as a new flow (XLATE_NEW)."""
    r, (addr, port) = _own_session_past_the_cut(tmpdir_short, monkeypatch)
    try:
        udp = ["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock]
        assert main([*udp, "-j"]) == 0  # no rule is asked, the session translates it (exit 1 until 1 Dec 2026)
        d = json.loads(capsys.readouterr().out)
        assert (d["reason"], d["snat"]) == ("XLATE_OUT", {"addr": addr, "port": port}), d
        assert not d["matched"] and d["session"]["nat"] == f"{addr}:{port}" and d["session"]["state"] == "UDP"
        assert d["session"]["rule"]["where"] and d["session"]["rule_id"]  # the rule it was made under
        assert main(udp) == 0
        assert f"rule:      none asked: the flow's live session ({addr}:{port}, UDP) decides; made under " in \
            capsys.readouterr().out
        assert any(n.startswith("XLATE_OUT: decided before the rules are asked: the flow has a session in the "
                                "running table (looked up by its 5-tuple)") for n in d["notes"]), d["notes"]
        assert d["live_sessions"] == 4  # the 3 listed and the own session
        (cut,) = [n for n in d["notes"] if n.startswith("the daemon listed at most 3 of the sessions")]
        assert "the flow's own session was looked up by its 5-tuple: it has one" in cut
        other = [*udp[:3], "198.18.40.10:40001", *udp[4:]]  # no session of its own: a new flow
        assert main([*other, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["reason"] == "XLATE_NEW" and d["live_sessions"] == 3
        assert any("the flow's own session was looked up by its 5-tuple: it has none" in n for n in d["notes"])
    finally:
        r.close()


def test_a_refusal_marker_is_not_met_by_a_flow_whose_session_is_past_the_cut(tmpdir_short, capsys, monkeypatch):
    """A flow with a refusal marker and a session (its packets take the session first): with
    the session past the listing's cut explain still says the marker is not met (no 'now:
    DROP' line).  On main explain took the flow as sessionless: 'now: DROP
    (DROP_REFUSED_RECENTLY)', what its packets do not meet."""
    r, _ = _own_session_past_the_cut(tmpdir_short, monkeypatch)
    try:
        r.backend.refusal_marker = lambda *a: {"reason": "DROP_PORT_EXHAUSTED", "addr": "198.19.2.72", "age_ms": 500}
        udp = ["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock]
        assert main([*udp, "-j"]) == 0  # no rule is asked: the session translates it
        m = json.loads(capsys.readouterr().out)["refusal_marker"]
        assert (m["met"], m["packets"]) == (False, None)
        assert main(udp) == 0
        out = capsys.readouterr().out
        assert "now:" not in out and "but it has a session now, which its packets take first" in out
    finally:
        r.close()


def test_live_explain_with_an_older_daemon_that_cannot_look_the_session_up(tmpdir_short, capsys, monkeypatch):
    """A daemon from before op session answers it 'unknown request op': explain works as it did,
    judging against the listing (here the own session is past its cut: a new flow), and the
    note on the cut says the own session may be among those not listed."""
    r, _ = _own_session_past_the_cut(tmpdir_short, monkeypatch)
    try:
        dispatch = r.server.dispatch
        old = {"ok": False, "code": "EINVAL", "exit": 2,
               "error": "unknown request op 'session'; expected one of status, health, reload, rules, sessions, "
                        "spill_memos, refusal_marker, stats, rate, flush, zero, adm"}  # fmt: skip
        r.server.dispatch = r.server.inline = lambda req: old if req.get("op") == "session" else dispatch(req)
        assert main(["explain", "--live", *ARGS, "--proto", "udp", "--socket", r.sock, "-j"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["reason"] == "XLATE_NEW" and d["live_sessions"] == 3
        (cut,) = [n for n in d["notes"] if n.startswith("the daemon listed at most 3 of the sessions")]
        assert "the flow's own session may be among those not listed" in cut
    finally:
        r.close()


def test_live_explain_says_which_links_are_down(running, capsys):
    """While link isp1 is down its rules run on the backup: --live answered with the backup's
    next hop and listed the rule as "changed" with no word of why; now it names the link."""
    from snatgw.config.parse import parse_text
    from test_links import LAB, LINK

    running.conf.write_text(LAB + LINK)
    running.service.config = parse_text(LAB + LINK, str(running.conf))
    assert running.service.set_link("isp1", True, "test")
    rc, d = explain_live(running, capsys)
    assert rc == 0 and d["live"]["links_on_backup"] == ["isp1"] and d["live"]["differs"]
    assert any(n.startswith("  link isp1 is down: its rules run on their backup") for n in d["notes"])
    assert main(["explain", "--live", "--socket", running.sock, *ARGS]) == 0
    assert "link isp1 is down" in capsys.readouterr().out
    assert running.service.set_link("isp1", False, "back")
    rc, d = explain_live(running, capsys)
    assert d["live"]["links_on_backup"] == [] and not any("is down" in n for n in d["notes"])
