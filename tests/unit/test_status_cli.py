"""`snatgw status` against an in-process daemon (FakeBackend): healthy report and exit 0, each
kind of problem and exit 1, the last reload's result, error counts, JSON, no daemon (exit 4).
The links are read by `ip link`: these tests give a stand-in reader (the lab test reads real ones)."""

from __future__ import annotations

import json

import pytest

from snatgw.cli.main import main
from snatgw.daemon import health

UP = {"exists": True, "up": True, "carrier": True, "operstate": "UP"}


@pytest.fixture
def links(monkeypatch):
    """Every configured device up, unless a test changes ``state``."""
    state: dict[str, dict] = {}
    monkeypatch.setattr(health, "link_states", lambda devs: {d: state.get(d, UP) for d in devs})
    return state


def status(running, capsys, *extra) -> tuple[int, str]:
    rc = main(["status", "--socket", running.sock, *extra])
    return rc, capsys.readouterr().out


def test_healthy_gateway_exits_0_and_shows_hooks_maps_sessions_links(running, links, capsys):
    """All hooks attached, links up, no failed reload: 'healthy', exit 0, the sections printed."""
    running.syn()
    rc, out = status(running, capsys)
    assert rc == 0 and out.startswith("snatgw: healthy")
    for part in ("hooks:", "maps:", "sessions: 1 of", "links:", "last apply none since start", "0 errors"):
        assert part in out
    assert "problems:" not in out


def test_json_report_carries_every_part(running, links, capsys):
    """-j: healthy, problems, datapath (hooks, maps, sessions), links, last_apply, errors."""
    rc, out = status(running, capsys, "-j")
    d = json.loads(out)
    assert rc == 0 and d["healthy"] is True and d["problems"] == []
    assert {"hooks", "maps", "sessions", "max_sessions"} <= set(d["datapath"])
    assert set(d["links"]) == {"lan40", "lan50", "eth1", "eth2"}
    assert d["errors"] == 0 and d["last_apply"] is None and d["backend"] == "fake"


@pytest.mark.parametrize("dev,st,msg", [
    ("eth2", {"exists": False, "up": False, "carrier": False, "operstate": "MISSING"}, "link eth2: missing"),
    ("eth1", {"exists": True, "up": False, "carrier": False, "operstate": "DOWN"}, "link eth1: administratively down"),
    ("lan40", {"exists": True, "up": True, "carrier": False, "operstate": "LOWERLAYERDOWN"},
     "link lan40: no carrier (LOWERLAYERDOWN)"),
])
def test_a_missing_or_down_link_is_a_problem_and_exit_1(running, links, capsys, dev, st, msg):
    """A device missing, down, or without carrier: UNHEALTHY, the reason printed, exit 1."""
    links[dev] = st
    rc, out = status(running, capsys)
    assert rc == 1 and out.startswith("snatgw: UNHEALTHY (1 problem)") and f"  - {msg}" in out


def test_a_failed_reload_is_reported_until_a_reload_works(running, links, capsys):
    """A broken file on reload: the error and time in status, exit 1, one error counted; a good
    reload clears the problem (the error count stays)."""
    good = running.conf.read_text()
    running.conf.write_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.1/24 snat_ip 198.19.2.71 }\n}\n")
    assert not running.req(op="reload")["ok"]
    rc, out = status(running, capsys)
    assert rc == 1 and "last reload failed at" in out and "host bits set" in out and "1 errors" in out
    running.conf.write_text(good)
    assert running.req(op="reload")["ok"]
    rc, out = status(running, capsys, "-j")
    d = json.loads(out)
    assert rc == 0 and d["last_apply"]["ok"] and d["last_apply"]["kind"] == "reload" and d["errors"] == 1


def test_a_detached_program_and_a_full_table_are_problems(running, links, capsys, monkeypatch):
    """A hook whose program was replaced, and sessions at 90% of max: both listed, exit 1."""
    real = running.backend.health

    def broken():
        h = real()
        h["hooks"][0] = {**h["hooks"][0], "attached": False, "found": 77}
        return {**h, "sessions": 95, "max_sessions": 100}

    monkeypatch.setattr(running.backend, "health", broken)
    rc, out = status(running, capsys)
    assert rc == 1 and "(2 problems)" in out
    assert "model is no longer on lan40 ingress (found 77)" in out and "sessions: 95 of 100 (95%)" in out


def test_the_route_back_is_shown_and_is_no_problem(running, links, capsys, monkeypatch):
    """bpf's route back (docs/datapath.md step 13): one line, either way healthy."""
    from snatgw.fibrules import describe

    real = running.backend.health
    why = "iif rule 100: from all iif eth1 lookup 100"
    monkeypatch.setattr(running.backend, "health", lambda: {**real(), "route_back": {
        "reused": False, "why": why, "text": describe(why)}})
    rc, out = status(running, capsys)
    assert rc == 0 and "route back: looked up per session (iif rule 100: from all iif eth1 lookup 100)" in out
    monkeypatch.setattr(running.backend, "health", lambda: {**real(), "route_back": {
        "reused": True, "why": None, "text": describe(None)}})
    rc, out = status(running, capsys)
    assert rc == 0 and "route back: reused from the reverse-path check" in out


def test_failed_removals_from_a_device_renamed_away_are_counted_in_status(running, links, capsys, monkeypatch):
    """bpf's hook check logs such a failure once per device and kind; status carries the count
    and what fails now (text and -j)."""
    monkeypatch.setattr(running.backend, "status_extra", lambda: {"renamed_detach": {
        "failed": 12, "failing": {"ethold": "bpf_tc_detach ifindex 4: Operation not permitted"}}}, raising=False)
    rc, out = status(running, capsys)
    assert ("  renamed    12 failed tries to take our programs off devices renamed away; failing now: ethold: "
            "bpf_tc_detach ifindex 4: Operation not permitted") in out
    rc, out = status(running, capsys, "-j")
    assert json.loads(out)["renamed_detach"]["failed"] == 12


def test_an_unreadable_datapath_is_a_problem(running, links, capsys, monkeypatch):
    """backend.health() failing is itself reported (the request still answers)."""
    monkeypatch.setattr(running.backend, "chaos", {"health": 0})
    rc, out = status(running, capsys)
    assert rc == 1 and "datapath: cannot read its state: fake backend: health failed on purpose" in out


def test_status_without_a_daemon_exits_4(tmp_path, capsys):
    """No daemon: exit 4 and the socket named."""
    assert main(["status", "--socket", str(tmp_path / "none.sock")]) == 4
    assert "none.sock" in capsys.readouterr().err


def test_the_audit_log_in_status_and_stats(running, links, capsys):
    """A configured audit log that is not running is a problem (exit 1); a running one prints its
    counters in `status` and `stats` (records, lost in the datapath and by writes)."""
    from dataclasses import replace

    svc = running.service
    svc.config = replace(svc.config, settings=replace(svc.config.settings, audit_log="syslog"))
    rc, out = status(running, capsys)
    assert rc == 1 and "  - audit log syslog: configured but not running" in out

    class Reader:
        def stats(self):
            return {"enabled": True, "target": "syslog (/dev/log)", "records": 40, "lost_write": 2,
                    "write_errors": 1, "rotations": 0, "last_error": "/dev/log: Resource temporarily unavailable",
                    "received": 42, "lost_queue": 0, "lost_datapath": 7}

    svc.audit = Reader()
    try:
        rc, out = status(running, capsys)
        assert rc == 0 and "audit log: syslog (/dev/log): 40 records written, 7 lost in the datapath, 2 by failed " \
                           "writes; 1 write errors, 0 rotations; last error: /dev/log" in out
        assert main(["stats", "--socket", running.sock]) == 0
        out = capsys.readouterr().out
        assert "audit log syslog (/dev/log): 40 records, lost: 7 (datapath" in out
        assert main(["stats", "--socket", running.sock, "-j"]) == 0
        assert json.loads(capsys.readouterr().out)["audit"]["lost_datapath"] == 7
    finally:
        svc.audit = None


def test_an_array_map_shows_no_fill(running, links, capsys, monkeypatch):
    """A bpf array's slots all exist (entries = max_entries, ``has_fill`` False): its fill is
    '-', as metrics and the alerts leave it out.  It showed 100.0% (snat_rules, snat_reasons,
    snat_config... on every healthy gateway), a full map to whoever reads `status`."""
    health = running.backend.health

    def with_arrays():
        h = health()
        h["maps"] += [{"name": "snat_rules", "entries": 16384, "max_entries": 16384, "has_fill": False},
                      {"name": "snat_eim", "entries": 3, "max_entries": 100, "has_fill": True}]
        return h

    monkeypatch.setattr(running.backend, "health", with_arrays)
    rc, out = status(running, capsys)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  snat_")}
    assert rc == 0 and rows["snat_rules"] == ["16384", "16384", "-"] and rows["snat_eim"] == ["3", "100", "3.0%"]


def test_a_start_that_resized_the_table_says_so(running, links, capsys, monkeypatch):
    """bpf: a start with another max_sessions carried the table over (``table_resized`` of the
    backend's status): `status` says from what to what, and what it copied."""
    resized = {"from": 1024, "to": 4096, "seconds": 0.41, "grace_seconds": 0.05,
               "maps": {"snat_ct": {"from": 2048, "to": 8192, "first": 40, "after_attach": {"copied": 2},
                                    "after_grace": {"copied": 0}}}}  # fmt: skip
    monkeypatch.setattr(running.backend, "status_extra", lambda: {"table_resized": resized}, raising=False)
    rc, out = status(running, capsys)
    assert rc == 0 and ("session table resized at start from 1024 to 4096 sessions: 40 entries copied, then 2 "
                        "made meanwhile, in 0.41 s") in out, out
