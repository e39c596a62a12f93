"""The Prometheus collector over a Service (FakeBackend): families and labels parse with
prometheus_client's own text parser; rules are labelled by stable id and identity text, not
position; reloads count by result; link states appear when a monitor runs."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from snatgw.daemon.metrics import parse_listen, scrape


def families(service) -> dict:
    return {f.name: f for f in text_string_to_metric_families(scrape(service).decode())}


def samples(fam, **labels) -> list:
    return [s for s in fam.samples if all(s.labels.get(k) == v for k, v in labels.items())]


def assert_values(f: dict, *rows) -> None:
    """Each (family, labels, value): the first sample of that family with those labels has it."""
    for name, labels, value in rows:
        got = samples(f[name], **labels)[0].value
        assert got == value, (name, labels, got, value)


def test_scrape_parses_and_labels_rules_by_stable_id_and_identity(running):
    """Per-rule counters carry rule_id and the from/to/gw/oif text; reasons their names."""
    a = running.syn()
    f = families(running.service)
    assert samples(f["snatgw_up"])[0].value == 1
    (s,) = samples(f["snatgw_rule_packets"], rule_id=str(a.rule.rule_id))
    assert s.labels["rule"] == a.rule.identity_text() and s.value >= 1
    assert samples(f["snatgw_rule_sessions"], rule_id=str(a.rule.rule_id))[0].value == 1
    assert samples(f["snatgw_reason_packets"], reason="XLATE_NEW")[0].value == 1
    assert samples(f["snatgw_sessions"])[0].value == 1
    assert samples(f["snatgw_map_max_entries"], map="sessions")[0].value > 0


def test_rule_label_survives_an_edit_that_reorders_nothing_but_changes_the_pool(running):
    """adm -k changes the pool: the same rule_id and rule label keep counting."""
    a = running.syn()
    running.req(op="adm", commands=[["-k", "-f", "1", "-F", "198.18.40.0/24", "-W", "198.19.2.1", "--oif", "eth1",
                                     "-U", "198.19.2.71-198.19.2.80", "-O", "sdh"]])
    f = families(running.service)
    (s,) = samples(f["snatgw_rule_packets"], rule_id=str(a.rule.rule_id))
    assert s.labels["rule"] == a.rule.identity_text()


def test_reloads_count_by_result_and_the_last_one_is_flagged(running):
    """A failed reload: reloads_total{result=failed} 1, last_reload_success 0; a good one: ok."""
    good = running.conf.read_text()
    running.conf.write_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.1/24 snat_ip 198.19.2.71 }\n}\n")
    running.req(op="reload")
    f = families(running.service)
    assert samples(f["snatgw_reloads"], result="failed")[0].value == 1
    assert samples(f["snatgw_last_reload_success"])[0].value == 0
    assert samples(f["snatgw_log_events"], level="error")[0].value == 1
    running.conf.write_text(good)
    running.req(op="reload")
    f = families(running.service)
    assert samples(f["snatgw_reloads"], result="ok")[0].value == 1
    assert samples(f["snatgw_last_reload_success"])[0].value == 1


def test_listen_setting_is_checked():
    """ADDR:PORT, IPv4, port 1..65535."""
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    for bad in ("9469", "127.0.0.1:0", "localhost:9469", "127.0.0.1:http", "::1:9469"):
        try:
            parse_listen(bad)
        except (ValueError, OSError):
            continue
        raise AssertionError(bad)


def test_program_run_time_appears_only_while_bpf_stats_are_enabled(running, monkeypatch):
    """prog_run_seconds/prog_runs come from the programs' run_time_ns/run_cnt (bpftool) only when
    kernel.bpf_stats_enabled is 1 (read, never written); otherwise the families are absent."""
    from snatgw.daemon import metrics

    monkeypatch.setattr(running.backend, "name", "bpf")
    asked = []
    monkeypatch.setattr(metrics, "prog_run_stats", lambda ids: asked.append(ids) or {"snat_inside": (1.5, 10)})
    monkeypatch.setattr(metrics, "bpf_stats_enabled", lambda: False)
    assert "snatgw_prog_run_seconds" not in families(running.service) and asked == []
    monkeypatch.setattr(metrics, "bpf_stats_enabled", lambda: True)
    f = families(running.service)
    assert samples(f["snatgw_prog_run_seconds"], prog="snat_inside")[0].value == 1.5
    assert samples(f["snatgw_prog_runs"], prog="snat_inside")[0].value == 10


def test_audit_log_families_appear_only_while_it_runs(running):
    """No audit families without `audit_log`; with it, records by result and the write errors
    and rotations, from the daemon's audit reader (status says the same)."""
    f = families(running.service)
    assert not any(n.startswith("snatgw_audit") for n in f)
    assert running.service.status()["audit"] == {"enabled": False, "target": None}

    class Reader:
        def stats(self):
            return {"enabled": True, "target": "/var/log/snatgw/audit.jsonl", "records": 12, "lost_write": 2,
                    "write_errors": 1, "rotations": 3, "last_error": "disk full", "received": 10,
                    "lost_queue": 0, "lost_datapath": 5}

    running.service.audit = Reader()
    try:
        assert_values(families(running.service), ("snatgw_audit_records", {"result": "written"}, 12),
                      ("snatgw_audit_records", {"result": "lost_datapath"}, 5),
                      ("snatgw_audit_records", {"result": "lost_write"}, 2),
                      ("snatgw_audit_write_errors", {}, 1), ("snatgw_audit_rotations", {}, 3))  # fmt: skip
        assert running.service.status()["audit"]["lost_datapath"] == 5
    finally:
        running.service.audit = None


def test_sync_families_appear_only_while_it_runs_and_status_text_shows_them(running):
    """No sync families without sync_peer; with it datagrams, records by result, drops by
    reason and the peer's silence; `snatgw status` prints the same counters."""
    from snatgw.cli.commands.status import sync_text
    from snatgw.datapath.bpf.synctable import COUNTS

    f = families(running.service)
    assert not any(n.startswith("snatgw_sync") for n in f)
    assert running.service.status()["sync"] == {"enabled": False, "peer": None, "error": None}
    st = {"enabled": True, "peer": "192.0.2.2:3781", "local": "192.0.2.1:3781", "boot_id": "00ff",
          "sent_datagrams": 7, "sent_records": 100, "send_errors": 0, "walks": 2, "walk_records": 60,
          "ring_records": 40, "received_datagrams": 5, "received_records": 90, "foreign": 1, "peer_boots": 1,
          "install_errors": 0, **dict.fromkeys(COUNTS, 0), "installed": 80, "rejected": 10, "bad_records": 0,
          "drops": {"bad_mac": 3, "replay": 0, "recv_queue": 0}, "send_queue": 0, "recv_queue": 0,
          "walking": False, "seconds_since_peer": 1.5, "last_error": None}  # fmt: skip

    class Sync:
        def stats(self):
            return st

    running.service.sync = Sync()
    try:
        assert_values(families(running.service), ("snatgw_sync_datagrams", {"direction": "sent"}, 7),
                      ("snatgw_sync_records", {"result": "installed"}, 80),
                      ("snatgw_sync_records", {"result": "rejected"}, 10),
                      ("snatgw_sync_drops", {"reason": "bad_mac"}, 3), ("snatgw_sync_drops", {"reason": "foreign"}, 1),
                      ("snatgw_sync_seconds_since_peer", {}, 1.5))  # fmt: skip
        text = sync_text(running.service.status()["sync"])
        assert "session sync with 192.0.2.2:3781" in text and "installed 80" in text and "bad_mac 3" in text
    finally:
        running.service.sync = None


def test_per_host_figures_say_how_fresh_they_are(running):
    """No host limit: the busiest host's sessions are the last sweep's (absent age before the
    first, then its age); the count of hosts and the busiest one's sessions follow the recount."""
    running.syn()
    running.syn(sport=40001)
    f = families(running.service)
    assert "snatgw_host_counts_age_seconds" not in f  # no sweep yet: age unknown
    assert samples(f["snatgw_host_sessions_max"])[0].value == 0
    running.service.gc()
    running.clock.t += 7
    f = families(running.service)
    assert samples(f["snatgw_host_counts_age_seconds"])[0].value == 7
    assert samples(f["snatgw_host_sessions_max"])[0].value == 2 and samples(f["snatgw_hosts"])[0].value == 1


def test_the_route_back_is_a_gauge_where_the_backend_reports_it(running, monkeypatch):
    """bpf reports how new sessions find their route back: 1 reused, 0 looked up; the fake
    backend has none, so no family."""
    assert "snatgw_route_back_reused" not in families(running.service)
    real = running.backend.health
    for reused in (True, False):
        monkeypatch.setattr(running.backend, "health", lambda r=reused: {**real(), "route_back": {"reused": r}})
        f = families(running.service)
        assert samples(f["snatgw_route_back_reused"])[0].value == (1 if reused else 0)


def test_error_and_warning_events_are_exported_from_zero(running):
    """log_events_total{level} has its error and warning series before the first such event:
    a series that appears at 1 is no increase to Prometheus (increase() needs two samples of
    the series), so SnatgwErrors (examples/prometheus) would miss the first error after every
    daemon start."""
    f = families(running.service)
    for level in ("error", "warning"):
        (s,) = samples(f["snatgw_log_events"], level=level)
        assert s.value == 0


def test_rule_sessions_is_the_rules_live_sessions_not_those_it_ever_made(running):
    """`snatgw_rule_sessions` is a gauge of each rule's live sessions: an expired session leaves
    it.  It exported the per-rule count of sessions created (bpf's snat_rule_stats, the model's),
    which only grows until `adm -Z`, as if live (nft's was live): a rule whose sessions had all
    ended still showed them.  `stats` keeps that count (ipvsadm's Conns, the rate's CPS)."""
    gone, kept = running.syn(), running.udp()
    running.clock.t += 250  # past the SYN's timeout (240 s), not the UDP one's (300 s)
    assert running.backend.expire() == 1
    f = families(running.service)
    assert samples(f["snatgw_rule_sessions"], rule_id=str(gone.rule.rule_id))[0].value == 0
    assert samples(f["snatgw_rule_sessions"], rule_id=str(kept.rule.rule_id))[0].value == 1
    assert samples(f["snatgw_sessions"])[0].value == 1
    made = running.req(op="stats")["stats"]["rules"]
    assert made[str(gone.rule.rule_id)]["sessions"] == 1 and made[str(kept.rule.rule_id)]["sessions"] == 1


def test_every_running_rule_has_its_series_from_the_start(running):
    """A rule that never met a packet is exported with 0 (packets, bytes, live sessions), as
    the nft backend's are: the bpf backend keeps no counters for it, and its series were
    absent, so rate() and alerts on it had nothing until its first packet."""
    rules = running.service.effective(running.service.config).rules
    assert len(rules) >= 2
    a = running.syn()
    f = families(running.service)
    for r in rules:
        for fam in ("snatgw_rule_packets", "snatgw_rule_bytes", "snatgw_rule_sessions"):
            (s,) = samples(f[fam], rule_id=str(r.rule_id))
            assert s.labels["rule"] == r.identity_text()
            assert (s.value > 0) == (r.rule_id == a.rule.rule_id), (fam, r.rule_id)


def test_a_flush_takes_the_flushed_sessions_out_of_the_rules_live_count(running):
    """`snatgw flush` removes sessions and the rule's live gauge follows at once, as the bpf
    backend's flush (a sweep) recounts; the model kept the flushed sessions counted."""
    a = running.syn()
    assert samples(families(running.service)["snatgw_rule_sessions"], rule_id=str(a.rule.rule_id))[0].value == 1
    running.req(op="flush")
    assert samples(families(running.service)["snatgw_rule_sessions"], rule_id=str(a.rule.rule_id))[0].value == 0


def test_every_family_is_in_the_docs_table_and_reloads_say_failovers(running):
    """Each family the collector can export (every _g/_c of daemon/metrics.py, sync and audit
    included, which a scrape shows only while they run) has a row in docs/operations.md's
    metrics table: the sync's four were only in the bpf failover section, so an operator
    reading the table did not know them.  reloads_total's help says failovers count there, as
    the table does."""
    import re
    from pathlib import Path

    import snatgw.daemon.metrics as M

    root = Path(__file__).resolve().parents[2]
    src = Path(M.__file__).read_text()
    names = set(re.findall(r'_[gc]\(\s*"([a-z_]+)"', src))
    ops = (root / "docs" / "operations.md").read_text()
    table = ops[ops.index("## Prometheus metrics"):ops.index("### Alerts")]
    rows = "\n".join(line for line in table.splitlines() if line.startswith("| `"))
    missing = [n for n in sorted(names) if f"`{n}`" not in rows and f"`{n}_total`" not in rows]
    assert not missing and len(names) > 30, missing
    help_ = {f.name: f.documentation for f in text_string_to_metric_families(scrape(running.service).decode())}
    assert "failover" in help_["snatgw_reloads"] and "failover" in help_["snatgw_last_reload_success"]
