"""Two gateways in a VRRP pair, for stateful failover with conntrackd (docs/operations.md,
"Stateful failover (nft backend)").  Five network namespaces <P>-in, -lan, -gwa, -gwb, -net:

    in (198.18.60.10, default via the VIP 198.18.60.1)
     |
    lan: bridge br0 (ports pin, pa, pb)
     |                         |
    gwa lan0 198.18.60.2      gwb lan0 198.18.60.3
    gwa sync0 198.18.99.1 --- gwb sync0 198.18.99.2      (conntrackd's FTFW over UDP)
    gwa wan0 198.19.20.2      gwb wan0 198.19.20.3
     |                         |
    net: bridge br0 198.19.20.1 (ports pa, pb); the server 203.0.113.10 on lo

The MASTER holds the VIP (on lan0) and the SNAT pool 198.19.20.71-72 (/32 on wan0):
``start_keepalived`` runs keepalived (VRRPv3 on lan0, conntrackd's primary-backup.sh as its notify
script), or ``take_over`` moves them by hand in keepalived's order (`ip addr add`, then the peers'
neighbour caches flushed in place of its gratuitous ARP) and ``become_primary`` runs the script's
`primary` steps; ``crash`` takes a gateway off all three links.  conntrackd, keepalived and
`snatgw run` run in the gateway namespaces with every file in the pair's work dir (the script's
settings too: as shipped, its `backup` step would start a conntrackd on /etc/conntrackd's config);
``down`` kills what runs in the namespaces and deletes them (their veths go with them), also
after a failure.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import threading
import time

from .gateway import log_tail, snatgw_argv
from .netns import LabError, NodeCommands, list_netns, run

NODES = ("in", "lan", "gwa", "gwb", "net")
GATEWAYS = ("gwa", "gwb")
WORK_ROOT = "/run/snatgw/hapair"
INSIDE_NET = "198.18.60.0/24"
VIP = "198.18.60.1"
HOST = "198.18.60.10"
SERVER = "203.0.113.10"
POOL = ("198.19.20.71", "198.19.20.72")
SYNC = {"gwa": "198.18.99.1", "gwb": "198.18.99.2"}
#: veth pairs: (node, ifname, peer node, peer ifname)
LINKS = (
    ("in", "eth0", "lan", "pin"),
    ("gwa", "lan0", "lan", "pa"),
    ("gwb", "lan0", "lan", "pb"),
    ("gwa", "wan0", "net", "pa"),
    ("gwb", "wan0", "net", "pb"),
    ("gwa", "sync0", "gwb", "sync0"),
)
BRIDGES = {"lan": ("pin", "pa", "pb"), "net": ("pa", "pb")}
ADDRS = {
    "in": [("eth0", f"{HOST}/24")],
    "gwa": [("lan0", "198.18.60.2/24"), ("wan0", "198.19.20.2/24"), ("sync0", "198.18.99.1/24")],
    "gwb": [("lan0", "198.18.60.3/24"), ("wan0", "198.19.20.3/24"), ("sync0", "198.18.99.2/24")],
    "net": [("br0", "198.19.20.1/24"), ("lo", f"{SERVER}/32")],
}
ROUTES = {"in": [f"default via {VIP}"], "gwa": ["default via 198.19.20.1"], "gwb": ["default via 198.19.20.1"]}
SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
#: the rules both gateways run (the same file on both: the same rule marks and device ids)
CONFIG = f"""snatgw {{
    inside lan0
    outside wan0
    port_range 5000-65535
    backend nft
}}

virtual_server fwmark 1 {{
  snat_rule {{ from {INSIDE_NET}  oif wan0  snat_ip {POOL[0]}-{POOL[-1]}  algo sdh }}
}}
"""


#: the failover script shipped with conntrackd (keepalived's notify_master/backup/fault)
NOTIFY_SCRIPT = "/usr/share/doc/conntrackd/examples/sync/primary-backup.sh"
VRID = 60


def config_text(backend: str = "nft", extra: str = "") -> str:
    """CONFIG for ``backend`` with ``extra`` settings lines (the session sync's)."""
    return CONFIG.replace("    backend nft\n", f"    backend {backend}\n{extra}", 1)


def sync_lines(gw: str, key: str, peer: str | None = None) -> str:
    """The settings lines of ``gw``'s session sync over sync0 with the key file ``key``
    (examples/snatgw-ha-bpf.conf is gateway A's config with them)."""
    other = peer or SYNC["gwb" if gw == "gwa" else "gwa"]
    return f"    sync_peer {other}\n    sync_local {SYNC[gw]}\n    sync_key {key}\n"


def notify_script_text(shipped: str, conf: str, lock: str) -> str:
    """primary-backup.sh with its two settings pointed at ``conf`` and ``lock`` (the edit
    docs/operations.md asks for), nothing else changed."""
    text = shipped
    for key, val in (("CONNTRACKD_CONFIG", conf), ("CONNTRACKD_LOCK", lock)):
        text, n = re.subn(rf"(?m)^{key}=.*$", f"{key}={val}", text)
        if n != 1:
            raise LabError(f"{NOTIFY_SCRIPT}: expected one {key}= line, found {n}")
    return text


def keepalived_text(gw: str, script: str, advert_int: str = "0.1") -> str:
    """A VRRP instance on lan0 owning the VIP and (not advertised) the pool on wan0, gateway A
    preferred; its notify scripts are ``script`` (primary-backup.sh) with the state's word.
    VRRPv3 with ``advert_int`` 0.1: MASTER ~0.4 s after the other one goes quiet."""
    pool = "".join(f"        {a}/32 dev wan0\n" for a in POOL)
    state, prio = ("MASTER", 150) if gw == "gwa" else ("BACKUP", 100)
    return (f"global_defs {{\n    router_id snatgw-ha-{gw}\n    script_user root\n    enable_script_security\n}}\n\n"
            f"vrrp_instance inside60 {{\n    state {state}\n    interface lan0\n    virtual_router_id {VRID}\n"
            f"    priority {prio}\n    version 3\n    advert_int {advert_int}\n"
            f"    virtual_ipaddress {{\n        {VIP}/24 dev lan0\n    }}\n"
            f"    virtual_ipaddress_excluded {{\n{pool}    }}\n"
            f'    notify_master "{script} primary"\n    notify_backup "{script} backup"\n'
            f'    notify_fault "{script} fault"\n}}\n')


def conntrackd_text(example: str, node: str, workdir: str) -> str:
    """examples/conntrackd.conf (gateway A's) for ``node``: gateway B's swaps the two sync link
    addresses; the log, lock and control socket move into ``workdir`` (never the host's)."""
    text = example
    if node == "gwb":
        a, b = SYNC["gwa"], SYNC["gwb"]
        text = re.sub(r"(IPv4_address|IPv4_Destination_Address)(\s+)(" + re.escape(a) + "|" + re.escape(b) + r")\b",
                      lambda m: m[1] + m[2] + (b if m[3] == a else a), text)
    for key, name in (("LogFile", "conntrackd.log"), ("LockFile", "conntrackd.lock"), ("Path", "conntrackd.ctl")):
        text, n = re.subn(rf"(?m)^(\s*{key}\s+)\S+", lambda m: m[1] + os.path.join(workdir, f"{node}-{name}"), text)
        if n != 1:
            raise LabError(f"conntrackd example: expected one {key} line, found {n}")
    return text


class HaPair(NodeCommands):
    """The two-gateway topology; ``HaPair.up()`` builds it under a fresh prefix sgha<hex>."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.workdir = os.path.join(WORK_ROOT, prefix)
        self.procs: list[subprocess.Popen] = []
        self.snatgw: dict[str, subprocess.Popen] = {}

    def ns(self, node: str) -> str:
        if node not in NODES:
            raise LabError(f"unknown node {node!r}; nodes are {', '.join(NODES)}")
        return f"{self.prefix}-{node}"

    # ------------------------------------------------------------------ commands

    # ------------------------------------------------------------------ life cycle

    @classmethod
    def up(cls, prefix: str | None = None) -> "HaPair":
        if os.geteuid() != 0:
            raise LabError("the HA pair needs root (network namespaces)")
        prefix = prefix or "sgha" + secrets.token_hex(3)
        if not re.match(r"^sgha[a-z0-9]{1,8}$", prefix):
            raise LabError(f"prefix: expected 'sgha' then 1..8 of [a-z0-9], got {prefix!r}")
        taken = [n for n in list_netns() if n.startswith(prefix + "-")]
        if taken:
            raise LabError(f"prefix {prefix}: namespaces exist already: {', '.join(taken)}")
        pair = cls(prefix)
        try:
            pair._build()
        except BaseException:
            pair.down()
            raise
        return pair

    def _build(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        self.build(NODES, SYSCTLS, LINKS, ADDRS, GATEWAYS, ROUTES, bridges=BRIDGES)

    def down(self) -> None:
        """Stop every process started here and any other left in the namespaces, delete the
        namespaces and the work dir.  Safe on a half-built pair and twice."""
        self.stop_procs(5)
        for node in NODES:
            ns = self.ns(node)
            if os.path.exists(f"/run/netns/{ns}"):
                out = run(["ip", "netns", "pids", ns], check=False).stdout
                for pid in (int(p) for p in out.split() if p.isdigit()):
                    if pid != os.getpid():
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                run(["ip", "netns", "del", ns], check=False)
        for gw in GATEWAYS:
            shutil.rmtree(self.pin_dir(gw), ignore_errors=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
        try:
            os.rmdir(WORK_ROOT)  # the last pair's
        except OSError:
            pass

    def __enter__(self) -> "HaPair":
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # ------------------------------------------------------------------ VRRP by hand

    def take_over(self, gw: str) -> None:
        """What keepalived does on the new MASTER: the VIP on lan0 and the pool addresses on wan0,
        then the peers learn the new owner (their neighbour entries flushed: the next packet asks)."""
        self.ip(gw, "addr", "add", f"{VIP}/24", "dev", "lan0")
        for a in POOL:
            self.ip(gw, "addr", "add", f"{a}/32", "dev", "wan0")
        self.ip("in", "neigh", "flush", "dev", "eth0")
        self.ip("net", "neigh", "flush", "dev", "br0")

    def crash(self, gw: str) -> None:
        """The gateway drops off every link at once (a power loss, as the peers see it)."""
        for dev in ("lan0", "wan0", "sync0"):
            self.ip(gw, "link", "set", "dev", dev, "down")

    # ------------------------------------------------------------------ daemons

    def start_snatgw(self, gw: str, backend: str = "nft", timeout: float = 30.0, sync: bool = False,
                     peer: str | None = None) -> subprocess.Popen:
        """`snatgw run` of CONFIG in ``gw``; returns once it printed `ready`.  ``sync``: with the
        bpf backend's session sync over sync0 toward the other gateway (or ``peer``), the key
        in the work dir (sync_key_path)."""
        conf = os.path.join(self.workdir, f"{gw}.conf")
        with open(conf, "w") as f:
            f.write(config_text(backend, self.sync_settings(gw, peer) if sync else ""))
        log_path = os.path.join(self.workdir, f"{gw}-snatgw.log")
        argv = snatgw_argv("run", conf, "--backend", backend, "--pin-dir", self.pin_dir(gw),
                           "--socket", self.socket(gw))
        with open(log_path, "a") as log:
            p = self.popen(gw, *argv, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1)
        self.snatgw[gw] = p
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or p.poll() is not None:
                raise LabError(f"snatgw run in {gw} not ready (exit {p.poll()}): {log_tail(log_path)}")
            r, _, _ = select.select([p.stdout], [], [], min(left, 0.5))
            if r:
                line = p.stdout.readline()
                if "ready" in line:
                    break
        threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()  # keep the pipe drained
        return p

    def sync_key_path(self) -> str:
        """The pair's shared sync key (made at the first call, mode 0600)."""
        path = os.path.join(self.workdir, "sync.key")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
        return path

    def sync_settings(self, gw: str, peer: str | None = None) -> str:
        """The settings lines of ``gw``'s session sync over sync0."""
        return sync_lines(gw, self.sync_key_path(), peer)

    def pin_dir(self, gw: str) -> str:
        """The bpf backend's pin directory of ``gw`` (removed by ``down``)."""
        return f"/sys/fs/bpf/snatgw-{self.prefix}-{gw}"

    def socket(self, gw: str) -> str:
        return os.path.join(self.workdir, f"{gw}.sock")

    def start_conntrackd(self, gw: str, example: str, timeout: float = 10.0) -> str:
        """conntrackd in ``gw`` (foreground, so its pid is ours) on the example's text; returns
        the config path once its control socket answers."""
        conf = os.path.join(self.workdir, f"{gw}-conntrackd.conf")
        with open(conf, "w") as f:
            f.write(conntrackd_text(example, gw, self.workdir))
        self.popen(gw, "conntrackd", "-C", conf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.ctd(gw, "-s", check=False).returncode != 0:
            if time.monotonic() > deadline:
                log = os.path.join(self.workdir, f"{gw}-conntrackd.log")
                raise LabError(f"conntrackd in {gw} does not answer: {log_tail(log)}")
            time.sleep(0.05)
        return conf

    def ctd(self, gw: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`conntrackd -C <gw's config> ARGS` in ``gw`` (a request to the running daemon)."""
        return self.run(gw, "conntrackd", "-C", os.path.join(self.workdir, f"{gw}-conntrackd.conf"), *args,
                        check=check, timeout=10)

    def start_keepalived(self, gw: str, conntrackd: bool = True) -> None:
        """keepalived --vrrp in ``gw`` (foreground; pid files and log in the work dir, no
        syslog) with keepalived_text, notifying a copy of primary-backup.sh pointed at ``gw``'s
        conntrackd (start_conntrackd first); without ``conntrackd`` a script that does nothing."""
        wd = self.workdir
        script = os.path.join(wd, f"{gw}-primary-backup.sh")
        if conntrackd:
            with open(NOTIFY_SCRIPT) as f:
                shipped = f.read()
            text = notify_script_text(shipped, os.path.join(wd, f"{gw}-conntrackd.conf"),
                                      os.path.join(wd, f"{gw}-conntrackd.lock"))
        else:  # the bpf backend's sync needs no step at a failover: both gateways always send and take
            text = "#!/bin/sh\nexit 0\n"
        with open(script, "w") as f:
            f.write(text)
        os.chmod(script, 0o755)
        conf = os.path.join(wd, f"{gw}-keepalived.conf")
        with open(conf, "w") as f:
            f.write(keepalived_text(gw, script))
        from .keepalived import keepalived_path

        argv = [keepalived_path(), "--vrrp", "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
                "-f", conf] + [a for kind in ("p", "r", "c", "b")
                               for a in (f"-{kind}", os.path.join(wd, f"{gw}-keepalived-{kind}.pid"))]
        with open(os.path.join(wd, f"{gw}-keepalived.log"), "a") as log:
            self.popen(gw, *argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def holds_vip(self, gw: str) -> bool:
        return f"inet {VIP}/24" in self.ip(gw, "-4", "addr", "show", "dev", "lan0").stdout

    def wait_vip(self, gw: str, timeout: float = 10.0) -> float:
        """Seconds until ``gw`` holds the VIP (keepalived made it MASTER)."""
        t0 = time.monotonic()
        while not self.holds_vip(gw):
            if time.monotonic() - t0 > timeout:
                raise LabError(f"{gw} did not become MASTER within {timeout:g} s: "
                               f"{log_tail(os.path.join(self.workdir, gw + '-keepalived.log'))}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def become_primary(self, gw: str) -> None:
        """primary-backup.sh's `primary` steps (keepalived's notify_master): commit the external
        cache to the kernel, flush the caches, resync the internal cache from the kernel, send a
        bulk update to the backup."""
        for arg in ("-c", "-f", "-R", "-B"):
            self.ctd(gw, arg)

