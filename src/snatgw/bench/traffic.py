"""Traffic and counting: trafgen packet configs (pure), a bounded trafgen run pinned to CPU0,
nftables netdev ingress counters, and /proc/stat CPU-time deltas.

A measurement window opens after a short warm-up and closes before trafgen is stopped, so
neither start-up nor tear-down is in the figure: pps = counter delta / window length.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from . import topo

COUNTER_TABLE = "sgbench"
USER_HZ = 100  # /proc/stat ticks per second (sysconf(_SC_CLK_TCK) on Linux)

#: flow patterns: name -> (ip source field, udp source port field)
PATTERNS = {
    "one": (topo.GEN_ADDR, "40000"),
    "ports10k": (topo.GEN_ADDR, "dinc(10000, 19999)"),
    # every packet a new flow: random source address in 198.18.128.0/17 and random port
    "new": ("198.18.128.0, sa[2:2]=drnd(32768, 65535)", "drnd(1024, 65535)"),
    # the same from 198.18.129.0-198.18.255.255: never one of the first 256 seq_hosts sources
    "new-above-seq": ("198.18.128.0, sa[2:2]=drnd(33024, 65535)", "drnd(1024, 65535)"),
    # port pressure: one inside host, random source ports over all 65,536 (issue 11)
    "ports64k": (topo.GEN_ADDR, "drnd(0, 65535)"),
}


def trafgen_conf(dst_mac: str, pattern: str = "one", *, dst: str = topo.SINK_ADDR, dport: int | str = 9,
                 fill: int = 18, seq_hosts: int = 0, seq_ports: int = 0) -> str:
    """One trafgen packet: Ethernet to the gateway, IPv4, UDP, zero payload to 60 bytes (64 on
    the wire with FCS).  ``seq_hosts``/``seq_ports`` (both > 0) instead count source address
    (low 16 bits from 198.18.128.0) and port up together: lcm(hosts, ports) distinct flows."""
    if seq_hosts and seq_ports:
        sa = f"198.18.128.0, sa[2:2]=dinc(32768, {32768 + seq_hosts - 1})"
        sp = f"dinc(1024, {1024 + seq_ports - 1})"
    else:
        sa, sp = PATTERNS[pattern]
    return (f"{{ eth(da={dst_mac}), ipv4(sa={sa}, da={dst}, ttl=64, df), "
            f"udp(sp={sp}, dp={dport}), fill(0x00, {fill}) }}\n")


def parse_nft_counters(text: str) -> list[int]:
    """The packet counters of ``nft -j list table`` output, in rule order."""
    out = []
    for obj in json.loads(text).get("nftables", []):
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                out.append(int(expr["counter"]["packets"]))
    return out


def install_gw_drop(ns: str, ifname: str = topo.GW_IN) -> None:
    """The baseline: count and drop everything at the gateway's inside ingress."""
    text = (f"table netdev {COUNTER_TABLE} {{ chain ingress {{ type filter hook ingress device {ifname} "
            f"priority -500; counter drop; }}; }}\n")
    topo.run(["nft", "-f", "-"], ns=ns, input=text)


def install_sink_counter(ns: str, ifname: str = topo.SINK_IF) -> None:
    """Count and drop the test datagrams at the sink: first those from the SNAT pool
    (translated), then any other (untranslated).  TCP is left alone."""
    pool = f"{topo.POOL_FIRST}-{topo.POOL_LAST}"
    text = (f"table netdev {COUNTER_TABLE} {{ chain ingress {{ type filter hook ingress device {ifname} "
            f"priority -500; ip saddr {pool} meta l4proto udp counter drop; meta l4proto udp counter drop; }}; }}\n")
    topo.run(["nft", "-f", "-"], ns=ns, input=text)


def read_counters(ns: str) -> list[int]:
    return parse_nft_counters(topo.run(["nft", "-j", "list", "table", "netdev", COUNTER_TABLE], ns=ns).stdout)


def parse_proc_stat(text: str) -> dict[str, list[int]]:
    """``/proc/stat`` cpuN lines -> {cpuN: [user, nice, system, idle, iowait, irq, softirq, steal]}."""
    out = {}
    for line in text.splitlines():
        f = line.split()
        if f and f[0].startswith("cpu") and f[0] != "cpu":
            out[f[0]] = [int(x) for x in f[1:9]]
    return out


def cpu_delta(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Per CPU, seconds spent in user/system/softirq/busy (all but idle+iowait) between two reads,
    and steal (the hypervisor ran something else on that virtual CPU; within busy): kept per
    run to tell a run slowed by stolen time from one slowed otherwise (turn 18's runs of one
    code spread 10-15% while CPU0 reported at most 4% steal, mostly none)."""
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    out = {}
    for cpu, a in after.items():
        b = before.get(cpu, a)
        d = {n: (x - y) / USER_HZ for n, x, y in zip(names, a, b)}
        d["busy"] = sum(v for n, v in d.items() if n not in ("idle", "iowait"))
        out[cpu] = {k: round(d[k], 3) for k in ("user", "system", "softirq", "steal", "busy")}
    return out


def read_proc_stat() -> dict[str, list[int]]:
    with open("/proc/stat") as f:
        return parse_proc_stat(f.read())


def tx_packets(ns: str, ifname: str = topo.GEN_IF) -> int:
    """Packets sent by ``ifname`` in ``ns`` (the generator's offered load)."""
    p = topo.run(["ip", "-j", "-s", "link", "show", "dev", ifname], ns=ns)
    return int(json.loads(p.stdout)[0]["stats64"]["tx"]["packets"])


@dataclass
class Window:
    packets: int
    seconds: float
    cpu: dict
    translated: int = 0  # of ``packets``, those that arrived from a SNAT pool address
    task_cpu_s: float | None = None  # CPU seconds of the pipeline's own tasks (pipeline_pids)
    offered: int | None = None  # packets the generator sent in the window (blast(offered=True))

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0

    def cpu_ns_per_packet(self) -> float | None:
        """CPU time of the pipeline's own tasks (trafgen and the ksoftirqd threads) per counted
        packet: unlike 1e9/pps it does not grow when other processes take CPU0's time."""
        if not self.packets or self.task_cpu_s is None:
            return None
        return self.task_cpu_s * 1e9 / self.packets


def trafgen_argv(conf_path: str, ifname: str = topo.GEN_IF, num: int = 0, gap_us: int = 0) -> list[str]:
    """trafgen pinned to CPU0, one process, host socket memory and IRQs left alone; ``num``
    packets (0: until stopped); ``gap_us``: a packet every that many microseconds, each by its
    own sendto() (trafgen's --rate fills its TX ring and sends it in bursts: ~1 s apart at
    2k pps), else as fast as it can."""
    argv = ["taskset", "-c", "0", "trafgen", "-o", ifname, "-c", conf_path, "--cpus", "1",
            "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]
    return argv + (["-n", str(num)] if num else []) + (["-t", f"{gap_us}us"] if gap_us else [])


def bounded(argv: list[str], seconds: float) -> list[str]:
    """``argv`` under timeout(1): SIGINT after ``seconds``, SIGKILL 5 s later.  The caller stops
    trafgen itself, but a caller killed meanwhile (a test's timeout, SIGKILL) cannot: a trafgen
    left running once sent into a namespace nobody owned any more for 78 minutes, a CPU's worth
    of load under every benchmark after it."""
    return ["timeout", "-s", "INT", "-k", "5", f"{seconds:.0f}"] + argv


def blast(t: "topo.Topology", conf: str, count_ns: str, duration: float, warmup: float = 0.3,
          offered: bool = False) -> Window:
    """Run trafgen in the generator for warm-up + ``duration`` seconds (hard bound) and count
    the packets arriving at ``count_ns``'s counter during the measured window (and, with
    ``offered``, those the generator sent in it)."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="sgbench-") as f:
        f.write(conf)
        f.flush()
        p = subprocess.Popen(bounded(["ip", "netns", "exec", t.gen] + trafgen_argv(f.name), warmup + duration + 30),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            time.sleep(warmup)
            if p.poll() is not None:
                raise RuntimeError(f"trafgen exited {p.returncode}: {p.stderr.read().strip()[-300:]}")
            pids = pipeline_pids(p.pid)
            o0 = tx_packets(t.gen) if offered else 0
            c0, s0, k0, t0 = read_counters(count_ns), read_proc_stat(), task_ticks(pids), time.monotonic()
            time.sleep(duration)
            c1, s1, k1, t1 = read_counters(count_ns), read_proc_stat(), task_ticks(pids), time.monotonic()
            o1 = tx_packets(t.gen) if offered else 0
        finally:
            _stop_group(p)
    delta = [b - a for a, b in zip(c0, c1)]
    return Window(sum(delta), t1 - t0, cpu_delta(s0, s1), delta[0] if len(delta) > 1 else 0,
                  task_cpu_s=(k1 - k0) / USER_HZ, offered=(o1 - o0) if offered else None)


def pid_ticks(stat_line: str) -> int:
    """utime + stime (clock ticks) from a /proc/<pid>/stat line (the name may hold spaces)."""
    f = stat_line.rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def task_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                total += pid_ticks(fh.read())
        except (OSError, IndexError, ValueError):
            pass
    return total


def pipeline_pids(trafgen_pid: int) -> list[int]:
    """trafgen, its forked sender(s) and the ksoftirqd threads: every task that runs the
    generator -> gateway -> sink pipeline.  Without IRQ time accounting (this kernel) softirq
    work done in trafgen's context is charged to trafgen's system time."""
    pids, todo = [], [trafgen_pid]
    while todo and len(pids) < 16:  # trafgen under timeout(1) (bounded), and its forked sender
        pid = todo.pop()
        pids.append(pid)
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as fh:
                todo += [int(x) for x in fh.read().split()]
        except OSError:
            pass
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as fh:
                    if fh.read().startswith("ksoftirqd/"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def _stop_group(p: subprocess.Popen) -> None:
    """trafgen forks its sender: SIGINT the process group we started (as Ctrl-C would)."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def send_count(t: "topo.Topology", conf: str, num: int, timeout: float = 120) -> None:
    """Send exactly ``num`` packets (e.g. to fill a session table), bounded in time."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="sgbench-") as f:
        f.write(conf)
        f.flush()
        topo.run(bounded(["ip", "netns", "exec", t.gen] + trafgen_argv(f.name, num=num), timeout), timeout=timeout + 10)
