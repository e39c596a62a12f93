"""Network-namespace plumbing for the lab: running commands in a namespace (nsenter --net only,
so the host mount namespace and bpffs stay visible), and opening sockets inside a namespace
from this process (setns on a thread of its own, which ends there), which the lab's clients use.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time

from ..errors import EXIT_BACKEND, EXIT_BAD_INPUT, SnatgwError

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


class LabError(SnatgwError):
    """The lab could not be built, used or taken down."""

    exit_code = EXIT_BACKEND


class LabUsageError(LabError):
    """A bad --name or --prefix: a bad argument (exit 2), not a lab that failed (exit 3)."""

    exit_code = EXIT_BAD_INPUT


class NoSuchLab(LabError):
    """A lab named on the command line is not up: a bad argument (exit 2, as every other one),
    not a lab that failed (exit 3)."""

    exit_code = EXIT_BAD_INPUT


def ns_path(ns: str) -> str:
    return os.path.join(NETNS_DIR, ns)


def nsenter(ns: str | None, *cmd: str) -> list[str]:
    """argv that runs ``cmd`` in network namespace ``ns`` (None: here)."""
    argv = [str(c) for c in cmd]
    return argv if ns is None else ["nsenter", f"--net={ns_path(ns)}", "--"] + argv


#: a private mount namespace whose /sys is the current network namespace's sysfs, with the
#: host's bpffs kept at /sys/fs/bpf (pins stay shared; `ip netns exec` mounts a /sys without it);
#: the parking directory in /run (the host's tmpfs) goes whether the mounts work or not
OWN_SYSFS_SCRIPT = ('d=$(mktemp -d /run/snatgw-sysfs.XXXXXX) || exit 1; '
                    'if mount --bind /sys/fs/bpf "$d" && mount -t sysfs sysfs /sys && mount --move "$d" /sys/fs/bpf; '
                    'then rmdir "$d"; exec "$@"; fi; umount "$d" 2>/dev/null; rmdir "$d"; exit 1')


def with_own_sysfs(*cmd: str) -> list[str]:
    """argv that runs ``cmd`` (already in its network namespace: after nsenter) with that
    namespace's own sysfs on /sys and the host's bpffs at /sys/fs/bpf, in a mount namespace of
    its own (slave: the host's later mounts still reach it; nothing of it reaches the host).
    ``cmd`` is exec'ed: its pid is the one started."""
    return ["unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", OWN_SYSFS_SCRIPT, "sh",
            *map(str, cmd)]


def run(argv: list[str], check: bool = True, timeout: float = 30.0,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run argv, capture text output; with ``check`` a failure raises LabError with stderr."""
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found (run `make setup`)") from None
    if check and cp.returncode != 0:
        msg = (cp.stderr or cp.stdout).strip()
        raise LabError(f"{' '.join(argv)}: exit {cp.returncode}: {msg}")
    return cp


class NodeCommands:
    """Commands in a node's network namespace and the stop of the processes started there: for
    any set of namespaces that has ``ns(node)`` and a ``procs`` list (the lab, the HA pair)."""

    def run(self, node: str, *cmd: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` in ``node``'s network namespace; text output captured."""
        return run(nsenter(self.ns(node), *cmd), check=check, timeout=timeout, input=input)

    def ip(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(["ip", "-n", self.ns(node), *args], check=check)

    def popen(self, node: str, *cmd: str, **kw) -> subprocess.Popen:
        """Start ``cmd`` in ``node``; stop_procs() (down()) stops it."""
        p = subprocess.Popen(nsenter(self.ns(node), *cmd), **kw)
        self.procs.append(p)
        return p

    def build(self, nodes, sysctls: dict, links, addrs: dict, routers, routes: dict, bridges: dict | None = None) -> None:
        """Make the namespaces ``nodes`` (loopback up, ``sysctls`` in each), the veth pairs
        ``links`` ((node, ifname, node, ifname), made inside the namespaces: nothing ever
        appears in the host's), the ``bridges`` ({node: member ports}, each a br0 without STP),
        the addresses ``addrs`` ({node: [(ifname, cidr)]}), every link up, forwarding on in
        ``routers`` and the ``routes`` ({node: ["DST via GW", ...]})."""
        for node in nodes:
            run(["ip", "netns", "add", self.ns(node)])
            self.ip(node, "link", "set", "lo", "up")
            for key, val in sysctls.items():
                self.run(node, "sysctl", "-q", "-w", f"{key}={val}")
        for a, aif, b, bif in links:
            # ("name"/"dev" keywords always: "up" and "down" are interface names here)
            self.ip(a, "link", "add", "name", aif, "type", "veth", "peer", "name", bif, "netns", self.ns(b))
        for node, ports in (bridges or {}).items():
            self.ip(node, "link", "add", "name", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
            for p in ports:
                self.ip(node, "link", "set", "dev", p, "master", "br0")
            self.ip(node, "link", "set", "dev", "br0", "up")
        for node, node_addrs in addrs.items():
            for ifname, cidr in node_addrs:
                self.ip(node, "addr", "add", cidr, "dev", ifname)
        for a, aif, b, bif in links:
            self.ip(a, "link", "set", "dev", aif, "up")
            self.ip(b, "link", "set", "dev", bif, "up")
        for node in routers:
            self.run(node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        for node, node_routes in routes.items():
            for r in node_routes:
                self.ip(node, "route", "add", *r.split())

    def stop_procs(self, grace: float) -> None:
        """SIGTERM every process popen() started that still runs, SIGKILL those still there
        ``grace`` seconds later; the list is emptied."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise LabError(f"setns: {os.strerror(e)}")


@contextlib.contextmanager
def in_netns(ns: str):
    """Run the body with this thread in network namespace ``ns``; always switch back."""
    with _setns_lock:
        home = os.open(f"/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            try:
                target = os.open(ns_path(ns), os.O_RDONLY)
            except FileNotFoundError:
                raise LabError(f"network namespace {ns} does not exist") from None
            try:
                _setns(target)  # inside the try: an exception right after the switch still switches back
                yield
            finally:
                _setns(home)  # a no-op when the switch failed
                os.close(target)
        finally:
            os.close(home)


def ns_socket(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM,
              proto: int = 0) -> socket.socket:
    """A socket that lives in network namespace ``ns`` (it stays there), made on a thread of its
    own: the caller never leaves its namespace.  On the caller's thread, an exception from a
    signal handler (Python runs them on the main thread: the demo's Ctrl-C) raised between the
    switch and the switch back left the main thread in the lab's namespace, and the lab's down()
    SIGKILLs every process it finds there: the interrupted demo killed itself (exit -9)."""
    made: list = []

    def make() -> None:
        try:
            with in_netns(ns):
                made.append(socket.socket(family, type, proto))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            made.append(e)

    t = threading.Thread(target=make, name="ns_socket", daemon=True)
    t.start()
    t.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []
