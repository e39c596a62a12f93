"""Scenario `sessions-cp`: the control plane at a million sessions (issue 14).

snatgw-bpf with `max_sessions 1100000`; fill about a million UDP sessions (distinct flows)
under `timeout udp 300` (a fill takes longer than 20 s where new sessions come slower than
50k/s: with a working expiry the table would never reach a million), then stop the traffic and
reload the config with `timeout udp 20` at that moment; then report:
- time of `snatgw stats` (the CLI against the daemon), and the count it gives;
- time of a full `snatgw conns --json` (its lines counted, not kept) and the peak RSS of the
  daemon and of the CLI meanwhile;
- the daemon's peak RSS over the whole scenario (VmHWM), sampled RSS too;
- new flows after every filled session has expired but before the sweep may have removed
  them: translated rate and DROP_TABLE_FULL refusals (the table holds only expired sessions);
- sessions left (kept count and map entries) at 3x the UDP timeout after the traffic stopped;
- the daemon's sweeps (count, longest, last) from its status.

snatgw-nft (`--config snatgw-nft`): the same measures at conntrack's limit.  A namespace's
conntrack holds at most `net.netfilter.nf_conntrack_max` entries, a host-wide setting that only
the host's own namespace may change (262,144 on this machine); the bench does not touch it, so
it fills 92% of it.  A reload cannot shorten the timeout of live conntrack entries (their
`ct timeout` object is bound at creation; docs/nftables.md), so the fill runs under
`timeout udp NFT_TIMEOUT` from the start and the clock starts when the traffic stops; conntrack
expires entries itself (no sweep to report).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from . import scenarios as sc
from . import topo, traffic
from .gateways import Gateway

UDP_TIMEOUT = 20
FILL_TIMEOUT = 300  # udp timeout during the fill
MAX_SESSIONS = 1_100_000
FILL_PASSES = 6
NFT_TIMEOUT = 60  # udp timeout of the nft run: long enough for stats and conns before expiry
NFT_FILL_SHARE = 0.92  # of nf_conntrack_max


def conntrack_max() -> int | None:
    """nf_conntrack_max as this (the host's) namespace sees it: the limit of every namespace."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RssSampler:
    """Samples processes' VmRSS every ``period`` s in a thread; ``peak`` per pid, in KiB."""

    def __init__(self, period: float = 0.1):
        self.period, self.pids, self.peak = period, set(), {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def watch(self, pid: int) -> None:
        self.pids.add(pid)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in list(self.pids):
                v = _rss_kib(pid)
                if v is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0), v)
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(2)


def _cli(gw: Gateway, *args: str) -> list[str]:
    return [sys.executable, "-m", "snatgw.cli.main", *args, "--socket", gw.socket]


def _status(gw: Gateway) -> dict:
    from ..daemon.client import call

    return call(gw.socket, {"op": "status"}, timeout=60)


def _stats(gw: Gateway) -> tuple[float, int | None]:
    """`snatgw stats --json` as an operator runs it (a new CLI process): seconds, sessions."""
    import json

    t0 = time.monotonic()
    p = subprocess.run(_cli(gw, "stats", "--json"), capture_output=True, text=True, timeout=120)
    dt = time.monotonic() - t0
    try:
        return dt, int(json.loads(p.stdout)["sessions"])
    except (ValueError, KeyError):
        return dt, None


def _stats_op(gw: Gateway) -> float:
    """The daemon's answer alone: one `stats` request on the control socket, in seconds."""
    from ..daemon.client import call

    t0 = time.monotonic()
    call(gw.socket, {"op": "stats"}, timeout=120)
    return time.monotonic() - t0


def _conns(gw: Gateway, rss: RssSampler) -> dict:
    """A full `conns --json`: time, lines, the CLI's peak RSS (its lines are counted here)."""
    t0 = time.monotonic()
    p = subprocess.Popen(_cli(gw, "conns", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rss.watch(p.pid)
    lines = 0
    while True:
        chunk = p.stdout.read(1 << 20)
        if not chunk:
            break
        lines += chunk.count(b"\n")
    p.wait(600)
    return {"seconds": time.monotonic() - t0, "lines": lines, "rc": p.returncode,
            "cli_peak_rss_kib": rss.peak.get(p.pid), "stderr": p.stderr.read().decode()[-300:]}


def rate_series(t, conf: str, gw: Gateway, seconds: float, step: float = 0.25) -> dict:
    """Established traffic over the filled flows for ``seconds`` while the daemon sweeps: the
    translated rate per window of ~``step`` s, and which windows saw a sweep end (the daemon's
    sweep count moved).  A sweep holds its CPU without a preemption point: a dip here is the
    datapath waiting for it."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="sgbench-") as f:
        f.write(conf)
        f.flush()
        p = subprocess.Popen(traffic.bounded(["ip", "netns", "exec", t.gen] + traffic.trafgen_argv(f.name), seconds + 30),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        windows = []
        try:
            time.sleep(0.3)
            c0, t0 = traffic.read_counters(gw.count_ns), time.monotonic()
            n0 = (_status(gw).get("sweeps") or {}).get("count")
            end = t0 + seconds
            while time.monotonic() < end:
                time.sleep(step)
                c1, t1 = traffic.read_counters(gw.count_ns), time.monotonic()
                n1 = (_status(gw).get("sweeps") or {}).get("count")
                windows.append({"t": round(t1 - (end - seconds), 2), "pps": (c1[0] - c0[0]) / (t1 - t0),
                                "sweep_ended": n1 != n0})
                c0, t0, n0 = c1, t1, n1
        finally:
            traffic._stop_group(p)
    rates = sorted(w["pps"] for w in windows)
    with_sweep = sorted(w["pps"] for w in windows if w["sweep_ended"])
    without = sorted(w["pps"] for w in windows if not w["sweep_ended"])
    med = lambda xs: xs[len(xs) // 2] if xs else None  # noqa: E731
    return {"windows": windows, "min_pps": rates[0] if rates else None, "median_pps": med(rates),
            "median_pps_sweep_windows": med(with_sweep), "median_pps_other_windows": med(without),
            "min_pps_sweep_windows": with_sweep[0] if with_sweep else None,
            "sweep_windows": len(with_sweep), "zero_windows": sum(1 for r in rates if r == 0)}


def run(echo=print, duration: float = 3.0, fill: int = 1_000_000, config: str = "snatgw-bpf") -> dict:
    nft = config == "snatgw-nft"
    max_sessions, timeout, fill_timeout = MAX_SESSIONS, UDP_TIMEOUT, FILL_TIMEOUT
    if nft:
        ct_max = conntrack_max()
        if ct_max is None:
            return {"status": "n/a", "reason": "no nf_conntrack_max (conntrack not available)", "config": config}
        max_sessions, timeout = ct_max, NFT_TIMEOUT
        fill, fill_timeout = min(fill, int(NFT_FILL_SHARE * ct_max)), NFT_TIMEOUT
    out: dict = {"config": config, "max_sessions": max_sessions, "udp_timeout": timeout, "target": fill,
                 "fill_timeout": fill_timeout}  # fmt: skip
    hosts = sc.seq_hosts_for(fill)
    flows = hosts * 4096
    out["flows"] = flows
    with topo.Topology() as t:
        gw = Gateway(config, t, max_sessions=max_sessions,
                     extra_settings=[f"timeout udp {fill_timeout}"])  # fmt: skip
        gw.start()
        try:
            with RssSampler() as rss:
                rss.watch(gw.proc.pid)
                out["daemon_rss_start_kib"] = _rss_kib(gw.proc.pid)
                conf = traffic.trafgen_conf(t.gw_in_mac, seq_hosts=hosts, seq_ports=4096,
                                            dport=f"dinc(9, {8 + hosts})")  # fmt: skip
                t0 = time.monotonic()
                held = []
                for _ in range(FILL_PASSES):
                    traffic.send_count(t, conf, flows, timeout=300)
                    held.append(_stats(gw)[1])
                    echo(f"  fill pass: {held[-1]} sessions")
                    if held[-1] is None or held[-1] >= 0.97 * fill or (len(held) > 1 and held[-1] <= held[-2]):
                        break
                stop = time.monotonic()  # the traffic stops here
                out["fill_seconds"], out["fill_passes"] = stop - t0, held
                out["sessions_at_stop_map"] = sc.daemon_sessions(gw)
                out["stats"] = [dict(zip(("seconds", "sessions"), _stats(gw))) for _ in range(3)]
                out["stats_op_seconds"] = [_stats_op(gw) for _ in range(3)]
                echo(f"  stats: {out['stats']} (daemon alone: {out['stats_op_seconds']})")
                out["conns_json"] = _conns(gw, rss)
                out["conns_json"]["daemon_peak_rss_kib"] = rss.peak.get(gw.proc.pid)
                echo(f"  conns --json: {out['conns_json']}")
                if not nft:
                    out["traffic_during_sweeps"] = rate_series(t, conf, gw, max(15.0, 5 * duration))
                    d = {k: v for k, v in out["traffic_during_sweeps"].items() if k != "windows"}
                    echo(f"  established traffic while sweeping: {d}")
                    # now the 20 s timeout: every filled session has been idle since `stop` at least
                    gw.extra_settings = (f"timeout udp {UDP_TIMEOUT}",)
                    gw.write_config(gw.nrules)
                    from ..daemon.client import call

                    t1 = time.monotonic()
                    call(gw.socket, {"op": "reload"}, timeout=120)
                    out["reload_seconds"] = time.monotonic() - t1
                    out["sessions_at_reload_map"] = sc.daemon_sessions(gw)
                    stop = t1  # expiry is measured from here: the sessions' timeout is 20 s from now on
                # every filled session has expired at stop + timeout (the last pass refreshed
                # them at the latest just before `stop`); new flows then, while the sweep works
                wait = stop + timeout + 1 - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                r0 = sc.daemon_reasons(gw) or {}
                at = round(time.monotonic() - stop, 1)
                new = traffic.trafgen_conf(t.gw_in_mac, "new", dport="drnd(1024, 65535)")
                w = traffic.blast(t, new, gw.count_ns, duration)
                r1 = sc.daemon_reasons(gw) or {}
                out["new_flows"] = {
                    "after_stop_s": at, "pps": w.pps, "translated": w.translated,
                    "table_full": r1.get("DROP_TABLE_FULL", 0) - r0.get("DROP_TABLE_FULL", 0),
                    "port_exhausted": r1.get("DROP_PORT_EXHAUSTED", 0) - r0.get("DROP_PORT_EXHAUSTED", 0),
                    "xlate_new": r1.get("XLATE_NEW", 0) - r0.get("XLATE_NEW", 0),
                }
                echo(f"  new flows at stop+{out['new_flows']['after_stop_s']} s: {out['new_flows']}")
                timeline = []
                while time.monotonic() < stop + 3 * timeout:
                    timeline.append((round(time.monotonic() - stop, 1), _stats(gw)[1]))
                    time.sleep(2)
                out["timeline"] = timeline
                out["left_at_3x"] = {"kept_count": _stats(gw)[1], "map": sc.daemon_sessions(gw),
                                     "after_stop_s": round(time.monotonic() - stop, 1)}
                echo(f"  left at 3x the timeout: {out['left_at_3x']}")
                st = _status(gw)
                out["sweeps"] = st.get("sweeps")
                out["daemon_peak_rss_sampled_kib"] = rss.peak.get(gw.proc.pid)
                out["daemon_vmhwm_kib"] = _rss_kib(gw.proc.pid, "VmHWM")
            out["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - report what was measured
            out.update(status="error", reason=f"{type(e).__name__}: {e}")
        finally:
            gw.stop()
    out["loadavg"] = sc.loadavg()
    return out


def summary(r: dict) -> list[str]:
    """Markdown lines for the report."""
    if not r or r.get("status") != "ok":
        return [f"sessions-cp: {r.get('status') if r else 'not run'} ({(r or {}).get('reason', '')})"]
    st = [s["seconds"] for s in r["stats"]]
    cj = r["conns_json"]
    n0 = r["fill_passes"][-1] or 0
    left = r["left_at_3x"]["map"]
    sw = r.get("sweeps") or {}
    ts = r.get("traffic_during_sweeps") or {}
    fmt = lambda x: f"{x:,.0f}" if isinstance(x, (int, float)) else "?"  # noqa: E731
    if r.get("config") == "snatgw-nft":
        head = (f"snatgw-nft: filled {n0:,} UDP sessions, 92% of this host's nf_conntrack_max "
                f"({r['max_sessions']:,}: the limit of every namespace, changed only by the host), in "
                f"{r['fill_seconds']:.0f} s under timeout udp {r['udp_timeout']} (a reload cannot shorten a live "
                f"entry's timeout), stopped the traffic, measured stats and conns; times below count from the stop "
                f"(conntrack expires entries itself). Load average at the end {r.get('loadavg')}.")
    else:
        head = (f"Filled {n0:,} UDP sessions (max_sessions {r['max_sessions']:,}) in {r['fill_seconds']:.0f} s under "
                f"timeout udp {FILL_TIMEOUT}, stopped the traffic, measured stats and conns, then reloaded with "
                f"timeout udp {r['udp_timeout']} s ({r.get('reload_seconds', 0):.1f} s; "
                f"a count of the map read during the next seconds, while the first sweeps removed sessions idle "
                f"over 20 s, found {r.get('sessions_at_reload_map') or 0:,}); times below count from that reload. "
                f"Load average at the end {r.get('loadavg')} (other work on the machine).")
    lines = [
        head,
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| `snatgw stats` (CLI process) | {min(st):.2f}-{max(st):.2f} s ({r['stats'][0]['sessions'] or 0:,} sessions); "
        f"the daemon's answer {min(r['stats_op_seconds']) * 1000:.0f}-{max(r['stats_op_seconds']) * 1000:.0f} ms | < 1 s |",
        f"| full `conns --json` | {cj['seconds']:.1f} s, {cj['lines']:,} lines; CLI peak RSS "
        f"{(cj['cli_peak_rss_kib'] or 0) / 1024:.0f} MiB | |",
        f"| daemon peak RSS (VmHWM, whole scenario) | {(r['daemon_vmhwm_kib'] or 0) / 1024:.0f} MiB "
        f"(start {(r['daemon_rss_start_kib'] or 0) / 1024:.0f} MiB) | < 150 MiB |",
        f"| sessions left at 3x the timeout ({r['left_at_3x']['after_stop_s']} s) | {left or 0:,} "
        f"({100 * (left or 0) / max(n0, 1):.2f}%) | <= 5% |",
        f"| new flows at stop+{r['new_flows']['after_stop_s']} s (table: expired sessions only) | "
        f"{r['new_flows']['pps']:,.0f} pps translated; DROP_TABLE_FULL {r['new_flows']['table_full']:,} | no refusal |",
    ]
    if ts:
        lines.append(
            f"| established traffic over the table while sweeping (windows of 0.25 s) | median "
            f"{fmt(ts.get('median_pps'))} pps; windows where a sweep ended: median "
            f"{fmt(ts.get('median_pps_sweep_windows'))}, min {fmt(ts.get('min_pps_sweep_windows'))} "
            f"({ts.get('sweep_windows')} windows); others median {fmt(ts.get('median_pps_other_windows'))}; "
            f"windows at 0: {ts.get('zero_windows')} | |")
    if sw:
        lines.append(f"| sweeps | {sw.get('count')} runs ({sw.get('under_pressure', 0)} under pressure), longest "
                     f"{sw.get('max_seconds', 0):.2f} s, last {sw.get('last_seconds', 0):.2f} s "
                     f"(visited {sw.get('last_visited', 0):,}) | |")
    return lines
