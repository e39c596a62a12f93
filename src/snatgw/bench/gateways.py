"""The gateway configurations a benchmark compares, each started in a fresh gateway namespace:
drop (baseline), forward (routing, no NAT), nft-kernel (hand-written nftables SNAT of the same
rules), snatgw-nft and snatgw-bpf (the `snatgw run` daemon with that backend), and
snatgw-bpf-audit (snatgw-bpf with the audit log on, writing to a file: its cost, issue 13),
and snatgw-bpf-hostlimit (snatgw-bpf with a `max_sessions_per_host` no host reaches: the
datapath then counts each inside host's sessions as they are made, issue 11).

A configuration that cannot run (backend not written yet, daemon fails) raises Unavailable
with the reason; the suite reports it as "n/a (reason)", never a made-up figure.
"""

from __future__ import annotations

import importlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import topo, traffic

CONFIGS = ("drop", "forward", "nft-kernel", "snatgw-nft", "snatgw-bpf", "snatgw-bpf-audit", "snatgw-bpf-hostlimit")
NAT_CONFIGS = ("nft-kernel", "snatgw-nft", "snatgw-bpf")
#: configurations measured only on the packet scenarios that show their cost (the audit log:
#: one established flow, unaffected; new flows, a record each), beside snatgw-bpf in each round
AUDIT_CONFIGS = ("snatgw-bpf-audit",)
AUDIT_SCENARIOS = ("udp-1flow", "udp-newflows", "udp-newflows-spread")
#: likewise the per-host count a host limit needs (one cold entry per new flow of many hosts):
#: only new flows pay it
HOSTLIMIT_CONFIGS = ("snatgw-bpf-hostlimit",)
HOSTLIMIT_SCENARIOS = ("udp-newflows", "udp-newflows-spread")
HOSTLIMIT = "max_sessions_per_host 1000000"  # never reached: its cost, not its refusals
NFT_TABLE = "sgbench_nat"
READY_TIMEOUT = 90.0  # seconds for `snatgw run` to print "ready" (10k rules may take a while)


class Unavailable(Exception):
    """This configuration cannot be measured here; the message says why."""


# ------------------------------------------------------------------ rules (pure)


def filler_src(i: int) -> str:
    """The i-th non-matching source host (198.19.128.0/17: never a generator address)."""
    if not 0 <= i < 32768:
        raise ValueError(f"at most 32768 filler rules, asked for #{i}")
    return f"198.19.{128 + i // 256}.{i % 256}/32"


def rule_lines(nrules: int) -> list[tuple[str, str]]:
    """(from, oif) of ``nrules`` rules in priority order: nrules-1 that never match the
    generator's traffic (longer source prefixes, so earlier), then the one that does."""
    if nrules < 1:
        raise ValueError("need at least one rule")
    return [(filler_src(i), topo.GW_UP) for i in range(nrules - 1)] + [("198.18.0.0/15", topo.GW_UP)]


def snatgw_config_text(nrules: int, *, max_sessions: int, pin_dir: str, socket: str, backend: str,
                       filler_pool_last: str = topo.POOL_LAST, extra_settings: tuple[str, ...] = ()) -> str:
    """The config `snatgw run` reads: settings block plus the rules of ``rule_lines``.  The
    non-matching rules' pool ends at ``filler_pool_last`` (a reload can change them alone)."""
    pool = f"{topo.POOL_FIRST}-{topo.POOL_LAST}"
    filler = f"{topo.POOL_FIRST}-{filler_pool_last}"
    lines = [
        "# written by snatgw bench",
        "snatgw {",
        f"    inside {topo.GW_IN}",
        f"    outside {topo.GW_UP}",
        f"    max_sessions {max_sessions}",
        f"    backend {backend}",
        f"    control_socket {socket}",
        f"    pin_dir {pin_dir}",
        *(f"    {line}" for line in extra_settings),
        "}",
        "virtual_server fwmark 1 {",
    ]
    rules = rule_lines(nrules)
    lines += [f"  snat_rule {{ from {src} oif {oif} snat_ip {filler} algo sdh }}" for src, oif in rules[:-1]]
    lines += [f"  snat_rule {{ from {src} oif {oif} snat_ip {pool} algo sdh }}" for src, oif in rules[-1:]]
    return "\n".join(lines + ["}", ""])


def nft_kernel_text(nrules: int) -> str:
    """Kernel nftables SNAT of the same rules, same order (kernel conntrack does the NAT)."""
    pool = f"{topo.POOL_FIRST}-{topo.POOL_LAST}"
    body = [f"        ip saddr {src} oifname \"{oif}\" snat ip to {pool}" for src, oif in rule_lines(nrules)]
    return "\n".join(
        [f"table ip {NFT_TABLE} {{", "    chain postrouting {",
         "        type nat hook postrouting priority srcnat; policy accept;"] + body + ["    }", "}", ""]
    )


# ------------------------------------------------------------------ availability


def _importable(module: str, attr: str) -> str | None:
    """None when ``module.attr`` imports; else why not."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure makes the config unavailable
        return f"{module} not importable: {type(e).__name__}: {e}"
    return None if hasattr(mod, attr) else f"{module} has no {attr}"


def availability(config: str) -> str | None:
    """None when ``config`` can be tried; else the reason it is n/a."""
    if config in ("drop", "forward"):
        return None
    if shutil.which("nft") is None:
        return "nft command not found"
    if config == "nft-kernel":
        return None
    why = _importable("snatgw.cli.commands.run", "run")
    if why:
        return f"`snatgw run` not available ({why})"
    if config == "snatgw-nft":
        return _importable("snatgw.datapath.nft.backend", "NftBackend")
    if config in AUDIT_CONFIGS:
        return _importable("snatgw.daemon.audit", "AuditReader") or _importable(
            "snatgw.datapath.bpf.backend", "BpfBackend")
    return _importable("snatgw.datapath.bpf.backend", "BpfBackend")


# ------------------------------------------------------------------ running gateways


class Gateway:
    """One configuration running in ``t.gw``.  ``count_ns`` is where arriving packets are counted."""

    def __init__(self, name: str, t: topo.Topology, *, nrules: int = 1, max_sessions: int = 262144,
                 extra_settings: tuple[str, ...] | list[str] = ()):  # fmt: skip
        self.name, self.t, self.nrules, self.max_sessions = name, t, nrules, max_sessions
        self.extra_settings = tuple(extra_settings)  # more lines of the snatgw { } block
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self.pin_dir = f"/sys/fs/bpf/snatgw-{t.prefix}"
        self.socket = ""
        self.config_path = ""
        self.start_seconds: float | None = None
        self.stderr_tail = ""

    @property
    def count_ns(self) -> str:
        return self.t.gw if self.name == "drop" else self.t.sink

    def __enter__(self) -> "Gateway":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        why = availability(self.name)
        if why:
            raise Unavailable(why)
        if self.name == "drop":
            traffic.install_gw_drop(self.t.gw)
            return
        traffic.install_sink_counter(self.t.sink)
        if self.name == "nft-kernel":
            topo.run(["nft", "-f", "-"], ns=self.t.gw, input=nft_kernel_text(self.nrules), timeout=120)
        elif self.name.startswith("snatgw-"):
            self._start_daemon(self.backend)

    @property
    def backend(self) -> str:
        return self.name.split("-")[1]

    @property
    def audit_path(self) -> str | None:
        """The audit log file of a snatgw-*-audit configuration (in the run's temp dir)."""
        return os.path.join(self.tmp, "audit.jsonl") if self.name.endswith("-audit") and self.tmp else None

    def _start_daemon(self, backend: str) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"{self.t.prefix}-")
        os.chmod(self.tmp, 0o700)
        self.socket = os.path.join(self.tmp, "control.sock")
        self.config_path = os.path.join(self.tmp, "snatgw.conf")
        self.write_config(self.nrules)
        argv = topo.ns_argv(self.t.gw, [
            sys.executable, "-m", "snatgw.cli.main", "run", self.config_path, "--backend", backend,
            "--inside", topo.GW_IN, "--outside", topo.GW_UP, "--socket", self.socket, "--pin-dir", self.pin_dir,
        ])
        self.errlog = open(os.path.join(self.tmp, "daemon.log"), "w+")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.errlog, text=True)
        deadline = t0 + READY_TIMEOUT
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if r:
                line = self.proc.stdout.readline()
                if "ready" in line:
                    self.start_seconds = time.monotonic() - t0
                    # keep reading: a daemon blocked on a full stdout pipe would stall the datapath's GC
                    threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
                    return
                if line == "":
                    break  # stdout closed: the daemon exited
            elif self.proc.poll() is not None:
                break
        try:
            rc = self.proc.wait(1)
        except subprocess.TimeoutExpired:
            rc = None
        raise Unavailable(f"`snatgw run --backend {backend}` "
                          + (f"exited {rc}" if rc is not None else f"not ready in {READY_TIMEOUT:.0f} s")
                          + f": {self.daemon_stderr()}")

    @staticmethod
    def _drain(stream) -> None:
        try:
            for _ in stream:
                pass
        except (OSError, ValueError):
            pass  # closed by stop()

    def write_config(self, nrules: int, filler_pool_last: str = topo.POOL_LAST) -> None:
        Path(self.config_path).write_text(snatgw_config_text(
            nrules, max_sessions=self.max_sessions, pin_dir=self.pin_dir, socket=self.socket,
            backend=self.backend, filler_pool_last=filler_pool_last,
            extra_settings=self.extra_settings + ((f"audit_log {self.audit_path}", "audit_log_keep 1")
                                                  if self.audit_path else ())
            + ((HOSTLIMIT,) if self.name in HOSTLIMIT_CONFIGS else ())))

    def daemon_stderr(self, lines: int = 2) -> str:
        """The daemon's error: its structured error="..." field if it logged one, else the last lines."""
        if not getattr(self, "errlog", None):
            return ""
        self.errlog.flush()
        self.errlog.seek(0)
        text = [ln.strip() for ln in self.errlog.read().splitlines() if ln.strip()]
        for ln in reversed(text):
            m = re.search(r'error="((?:[^"\\]|\\.)*)"', ln)
            if m:
                return m.group(1)[-300:]
        return " | ".join(text[-lines:])[-300:] or "(no stderr)"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a `snatgw` verb against this daemon's control socket."""
        return topo.run([sys.executable, "-m", "snatgw.cli.main", *args, "--socket", self.socket],
                        check=False, timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.stderr_tail = self.daemon_stderr()
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None
        if getattr(self, "errlog", None):
            self.errlog.close()
            self.errlog = None
        # the daemon keeps its pins on SIGTERM (for a successor): the bench leaves none
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
