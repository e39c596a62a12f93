"""A real keepalived beside snatgw in the lab (docs/operations.md, "Beside keepalived"): one
keepalived.conf whose vrrp_instance owns the inside gateway address on <P>-gw's lan40 (and moves the
SNAT pool addresses with it) plus snatgw's rules; keepalived VRRP-only in <P>-gw, files in the work dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

from ipaddress import IPv4Interface

from .demo import REF_RULES, config_text, ruleset
from .netns import LabError, nsenter, run
from .topology import ADDRS, OUTSIDE_IFS

#: the inside hosts' gateway address that VRRP moves between gateways (in40's default route)
VIP = "198.18.40.254"
VRRP_IF = "lan40"
VRID = 40


def pool_addresses(rules: list[dict] = REF_RULES) -> list[tuple[str, str]]:
    """(address, outside interface) of every SNAT pool address of ``rules``, by the lab's subnets."""
    out: dict[str, str] = {}
    for r in ruleset(rules).defined:
        for a in r.pool.addresses():
            iface = next((i for i, cidr in ADDRS["gw"]
                          if i in OUTSIDE_IFS and a in IPv4Interface(cidr).network), None)
            if iface is None:
                raise LabError(f"SNAT address {a} is in no outside subnet of the lab")
            out.setdefault(str(a), iface)
    return list(out.items())


def vrrp_text(rules: list[dict] = REF_RULES, vip: str = VIP, iface: str = VRRP_IF, vrid: int = VRID,
              priority: int = 150, state: str = "MASTER", advert_int: str = "1") -> str:
    """keepalived's part of the combined file: global_defs and one vrrp_instance owning ``vip``
    and (not advertised, moved with it) the SNAT pool addresses of ``rules`` on the uplinks.
    The default is examples/keepalived.conf's instance; a fractional ``advert_int`` (VRRPv3
    only: the instance then says `version 3`) makes keepalived MASTER sooner (3 adverts and a
    skew after its start: ~0.4 s at 0.1 instead of ~3.5 s at 1)."""
    pool = "".join(f"        {a}/32 dev {i}\n" for a, i in pool_addresses(rules))
    version = "    version 3\n" if "." in advert_int else ""
    return (
        "global_defs {\n    router_id snatgw-lab-gw\n}\n\n"
        f"vrrp_instance inside40 {{\n    state {state}\n    interface {iface}\n"
        f"    virtual_router_id {vrid}\n    priority {priority}\n{version}    advert_int {advert_int}\n"
        f"    virtual_ipaddress {{\n        {vip}/24 dev {iface}\n    }}\n"
        f"    virtual_ipaddress_excluded {{\n{pool}    }}\n}}\n\n"
    )


def combined_config(rules: list[dict] = REF_RULES, **vrrp) -> str:
    """One file for both programs: keepalived's VRRP blocks, snatgw { } and virtual_server fwmark 1."""
    return vrrp_text(rules, **vrrp) + config_text(rules)


def keepalived_path() -> str:
    path = shutil.which("keepalived") or next(
        (p for p in ("/usr/sbin/keepalived", "/sbin/keepalived") if os.access(p, os.X_OK)), None)
    if path is None:
        raise LabError("keepalived: command not found (Debian package keepalived; run `make setup`)")
    return path


def config_test(lab, conf: str) -> subprocess.CompletedProcess:
    """`keepalived -t --vrrp -f CONF` in <P>-gw (its config test; interfaces are checked there)."""
    return lab.run("gw", keepalived_path(), "--vrrp", "-t", "-f", conf, check=False)


class Keepalived:
    """keepalived --vrrp in <P>-gw: no IPVS (the checker child is never started), no syslog, its
    pid files and log in the lab's work dir.  ``stop`` kills it by pid file and verifies."""

    def __init__(self, lab, conf: str):
        self.lab, self.conf = lab, conf
        wd = lab.workdir
        self.pidfile = os.path.join(wd, "keepalived.pid")
        self.vrrp_pidfile = os.path.join(wd, "keepalived-vrrp.pid")
        # never written with --vrrp; given so nothing could ever land in the host's /run
        self.checker_pidfile = os.path.join(wd, "keepalived-checkers.pid")
        self.bfd_pidfile = os.path.join(wd, "keepalived-bfd.pid")
        self.log = os.path.join(wd, "keepalived.log")
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [keepalived_path(), "--vrrp", "--dont-fork", "--log-console", "--log-detail",
                "--no-syslog", "-f", self.conf, "-p", self.pidfile, "-r", self.vrrp_pidfile,
                "-c", self.checker_pidfile, "-b", self.bfd_pidfile]

    def start(self) -> "Keepalived":
        if self.pids():
            raise LabError(f"keepalived already runs in {self.lab.ns('gw')}: pids {self.pids()}")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(nsenter(self.lab.ns("gw"), *self.argv()), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def wait_master(self, timeout: float = 15.0) -> float:
        """Wait until the VIP is on the VRRP interface (keepalived is MASTER); seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if vip_present(self.lab):
                return time.monotonic() - t0
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"keepalived exited with {self.proc.returncode}; log {self.log}:\n{self.tail()}")
            time.sleep(0.1)
        raise LabError(f"keepalived did not become MASTER ({VIP} not on {VRRP_IF}) within {timeout:g} s; "
                       f"log {self.log}:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            with open(self.log) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def pids(self) -> list[int]:
        """keepalived processes (parent and children) running in <P>-gw."""
        return keepalived_pids(self.lab)

    def stop(self, timeout: float = 10.0) -> list[int]:
        """SIGTERM the parent named by the pid file (it stops its VRRP child and drops the VIP),
        SIGKILL whatever keepalived is still in <P>-gw after ``timeout``; remove the pid files.
        Returns the pids that had to be killed (empty when it stopped cleanly)."""
        parent = _read_pid(self.pidfile)
        if parent is None and self.proc is not None and self.proc.poll() is None:
            parent = self.proc.pid  # died before writing its pid file? nsenter exec'd it: same pid
        if parent is not None and parent in self.pids():
            os.kill(parent, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = self.pids()
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 5
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pids():
            raise LabError(f"keepalived in {self.lab.ns('gw')} survived SIGKILL: pids {self.pids()}")
        for path in (self.pidfile, self.vrrp_pidfile, self.checker_pidfile, self.bfd_pidfile):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        return killed


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def keepalived_pids(lab) -> list[int]:
    """Processes named keepalived in <P>-gw (by the namespace, so the host's are never touched)."""
    out = run(["ip", "netns", "pids", lab.ns("gw")], check=False).stdout
    found = []
    for p in out.split():
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().strip() == "keepalived":
                    found.append(int(p))
        except OSError:
            continue
    return sorted(found)


def gw_addresses(lab) -> set[tuple[str, str]]:
    """(address, interface) of every IPv4 address in <P>-gw."""
    out = json.loads(lab.ip("gw", "-j", "-4", "addr").stdout or "[]")
    return {(i["local"], a["ifname"]) for a in out for i in a.get("addr_info", [])}


def vip_present(lab, vip: str = VIP, iface: str = VRRP_IF) -> bool:
    return (vip, iface) in gw_addresses(lab)
