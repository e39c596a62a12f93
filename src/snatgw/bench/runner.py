"""The suite: rounds of interleaved configurations over the packet scenarios, then rule
scaling, session-table scale and control plane; writes bench/results/<ts>.{json,md,png}.

Order: for each round, the configurations run one after another (a balanced Latin square:
each round starts with another one, and no configuration always follows the same one), each
measuring every selected packet scenario on a fresh gateway in a fresh topology (no scenario
meets the sessions of another).  The same for rule scaling (per rule count).  Every load is bounded:
trafgen by time, fills by count, daemons by a ready timeout.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import scenarios as sc
from . import topo, traffic
from .gateways import AUDIT_CONFIGS, AUDIT_SCENARIOS, CONFIGS, HOSTLIMIT_CONFIGS, HOSTLIMIT_SCENARIOS, Gateway
from .gateways import Unavailable, availability

log = logging.getLogger("snatgw.bench")
FILL_PASSES = 6  # bound on the session-table fill passes


@dataclass
class Params:
    quick: bool = False
    rounds: int = 3
    duration: float = 3.0
    scenarios: tuple[str, ...] = sc.ALL_SCENARIOS
    configs: tuple[str, ...] = CONFIGS
    rule_counts: tuple[int, ...] = (1, 100, 1000, 10000)
    rule_configs: tuple[str, ...] = ("nft-kernel", "snatgw-nft", "snatgw-bpf")
    fill_sessions: int = 1_000_000
    control_rules: int = 10000
    max_sessions: int = 1 << 20  # table size for the packet scenarios (new flows must fit)
    out_dir: str = "bench/results"
    #: `--rps`: the mask (hex, daemon/rps.format_mask) every topology writes to the gateway's
    #: in0 and up0 rx queues, the same for every configuration; None: receive packet steering
    #: left as the kernel has it (off)
    rps: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def make(cls, quick: bool = False, **over) -> "Params":
        base = cls(quick=quick, duration=1.0, rule_counts=(1, 10000), rule_configs=("nft-kernel", "snatgw-bpf"),
                   fill_sessions=50_000, max_sessions=1 << 18) if quick else cls()
        for k, v in over.items():
            if v is not None:
                setattr(base, k, v)
        return base


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    ver = lambda cmd: (shutil.which(cmd[0]) and os.popen(" ".join(cmd) + " 2>&1").read().strip().splitlines()[0]) or None  # noqa: E731
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu_model": cpu, "python": platform.python_version(),
            "nft": ver(["nft", "--version"]), "trafgen": ver(["trafgen", "--version"]),
            "iperf3": ver(["iperf3", "--version"]), "loadavg_start": sc.loadavg(),
            "nf_conntrack_max": _read_int("/proc/sys/net/netfilter/nf_conntrack_max"),
            "nf_conntrack_buckets": _read_int("/proc/sys/net/netfilter/nf_conntrack_buckets")}


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def rotated(items: tuple[str, ...], r: int) -> list[str]:
    """The order of round r: row r of a Williams design (a balanced Latin square).  Each
    round starts with a different configuration, and the one run just before a configuration
    changes from round to round: over n rounds (2n for an odd n) every configuration follows
    every other one equally often.  (A plain rotation keeps the cyclic order, so snatgw-bpf
    always came right after nft-kernel, whose namespace's conntrack teardown then overlapped
    its measurement.)"""
    n = len(items)
    if not n:
        return []
    first = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]
    row = [items[(i + r) % n] for i in first]
    return row[::-1] if n % 2 and (r // n) % 2 else row


class Suite:
    def __init__(self, params: Params, echo=print):
        self.p = params
        self.echo = echo
        self.records: list[dict] = []
        self.na: dict[str, str] = {}  # config (and rule count) -> why it could not run
        self.failures: dict[str, set[int]] = {}  # config (and rule count) -> rounds its daemon failed to start in
        self.missing: dict[str, str] = {}  # configs whose code is not there at all
        self.why = ""
        self.results: dict = {"params": {k: v for k, v in vars(params).items()}, "machine": machine(),
                              "records": self.records, "unavailable": self.na}

    # ------------------------------------------------------------------ helpers
    def _topology(self):
        """A fresh topology, with the run's receive packet steering on the gateway's devices."""
        return topo.Topology(rps=self.p.rps)

    def _rec(self, scenario: str, config: str, rnd: int, **fields) -> dict:
        rec = {"scenario": scenario, "config": config, "round": rnd, "status": "ok"} | fields
        self.records.append(rec)
        v = rec.get("value")
        self.echo(f"  {scenario:<14} {config:<11} round {rnd}: "
                  + (f"{v:,.3f} {rec.get('metric')}" if rec["status"] == "ok" and v is not None
                     else f"{rec['status']} ({rec.get('reason')})"))
        return rec

    def _gateway_or_na(self, cfg: str, t: topo.Topology, rnd: int | None = None, nrules: int = 1,
                       **kw) -> Gateway | None:  # fmt: skip
        """A started gateway, or None with the reason in self.why.  A configuration that cannot
        be imported is n/a for the whole run.  One whose daemon failed to start is n/a for the
        rest of that round (each scenario has a gateway of its own: a daemon that cannot start
        would otherwise cost a start timeout per scenario), tried again the next round, and
        given up (for that rule count) once it failed in two rounds, as when a round shared one
        gateway.  ``rnd`` None: a phase that runs once, outside the rounds (session table,
        control plane): tried unless given up; a failure there counts as one bad round."""
        key = cfg if nrules == 1 else f"{cfg} ({nrules:,} rules)"
        failed = self.failures.get(key, set())
        if cfg in self.missing or len(failed) >= 2 or (rnd is not None and rnd in failed):
            self.why = self.missing.get(cfg) or self.na.get(key, "failed to start")
            if len(failed) >= 2 and cfg not in self.missing:
                self.why += " (failed to start in two rounds: given up)"
            elif cfg not in self.missing:
                self.why += " (failed to start in this round: tried again the next)"
            return None
        why = availability(cfg)
        if why:
            self.missing[cfg] = self.na[cfg] = self.why = why
            return None
        gw = Gateway(cfg, t, nrules=nrules, **kw)
        try:
            gw.start()
        except Unavailable as e:
            gw.stop()
            self.failures.setdefault(key, set()).add(rnd)
            self.na[key] = self.why = str(e)
            return None
        return gw

    # ------------------------------------------------------------------ phases
    def packet_phase(self) -> None:
        scens = [s for s in sc.PACKET_SCENARIOS if s in self.p.scenarios]
        if not scens:
            return
        for r in range(self.p.rounds):
            self.echo(f"round {r + 1}/{self.p.rounds}: packet scenarios")
            for cfg in rotated(self.p.configs, r):
                mine = [s for s in scens if (cfg not in AUDIT_CONFIGS or s in AUDIT_SCENARIOS)
                        and (cfg not in HOSTLIMIT_CONFIGS or s in HOSTLIMIT_SCENARIOS)]
                if not mine:
                    continue
                # each scenario on a fresh gateway in fresh namespaces: one that ran before
                # would leave its sessions (snatgw's table, the kernel's conntrack) to the next,
                # so a scenario's figure would depend on the order and on how each
                # configuration copes with a table another scenario filled
                for s in mine:
                    self._packet_one(s, cfg, r)

    def _packet_one(self, s: str, cfg: str, r: int) -> None:
        """One scenario of one configuration, on its own gateway in its own namespaces."""
        with self._topology() as t:
            gw = self._gateway_or_na(cfg, t, r, max_sessions=self.p.max_sessions)
            if gw is None:
                self._rec(s, cfg, r, status="n/a", reason=self.why, value=None)
                return
            try:
                try:
                    fields = sc.measure(s, t, gw, self.p.duration)
                except Exception as e:  # noqa: BLE001 - one failed measurement must not end the suite
                    fields = {"status": "error", "reason": f"{type(e).__name__}: {e}", "value": None}
                if cfg in AUDIT_CONFIGS:
                    fields |= sc.audit_counts(gw)
                self._rec(s, cfg, r, **({"start_s": gw.start_seconds} | fields))
            finally:
                gw.stop()

    def rules_phase(self) -> None:
        if "rules" not in self.p.scenarios:
            return
        cfgs = [c for c in self.p.rule_configs if c in self.p.configs]
        for r in range(self.p.rounds):
            self.echo(f"round {r + 1}/{self.p.rounds}: rule scaling {list(self.p.rule_counts)}")
            units = [(1, "drop")] + [(n, c) for n in self.p.rule_counts for c in cfgs]
            for n, cfg in units[:1] + rotated(tuple(units[1:]), r):
                scen = f"rules-{n}"
                with self._topology() as t:
                    gw = self._gateway_or_na(cfg, t, r, nrules=n, max_sessions=self.p.max_sessions)
                    if gw is None:
                        self._rec(scen, cfg, r, status="n/a", reason=self.why, value=None, rules=n)
                        continue
                    try:
                        fields = sc.udp(t, gw, "one", self.p.duration)
                    except Exception as e:  # noqa: BLE001
                        fields = {"status": "error", "reason": f"{type(e).__name__}: {e}", "value": None}
                    finally:
                        gw.stop()
                    self._rec(scen, cfg, r, rules=n, start_s=gw.start_seconds, **fields)

    def sessions_phase(self) -> None:
        if "sessions" not in self.p.scenarios:
            return
        n = self.p.fill_sessions
        hosts = sc.seq_hosts_for(n)
        # the fill pattern: source address and destination port count together (one remote
        # endpoint per host), source port apart; period hosts x 4096, every flow distinct.
        # (One endpoint for all hosts would exhaust the bounded port search: many hosts using
        # the same source port toward one endpoint start the search at the same port.)
        flows = hosts * 4096
        out: dict = {"target_sessions": n, "flows": flows, "seq_hosts": hosts, "seq_ports": 4096,
                     "conntrack_objsize": sc.conntrack_objsize(), "by_config": {}}
        self.results["sessions"] = out
        self.echo(f"session-table scale: table of {n:,} sessions, {flows:,} flows")
        for cfg in [c for c in ("snatgw-bpf", "snatgw-nft") if c in self.p.configs]:
            entry: dict = {}
            out["by_config"][cfg] = entry
            with self._topology() as t:
                mem0 = sc.meminfo()
                gw = self._gateway_or_na(cfg, t, max_sessions=n)
                if gw is None:
                    entry.update(status="n/a", reason=self.why)
                    self.echo(f"  {cfg}: n/a ({self.why})")
                    continue
                try:
                    conf = traffic.trafgen_conf(t.gw_in_mac, seq_hosts=hosts, seq_ports=4096, dport=f"dinc(9, {8 + hosts})")
                    # The generator outruns new-session setup (the veth backlog drops the
                    # excess), so fill in passes: each pass re-sends the pattern; flows that
                    # already have a session are cheap hits.  Stop when full or no progress.
                    t0 = time.monotonic()
                    held: list[int | None] = []
                    for _ in range(FILL_PASSES):
                        traffic.send_count(t, conf, flows, timeout=300)
                        time.sleep(0.3)
                        held.append(sc.daemon_sessions(gw))
                        if held[-1] is None or held[-1] >= flows or (len(held) > 1 and held[-1] <= held[-2]):
                            break
                    entry["fill_seconds"] = time.monotonic() - t0
                    entry["fill_passes"] = held
                    mem1 = sc.meminfo()
                    entry["sessions"] = held[-1]
                    entry["reasons"] = sc.daemon_reasons(gw)
                    entry["maps"] = sc.pinned_maps(gw.pin_dir)
                    entry["max_sessions"] = gw.max_sessions
                    entry["memavailable_drop_bytes"] = mem0.get("MemAvailable", 0) - mem1.get("MemAvailable", 0)
                    entry["slab_delta_bytes"] = mem1.get("Slab", 0) - mem0.get("Slab", 0)
                    entry["memlock_bytes"] = sum(m.get("bytes_memlock") or 0 for m in entry["maps"])
                    entry.update(sc.session_memory(entry["maps"], gw.max_sessions))
                    lookups = []
                    for r in range(self.p.rounds):
                        w = traffic.blast(t, conf, gw.count_ns, self.p.duration)
                        lookups.append({"round": r, "pps": w.pps, "packets": w.packets, "translated": w.translated,
                                        "cpu_ns": w.cpu_ns_per_packet(), "loadavg": sc.loadavg()})
                    entry["lookup"] = lookups
                    entry["sessions_after_lookup"] = sc.daemon_sessions(gw)
                    entry["status"] = "ok"
                except Exception as e:  # noqa: BLE001
                    entry.update(status="error", reason=f"{type(e).__name__}: {e}")
                finally:
                    gw.stop()
            self.echo(f"  {cfg}: {entry.get('status')} sessions={entry.get('sessions')} "
                      f"memlock={entry.get('memlock_bytes')} MiB/1M={entry.get('mib_per_1m_sessions')}")
            # drop baseline of the same pattern, for the lookup cost
        with self._topology() as t:
            gw = Gateway("drop", t)
            with gw:
                conf = traffic.trafgen_conf(t.gw_in_mac, seq_hosts=hosts, seq_ports=4096, dport=f"dinc(9, {8 + hosts})")
                out["drop_pps"] = [traffic.blast(t, conf, gw.count_ns, self.p.duration).pps
                                   for _ in range(self.p.rounds)]

    def control_phase(self) -> None:
        if "control" not in self.p.scenarios:
            return
        n = self.p.control_rules
        out: dict = {"rules": n, "by_config": {}}
        self.results["control"] = out
        self.echo(f"control plane: load/reload {n:,} rules")
        for cfg in [c for c in ("snatgw-bpf", "snatgw-nft") if c in self.p.configs]:
            entry: dict = {}
            out["by_config"][cfg] = entry
            with self._topology() as t:
                gw = self._gateway_or_na(cfg, t, nrules=n, max_sessions=1 << 16)
                if gw is None:
                    entry.update(status="n/a", reason=self.why)
                    self.echo(f"  {cfg}: n/a ({self.why})")
                    continue
                try:
                    from ..daemon.client import call
                    entry["load_seconds"] = gw.start_seconds  # spawn to "ready": parse, compile, attach
                    conf = traffic.trafgen_conf(t.gw_in_mac, seq_hosts=sc.seq_hosts_for(1000, 1024), seq_ports=1024)
                    traffic.send_count(t, conf, 1000)
                    time.sleep(0.3)
                    reloads = []
                    for r in range(self.p.rounds):
                        before = sc.daemon_sessions(gw)
                        # change every filler rule's pool; the rule carrying the sessions is unchanged
                        gw.write_config(n, filler_pool_last=("198.19.1.105" if r % 2 == 0 else "198.19.1.110"))
                        t0 = time.monotonic()
                        resp = call(gw.socket, {"op": "reload"}, timeout=120)
                        dt = time.monotonic() - t0
                        after = sc.daemon_sessions(gw)
                        reloads.append({"round": r, "seconds": dt, "sessions_before": before, "sessions_after": after,
                                        "lost": (before - after) if before is not None and after is not None else None,
                                        "reply_rules": resp.get("rules")})
                        self.echo(f"  {cfg} reload {r}: {dt:.3f} s, sessions {before} -> {after}")
                    entry.update(status="ok", reloads=reloads)
                except Exception as e:  # noqa: BLE001
                    entry.update(status="error", reason=f"{type(e).__name__}: {e}")
                finally:
                    gw.stop()

    def sessions_cp_phase(self) -> None:
        """Scenario sessions-cp (bench/sessions_cp.py): stats, conns, expiry at 1M sessions
        (snatgw-bpf), and at conntrack's limit (snatgw-nft)."""
        if "sessions-cp" not in self.p.scenarios:
            return
        from . import sessions_cp

        for config, key in (("snatgw-bpf", "sessions_cp"), ("snatgw-nft", "sessions_cp_nft")):
            if config not in self.p.configs:
                continue
            why = availability(config)
            if why:
                self.results[key] = {"status": "n/a", "reason": why, "config": config}
                continue
            self.echo(f"control plane at {self.p.fill_sessions:,} sessions (sessions-cp, {config})")
            self.results[key] = sessions_cp.run(self.echo, self.p.duration, self.p.fill_sessions, config)

    def progbench_phase(self) -> None:
        """The bpf-C helper's test-run micro-benchmark, when present (its own namespace)."""
        if "progbench" not in self.p.scenarios:
            return
        import importlib.util
        import subprocess
        import sys

        if importlib.util.find_spec("snatgw.bench.progbench") is None:
            self.results["progbench"] = "n/a (snatgw.bench.progbench not present)"
            return
        self.echo("progbench: BPF_PROG_TEST_RUN per-packet costs")
        try:
            p = subprocess.run([sys.executable, "-m", "snatgw.bench.progbench"], capture_output=True, text=True,
                               timeout=300)
            self.results["progbench"] = p.stdout if p.returncode == 0 else \
                f"n/a (progbench exited {p.returncode}: {p.stderr.strip()[-300:]})"
        except subprocess.TimeoutExpired:
            self.results["progbench"] = "n/a (progbench took over 300 s)"
        self.echo(self.results["progbench"].rstrip())

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        t0 = time.monotonic()
        for phase in (self.packet_phase, self.rules_phase, self.sessions_phase, self.control_phase,
                      self.progbench_phase, self.sessions_cp_phase):
            try:
                phase()
            except Exception as e:  # noqa: BLE001 - keep what was measured; say what failed
                log.exception("bench phase failed")
                self.results.setdefault("errors", []).append(f"{phase.__name__}: {type(e).__name__}: {e}")
                self.echo(f"{phase.__name__} failed: {e}")
        self.results["machine"]["loadavg_end"] = sc.loadavg()
        self.results["elapsed_s"] = time.monotonic() - t0
        return self.results


def write_results(results: dict, out_dir: str | Path, stamp: str | None = None) -> dict[str, Path]:
    """<ts>.json, <ts>.md, <ts>.png (+ rules png) and latest.{md,png} copies."""
    from . import plot, report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results.setdefault("timestamp", stamp)
    paths = {"json": out / f"{stamp}.json", "md": out / f"{stamp}.md", "png": out / f"{stamp}.png"}
    paths["json"].write_text(json.dumps(results, indent=1, default=str) + "\n")
    pngs = plot.plot(results, paths["png"])
    paths["md"].write_text(report.render(results, [p.name for p in pngs]))
    shutil.copyfile(paths["md"], out / "latest.md")
    for p in pngs:
        shutil.copyfile(p, out / p.name.replace(stamp, "latest"))
    return paths
