"""Counters read from nftables (the nft backend's named counters, the bpf leak guard's drops in
DROP_LEAK) never go back when a read fails: the figures of the last read that worked are
answered (Prometheus took the dip for a counter reset, then the return for a burst), and the
failure is counted (status `counter_reads`, metric `counter_read_failures_total`) and logged
once per interval.  The failures are injected; the reads themselves are tested live in
tests/nft and tests/bpf."""

from __future__ import annotations

import logging
import subprocess

import pytest

from snatgw.datapath import backend as DB
from snatgw.datapath import nftnl
from snatgw.datapath.backend import LastRead
from snatgw.errors import BackendError


def _failing(msg="nf_tables netlink: counters of ip snatgw_guard: a malformed answer"):
    def fail(*a, **kw):
        raise BackendError(msg)

    return fail


def test_a_failed_read_answers_the_last_figures_counts_and_logs_once_per_interval(caplog):
    t = [100.0]
    r = LastRead("test counters", logging.getLogger("snatgw.test"), clock=lambda: t[0])
    assert r.read(lambda: {"a": 5}) == {"a": 5}
    with caplog.at_level(logging.WARNING, "snatgw.test"):
        for _ in range(5):  # a scrape every few seconds while nft cannot be read
            assert r.read(_failing()) == {"a": 5}
            t[0] += 5
        assert len(caplog.records) == 1 and "test counters" in caplog.text and "malformed" in caplog.text
        t[0] += DB.READ_LOG_INTERVAL
        assert r.read(_failing()) == {"a": 5}
        assert len(caplog.records) == 2  # one line per interval, never one per scrape
    assert r.as_dict() == {"failed": 6, "last_error": "nf_tables netlink: counters of ip snatgw_guard: "
                                                      "a malformed answer"}  # fmt: skip
    assert r.read(lambda: {"a": 7}) == {"a": 7} and r.as_dict()["last_error"] is None  # works again
    assert r.read(_failing()) == {"a": 7}
    r.forget()  # zeroed: a failed read answers zeros, not the figures from before the zero
    assert r.read(_failing()) == {}
    assert r.read(lambda: {"a": 1}) == {"a": 1}
    with pytest.raises(ValueError):  # anything but a BackendError is a bug: not hidden
        r.read(lambda: int("x"))


class _Maps:
    def reasons(self):
        return {"DROP_LEAK": 3, "XLATE_NEW": 10}


def test_bpf_drop_leak_keeps_the_guard_drops_last_read_when_a_read_fails(monkeypatch):
    """DROP_LEAK is the datapath's count plus the leak guard table's nft counter: a read of
    that counter failing left the guard's part out (3 + 40 -> 3), a counter reset for
    Prometheus, and the next scrape a burst of 40."""
    from snatgw.datapath.bpf import guard
    from snatgw.datapath.bpf.backend import BpfBackend

    b = BpfBackend()
    answers = iter([40, BackendError("nf_tables netlink: counters of ip snatgw_guard: Operation not permitted"),
                    BackendError("again"), 41])  # fmt: skip

    def dropped(netns=None):
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(guard, "dropped", dropped)
    seen = [b._reasons(_Maps())["DROP_LEAK"] for _ in range(4)]
    assert seen == [43, 43, 43, 44]
    assert b.status_extra()["counter_reads"] == {"failed": 2, "last_error": None}
    monkeypatch.setattr(guard, "reset", lambda netns=None: True)
    monkeypatch.setattr(b, "_writable", lambda: None)
    b.maps = type("M", (), {"zero": lambda self: None})()
    b.config = object()  # started: the guard is this backend's
    b.zero()  # the guard's counter is zeroed with the maps: the old drops do not come back
    monkeypatch.setattr(guard, "dropped", _failing())
    assert b._reasons(_Maps())["DROP_LEAK"] == 3


def test_nft_counters_keep_the_last_figures_when_netlink_and_nft_both_fail(monkeypatch):
    """The nft backend reads its named counters by netlink, then `nft` if that fails; when `nft`
    failed too every counter read 0 (and an answer that was not JSON raised out of stats)."""
    from snatgw.datapath.nft import render as R
    from snatgw.datapath.nft.backend import NftBackend

    b = NftBackend()
    good = {"new_1": (7, 700), R.C_NO_SESSION: (2, 80), R.C_UNMATCHED: (1, 40)}
    monkeypatch.setattr(nftnl, "counters", lambda family, table, netns=None: dict(good))
    first = b.counters().reasons
    assert first == {"XLATE_NEW": 7, "DROP_NO_SESSION": 2, "DROP_UNMATCHED": 1}

    monkeypatch.setattr(nftnl, "counters", _failing("nf_tables netlink: counters of ip snatgw: No buffer space"))
    nft_answers = iter([subprocess.CompletedProcess([], 1, "", "Error: cannot connect"),
                        subprocess.CompletedProcess([], 0, "{ not json", ""),
                        subprocess.CompletedProcess([], 0, '{"nftables": [{"counter": 5}]}', "")])  # fmt: skip
    monkeypatch.setattr(b, "_run", lambda argv, input=None, check=True: next(nft_answers))
    for _ in range(3):
        assert b.counters().reasons == first
    reads = b.status_extra()["counter_reads"]
    assert reads["failed"] == 3 and "nft list counters" in reads["last_error"]

    monkeypatch.setattr(b, "_run", lambda argv, input=None, check=True: subprocess.CompletedProcess([], 0, "", ""))
    monkeypatch.setattr(b, "_insert_failed", lambda: 0)
    b.zero()  # `nft reset counters` worked: a failed read answers zeros now
    assert b._counters() == {}


def test_the_failed_reads_are_a_metric_and_a_status_line(running, monkeypatch, capsys):
    """Where the backend reads nft's counters (not the fake): counter_read_failures_total, and
    `snatgw status` says how many reads failed and whether they fail now."""
    from prometheus_client.parser import text_string_to_metric_families

    from snatgw.cli.main import main
    from snatgw.daemon import health
    from snatgw.daemon.metrics import scrape

    fams = {f.name for f in text_string_to_metric_families(scrape(running.service).decode())}
    assert "snatgw_counter_read_failures" not in fams  # the fake backend reads none
    reads = LastRead("nft backend: the table's named counters", logging.getLogger("snatgw.test"))
    reads.read(lambda: {"leak": (1, 1)})
    for _ in range(3):
        reads.read(_failing())
    monkeypatch.setattr(running.backend, "counter_reads", reads, raising=False)
    real = running.backend.status_extra if hasattr(running.backend, "status_extra") else dict
    monkeypatch.setattr(running.backend, "status_extra", lambda: {**real(), "counter_reads": reads.as_dict()},
                        raising=False)  # fmt: skip
    fam = {f.name: f for f in text_string_to_metric_families(scrape(running.service).decode())}
    assert fam["snatgw_counter_read_failures"].samples[0].value == 3
    monkeypatch.setattr(health, "link_states", lambda devs: {d: {"exists": True, "up": True, "carrier": True,
                                                                 "operstate": "UP"} for d in devs})  # fmt: skip
    main(["status", "--socket", running.sock])
    out = capsys.readouterr().out
    assert "3 failed reads of nft's named counters since start; failing now: nf_tables netlink" in out


def test_counters_no_read_has_given_are_left_out_not_exported_as_zero(running, monkeypatch):
    """The first reads after a restart fail (the nft table's counters live on, say at 40): the
    reason and rule counters are left out of the scrape (a gap), not 0 then 40, which
    Prometheus takes for 40 packets in one interval and an increase() alert fires on.  Back
    once a read works; a zero (`snatgw zero`) makes zeros known, not unknown."""
    from prometheus_client.parser import text_string_to_metric_families

    from snatgw.daemon.metrics import scrape

    def families():
        return {f.name for f in text_string_to_metric_families(scrape(running.service).decode())}

    reads = LastRead("nft backend: counters", logging.getLogger("snatgw.test"))
    monkeypatch.setattr(running.backend, "counter_reads", reads, raising=False)
    assert {"snatgw_reason_packets", "snatgw_rule_packets"} <= families()
    assert reads.read(_failing()) == {} and reads.unknown == {""}
    assert reads.read(_failing(), "conntrack") == {} and reads.unknown == {"", "conntrack"}
    fams = families()
    assert "snatgw_reason_packets" not in fams and "snatgw_rule_packets" not in fams
    assert "snatgw_rule_sessions" in fams and "snatgw_counter_read_failures" in fams
    reads.read(lambda: {"leak": (40, 4000)})
    assert reads.unknown == {"conntrack"} and "snatgw_reason_packets" not in families()
    reads.forget("conntrack")  # zeroed: zeros are its figures now
    assert reads.unknown == set() and reads.read(_failing(), "conntrack") == {}
    assert reads.unknown == set() and "snatgw_reason_packets" in families()


def test_a_backend_never_started_leaves_the_leak_guard_table_alone(monkeypatch):
    """stop() removes the leak guard's table only when this backend put it there (started):
    a backend over loaded maps without a start (the bpf tests' fixtures, in the test runner's
    own namespace) deleted whatever `table ip snatgw_guard` that namespace held."""
    from snatgw.datapath.bpf import guard
    from snatgw.datapath.bpf.backend import BpfBackend

    removed = []
    monkeypatch.setattr(guard, "remove", lambda netns=None: removed.append(netns) or True)
    b = BpfBackend()
    b.loader = type("L", (), {"stop": lambda self, keep: None})()
    b.stop()
    assert removed == []
    b.loader, b.config = type("L", (), {"stop": lambda self, keep: None})(), object()
    b.stop()
    assert removed == [None]


def test_nft_port_exhaustion_keeps_the_last_figure_when_proc_cannot_be_read(monkeypatch):
    """DROP_PORT_EXHAUSTED is conntrack's insert_failed (/proc/net/stat/nf_conntrack, by `cat`
    in the gateway's namespace when the backend aims at another) less its value at start: an
    unreadable file read as 0, so the count fell to 0 and XLATE_NEW (the new flows less it)
    jumped by as much, until the next read."""
    from snatgw.datapath.nft import backend as NB
    from snatgw.datapath.nft.backend import NftBackend

    head = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop\n"
    cpu = "00000000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 {:08x} 00000000\n"
    proc = iter([head + cpu.format(1) + cpu.format(1),  # at start: 2
                 head + cpu.format(4) + cpu.format(3),  # 7: 5 flows found no free port
                 None, None,  # `cat` in the namespace failed
                 head + cpu.format(5) + cpu.format(3)])  # fmt: skip
    b = NftBackend()
    monkeypatch.setattr(b, "_read", lambda path: next(proc))
    monkeypatch.setattr(nftnl, "counters", lambda family, table, netns=None: {"new_1": (20, 2000)})
    monkeypatch.setattr(b, "_conntrack_count", lambda: 0)
    monkeypatch.setattr(b, "_tally", lambda: NB._Tally({}, {}, {}, 0.0, 0.0))
    b._failed_base = b._conntrack_failed()
    seen = [(r["DROP_PORT_EXHAUSTED"], r["XLATE_NEW"]) for r in (b.stats().reasons for _ in range(4))]
    assert seen == [(5, 15), (5, 15), (5, 15), (6, 14)]
    assert b.status_extra()["counter_reads"] == {"failed": 2, "last_error": None}


def test_nft_port_exhaustion_counts_from_the_first_read_that_works_when_start_could_not_read(monkeypatch):
    """/proc/net/stat/nf_conntrack unreadable when the backend starts or is zeroed: the base of
    DROP_PORT_EXHAUSTED was 0, so the first read that worked counted every insert failure of
    the namespace's past (700 here) as refusals, a burst SnatgwPortsExhausted fires on.  The
    count starts at the first read that works instead."""
    from snatgw.datapath.nft import backend as NB
    from snatgw.datapath.nft.backend import NftBackend

    head = "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop\n"
    cpu = "00000000  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 {:08x} 00000000\n"
    proc = iter([None,  # at zero(): `cat` in the namespace failed
                 head + cpu.format(400) + cpu.format(300),  # 700: the past
                 head + cpu.format(402) + cpu.format(301)])  # 3 flows found no free port
    b = NftBackend()
    monkeypatch.setattr(b, "_read", lambda path: next(proc))
    monkeypatch.setattr(nftnl, "counters", lambda family, table, netns=None: {"new_1": (20, 2000)})
    monkeypatch.setattr(b, "_conntrack_count", lambda: 0)
    monkeypatch.setattr(b, "_tally", lambda: NB._Tally({}, {}, {}, 0.0, 0.0))
    monkeypatch.setattr(b, "_run", lambda argv, check=True: subprocess.CompletedProcess(argv, 0, "", ""))
    b.zero()  # start() takes its base the same way
    seen = [r["DROP_PORT_EXHAUSTED"] for r in (b.stats().reasons for _ in range(2))]
    assert seen == [0, 3]
