"""Scenario `sessions-cp`: the control plane at a million sessions (issue 14).

snatgw-bpf with `max_sessions 1100000`; fill about a million UDP sessions (distinct flows)
under `timeout udp 300` (a fill takes longer than 20 s where new sessions come slower than
50k/s: with a working expiry the table would never reach a million), then stop the traffic and
reload the config with `timeout udp 20` at that moment; then report:
- time of `snatgw stats` (the CLI against the daemon), and the count it gives;
- time of a full `snatgw conns --json` (its lines counted, not kept) and the peak RSS of the
  daemon and of the CLI meanwhile;
- the daemon's peak RSS over the whole scenario (VmHWM), sampled RSS too;
- at the filled table (before the timeout cut), the reload that turns a host limit on (the
  recount walk of docs/datapath.md step 15) and the one that turns it off, under a steady
  stream of new flows: times, the rate, the per-host counts against the table's
  (host_limit_reloads);
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
from ipaddress import IPv4Address

from . import scenarios as sc
from . import topo, traffic
from .gateways import Gateway

UDP_TIMEOUT = 20
#: max_sessions_per_host of the reload that turns a host limit on at the filled table: above
#: every host's count in the fill (4096 each: seq_ports source ports toward one server port),
#: so nothing is refused; the reload's recount walk is what is measured
HOST_LIMIT = 8192
#: new flows per second while that reload (and the one that turns the limit off) runs: the
#: table's room above the fill is ~110k sessions, and a window of 0.25 s still holds 500
RELOAD_NEW_PPS = 2000
RELOAD_SERIES_MAX = 120  # s: the longest a series may run (trafgen's hard bound)
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


def _med(xs: list) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _walks(gw: Gateway) -> tuple:
    """(sweeps, recounts, a walk running now) from the daemon's status: answered on its loop
    thread, so also while a reload holds the worker."""
    st = _status(gw)
    return ((st.get("sweeps") or {}).get("count"), (st.get("recounts") or {}).get("count"),
            st.get("walk_running_seconds") is not None)


def reload_series(t, gw: Gateway, action, before: float = 2.0, after: float = 2.0, step: float = 0.25,
                  pps: int = RELOAD_NEW_PPS) -> dict:
    """New flows (each packet a new inside host and port of 198.18.129.0-198.18.255.255, trafgen at
    ``pps``, evenly spaced) while ``action()`` (a reload: returns its reply) runs in a thread
    begun ``before`` s into the series; the series ends ``after`` s after it returned.  Per
    window of ~``step`` s: the translated pps at the sink, the generator's offered pps, whether
    the action ran in it and whether a walk of the table (a sweep or the recount) ran in it
    (the daemon's status at its end: one running, or one ended since the last look); the
    medians before / during / after, and in windows with and without a walk; the datapath's
    XLATE_NEW, DROP_HOST_LIMIT and DROP_TABLE_FULL over the series."""
    import tempfile

    # never from the fill's hosts (198.18.128.0 + i, i < hosts <= 256): their sessions stay
    # as filled, so their counts can be judged against the table at any moment
    conf = traffic.trafgen_conf(t.gw_in_mac, "new-above-seq", dport="drnd(1024, 65535)")
    r0 = sc.daemon_reasons(gw) or {}
    done: dict = {}

    def act():
        done["start"] = time.monotonic()
        try:
            done["result"] = action()
        except Exception as e:  # noqa: BLE001 - reported with what was measured
            done["error"] = f"{type(e).__name__}: {e}"
        done["end"] = time.monotonic()

    th = threading.Thread(target=act, daemon=True)
    started = False
    windows = []
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", prefix="sgbench-") as f:
        f.write(conf)
        f.flush()
        argv = ["ip", "netns", "exec", t.gen] + traffic.trafgen_argv(f.name, gap_us=10**6 // pps)
        p = subprocess.Popen(traffic.bounded(argv, RELOAD_SERIES_MAX), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
        try:
            time.sleep(0.3)
            c0, o0, t0 = traffic.read_counters(gw.count_ns), traffic.tx_packets(t.gen), time.monotonic()
            k0 = _walks(gw)
            begin = t0
            while True:
                now = time.monotonic()
                if not started and now - begin >= before:
                    th.start()
                    started = True
                if "end" in done and now - done["end"] >= after or now - begin > RELOAD_SERIES_MAX - 5:
                    break
                time.sleep(step)
                c1, o1, t1 = traffic.read_counters(gw.count_ns), traffic.tx_packets(t.gen), time.monotonic()
                k1 = _walks(gw)
                windows.append({"t0": t0 - begin, "t1": t1 - begin, "pps": (c1[0] - c0[0]) / (t1 - t0),
                                "offered_pps": (o1 - o0) / (t1 - t0), "translated": c1[0] - c0[0],
                                "offered": o1 - o0, "walk": k1[2] or k1[:2] != k0[:2]})
                c0, o0, t0, k0 = c1, o1, t1, k1
        finally:
            traffic._stop_group(p)
    th.join(RELOAD_SERIES_MAX)
    r1 = sc.daemon_reasons(gw) or {}
    start, end = done.get("start"), done.get("end")
    a = (start - begin) if start else None
    b = (end - begin) if end else None
    for w in windows:
        w["phase"] = ("before" if a is None or w["t1"] <= a else
                      "after" if b is not None and w["t0"] >= b else "during")
    by = {ph: [w["pps"] for w in windows if w["phase"] == ph] for ph in ("before", "during", "after")}
    during = by["during"]
    out = {"seconds": (end - start) if start and end else None, "reply": done.get("result"),
           "error": done.get("error"), "pps_target": pps, "windows": windows,
           "median_pps_before": _med(by["before"]), "median_pps_during": _med(during),
           "min_pps_during": min(during) if during else None, "median_pps_after": _med(by["after"]),
           "windows_during": len(during), "zero_windows_during": sum(1 for x in during if x == 0),
           "median_offered_pps_during": _med([w["offered_pps"] for w in windows if w["phase"] == "during"]),
           # the generator shares CPU0 with the gateway's softirq work: a dip in both is the
           # pipeline slowed (CPU taken), translated below offered is flows the gateway lost
           "translated_during": sum(w["translated"] for w in windows if w["phase"] == "during"),
           "offered_during": sum(w["offered"] for w in windows if w["phase"] == "during"),
           # every phase: is a dip the reload's, or any walk's (under pressure sweeps run back to back)?
           "median_pps_walk": _med([w["pps"] for w in windows if w["walk"]]),
           "median_pps_no_walk": _med([w["pps"] for w in windows if not w["walk"]]),
           "windows_walk": sum(1 for w in windows if w["walk"]), "windows_no_walk": sum(1 for w in windows if not w["walk"])}
    for name in ("XLATE_NEW", "DROP_HOST_LIMIT", "DROP_TABLE_FULL"):
        out[name.lower()] = r1.get(name, 0) - r0.get(name, 0)
    return out


def kept_host_counts(gw: Gateway) -> dict[str, int]:
    """The per-host live counts as the datapath keeps them (snat_host_sess, read from the
    pins): inside host -> sessions, hosts with none left out."""
    from ..datapath.bpf.maps import DatapathMaps
    from ..layout import MAP_HOST_SESS

    m = DatapathMaps.open_pinned(gw.pin_dir, readonly=True)
    try:
        return {h: s for h, (s, _r) in m.pressure_counts()[MAP_HOST_SESS].items() if s}
    finally:
        m.close()


def true_host_counts(gw: Gateway) -> dict[str, int]:
    """The table's own count per inside host: its OUT entries by source address (what the
    recount counts), read from the pinned session map in batches (keys only parsed)."""
    from collections import Counter

    from .. import layout as L
    from ..datapath.bpf.libbpf import Map

    d = L.CT_KEY.offsets()["dir"]
    m = Map.open_pinned(os.path.join(gw.pin_dir, L.MAP_CT), readonly=True)
    c: Counter = Counter()
    try:
        ks = m.key_size
        for n, raw in m.key_batches(8192):
            c.update(raw[i : i + 4] for i in range(0, n * ks, ks) if raw[i + d] == L.CT_DIR_OUT)
    finally:
        m.close()
    return {str(IPv4Address(k)): v for k, v in c.items()}


def compare_counts(kept: dict[str, int], true: dict[str, int], fill_hosts: set[str] = frozenset()) -> dict:
    """Kept per-host counts against the table's: how many hosts and sessions each says, hosts
    exact / high / low (a low count would let a host past its limit: never allowed), by how much,
    and the fill's own hosts alone."""
    hosts = set(kept) | set(true)
    diff = {h: kept.get(h, 0) - true.get(h, 0) for h in hosts}
    return {"hosts_counted": len(kept), "hosts_true": len(true), "sessions_counted": sum(kept.values()),
            "sessions_true": sum(true.values()), "hosts_exact": sum(1 for v in diff.values() if v == 0),
            "hosts_high": sum(1 for v in diff.values() if v > 0), "high_by": sum(v for v in diff.values() if v > 0),
            "hosts_low": sum(1 for v in diff.values() if v < 0), "low_by": -sum(v for v in diff.values() if v < 0),
            "fill_hosts": len(fill_hosts), "fill_hosts_exact": sum(1 for h in fill_hosts if diff.get(h, 0) == 0),
            "max_true": max(true.values(), default=0)}  # fmt: skip


def host_limit_reloads(t, gw: Gateway, fill_timeout: int, fill_hosts: set[str], echo=print) -> dict:
    """At the filled table, the reload an operator makes to turn a host limit on
    (`max_sessions_per_host HOST_LIMIT`, above every host's count: nothing refused), through
    the control socket's `reload` as `snatgw reload` does it, under a steady stream of new
    flows; then the per-host counts it produced against the table's; then the reload that
    turns the limit off (no walk).  docs/datapath.md step 15."""
    from ..daemon.client import call

    def reload():
        return call(gw.socket, {"op": "reload"}, timeout=RELOAD_SERIES_MAX)

    snap: dict = {}

    def reload_and_look():
        """The reload, then at once the counts it produced (before any later sweep can end:
        one takes seconds at this size) and the daemon's sweep count."""
        t0 = time.monotonic()
        reply = reload()
        snap["seconds"] = time.monotonic() - t0
        snap["kept"], snap["sweeps"] = kept_host_counts(gw), _walks(gw)[0]
        return reply

    out: dict = {"limit": HOST_LIMIT}
    st0 = _status(gw)
    out["recounts_before"] = st0.get("recounts")
    gw.extra_settings = (f"timeout udp {fill_timeout}", f"max_sessions_per_host {HOST_LIMIT}")
    gw.write_config(gw.nrules)
    on = reload_series(t, gw, reload_and_look)
    on["seconds"] = snap.get("seconds")  # the reload's own, without the look after it
    st1 = _status(gw)
    on["recount"] = st1.get("recounts")
    on["walked"] = (st1.get("recounts") or {}).get("count") != (st0.get("recounts") or {}).get("count")
    sweeps = lambda st: (st.get("sweeps") or {}).get("count") or 0  # noqa: E731
    on["sweeps_during"] = sweeps(st1) - sweeps(st0)
    p = call(gw.socket, {"op": "stats"}, timeout=60)["stats"].get("pressure") or {}
    on["stats"] = {k: p.get(k) for k in ("hosts_counted", "hosts_total")}
    on["stats"]["top_host"] = (p.get("hosts") or [None])[0]
    # the traffic has stopped: the table's own count per host, against the kept counts now
    # (the recount's, plus the datapath's increments since; a sweep since would have made them
    # its own) and, for the fill's hosts, against the counts right after the reload
    t0 = time.monotonic()
    kept = kept_host_counts(gw)
    true = true_host_counts(gw)
    on["counts_read_seconds"] = time.monotonic() - t0
    on["counts"] = compare_counts(kept, true, fill_hosts)
    on["counts"]["sweeps_since_reload"] = sweeps(_status(gw)) - (snap.get("sweeps") or 0) if snap else None
    if "kept" in snap:
        k0 = {h: snap["kept"][h] for h in fill_hosts if h in snap["kept"]}
        on["counts_at_reload"] = compare_counts(k0, {h: true[h] for h in fill_hosts if h in true}, fill_hosts)
    out["on"] = on
    echo(f"  host limit on by reload: {on['seconds']} s, recount {on['recount']}, new flows "
         f"{on['median_pps_before']} -> {on['median_pps_during']} pps (min {on['min_pps_during']}), "
         f"counts {on['counts']}")
    gw.extra_settings = (f"timeout udp {fill_timeout}",)
    gw.write_config(gw.nrules)
    off = reload_series(t, gw, reload)
    st2 = _status(gw)
    off["walked"] = (st2.get("recounts") or {}).get("count") != (st1.get("recounts") or {}).get("count")
    p = call(gw.socket, {"op": "stats"}, timeout=60)["stats"].get("pressure") or {}
    off["stats"] = {k: p.get(k) for k in ("hosts_counted", "hosts_total")}
    out["off"] = off
    echo(f"  host limit off by reload: {off['seconds']} s, walked {off['walked']}, new flows "
         f"{off['median_pps_before']} -> {off['median_pps_during']} pps, hosts counted {off['stats']}")
    return out


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
                    base = int(IPv4Address("198.18.128.0"))  # trafgen_conf's seq_hosts sources
                    fill_hosts = {str(IPv4Address(base + i)) for i in range(hosts)}
                    if hosts <= 256:  # the series' new flows come from other hosts (reload_series)
                        out["host_limit"] = host_limit_reloads(t, gw, fill_timeout, fill_hosts, echo)
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
    lines += host_limit_rows(r.get("host_limit"), sw)
    if sw:
        lines.append(f"| sweeps | {sw.get('count')} runs ({sw.get('under_pressure', 0)} under pressure"
                     f"{', %d cut short' % sw['cut_short'] if sw.get('cut_short') else ''}), longest "
                     f"{sw.get('max_seconds', 0):.2f} s, last {sw.get('last_seconds', 0):.2f} s "
                     f"(visited {sw.get('last_visited', 0):,}) | |")
    return lines


def cut_note(cut) -> str:
    """What the recount waited for: an expiry sweep it cut short at its next chunk, none (an
    older result does not say: nothing)."""
    if cut is None:
        return ""
    return " (an expiry sweep, cut short at its next chunk)" if cut else " (no sweep was running)"


def host_limit_rows(h: dict | None, sweeps: dict | None = None) -> list[str]:
    """The report's rows for host_limit_reloads(): the reload that turns a host limit on (its
    time, the recount walk's, new flows during it, the counts it produced against the table's)
    and the one that turns it off."""
    if not h:
        return []
    fmt = lambda x: f"{x:,.0f}" if isinstance(x, (int, float)) else "?"  # noqa: E731
    sec = lambda x: f"{x:.2f} s" if isinstance(x, (int, float)) else "?"  # noqa: E731

    def flows(s: dict) -> str:
        return (f"median {fmt(s.get('median_pps_before'))} pps before, {fmt(s.get('median_pps_during'))} during "
                f"(min {fmt(s.get('min_pps_during'))}; {s.get('windows_during', 0)} windows, "
                f"{s.get('zero_windows_during', 0)} at 0; offered {fmt(s.get('median_offered_pps_during'))}; "
                f"{fmt(s.get('translated_during'))} of {fmt(s.get('offered_during'))} offered packets translated), "
                f"{fmt(s.get('median_pps_after'))} after; in windows where a walk ran (a sweep or the recount, any "
                f"phase) median {fmt(s.get('median_pps_walk'))} ({s.get('windows_walk', '?')} windows), in the "
                f"others {fmt(s.get('median_pps_no_walk'))} ({s.get('windows_no_walk', '?')}); "
                f"XLATE_NEW {fmt(s.get('xlate_new'))}, "
                f"DROP_HOST_LIMIT {fmt(s.get('drop_host_limit'))}, DROP_TABLE_FULL {fmt(s.get('drop_table_full'))}")

    on, off = h.get("on") or {}, h.get("off") or {}
    rc = on.get("recount") or {}
    c = on.get("counts") or {}
    c0 = on.get("counts_at_reload") or {}
    st = on.get("stats") or {}
    longest = (sweeps or {}).get("max_seconds")
    rows = [
        f"| reload turning a host limit on (`max_sessions_per_host {h.get('limit')}`, nothing refused) | "
        f"{sec(on.get('seconds'))}{' (error: ' + on['error'] + ')' if on.get('error') else ''}; of it the recount "
        f"walk {sec(rc.get('last_seconds'))} over {fmt(rc.get('last_visited'))} entries ({fmt(rc.get('last_live'))} "
        f"sessions), after {sec(rc.get('last_wait_seconds'))} waiting for a walk in progress"
        f"{cut_note(rc.get('last_cut_sweep'))}; "
        f"{on.get('sweeps_during', '?')} sweeps ran meanwhile | the recount walk, no wait for a sweep "
        f"(longest sweep {sec(longest)}) |",
        f"| new flows during that reload (trafgen, a packet every "
        f"{fmt(1e6 / on['pps_target']) if on.get('pps_target') else '?'} us; windows of 0.25 s) | "
        f"{flows(on)} | kept made, none refused |",
        f"| per-host counts it produced, against the table's OUT entries "
        f"(read {sec(on.get('counts_read_seconds'))} after) | stats: hosts {st.get('hosts_counted', '?')}, "
        f"{fmt(st.get('hosts_total'))} hosts; kept {fmt(c.get('hosts_counted'))} hosts / "
        f"{fmt(c.get('sessions_counted'))} sessions, table {fmt(c.get('hosts_true'))} / "
        f"{fmt(c.get('sessions_true'))}; hosts exact {fmt(c.get('hosts_exact'))}, high {fmt(c.get('hosts_high'))} "
        f"(+{fmt(c.get('high_by'))}), low {fmt(c.get('hosts_low'))} (-{fmt(c.get('low_by'))}); the fill's hosts "
        f"exact {fmt(c.get('fill_hosts_exact'))} of {fmt(c.get('fill_hosts'))} (largest {fmt(c.get('max_true'))}); "
        f"{c.get('sweeps_since_reload', '?')} sweeps ended since the reload; right after it (read at once), the "
        f"fill's hosts exact {fmt(c0.get('fill_hosts_exact'))} of {fmt(c0.get('fill_hosts'))}, high "
        f"{fmt(c0.get('hosts_high'))}, low {fmt(c0.get('hosts_low'))} | "
        f"exact, or high by flows made during the walk; never low |",
    ]
    if off:
        ost = off.get("stats") or {}
        rows.append(
            f"| reload turning it off | {sec(off.get('seconds'))}"
            f"{' (error: ' + off['error'] + ')' if off.get('error') else ''}; "
            f"{'a recount walk ran' if off.get('walked') else 'no walk'}; "
            f"stats: hosts {ost.get('hosts_counted', '?')}; "
            f"new flows {flows(off)} | flag cleared, no walk |")
    return rows
