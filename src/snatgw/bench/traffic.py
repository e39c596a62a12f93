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
    """Per CPU, seconds spent in user/system/softirq/busy (all but idle+iowait) between two reads."""
    names = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"]
    out = {}
    for cpu, a in after.items():
        b = before.get(cpu, a)
        d = {n: (x - y) / USER_HZ for n, x, y in zip(names, a, b)}
        d["busy"] = sum(v for n, v in d.items() if n not in ("idle", "iowait"))
        out[cpu] = {k: round(d[k], 3) for k in ("user", "system", "softirq", "busy")}
    return out


def read_proc_stat() -> dict[str, list[int]]:
    with open("/proc/stat") as f:
        return parse_proc_stat(f.read())


@dataclass
class Window:
    packets: int
    seconds: float
    cpu: dict
    translated: int = 0  # of ``packets``, those that arrived from a SNAT pool address

    @property
    def pps(self) -> float:
        return self.packets / self.seconds if self.seconds > 0 else 0.0

    def cpu_ns_per_packet(self) -> float | None:
        """Kernel CPU time (system + softirq, all CPUs) per counted packet.  User time is left
        out: it is other processes' (trafgen's own user time is negligible)."""
        kern = sum(c["system"] + c["softirq"] for c in self.cpu.values())
        return kern * 1e9 / self.packets if self.packets else None


def trafgen_argv(conf_path: str, ifname: str = topo.GEN_IF, num: int = 0) -> list[str]:
    """trafgen pinned to CPU0, one process, host socket memory and IRQs left alone."""
    argv = ["taskset", "-c", "0", "trafgen", "-o", ifname, "-c", conf_path, "--cpus", "1",
            "--no-sock-mem", "--notouch-irq", "--no-cpu-stats"]
    return argv + (["-n", str(num)] if num else [])


def blast(t: "topo.Topology", conf: str, count_ns: str, duration: float, warmup: float = 0.3) -> Window:
    """Run trafgen in the generator for warm-up + ``duration`` seconds (hard bound) and count
    the packets arriving at ``count_ns``'s counter during the measured window."""
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="sgbench-") as f:
        f.write(conf)
        f.flush()
        p = subprocess.Popen(["ip", "netns", "exec", t.gen] + trafgen_argv(f.name),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            time.sleep(warmup)
            if p.poll() is not None:
                raise RuntimeError(f"trafgen exited {p.returncode}: {p.stderr.read().strip()[-300:]}")
            c0, s0, t0 = read_counters(count_ns), read_proc_stat(), time.monotonic()
            time.sleep(duration)
            c1, s1, t1 = read_counters(count_ns), read_proc_stat(), time.monotonic()
        finally:
            _stop_group(p)
    delta = [b - a for a, b in zip(c0, c1)]
    return Window(sum(delta), t1 - t0, cpu_delta(s0, s1), delta[0] if len(delta) > 1 else 0)


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
        topo.run(["ip", "netns", "exec", t.gen] + trafgen_argv(f.name, num=num), timeout=timeout)
