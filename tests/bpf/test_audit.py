"""The audit log's datapath side (issue 13): with `audit_log` set, the new-flow path puts a
create record in the snat_audit ring buffer after the session pair is inserted, the sweep puts
an end record per session it expires or flushes; off, nothing is written; a full ring drops
and counts records and never stops a packet.  Real programs by BPF_PROG_TEST_RUN, the ring read
through libbpf as the daemon reads it."""

from dataclasses import replace
from ipaddress import ip_network

import pytest

from snatgw import layout as L
from snatgw.datapath.bpf import libbpf as B
from snatgw.datapath.bpf.audit import AuditRing, decode
from snatgw.datapath.bpf.maps import DatapathMaps, map_specs
from snatgw.datapath.bpf.sweep import SessionFilter, Sweeper

from tests.cases.corpus import REF_RULES, REF_SETTINGS, RULE_SDH, ruleset
from tests.cases.pkts import A, R1, echo, snat_of, tcp, udp

pytestmark = pytest.mark.bpf

AUDIT = replace(REF_SETTINGS, audit_log="/var/log/snatgw/audit.jsonl")


class Ring:
    """The harness's ring read as the daemon reads it (libbpf ring_buffer, bounded drains)."""

    def __init__(self, prog):
        self.rb = B.RingBuffer(prog.maps[L.MAP_AUDIT].fd)

    def records(self, limit=100_000):
        return [decode(r) for r in self.rb.drain(limit)]


def counts(prog):
    m = prog.maps[L.MAP_AUDIT_CNT]
    return [m.sum_percpu(k) for k in range(L.AUDIT_CNT_N)]


def sweeper(prog):
    """The sweep program over the harness's maps (as the backend loads it)."""
    maps = {n: prog.obj.map(n) for n in map_specs()}
    return Sweeper(DatapathMaps(maps))


def test_create_record_has_the_sessions_addresses(make_prog):
    prog = make_prog(ruleset(REF_RULES), AUDIT)
    ring = Ring(prog)
    r = prog.run("inside", udp(A, R1, 40000, 53), "lan40", now=5)
    assert r.reason == L.Reason.XLATE_NEW
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    [rec] = ring.records()
    assert rec["event"] == "create" and rec["proto"] == "udp"
    assert (rec["inside_addr"], rec["inside_port"]) == (A, 40000)
    assert (rec["nat_addr"], rec["nat_port"]) == (addr, port)
    assert (rec["remote_addr"], rec["remote_port"]) == (R1, 53)
    assert rec["rule_id"] == RULE_SDH.rule_id
    # established packets and replies make no record; a second flow makes its own
    prog.run("inside", udp(A, R1, 40000, 53), "lan40", now=6)
    prog.run("outside", udp(R1, addr, 53, port), "eth1", now=6)
    assert ring.records() == []
    prog.run("inside", tcp(A, R1, 40001, 80, "S"), "lan40", now=7)
    [t] = ring.records()
    assert (t["proto"], t["inside_port"], t["remote_port"]) == ("tcp", 40001, 80)
    assert counts(prog) == [2, 0]


def test_echo_record_carries_the_identifiers(make_prog):
    prog = make_prog(ruleset(REF_RULES), AUDIT)
    ring = Ring(prog)
    prog.run("inside", echo(A, R1, 777), "lan40")
    addr, port = snat_of(RULE_SDH, A, R1, 777)
    [rec] = ring.records()
    assert (rec["proto"], rec["inside_port"], rec["nat_addr"], rec["nat_port"], rec["remote_port"]) == \
        ("icmp", 777, addr, port, 0)


def test_off_by_default_writes_nothing(make_prog):
    prog = make_prog(ruleset(REF_RULES), REF_SETTINGS)
    ring = Ring(prog)
    for i in range(5):
        assert prog.run("inside", udp(A, R1, 41000 + i, 53), "lan40").reason == L.Reason.XLATE_NEW
    sweeper(prog).flush()
    assert ring.records() == [] and counts(prog) == [0, 0]


def test_refused_and_passed_flows_make_no_record(make_prog):
    prog = make_prog(ruleset(REF_RULES), AUDIT)
    ring = Ring(prog)
    r = prog.run("inside", tcp(A, R1, 40000, 80, "A"), "lan40")  # no SYN: no session
    assert r.reason == L.Reason.DROP_NO_SESSION
    assert ring.records() == []


def test_sweep_writes_end_records_for_expired_and_flushed_sessions(make_prog):
    prog = make_prog(ruleset(REF_RULES), AUDIT)
    ring = Ring(prog)
    for i in range(3):
        prog.run("inside", udp(A, R1, 42000 + i, 53), "lan40", now=10)
    assert len(ring.records()) == 3
    sw = sweeper(prog)
    t0 = (10 + 1000) * 10**9  # the programs' clock in the harness (CLOCK_BASE)
    timeouts = {s: 60 * 10**9 for s in range(256)}
    # 30 s later nothing is idle past 60 s: nothing ends
    assert sw.expire(t0 + 30 * 10**9, timeouts, 10**9).removed == 0
    assert ring.records() == []
    res = sw.flush(SessionFilter(inside=ip_network(A)))
    assert res.removed == 3
    ends = ring.records()
    assert sorted(e["inside_port"] for e in ends) == [42000, 42001, 42002]
    assert {e["event"] for e in ends} == {"end"} and {e["why"] for e in ends} == {"flush"}
    assert {e["state"] for e in ends} == {"UDP"}
    # expiry
    prog.run("inside", udp(A, R1, 43000, 53), "lan40", now=10)
    ring.records()
    assert sw.expire(t0 + 61 * 10**9, timeouts, 10**9).removed == 1
    [e] = ring.records()
    assert (e["why"], e["inside_port"]) == ("expired", 43000)
    assert abs(e["last_seen"] - e["time"] + 61) < 1e-6  # idle for 61 s when it ended
    sw.close()


def test_full_ring_drops_and_counts_records_and_packets_still_pass(make_prog):
    ring_bytes = 16384  # a small ring (the same code): 292 records fill it
    prog = make_prog(ruleset(REF_RULES), AUDIT, defines={"SNAT_AUDIT_RING_BYTES": ring_bytes})
    per = L.AUDIT_REC.size + 8  # ring header
    fits = ring_bytes // per
    n = fits + 300
    reasons = set()
    for i in range(n):  # nobody reads the ring meanwhile
        src = f"198.18.40.{10 + i % 200}"
        reasons.add(prog.run("inside", udp(src, R1, 1024 + i // 200, 53), "lan40").reason)
    assert reasons == {L.Reason.XLATE_NEW}  # every flow translated, ring full or not
    written, lost = counts(prog)
    assert written + lost == n and lost >= 300 and written >= fits - 1
    ring = Ring(prog)
    got = ring.records(limit=100)
    assert len(got) == 100  # a bounded drain: the rest stays for the next
    rest = ring.records()
    assert len(got) + len(rest) == written
    # once read, the ring takes records again
    prog.run("inside", udp(A, R1, 44000, 53), "lan40")
    assert [r["inside_port"] for r in ring.records()] == [44000]


def test_the_daemons_line_is_format_record_of_the_decoded_record():
    """The hot path (record -> line, no dict) writes exactly what format_record(decode()) does,
    for create and end records, TCP, UDP, ICMP and a protocol without ports."""
    from snatgw.daemon.audit import format_record, iso
    from snatgw.datapath.bpf.audit import line

    off = 1.795e9
    for kind, why, proto, state in ((L.AUDIT_NEW, 0, 17, 11), (L.AUDIT_END, L.AUDIT_END_EXPIRED, 6, 5),
                                    (L.AUDIT_END, L.AUDIT_END_FLUSH, 1, 12), (L.AUDIT_NEW, 0, 47, 0)):  # fmt: skip
        raw = L.AUDIT_REC.pack(ts=123_456_789_012, inside=0xC6122810, nat=0xC6130247, remote=0xCB00710A,
                               inside_port=40000, nat_port=40001, remote_port=53, kind=kind, proto=proto,
                               rule_id=4_000_000_000, why=why, state=state, last_seen=120_000_000_000)  # fmt: skip
        assert line(raw, off, iso) == format_record(decode(raw, off), "bpf")
