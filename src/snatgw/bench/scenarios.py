"""One measurement per function, against a gateway already running in a Topology.

Each returns a record (dict) for the results file: metric, value and the raw figures behind
it.  Packet scenarios count at the sink (or the gateway's drop rule) over a timed window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from . import topo, traffic
from .gateways import Gateway

#: packet scenarios (UDP, trafgen) -> (trafgen pattern, trafgen_conf options)
UDP_SCENARIOS = {
    "udp-1flow": ("one", {}),
    "udp-10kflows": ("ports10k", {}),
    "udp-newflows": ("new", {}),
    # the same to random server ports: new flows spread over many remote endpoints, as a
    # gateway's do, so each (SNAT address, remote endpoint) port space stays nearly empty
    "udp-newflows-spread": ("new", {"dport": "drnd(1024, 65535)"}),
}
TCP_SCENARIOS = ("tcp-cycles", "tcp-bulk")
#: port pressure (issue 11): one inside host, random source ports, one server address and port,
#: the 11-address sdh pool; the figure is the generator's offered rate (refused packets never
#: reach the sink), with the sessions made and the refusals
PRESSURE_SCENARIOS = ("udp-portpressure",)
PACKET_SCENARIOS = tuple(UDP_SCENARIOS) + PRESSURE_SCENARIOS + TCP_SCENARIOS
SUITE_SCENARIOS = ("rules", "sessions", "control", "progbench", "sessions-cp")
ALL_SCENARIOS = PACKET_SCENARIOS + SUITE_SCENARIOS

TITLES = {
    "udp-1flow": "1. one established UDP flow",
    "udp-10kflows": "2. 10k flows (source ports)",
    "udp-newflows": "3a. new sessions (every packet a new flow)",
    "udp-newflows-spread": "3a'. new sessions to random server ports",
    "udp-portpressure": "3c. port pressure: one host, 64k source ports, one server port",
    "tcp-cycles": "3b. TCP connect/close cycles",
    "tcp-bulk": "4. bulk TCP (iperf3)",
    "rules": "5. rule-count scaling",
    "sessions": "6. session-table scale",
    "control": "7. control plane",
    "progbench": "BPF_PROG_TEST_RUN per-packet cost (snatgw.bench.progbench)",
    "sessions-cp": "8. control plane at 1M sessions: stats, conns, expiry, new flows (bpf)",
}


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def udp(t: topo.Topology, gw: Gateway, pattern: str, duration: float, **conf) -> dict:
    def blast() -> traffic.Window:
        return traffic.blast(t, traffic.trafgen_conf(t.gw_in_mac, pattern, **conf), gw.count_ns, duration)

    w = blast()
    rec = {"metric": "pps", "value": w.pps, "packets": w.packets, "seconds": round(w.seconds, 4),
           "cpu": w.cpu, "cpu_ns": w.cpu_ns_per_packet(), "loadavg": loadavg()}
    if gw.name != "drop":
        rec["translated"] = w.translated
        if gw.name != "forward" and w.packets and w.translated < 0.99 * w.packets:
            rec.update(status="error", reason=f"only {w.translated} of {w.packets} packets arrived translated")
    if gw.name == "snatgw-bpf" and pattern == "new" and rec.get("status") != "error":
        rec.update(_program_pass(t, gw, blast, lambda pw: pw.pps))  # 3a, 3a': a new flow's own time
    return rec


def port_pressure(t: topo.Topology, gw: Gateway, duration: float) -> dict:
    """One host sending from random source ports (of all 65,536) to one server address and
    port through the 11-address sdh pool.  value: packets per second the generator got
    through the gateway (translated or refused: every packet costs the gateway); delivered:
    those that reached the sink translated; sessions made and refusals, as each gateway
    counts them."""
    _fresh_table(t, gw)  # a fresh gateway's is empty: this says so whoever runs it
    before = _conntrack_stat(t.gw) if gw.name == "nft-kernel" else {}
    # the allocator's counters run since the daemon started: this run's are the difference
    alloc0 = daemon_allocator(gw) if gw.name.startswith("snatgw-") else None
    w = _blast_ports64k(t, gw, duration)
    offered = w.offered if gw.name != "drop" else w.packets
    rec = {"metric": "pps", "value": offered / w.seconds if w.seconds > 0 else 0.0, "offered": offered,
           "seconds": round(w.seconds, 4), "cpu": w.cpu, "cpu_ns": None, "loadavg": loadavg()}  # fmt: skip
    if w.task_cpu_s is not None and offered:  # drop's too: the pipeline CPU figure pairs with it
        rec["cpu_ns"] = w.task_cpu_s * 1e9 / offered
    if gw.name == "drop":
        return rec
    rec["delivered_pps"] = w.translated / w.seconds if w.seconds > 0 else 0.0
    if gw.name == "nft-kernel":
        after = _conntrack_stat(t.gw)
        rec["sessions"] = after.get("entries")
        rec["refused_flows"] = after.get("insert_failed", 0) - before.get("insert_failed", 0)
    elif gw.name.startswith("snatgw-"):
        reasons = daemon_reasons(gw) or {}
        alloc = allocator_delta(alloc0, daemon_allocator(gw))
        for k in ("spill_memo_hits", "port_searches", "port_search_tries"):
            if alloc.get(k) is not None:
                rec[k] = alloc[k]
        rec["sessions"] = daemon_sessions(gw)
        rec["refused_flows"] = reasons.get("DROP_PORT_EXHAUSTED", 0)
        rec["refused_marker_packets"] = reasons.get("DROP_REFUSED_RECENTLY", 0)
        rec["reasons"] = reasons
    if gw.name == "snatgw-bpf":
        rec.update(_program_pass(t, gw, lambda: _blast_ports64k(t, gw, duration),
                                 lambda pw: pw.offered / pw.seconds if pw.seconds > 0 else None))
    return rec


def _blast_ports64k(t: topo.Topology, gw: Gateway, duration: float) -> traffic.Window:
    """3c's traffic: one host, random source ports over all 65,536, one server port; the
    offered count (every packet the generator got out, translated or refused)."""
    return traffic.blast(t, traffic.trafgen_conf(t.gw_in_mac, "ports64k"), gw.count_ns, duration, offered=True)


def _program_pass(t: topo.Topology, gw: Gateway, blast, rate) -> dict:
    """Where the live cost goes: the inside program's own ns per packet (run_time_ns /
    run_cnt), from a second blast of the same kind and length from an emptied table, with the
    programs' run-time statistics on (bpf_stats).  Not the measured blast: the kernel then
    reads its clock twice around every program run, which in a VM costs hundreds of ns per
    packet and would be charged to snatgw-bpf alone.  ``blast`` runs the scenario's traffic once
    more; prog_pass_pps (``rate`` of its window): this pass's rate, what the instrumentation
    itself costs against the measured one."""
    _fresh_table(t, gw)
    with bpf_stats():
        p0 = _tc_prog_stats(t.gw, topo.GW_IN)
        w = blast()
        p1 = _tc_prog_stats(t.gw, topo.GW_IN) if p0 else None
    if not (p0 and p1 and p1[1] > p0[1]):
        return {}
    return {"prog_ns_per_run": (p1[0] - p0[0]) / (p1[1] - p0[1]), "prog_runs": p1[1] - p0[1],
            "prog_pass_pps": rate(w)}


def _fresh_table(t: topo.Topology, gw: Gateway) -> None:
    """Empty the session table before a measurement (the daemon's flush; conntrack -F for the
    kernel's), so a measurement starts from no sessions whatever ran before it on this gateway."""
    if gw.name.startswith("snatgw-"):
        try:
            from ..daemon.client import call

            call(gw.socket, {"op": "flush"}, timeout=120)
        except Exception:  # noqa: BLE001 - then the record says what the table held
            pass
    if gw.name != "drop":
        topo.run(["conntrack", "-F"], ns=t.gw, check=False)


class bpf_stats:
    """Programs' run-time statistics for the span of a measurement: BPF_ENABLE_STATS, whose fd
    the kernel releases when it is closed or this process dies (no global sysctl is written,
    nothing stays on after a crash), so run_time_ns/run_cnt count.  Where the kernel or
    libbpf cannot (``fd`` None) the figures are simply missing from the record."""

    def __init__(self, on: bool = True):
        self.on, self.fd = on, None

    def __enter__(self):
        if self.on:
            from ..datapath.bpf import libbpf

            try:
                self.fd = libbpf.enable_run_time_stats()
            except Exception:  # noqa: BLE001 - no stats: the caller's figures are absent
                self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _tc_prog_stats(ns: str, dev: str) -> tuple[int, int] | None:
    """(run_time_ns, run_cnt) of the TC ingress program on ``dev`` in ``ns``."""
    try:
        net = json.loads(topo.run(["bpftool", "-j", "net", "show", "dev", dev], ns=ns).stdout)
        ids = [f["id"] for e in net for f in e.get("tc", []) if f.get("kind") == "clsact/ingress" and "id" in f]
        if not ids:
            return None
        info = json.loads(topo.run(["bpftool", "-j", "prog", "show", "id", str(ids[0])]).stdout)
        return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))
    except (RuntimeError, ValueError, KeyError, IndexError):
        return None


def _conntrack_stat(ns: str) -> dict[str, int]:
    """conntrack's entries and insert_failed (summed over CPUs) in ``ns``."""
    p = topo.run(["cat", "/proc/net/stat/nf_conntrack"], ns=ns, check=False)
    lines = p.stdout.splitlines()
    if not lines:
        return {}
    names, tot = lines[0].split(), {}
    for line in lines[1:]:
        for n, v in zip(names, line.split()):
            tot[n] = tot.get(n, 0) + int(v, 16)
    cnt = topo.run(["cat", "/proc/sys/net/netfilter/nf_conntrack_count"], ns=ns, check=False).stdout.strip()
    tot["entries"] = int(cnt) if cnt.isdigit() else tot.get("entries", 0)
    return tot


def _ns_py(ns: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, "taskset", "-c", "0", sys.executable, "-m", *args]


def tcp_cycles(t: topo.Topology, gw: Gateway, duration: float, concurrency: int = 64) -> dict:
    server = subprocess.Popen(_ns_py(t.sink, "snatgw.bench.tcpload", "server", "--duration", str(duration + 15)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        p = topo.run(_ns_py(t.gen, "snatgw.bench.tcpload", "client", "--host", topo.SINK_ADDR,
                            "--duration", str(duration), "--concurrency", str(concurrency)),
                     timeout=duration + 30)
        res = json.loads(p.stdout.strip().splitlines()[-1])
    finally:
        _kill_group(server)
    rec = {"metric": "conn/s", "value": res["connections"] / res["seconds"], "loadavg": loadavg(), **res}
    if res["connections"] == 0:
        rec.update(status="error", reason=f"no connection completed ({res['errors']} errors)")
    return rec


def tcp_bulk(t: topo.Topology, gw: Gateway, duration: float) -> dict:
    secs = max(1, round(duration))
    server = subprocess.Popen(["ip", "netns", "exec", t.sink, "timeout", str(secs + 20), "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        p = topo.run(["ip", "netns", "exec", t.gen, "taskset", "-c", "0", "iperf3", "-c", topo.SINK_ADDR,
                      "-t", str(secs), "-J"], check=False, timeout=secs + 30)
    finally:
        _kill_group(server)
    try:
        res = json.loads(p.stdout)
    except ValueError:
        return {"metric": "Gbit/s", "value": None, "status": "error", "reason": f"iperf3: {p.stderr.strip()[-200:]}"}
    if "error" in res:
        return {"metric": "Gbit/s", "value": None, "status": "error", "reason": f"iperf3: {res['error']}"}
    bps = res["end"]["sum_received"]["bits_per_second"]
    return {"metric": "Gbit/s", "value": bps / 1e9, "retransmits": res["end"].get("sum_sent", {}).get("retransmits"),
            "loadavg": loadavg()}


def _kill_group(p: subprocess.Popen) -> None:
    """Stop a server we started, and any child of it (timeout's iperf3), by its process group."""
    try:
        os.killpg(p.pid, 9)
    except ProcessLookupError:
        pass
    p.wait()


def measure(scenario: str, t: topo.Topology, gw: Gateway, duration: float) -> dict:
    """One round of one packet scenario against a running gateway."""
    if scenario in UDP_SCENARIOS:
        pattern, conf = UDP_SCENARIOS[scenario]
        return udp(t, gw, pattern, duration, **conf)
    if scenario in PRESSURE_SCENARIOS:
        return port_pressure(t, gw, duration)
    if gw.name == "drop":
        return {"status": "n/a", "reason": "the drop baseline stops every packet: no TCP", "value": None}
    if scenario == "tcp-cycles":
        return tcp_cycles(t, gw, duration)
    if scenario == "tcp-bulk":
        return tcp_bulk(t, gw, duration)
    raise ValueError(f"unknown packet scenario {scenario!r}")


# ------------------------------------------------------------------ sessions / control plane


def seq_hosts_for(n: int, ports: int = 4096) -> int:
    """Largest odd prime p with p * ports <= n (at least 3): lockstep counters over p hosts and
    ``ports`` ports (a power of two) then repeat after exactly p * ports distinct flows."""
    p = max(3, n // ports)
    while p > 3 and (p % 2 == 0 or any(p % d == 0 for d in range(3, int(p ** 0.5) + 1, 2))):
        p -= 1
    return p


def session_memory(maps: list[dict], max_sessions: int) -> dict:
    """Split map memory into what scales with the session table (maps with at least
    ``max_sessions`` entries) and the fixed rest; per session at capacity; MiB for 1M."""
    per_table = sum(m.get("bytes_memlock") or 0 for m in maps if (m.get("max_entries") or 0) >= max_sessions)
    fixed = sum(m.get("bytes_memlock") or 0 for m in maps) - per_table
    if not per_table or max_sessions <= 0:
        return {}
    per = per_table / max_sessions
    return {"session_map_bytes": per_table, "fixed_map_bytes": fixed, "bytes_per_session": per,
            "mib_per_1m_sessions": (per * 1_000_000 + fixed) / 2**20}


def pinned_maps(pin_dir: str) -> list[dict]:
    """bpftool's view (name, type, max_entries, bytes_memlock) of every map pinned in ``pin_dir``."""
    out = []
    if not os.path.isdir(pin_dir):
        return out
    for name in sorted(os.listdir(pin_dir)):
        p = subprocess.run(["bpftool", "-j", "map", "show", "pinned", os.path.join(pin_dir, name)],
                           capture_output=True, text=True)
        if p.returncode == 0:
            try:
                m = json.loads(p.stdout)
            except ValueError:
                continue
            out.append({k: m.get(k) for k in ("name", "type", "max_entries", "bytes_memlock", "key", "value")}
                       | {"pin": name})
    return out


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0]) * 1024 if v.split() else 0
    return out


def conntrack_objsize() -> int | None:
    """Bytes per kernel conntrack entry (slab object size), for comparison."""
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                if line.startswith("nf_conntrack "):
                    return int(line.split()[3])
    except OSError:
        pass
    return None


def daemon_sessions(gw: Gateway) -> int | None:
    """Live session count: for bpf, the pinned session map's entries / 2 (counted now; the
    daemon's `stats` figure is the last GC sweep's, which may be seconds old); otherwise the
    daemon's `stats` answer.  None if neither can say."""
    from ..layout import MAP_CT

    ct = os.path.join(gw.pin_dir, MAP_CT)
    if gw.name == "snatgw-bpf" and os.path.exists(ct):
        try:
            from ..datapath.bpf.libbpf import Map

            m = Map.open_pinned(ct, readonly=True)
            try:
                return len(m) // 2
            finally:
                m.close()
        except Exception:  # noqa: BLE001 - fall back to the daemon's figure
            pass
    try:
        from ..daemon.client import call
        return int(call(gw.socket, {"op": "stats"}, timeout=120)["stats"]["sessions"])
    except Exception:  # noqa: BLE001 - any failure means "unknown", reported as such
        return None


def audit_counts(gw: Gateway) -> dict:
    """The audit log's counters so far (the gateway runs one scenario: that scenario's):
    records written, lost in the datapath (ring full), lost by writes; {} when they cannot be
    read (a daemon that does not answer in time included: the figure just measured is kept)."""
    try:
        cp = gw.cli("status", "--json", timeout=30)
        a = json.loads(cp.stdout).get("audit") or {}
    except (subprocess.SubprocessError, OSError, ValueError, AttributeError):
        return {}
    return {"audit_records": a.get("records"), "audit_lost_datapath": a.get("lost_datapath"),
            "audit_lost_write": a.get("lost_write")}


def daemon_allocator(gw: Gateway) -> dict[str, int] | None:
    """The daemon's port allocator counters (bpf: spill memo hits, memos written), if any."""
    try:
        from ..daemon.client import call

        return call(gw.socket, {"op": "stats"}, timeout=120)["stats"].get("pressure", {}).get("allocator")
    except Exception:  # noqa: BLE001
        return None


def allocator_delta(before: dict | None, after: dict | None) -> dict[str, int | None]:
    """The allocator's counters over one run: ``after`` less ``before`` (daemon_allocator
    readings); a counter either lacks (nft, an old datapath) is None, never a made-up 0."""
    before, after = before or {}, after or {}
    return {k: (v - before[k] if isinstance(v, int) and isinstance(before.get(k), int) else None)
            for k, v in after.items() if k not in ("last_interval", "tries_per_search")}


def daemon_reasons(gw: Gateway) -> dict[str, int] | None:
    """The daemon's non-zero per-reason counters (why packets were passed or dropped)."""
    try:
        from ..daemon.client import call
        reasons = call(gw.socket, {"op": "stats"}, timeout=120)["stats"]["reasons"]
        return {k: v for k, v in reasons.items() if v}
    except Exception:  # noqa: BLE001
        return None
