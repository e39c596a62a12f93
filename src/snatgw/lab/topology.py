"""The multi-ISP lab (docs/lab.md): six network namespaces <P>-in40, -in50, -gw, -isp1, -isp2,
-net joined by veth pairs, as the shared LAB plan fixes them.  ``Lab.up`` builds it and records
it in /run/snatgw/lab/<name>.json; ``Lab.down`` (or ``down_all``) removes everything it made.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface

from ..rules import Route
from .netns import LabError, LabUsageError, NodeCommands, list_netns, ns_path, run

STATE_DIR = "/run/snatgw/lab"
SOCKET_DIR = "/run/snatgw"
BPFFS = "/sys/fs/bpf"

NODES = ("in40", "in50", "gw", "isp1", "isp2", "net")
INSIDE_IFS = ("lan40", "lan50")
OUTSIDE_IFS = ("eth1", "eth2")
#: gateway uplink -> the ISP router behind it, and the `net` interface that ISP reaches
ISP_OF = {"eth1": "isp1", "eth2": "isp2"}
SERVERS = (IPv4Address("203.0.113.10"), IPv4Address("198.51.100.10"))
INSIDE_HOSTS = {
    "in40": [IPv4Address(f"198.18.40.{i}") for i in (10, 11, 12)],
    "in50": [IPv4Address(f"198.18.50.{i}") for i in (10, 11)],
}

#: veth pairs: (node, ifname, peer node, peer ifname)
LINKS = (
    ("in40", "eth0", "gw", "lan40"),
    ("in50", "eth0", "gw", "lan50"),
    ("gw", "eth1", "isp1", "up"),
    ("gw", "eth2", "isp2", "up"),
    ("isp1", "down", "net", "isp1"),
    ("isp2", "down", "net", "isp2"),
)
ADDRS = {
    "in40": [("eth0", "198.18.40.10/24"), ("eth0", "198.18.40.11/24"), ("eth0", "198.18.40.12/24")],
    "in50": [("eth0", "198.18.50.10/24"), ("eth0", "198.18.50.11/24")],
    "gw": [("lan40", "198.18.40.1/24"), ("lan50", "198.18.50.1/24"),
           ("eth1", "198.19.2.2/24"), ("eth2", "198.19.3.2/24")],
    "isp1": [("up", "198.19.2.1/24"), ("down", "192.0.2.1/25")],
    "isp2": [("up", "198.19.3.1/24"), ("down", "192.0.2.129/25")],
    "net": [("isp1", "192.0.2.2/25"), ("isp2", "192.0.2.130/25"),
            ("lo", "203.0.113.10/32"), ("lo", "198.51.100.10/32")],
}
ROUTES = {
    "in40": ["default via 198.18.40.1"],
    "in50": ["default via 198.18.50.1"],
    "gw": ["default via 198.19.2.1 dev eth1", "198.51.100.0/24 via 198.19.3.1 dev eth2"],
    "isp1": ["203.0.113.0/24 via 192.0.2.2", "198.51.100.0/24 via 192.0.2.2"],
    "isp2": ["203.0.113.0/24 via 192.0.2.130", "198.51.100.0/24 via 192.0.2.130"],
    "net": ["198.19.2.0/24 via 192.0.2.1", "198.19.3.0/24 via 192.0.2.129"],
}
ROUTERS = ("gw", "isp1", "isp2")
#: every namespace: no IPv6 chatter, no reverse-path filter, no ICMP rate limit (tests count errors)
SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
    "net.ipv4.icmp_ratelimit": "0",
}

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,11}$")
NODE_NS_RE = re.compile(r"^(?P<prefix>sg[a-z0-9]{1,10})-(?P<node>" + "|".join(NODES) + r")$")

_live: set["Lab"] = set()


def _cleanup_at_exit() -> None:
    for lab in list(_live):
        try:
            lab.down()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_cleanup_at_exit)


def state_path(name: str) -> str:
    return os.path.join(STATE_DIR, f"{name}.json")


@dataclass
class Lab(NodeCommands):
    name: str
    prefix: str
    created: float = field(default_factory=time.time)
    keep: bool = False  # True: survive this process (the CLI's `lab up`)
    gateway_pid: int | None = None
    gateway_backend: str | None = None
    gateway_config: str | None = None
    procs: list = field(default_factory=list, repr=False)  # Popen objects we started
    gateway_proc: object = field(default=None, repr=False)

    __hash__ = object.__hash__

    # ------------------------------------------------------------------ naming

    def ns(self, node: str) -> str:
        if node not in NODES:
            raise LabError(f"unknown lab node {node!r}; nodes are {', '.join(NODES)}")
        return f"{self.prefix}-{node}"

    @property
    def pin_dir(self) -> str:
        return os.path.join(BPFFS, f"snatgw-{self.prefix}")

    @property
    def socket_path(self) -> str:
        return os.path.join(SOCKET_DIR, f"{self.prefix}.sock")

    @property
    def workdir(self) -> str:
        return os.path.join(STATE_DIR, self.prefix)

    # ------------------------------------------------------------------ commands

    def route(self, dst, src=None) -> Route:
        """The gateway's FIB answer for ``dst`` (egress device, next hop), from the kernel."""
        args = ["-j", "route", "get", str(dst)]
        if src is not None:
            args += ["from", str(src), "iif", "lan40" if str(src).startswith("198.18.40.") else "lan50"]
        r = json.loads(self.ip("gw", *args).stdout)[0]
        return Route(r["dev"], IPv4Address(r.get("gateway", str(dst))))

    def recreate_link(self, gw_dev: str) -> int:
        """Delete the gateway's ``gw_dev`` (its veth peer goes with it) and make the pair again
        under the same names, with the addresses both ends had (SNAT addresses included) and
        the plan's routes, as a VLAN or PPP device comes back: same name, another ifindex.
        Returns the new ifindex."""
        node, dev = next((b, bif) if a == "gw" else (a, aif) for a, aif, b, bif in LINKS
                         if ("gw", gw_dev) in ((a, aif), (b, bif)))  # fmt: skip

        def addrs(n, d):
            shown = json.loads(self.ip(n, "-j", "-4", "addr", "show", "dev", d).stdout)
            return [f"{a['local']}/{a['prefixlen']}" for i in shown for a in i.get("addr_info", [])]

        had = {"gw": addrs("gw", gw_dev), node: addrs(node, dev)}
        self.ip("gw", "link", "del", "dev", gw_dev)
        self.ip("gw", "link", "add", "name", gw_dev, "type", "veth", "peer", "name", dev, "netns", self.ns(node))
        for n, d in (("gw", gw_dev), (node, dev)):
            for cidr in had[n]:
                self.ip(n, "addr", "add", cidr, "dev", d)
            self.ip(n, "link", "set", "dev", d, "up")
        for n in ("gw", node):
            for r in ROUTES.get(n, ()):
                self.ip(n, "route", "replace", *r.split())
        return json.loads(self.ip("gw", "-j", "link", "show", "dev", gw_dev).stdout)[0]["ifindex"]

    def outside_iface_for(self, addr) -> str | None:
        """The gateway's outside interface whose subnet contains ``addr``."""
        addr = IPv4Address(str(addr))
        for ifname, cidr in ADDRS["gw"]:
            if ifname in OUTSIDE_IFS and addr in IPv4Interface(cidr).network:
                return ifname
        return None

    # ------------------------------------------------------------------ life cycle

    @staticmethod
    def check_args(name: str, prefix: str | None) -> None:
        """A bad --name or --prefix: LabUsageError (exit 2)."""
        if not NAME_RE.match(name):
            raise LabUsageError(f"--name: expected 1..32 of [A-Za-z0-9_.-], got {name!r}")
        if prefix is not None and (not PREFIX_RE.match(prefix) or not prefix.startswith("sg")):
            raise LabUsageError(f"--prefix: expected 'sg' then 1..10 of [a-z0-9] (e.g. sg1a2b), "
                                f"got {prefix!r}")

    @classmethod
    def running(cls, name: str, prefix: str | None = None) -> "Lab | None":
        """The lab `up --name NAME [--prefix PREFIX]` asks for, if it is up already (every
        namespace there), so that asking again is no failure; None if no lab of that name is up.
        Up with another prefix: LabUsageError (exit 2) naming both; up with namespaces gone:
        LabError (exit 3) naming them (a broken lab, which `lab down --name` clears)."""
        cls.check_args(name, prefix)
        old = cls.load(name)
        if old is None or not old.exists():
            return None
        if prefix is not None and prefix != old.prefix:
            raise LabUsageError(f"lab {name!r} is up already with prefix {old.prefix}, not {prefix}: "
                                f"`snatgw lab down --name {name}` first, or another --name")
        have = set(list_netns())
        gone = [old.ns(n) for n in NODES if old.ns(n) not in have]
        if gone:
            raise LabError(f"lab {name!r} (prefix {old.prefix}) is up but broken: namespaces "
                           f"{', '.join(gone)} are gone; `snatgw lab down --name {name}`, then up again")
        return old

    @classmethod
    def up(cls, name: str = "default", prefix: str | None = None, keep: bool = False) -> "Lab":
        """Build the lab.  Refuses a name that is up already or a prefix whose namespaces exist."""
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        cls.check_args(name, prefix)
        if prefix is None:
            prefix = "sg" + secrets.token_hex(2)
        old = cls.load(name)
        if old is not None and old.exists():
            raise LabError(f"lab {name!r} is up already (prefix {old.prefix}); `snatgw lab down --name {name}`")
        taken = [n for n in list_netns() if n.startswith(prefix + "-")]
        if taken:  # another lab's, or a leftover: the --prefix asked for is taken (exit 2)
            owner = [lab.name for lab in list_labs() if lab.prefix == prefix and lab.name != name]
            whose = (f"lab {owner[0]!r} has it (`snatgw lab status --name {owner[0]}`)" if owner else
                     "a leftover of no lab (`snatgw lab down --all` removes it, with every lab)")
            raise LabUsageError(f"--prefix {prefix}: namespaces {', '.join(taken)} exist already: {whose}; "
                                "choose another --prefix, or leave it out (a free one is picked)")
        lab = cls(name=name, prefix=prefix, keep=keep)
        _live.add(lab)
        try:
            lab._build()
            lab.save()
        except BaseException:
            lab.down()
            raise
        if keep:
            _live.discard(lab)
        return lab

    def _build(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self.build(NODES, SYSCTLS, LINKS, {node: ADDRS[node] for node in NODES}, ROUTERS, ROUTES)
        # in `net`, mark each packet with the ifindex it arrived on; TCP copies a SYN's mark to
        # the accepted socket, so the TCP server can tell which ISP a connection came through
        self.run("net", "sysctl", "-q", "-w", "net.ipv4.tcp_fwmark_accept=1")
        idx = {i["ifname"]: i["ifindex"] for i in json.loads(self.ip("net", "-j", "link").stdout)}
        self.run("net", "nft", "-f", "-", input=(
            "table ip sglab_links {\n chain pre {\n  type filter hook prerouting priority -300;\n"
            + "".join(f'  iifname "{n}" meta mark set {idx[n]}\n' for n in ("isp1", "isp2")) + " }\n}\n"))

    def exists(self) -> bool:
        have = set(list_netns())
        return any(self.ns(n) in have for n in NODES)

    def save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        state = {
            "name": self.name, "prefix": self.prefix, "created": self.created,
            "namespaces": [self.ns(n) for n in NODES], "pin_dir": self.pin_dir,
            "socket": self.socket_path, "gateway_pid": self.gateway_pid,
            "gateway_backend": self.gateway_backend, "gateway_config": self.gateway_config,
        }
        tmp = state_path(self.name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, state_path(self.name))

    @classmethod
    def load(cls, name: str = "default") -> "Lab | None":
        try:
            with open(state_path(name)) as f:
                s = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LabError(f"{state_path(name)}: unreadable lab state: {e}; remove the file "
                           f"(`snatgw lab down --all` removes it with any namespaces left by prefix)") from None
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("prefix"), str):
            raise LabError(f"{state_path(name)}: unreadable lab state: no name and prefix; remove the file "
                           f"(`snatgw lab down --all` removes it with any namespaces left by prefix)")
        return cls(name=s["name"], prefix=s["prefix"], created=s.get("created", 0.0), keep=True,
                   gateway_pid=s.get("gateway_pid"), gateway_backend=s.get("gateway_backend"),
                   gateway_config=s.get("gateway_config"))

    def _pids_in_lab(self) -> list[int]:
        pids: set[int] = set()
        for node in NODES:
            if os.path.exists(ns_path(self.ns(node))):
                out = run(["ip", "netns", "pids", self.ns(node)], check=False).stdout
                pids.update(int(p) for p in out.split() if p.isdigit())
        pids.discard(os.getpid())  # never ourselves (a thread of ours left in a lab namespace)
        return sorted(pids)

    def daemon_pids(self) -> list[int]:
        """Processes in <P>-gw running `snatgw ... run`."""
        if not os.path.exists(ns_path(self.ns("gw"))):
            return []
        out = run(["ip", "netns", "pids", self.ns("gw")], check=False).stdout
        found = []
        for p in out.split():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if any(b"snatgw" in a for a in argv) and b"run" in argv:
                found.append(int(p))
        return found

    def down(self) -> None:
        """Stop what runs in the lab, delete its namespaces (their veths go with them), its pins,
        socket, work dir and state file.  Safe to call twice and on a half-built lab."""
        from .gateway import stop_gateway

        try:
            stop_gateway(self)
        except LabError:
            pass
        self.stop_procs(3)
        hand_started = self.daemon_pids()  # a gateway started by hand: let it exit cleanly
        for pid in hand_started:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while hand_started and time.monotonic() < deadline and any(_pid_alive(p) for p in hand_started):
            time.sleep(0.05)
        for pid in self._pids_in_lab():  # processes started in our namespaces (e.g. `lab exec`)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for node in NODES:
            if os.path.exists(ns_path(self.ns(node))):
                run(["ip", "netns", "del", self.ns(node)], check=False)
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        for path in (self.socket_path,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        old = Lab.load(self.name) if os.path.exists(state_path(self.name)) else None
        if old is not None and old.prefix == self.prefix:
            os.unlink(state_path(self.name))
        _live.discard(self)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ gateway and traffic

    def start_gateway(self, config_path: str, backend: str = "bpf", timeout: float = 30.0, extra=(),
                      own_sysfs: bool = False):
        """`snatgw run CONFIG --backend B` in <P>-gw; returns once it printed `ready`."""
        from .gateway import start_gateway

        return start_gateway(self, config_path, backend, timeout, extra, own_sysfs)

    def stop_gateway(self, timeout: float = 10.0):
        from .gateway import stop_gateway

        return stop_gateway(self, timeout)

    def reload_gateway(self, config_path: str | None = None) -> None:
        from .gateway import reload_gateway

        reload_gateway(self, config_path)

    def add_snat_addresses(self, config):
        from .gateway import add_snat_addresses

        return add_snat_addresses(self, config)

    def start_servers(self, **kw):
        """The TCP/UDP echo servers and ICMP watcher in <P>-net (stopped on down())."""
        from .clients import EchoServers

        return EchoServers(self, **kw)

    # ------------------------------------------------------------------ status

    def status(self) -> dict:
        """Namespaces, addresses, routes and whether a gateway runs."""
        nodes = {}
        have = set(list_netns())
        for node in NODES:
            ns = self.ns(node)
            info: dict = {"namespace": ns, "exists": ns in have}
            if ns in have:
                addrs = json.loads(self.ip(node, "-j", "addr").stdout or "[]")
                info["addresses"] = {
                    a["ifname"]: [f"{i['local']}/{i['prefixlen']}" for i in a.get("addr_info", [])
                                  if i.get("family") == "inet"]
                    for a in addrs
                }
                info["routes"] = [
                    " ".join(x for x in (r["dst"], "via " + r["gateway"] if "gateway" in r else "",
                                         "dev " + r.get("dev", "")) if x)
                    for r in json.loads(self.ip(node, "-j", "route").stdout or "[]")
                ]
            nodes[node] = info
        pid = self.gateway_pid
        alive = bool(pid) and _pid_alive(pid)
        if not alive:  # maybe started by hand (`snatgw lab exec gw -- snatgw run ...`)
            pid = next(iter(self.daemon_pids()), None)
            alive = pid is not None
        return {
            "name": self.name, "prefix": self.prefix, "nodes": nodes,
            "gateway": {"running": alive, "pid": pid if alive else None, "backend": self.gateway_backend,
                        "config": self.gateway_config, "socket": self.socket_path,
                        "pin_dir": self.pin_dir, "pins": os.path.isdir(self.pin_dir)},
        }


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                return False
    except (OSError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_labs(unreadable: list[str] | None = None) -> list[Lab]:
    """The labs with a state file.  A state file that cannot be read (emptied, edited, of
    another version) is left out, its path appended to ``unreadable`` when given: one bad file
    must not stop `lab status`, `lab down --all` or another lab's hint."""
    try:
        names = sorted(f[:-5] for f in os.listdir(STATE_DIR) if f.endswith(".json"))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        try:
            lab = Lab.load(n)
        except LabError:
            if unreadable is not None:
                unreadable.append(state_path(n))
            continue
        if lab is not None:
            out.append(lab)
    return out


#: nodes only the lab has: a prefix is a lab's when one of these exists (other tools in this
#: tree also name namespaces "sg...-gw", and those are not ours to remove)
LAB_ONLY_NODES = ("in40", "in50", "isp1", "isp2")


def leftover_prefixes() -> set[str]:
    """Prefixes of lab namespaces that exist now and belong to no lab with a state file (a lab
    that is up, of this process or another, is not a leftover)."""
    live = {lab.prefix for lab in list_labs()}
    return {m["prefix"] for m in map(NODE_NS_RE.match, list_netns())
            if m and m["node"] in LAB_ONLY_NODES and m["prefix"] not in live}


def down_all() -> list[str]:
    """Take down every lab with a state file, then leftovers found by prefix (the namespaces of
    a lab whose state file cannot be read are among them), then the unreadable state files.
    Returns the prefixes and the state files removed."""
    done, unreadable = [], []
    for lab in list_labs(unreadable):
        lab.down()
        done.append(lab.prefix)
    for prefix in sorted(leftover_prefixes()):
        Lab(name=f"leftover-{prefix}", prefix=prefix).down()
        done.append(prefix)
    for path in unreadable:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        done.append(f"{path} (unreadable state)")
    return done
