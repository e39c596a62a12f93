"""The benchmark's own three namespaces: generator --veth-- gateway --veth-- sink.

Every name carries a unique prefix ("sgb" + 4 hex of the pid + a counter); `Topology` is a
context manager that removes its namespaces (and so their veths) even when a run fails.
Addresses come from 198.18.0.0/15 only (RFC 2544, the benchmarking block).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from itertools import count

GEN_IF, GW_IN, GW_UP, SINK_IF = "eth0", "in0", "up0", "eth0"
GEN_ADDR, GW_IN_ADDR = "198.18.1.2", "198.18.1.1"
GW_UP_ADDR, SINK_ADDR = "198.19.1.1", "198.19.1.2"
#: SNAT pool, local addresses of the gateway's uplink
POOL_FIRST, POOL_LAST = "198.19.1.100", "198.19.1.110"
#: extra inside sources for the many-new-flows scenarios (routed to the generator)
NEW_SRC_NET = "198.18.128.0/17"

_seq = count()


def run(cmd: list[str], *, ns: str | None = None, check: bool = True, timeout: float = 30,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (in namespace ``ns`` when given), text output captured."""
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()[-400:]}")
    return p


def ns_argv(ns: str, cmd: list[str]) -> list[str]:
    """argv that runs ``cmd`` in ``ns`` (network namespace only; host mounts kept, so bpffs)."""
    return ["nsenter", f"--net=/run/netns/{ns}"] + cmd


def rps_script(mask: str, devices=(GW_IN, GW_UP)) -> str:
    """A shell script (run by `ip netns exec` in the gateway: its namespace's sysfs) that writes
    ``mask`` to every rx queue's rps_cpus of ``devices`` and fails when one does not take it."""
    return "; ".join(f"for q in /sys/class/net/{d}/queues/rx-*; do echo {mask} > $q/rps_cpus || exit 1; done"
                     for d in devices)


@dataclass
class Topology:
    prefix: str = ""
    #: receive packet steering of the gateway's in0 and up0 (`snatgw bench --rps`): the mask
    #: written to every rx queue right after the topology is made, before any gateway starts, so
    #: every configuration (drop, forward, nft-kernel, snatgw) runs with the same; None: untouched
    rps: str | None = None

    def __post_init__(self):
        if not self.prefix:
            self.prefix = f"sgb{os.getpid() & 0xFFFF:04x}{next(_seq) % 100:02d}"
        self.gen, self.gw, self.sink = (f"{self.prefix}-{n}" for n in ("gen", "gw", "sink"))
        self.created: list[str] = []
        self.gw_in_mac = self.sink_mac = ""

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> "Topology":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        for ns in (self.gen, self.gw, self.sink):
            run(["ip", "netns", "add", ns])
            self.created.append(ns)
        g, w, s = self.gen, self.gw, self.sink
        # veths are born inside the namespaces: nothing ever exists in the host namespace
        run(["ip", "-n", g, "link", "add", GEN_IF, "type", "veth", "peer", "name", GW_IN, "netns", w])
        run(["ip", "-n", w, "link", "add", GW_UP, "type", "veth", "peer", "name", SINK_IF, "netns", s])
        batches = {
            g: [f"addr add {GEN_ADDR}/24 dev {GEN_IF}", f"link set {GEN_IF} up", "link set lo up",
                f"route add default via {GW_IN_ADDR}"],
            w: [f"addr add {GW_IN_ADDR}/24 dev {GW_IN}", f"addr add {GW_UP_ADDR}/24 dev {GW_UP}",
                f"link set {GW_IN} up", f"link set {GW_UP} up", "link set lo up",
                f"route add {NEW_SRC_NET} via {GEN_ADDR}"]
            + [f"addr add 198.19.1.{i}/32 dev {GW_UP}" for i in range(100, 111)],
            s: [f"addr add {SINK_ADDR}/24 dev {SINK_IF}", f"link set {SINK_IF} up", "link set lo up",
                f"route add default via {GW_UP_ADDR}"],
        }
        for ns, lines in batches.items():
            run(["ip", "-n", ns, "-b", "-"], input="\n".join(lines) + "\n")
        run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
             "net.ipv4.conf.default.rp_filter=0", f"net.ipv4.conf.{GW_IN}.rp_filter=0"], ns=w)
        run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=20000 60999"], ns=g)
        self.gw_in_mac = self.mac(w, GW_IN)
        self.sink_mac = self.mac(s, SINK_IF)
        gen_mac, gw_up_mac = self.mac(g, GEN_IF), self.mac(w, GW_UP)
        # permanent neighbours: no ARP in the measured path, no first-packet loss
        run(["ip", "-n", w, "neigh", "replace", SINK_ADDR, "lladdr", self.sink_mac, "dev", GW_UP, "nud", "permanent"])
        run(["ip", "-n", w, "neigh", "replace", GEN_ADDR, "lladdr", gen_mac, "dev", GW_IN, "nud", "permanent"])
        run(["ip", "-n", g, "neigh", "replace", GW_IN_ADDR, "lladdr", self.gw_in_mac, "dev", GEN_IF, "nud", "permanent"])
        for a in [GW_UP_ADDR] + [f"198.19.1.{i}" for i in range(100, 111)]:
            run(["ip", "-n", s, "neigh", "replace", a, "lladdr", gw_up_mac, "dev", SINK_IF, "nud", "permanent"])
        if self.rps:
            run(["sh", "-c", rps_script(self.rps)], ns=w)

    def down(self) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
        # veth deletion is asynchronous; give the kernel a moment before the next topology
        time.sleep(0.05)

    @staticmethod
    def mac(ns: str, ifname: str) -> str:
        out = run(["ip", "-n", ns, "-j", "link", "show", ifname]).stdout
        return json.loads(out)[0]["address"]


def leftover_namespaces(prefix: str = "sgb") -> list[str]:
    """Namespaces whose name starts with ``prefix`` (for tests that check cleanup)."""
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    try:
        return [n["name"] for n in json.loads(out or "[]") if n["name"].startswith(prefix)]
    except (ValueError, KeyError):
        return []
