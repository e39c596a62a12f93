"""progbench runs end to end (tiny counts): every case is measured and the bench wrappers
really restore the packet, so repeated rounds of an established flow stay XLATE_OUT."""

import pytest

from snatgw.layout import Reason

pytestmark = pytest.mark.bpf


def test_progbench_measures_every_case():
    """All cases come back with a number (no timing is asserted); the refused flow's figure is
    the refusal marker's (measure() checks that every run met it, DROP_REFUSED_RECENTLY)."""
    from snatgw.bench.progbench import measure

    rows = measure(repeat=50, rounds=1, new_flows=20, cold_sessions=2000)
    names = [r[0] for r in rows]
    assert {"established (udp out)", "new flow (udp)", "reply (udp in)", "icmp error in",
            "new flow (udp), 2k sessions", "new flow refused, 128 tries",
            "new flow refused, 128 tries, spill memo young", "new flow, route back reused",
            "new flow, route back looked up", "refused flow (marker)"} <= set(names)
    assert all(isinstance(ns, (int, float)) for _, ns, _ in rows)


def test_bench_wrapper_restores_the_packet_between_rounds(bench_prog):
    """100 rounds of bench_inside on one established packet count 100 XLATE_OUT, and
    bench_new makes a new session every round."""
    from scapy.layers.inet import IP, UDP
    from scapy.packet import raw

    from snatgw.bench.progbench import PAD, RULES
    from snatgw.config.schema import Settings
    from snatgw.rules import Rule, RuleSet

    h = bench_prog  # the SNAT_BENCH build as a fresh load (tests/bpf/conftest.py)
    h.apply(RuleSet([Rule.from_dict(d) for d in RULES]), Settings(port_tries=64))
    pkt = raw(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=40000, dport=53) / PAD)
    h.run("inside", pkt, "lan40")
    h.bench("bench_inside", pkt, "lan40", 100)
    assert h.reasons() == {Reason.XLATE_NEW: 1, Reason.XLATE_OUT: 100}
    h.bench("bench_new", pkt, "lan40", 50)
    assert h.reasons()[Reason.XLATE_NEW] == 51 and len(h.ct()) == 2 * 51


def _runs(fd: int) -> int:
    """run_cnt of the program behind ``fd`` (its fdinfo)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("run_cnt:"))


def test_bench_statistics_count_runs_while_held_and_write_no_sysctl(bench_prog, monkeypatch):
    """The bench's program-time pass (scenarios.bpf_stats) makes the kernel count runs through
    BPF_ENABLE_STATS, never by writing kernel.bpf_stats_enabled (a global sysctl), and counting
    ends with it: 20 runs held count 20; after it (the sysctl off, as on this machine) none."""
    import builtins

    from scapy.layers.inet import IP, UDP
    from scapy.packet import raw

    from snatgw.bench.progbench import PAD
    from snatgw.bench.scenarios import bpf_stats

    real_open, written = builtins.open, []

    def watch(path, mode="r", *a, **kw):
        if "bpf_stats_enabled" in str(path) and any(c in mode for c in "wa+"):
            written.append(path)
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", watch)
    h = bench_prog
    pkt = raw(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=40000, dport=53) / PAD)
    fd = h.obj.prog_fd("bench_inside")
    before = _runs(fd)
    with bpf_stats() as st:
        assert st.fd is not None
        h.bench("bench_inside", pkt, "lan40", 20)
        held = _runs(fd)
    h.bench("bench_inside", pkt, "lan40", 20)
    assert held - before == 20
    with real_open("/proc/sys/kernel/bpf_stats_enabled") as f:
        if f.read().strip() == "0":  # the host counts nothing itself: the fd's end stops ours
            assert _runs(fd) == held
    assert written == [] and st.fd is None
