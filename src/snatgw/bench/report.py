"""Markdown report of a results dict (pure): packet scenarios with spread, gateway cost per
packet, ratios side by side, the issue's targets marked met / not met / n/a, rule scaling,
session-table scale and control plane.  Unavailable configurations show as "n/a (reason)".
"""

from __future__ import annotations

import statistics

from . import stats as st

PKT = ("udp-1flow", "udp-10kflows", "udp-newflows")  # the scenarios 1-3 (targets)
UDP = PKT + ("udp-newflows-spread", "udp-portpressure")  # every trafgen scenario: a drop baseline, a cost
TITLES = {
    "udp-1flow": "1 one UDP flow", "udp-10kflows": "2 10k UDP flows", "udp-newflows": "3a new UDP flows",
    "udp-newflows-spread": "3a' new UDP flows, random server ports",
    "udp-portpressure": "3c port pressure (one host, 64k ports, one server port; offered pps)",
    "tcp-cycles": "3b TCP connect/close", "tcp-bulk": "4 bulk TCP",
}
ORDER = ("udp-1flow", "udp-10kflows", "udp-newflows", "udp-newflows-spread", "udp-portpressure", "tcp-cycles",
         "tcp-bulk")
CONFIG_ORDER = ("drop", "forward", "nft-kernel", "snatgw-nft", "snatgw-bpf", "snatgw-bpf-audit",
                "snatgw-bpf-hostlimit")


def fmt(v: float | None, metric: str = "") -> str:
    if v is None:
        return "—"
    if metric == "pps":
        return f"{v / 1e6:.3f} M" if v >= 1e6 else f"{v / 1e3:.1f} k"
    if metric == "Gbit/s":
        return f"{v:.2f}"
    if metric in ("conn/s", "ns"):
        return f"{v:,.0f}"
    return f"{v:.3g}"


def fmt_spread(s: st.Spread | None, metric: str) -> str:
    if s is None:
        return "—"
    return f"{fmt(s.median, metric)} [{fmt(s.min, metric)}–{fmt(s.max, metric)}]"


def fmt_ratio(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _na(entry: dict | None, width: int = 90) -> str:
    """"n/a (reason)" shortened for a table cell; the full reasons are listed once above."""
    if not entry:
        return "not run"
    reason = str(entry.get("reason", "?")).replace("|", "/")
    if len(reason) > width:
        reason = reason[: width - 1] + "…"
    return f"{entry.get('status', 'n/a')} ({reason})"


# ------------------------------------------------------------------ targets


#: issue 11's new-flow targets: gateway-isolated nft-kernel / snatgw-bpf at least this
NEWFLOW_TARGETS = (("udp-newflows", 1.5), ("udp-newflows-spread", 2.0), ("udp-portpressure", 1.5))


def fmt_interval(iv: tuple[float, float] | None) -> str:
    return "—" if iv is None else f"{iv[0]:.2f}–{iv[1]:.2f}"


def judge_interval(ratio: float | None, iv: tuple[float, float] | None, target: float) -> str:
    """met: the whole 90% interval at or above the target; not met: the whole interval below
    it; otherwise the rounds cannot tell (the target inside it), whichever side the ratio of
    the medians fell on this time.  Without an interval (fewer than three rounds), by the
    ratio alone, said so."""
    if ratio is None:
        return "n/a"
    if iv is None:
        return ("met" if ratio >= target else "not met") + " (by the ratio alone: too few rounds for an interval)"
    if iv[0] >= target:
        return "met"
    if iv[1] < target:
        return "not met"
    return f"not settled ({target:g}× inside the interval; ratio {'above' if ratio >= target else 'below'})"


def pool_records(runs: list[tuple[str, object]]) -> list[dict]:
    """The records of several runs' results (``(name, parsed JSON)`` each) as one run's: the
    rounds of each run renumbered after the previous run's, so a round keeps its own drop,
    nft-kernel and snatgw-bpf runs together (as round_costs pairs them).  ValueError naming
    the run that is not a results file of `snatgw bench`."""
    out: list[dict] = []
    offset = 0
    for name, data in runs:
        recs = data.get("records") if isinstance(data, dict) else None
        if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
            raise ValueError(f"{name}: not a results file of `snatgw bench` (expected an object with a "
                             "'records' list, as bench/results/<timestamp>.json)")
        last = -1
        for r in recs:  # a packet round's record; others (sessions, control, ...) are not pooled
            rnd, value = r.get("round"), r.get("value")
            if not (isinstance(rnd, int) and not isinstance(rnd, bool) and rnd >= 0
                    and isinstance(r.get("scenario"), str) and isinstance(r.get("config"), str)
                    and (value is None or isinstance(value, (int, float)) and not isinstance(value, bool))):
                continue
            last = max(last, rnd)
            out.append(dict(r, round=rnd + offset))
        offset += last + 1
    return out


def pooled_targets(records: list[dict]) -> list[dict]:
    """Issue 11's new-flow targets over pooled rounds (pool_records): per scenario the rounds
    used, the costs' medians, the ratio, its 90% interval and the verdict, as a report judges
    one run's."""
    rows = []
    for scen, target in NEWFLOW_TARGETS:
        rc = st.round_costs(records, scen, "snatgw-bpf", "nft-kernel")
        if not rc:
            continue
        bpf = statistics.median(c for _, c, _ in rc)
        nft = statistics.median(c for _, _, c in rc)
        ratio = nft / bpf if bpf > 0 and nft > 0 else None
        iv = st.isolated_interval(records, scen, "snatgw-bpf", "nft-kernel")
        rows.append({"scenario": scen, "title": TITLES[scen].split(" (")[0], "target": target, "rounds": len(rc),
                     "nft_kernel_ns": round(nft), "snatgw_bpf_ns": round(bpf), "ratio": ratio,
                     "interval": None if iv is None else list(iv),
                     "verdict": judge_interval(ratio, iv, target)})
    return rows


def targets(summary: dict, results: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows.  Verdict: met | not met | n/a; issue 11's new-flow
    rows judge by the 90% interval over rounds (judge_interval)."""
    rows = []
    recs = results.get("records", [])

    def judge(name: str, values: list[tuple[str, float | None]], ok) -> None:
        got = [(k, v) for k, v in values if v is not None]
        measured = ", ".join(f"{k}: {fmt_ratio(v)}" for k, v in got) or "—"
        if len(got) < len(values) or not got:
            verdict = "n/a" if not got else ("not met" if not all(ok(v) for _, v in got) else "n/a (partial)")
        else:
            verdict = "met" if all(ok(v) for _, v in got) else "not met"
        rows.append((name, measured, verdict))

    judge("snatgw-bpf ≥ 1.8× nft-kernel, gateway isolated (scenarios 1–3)",
          [(s, st.speedup_isolated(summary, s, "snatgw-bpf", "nft-kernel")) for s in PKT], lambda v: v >= 1.8)
    judge("snatgw-bpf ≥ 1.3× nft-kernel, end to end (scenarios 1–3)",
          [(s, st.speedup_e2e(summary, s, "snatgw-bpf", "nft-kernel")) for s in PKT], lambda v: v >= 1.3)
    judge("snatgw-bpf ≥ 0.95× forward (scenarios 1–2, end to end)",
          [(s, st.speedup_e2e(summary, s, "snatgw-bpf", "forward")) for s in PKT[:2]], lambda v: v >= 0.95)
    judge("new-session rate ≥ 2× nft-kernel",
          [(s, st.speedup_e2e(summary, s, "snatgw-bpf", "nft-kernel"))
           for s in ("udp-newflows", "udp-newflows-spread", "tcp-cycles") if any(k[0] == s for k in summary)],
          lambda v: v >= 2.0)
    for scen, target in NEWFLOW_TARGETS:
        if not any(k[0] == scen for k in summary):
            continue
        r = st.speedup_isolated(summary, scen, "snatgw-bpf", "nft-kernel")
        iv = st.isolated_interval(recs, scen, "snatgw-bpf", "nft-kernel")
        rows.append((f"{TITLES[scen].split(' (')[0]}: snatgw-bpf ≥ {target:g}× nft-kernel, gateway isolated (issue 11)",
                     f"{fmt_ratio(r)}, 90% interval {fmt_interval(iv)}" if r is not None else "—",
                     judge_interval(r, iv, target)))
    counts = sorted({int(s.split("-")[1]) for s, _ in summary if s.startswith("rules-")})
    if counts:
        lo, hi = f"rules-{counts[0]}", f"rules-{counts[-1]}"
        judge(f"≤ 10% slowdown {counts[0]} → {counts[-1]} rules (snatgw-bpf pps)",
              [(f"{counts[-1]}/{counts[0]}",
                st.ratio(st.median_of(summary, hi, "snatgw-bpf"), st.median_of(summary, lo, "snatgw-bpf")))],
              lambda v: v >= 0.90)
    else:
        rows.append(("≤ 10% slowdown 1 → 10k rules", "—", "n/a"))
    sess = (results.get("sessions") or {}).get("by_config", {}).get("snatgw-bpf") or {}
    mib = sess.get("mib_per_1m_sessions")
    rows.append(("1M sessions ≤ 256 MiB (snatgw-bpf map memory)",
                 f"{mib:.1f} MiB for 1M (session maps at capacity + fixed maps)" if mib else _na(sess),
                 ("met" if mib <= 256 else "not met") if mib else "n/a"))
    ctl = (results.get("control") or {}).get("by_config", {}).get("snatgw-bpf") or {}
    rel = [r for r in ctl.get("reloads", []) if r.get("seconds") is not None]
    if rel:
        worst = max(r["seconds"] for r in rel)
        lost = [r.get("lost") for r in rel]
        ok = worst < 1.0 and all(x == 0 for x in lost)
        rows.append((f"reload of {results['control']['rules']:,} rules < 1 s, zero sessions lost (snatgw-bpf)",
                     f"worst {worst:.3f} s, lost {lost}", "met" if ok else "not met"))
    else:
        rows.append(("reload of 10k rules < 1 s, zero sessions lost (snatgw-bpf)", _na(ctl), "n/a"))
    return rows


# ------------------------------------------------------------------ sections


def _packet_table(summary: dict) -> list[str]:
    out = ["| scenario | config | median [min–max] | unit | gateway ns/pkt (vs drop) | pipeline CPU ns/pkt (vs drop) |",
           "|---|---|---|---|---|---|"]
    for s in ORDER:
        for c in CONFIG_ORDER:
            e = summary.get((s, c))
            if e is None:
                continue
            if e.get("status") != "ok":
                out.append(f"| {TITLES[s]} | {c} | {_na(e)} | | | |")
                continue
            m = e["metric"]
            out.append(f"| {TITLES[s]} | {c} | {fmt_spread(e['value'], m)} | {m} | "
                       f"{fmt_spread(e.get('cost_ns'), 'ns')} | {fmt_spread(e.get('cpu_cost_ns'), 'ns')} |")
    return out


def _ratio_table(summary: dict, records: list[dict] = ()) -> list[str]:
    out = ["| scenario | bpf/nft-kernel e2e | bpf/nft-kernel isolated | isolated, 90% interval (rounds resampled) "
           "| bpf/nft-kernel isolated (CPU) | bpf/forward e2e "
           "| bpf/forward isolated | snatgw-nft/nft-kernel e2e |", "|---|---|---|---|---|---|---|---|"]
    for s in ORDER:
        if not any(k[0] == s for k in summary):
            continue
        iso = s in UDP
        out.append("| " + " | ".join([
            TITLES[s],
            fmt_ratio(st.speedup_e2e(summary, s, "snatgw-bpf", "nft-kernel")),
            fmt_ratio(st.speedup_isolated(summary, s, "snatgw-bpf", "nft-kernel")) if iso else "—",
            fmt_interval(st.isolated_interval(list(records), s, "snatgw-bpf", "nft-kernel")) if iso else "—",
            fmt_ratio(st.speedup_isolated(summary, s, "snatgw-bpf", "nft-kernel", "cpu_cost_ns")) if iso else "—",
            fmt_ratio(st.speedup_e2e(summary, s, "snatgw-bpf", "forward")),
            fmt_ratio(st.speedup_isolated(summary, s, "snatgw-bpf", "forward")) if iso else "—",
            fmt_ratio(st.speedup_e2e(summary, s, "snatgw-nft", "nft-kernel")),
        ]) + " |")
    return out


def _paired_table(records: list[dict]) -> list[str]:
    """snatgw-bpf against nft-kernel, gateway isolated, round by round (st.paired_isolated):
    how far the rounds' own ratios spread around the ratio of the medians above.  A round whose
    costs are not both above its drop run's shows n/a and counts in neither median nor range."""
    out = []
    for s in ORDER:
        if s not in UDP:
            continue
        pairs = st.paired_isolated(records, s, "snatgw-bpf", "nft-kernel")
        if not pairs:
            continue
        got = [x for _, x in pairs if x is not None]
        per = " ".join("n/a" if x is None else f"{x:.2f}" for _, x in pairs)
        if got:
            sp = st.spread(got)
            out.append(f"| {TITLES[s]} | {per} | {sp.median:.2f}× [{sp.min:.2f}–{sp.max:.2f}] |")
        else:
            out.append(f"| {TITLES[s]} | {per} | — |")
    if not out:
        return []
    return ["| scenario | per round, in round order | median [min–max] |", "|---|---|---|"] + out


def _pressure_table(records: list[dict]) -> list[str]:
    """Per config and round: offered and delivered pps, sessions made, flows refused, and
    (snatgw) packets of refused flows that hit the refusal marker, (bpf) address searches the
    spill memo cut short and the candidate ports tried per port search; the inside program's
    own ns per packet and the offered rate of the separate pass that measured it."""
    rows = [r for r in records if r.get("scenario") == "udp-portpressure" and r.get("status") == "ok"
            and r.get("config") != "drop"]  # fmt: skip
    if not rows:
        return []
    out = ["| config | round | offered pps | delivered pps | sessions | flows refused | marker hits | spill memo hits "
           "| tries per search | program ns/pkt | offered pps, program pass |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in CONFIG_ORDER:
        for r in (x for x in rows if x["config"] == c):
            searches, tries = r.get("port_searches"), r.get("port_search_tries")
            per = f"{tries / searches:.2f} ({searches})" if searches and tries is not None else "—"
            out.append(f"| {c} | {r['round']} | {fmt(r.get('value'), 'pps')} | {fmt(r.get('delivered_pps'), 'pps')} | "
                       f"{r.get('sessions', '—')} | {r.get('refused_flows', '—')} | "
                       f"{r.get('refused_marker_packets', '—')} | {r.get('spill_memo_hits', '—')} | {per} | "
                       f"{round(r['prog_ns_per_run']) if r.get('prog_ns_per_run') else '—'} | "
                       f"{fmt(r['prog_pass_pps'], 'pps') if r.get('prog_pass_pps') else '—'} |")
    return out


def _program_table(records: list[dict]) -> list[str]:
    """3a and 3a' per round (snatgw-bpf): the gateway's cost per new flow (measured, minus the
    round's drop) beside the inside program's own time per packet (from the separate pass with
    run-time statistics): what the rest of the path costs is the difference, shown beside plain
    forwarding's whole cost in the same round."""
    ok = [r for r in records if r.get("status") == "ok"]
    by = {(r["scenario"], r["round"], r["config"]): r for r in ok}
    rows = [r for r in ok if r.get("config") == "snatgw-bpf" and r.get("prog_ns_per_run")
            and r.get("scenario") in ("udp-newflows", "udp-newflows-spread")]  # fmt: skip
    if not rows:
        return []

    def cost(r: dict, cfg: str) -> float | None:
        d, c = by.get((r["scenario"], r["round"], "drop")), by.get((r["scenario"], r["round"], cfg))
        return st.cost_ns(c.get("value"), d.get("value")) if c and d else None

    def ns(v: float | None) -> str:
        return f"{v:,.0f}" if v is not None else "—"

    out = ["| scenario | round | gateway ns/pkt | program ns/pkt | rest of the path ns/pkt | forward ns/pkt "
           "| pps, program pass |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda x: (x["scenario"], x["round"])):
        c, prog = cost(r, "snatgw-bpf"), r["prog_ns_per_run"]
        out.append(f"| {TITLES[r['scenario']].split()[0]} | {r['round']} | {ns(c)} | {ns(prog)} | "
                   f"{ns(c - prog if c is not None else None)} | {ns(cost(r, 'forward'))} | "
                   f"{fmt(r['prog_pass_pps'], 'pps') if r.get('prog_pass_pps') else '—'} |")
    return out


def _hostlimit_table(summary: dict) -> list[str]:
    """snatgw-bpf against snatgw-bpf-hostlimit (max_sessions_per_host set, never reached: the
    datapath counts each inside host's new sessions) per scenario: medians of the gateway cost
    and the pipeline CPU per packet, and what the count adds."""
    rows = []
    for s in ORDER:
        off, on = summary.get((s, "snatgw-bpf")), summary.get((s, "snatgw-bpf-hostlimit"))
        if not off or not on or off.get("status") != "ok" or on.get("status") != "ok":
            continue
        cells = []
        for f in ("cost_ns", "cpu_cost_ns"):
            a, b = st.median_of(summary, s, "snatgw-bpf", f), st.median_of(summary, s, "snatgw-bpf-hostlimit", f)
            cells += [fmt(a, "ns") if a is not None else "—", fmt(b, "ns") if b is not None else "—",
                      f"{b - a:+,.0f} ns" if a is not None and b is not None else "—"]
        rows.append(f"| {TITLES[s]} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["| scenario | gateway ns/pkt, no limit | with a limit | difference | pipeline CPU ns/pkt, no limit "
            "| with a limit | difference |", "|---|---|---|---|---|---|---|"] + rows


def _audit_table(records: list[dict]) -> list[str]:
    """The audit log's cost: snatgw-bpf and snatgw-bpf-audit per scenario and round (pps), with
    the log's records and losses (each scenario on a gateway of its own: that run's)."""
    rows = [r for r in records if r.get("config") in ("snatgw-bpf", "snatgw-bpf-audit") and r.get("status") == "ok"
            and r.get("scenario") in ("udp-1flow", "udp-newflows", "udp-newflows-spread")]  # fmt: skip
    if not any(r["config"] == "snatgw-bpf-audit" for r in rows):
        return []
    out = ["| scenario | round | snatgw-bpf pps | snatgw-bpf-audit pps | audit/off | records written | lost (ring full) | lost (writes) |",
           "|---|---|---|---|---|---|---|---|"]
    for s in ("udp-1flow", "udp-newflows", "udp-newflows-spread"):
        for rnd in sorted({r["round"] for r in rows if r["scenario"] == s}):
            off = next((r for r in rows if (r["scenario"], r["round"], r["config"]) == (s, rnd, "snatgw-bpf")), None)
            on = next((r for r in rows if (r["scenario"], r["round"], r["config"]) == (s, rnd, "snatgw-bpf-audit")), None)
            if on is None:
                continue
            ratio = f"{on['value'] / off['value']:.2f}" if off and off.get("value") and on.get("value") else "—"
            out.append(f"| {s} | {rnd} | {fmt(off.get('value'), 'pps') if off else '—'} | {fmt(on.get('value'), 'pps')} | "
                       f"{ratio} | {on.get('audit_records', '—')} | {on.get('audit_lost_datapath', '—')} | "
                       f"{on.get('audit_lost_write', '—')} |")
    return out


def _rules_table(summary: dict, records: list[dict]) -> list[str]:
    counts = sorted({int(s.split("-")[1]) for s, _ in summary if s.startswith("rules-")})
    cfgs = [c for c in CONFIG_ORDER[2:] if any(k == (f"rules-{n}", c) for n in counts for k in summary)]
    if not counts:
        return []
    out = ["| rules | " + " | ".join(f"{c} pps | {c} ns/pkt | {c} start s" for c in cfgs) + " |",
           "|---|" + "---|---|---|" * len(cfgs)]
    for n in counts:
        cells = []
        for c in cfgs:
            e = summary.get((f"rules-{n}", c))
            if not e or e.get("status") != "ok":
                cells += [_na(e), "", ""]
                continue
            starts = [r.get("start_s") for r in records if r["scenario"] == f"rules-{n}" and r["config"] == c
                      and r.get("start_s") is not None]
            sp = st.spread(starts)
            cells += [fmt_spread(e["value"], "pps"), fmt_spread(e.get("cost_ns"), "ns"),
                      f"{sp.median:.2f}" if sp else "—"]
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return out


def _sessions_section(results: dict) -> list[str]:
    s = results.get("sessions")
    if not s:
        return []
    out = [f"Table of {s['target_sessions']:,} sessions filled with {s.get('flows', 0):,} distinct flows "
           "(source address and destination port counting together, × 4096 source ports), then replayed (lookups). "
           f"Kernel conntrack object size here: {s.get('conntrack_objsize') or '?'} bytes (nft-kernel, for comparison).",
           "", "| config | sessions held | map memlock | per session (table maps) | MiB per 1M (+fixed maps) | MemAvailable drop "
           "| lookup pps median [min–max] | fill s (passes) |", "|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for cfg, e in s.get("by_config", {}).items():
        if e.get("status") != "ok":
            out.append(f"| {cfg} | {_na(e)} | | | | | | |")
            continue
        lk = st.spread([x["pps"] for x in e.get("lookup", [])])
        bps = e.get("bytes_per_session")
        mib = e.get("mib_per_1m_sessions")
        out.append(f"| {cfg} | {e.get('sessions') if e.get('sessions') is not None else '?'} | "
                   f"{(e.get('memlock_bytes') or 0) / 2**20:.1f} MiB | {f'{bps:.0f} B' if bps else '—'} | "
                   f"{f'{mib:.1f}' if mib else '—'} | {e.get('memavailable_drop_bytes', 0) / 2**20:.1f} MiB | "
                   f"{fmt_spread(lk, 'pps')} | {e.get('fill_seconds', 0):.1f} ({len(e.get('fill_passes') or [])}) |")
        if e.get("reasons"):
            notes.append(f"{cfg} counters after the fill: " + ", ".join(f"{k} {v:,}" for k, v in e["reasons"].items()))
    out += [""] + [f"- {n}" for n in notes] if notes else []
    dp = st.spread(s.get("drop_pps") or [])
    if dp:
        out += ["", f"Drop baseline with the same traffic: {fmt_spread(dp, 'pps')}."]
    return out


def _control_section(results: dict) -> list[str]:
    c = results.get("control")
    if not c:
        return []
    out = [f"| config | load {c['rules']:,} rules (spawn → ready) | reload s median [min–max] | sessions before → after |",
           "|---|---|---|---|"]
    for cfg, e in c.get("by_config", {}).items():
        if e.get("status") != "ok":
            out.append(f"| {cfg} | {_na(e)} | | |")
            continue
        rel = e.get("reloads", [])
        sp = st.spread([r["seconds"] for r in rel])
        moves = ", ".join(f"{r.get('sessions_before')}→{r.get('sessions_after')}" for r in rel)
        ld = e.get("load_seconds")
        out.append(f"| {cfg} | {f'{ld:.2f} s' if ld else '—'} | "
                   f"{f'{sp.median:.3f} [{sp.min:.3f}–{sp.max:.3f}]' if sp else '—'} | {moves} |")
    return out


def render(results: dict, images: list[str] = ()) -> str:
    recs = results.get("records", [])
    summary = st.summarize(recs)
    m, p = results.get("machine", {}), results.get("params", {})
    out = [f"# snatgw benchmark {results.get('timestamp', '')}", "",
           f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), kernel {m.get('kernel')}; "
           f"load average {m.get('loadavg_start')} at start, {m.get('loadavg_end')} at end. "
           f"{'Quick' if p.get('quick') else 'Full'} run: {p.get('rounds')} rounds × {p.get('duration')} s, "
           f"configurations interleaved (a balanced Latin square: each round in another order), each scenario on a fresh gateway in a fresh namespace trio; snatgw's "
           f"session table sized for {p.get('max_sessions', 0):,} sessions in the packet scenarios "
           f"(this machine's conntrack: at most {m.get('nf_conntrack_max') or '?'} entries in "
           f"{m.get('nf_conntrack_buckets') or '?'} buckets).", "",
           "Method: trafgen on CPU0 sends 64-byte UDP frames; generator, gateway and sink all run in the "
           "sender's context, so 1e9/pps is their summed cost. The `drop` baseline drops at the gateway's "
           "inside ingress; **gateway ns/pkt = 1e9/pps(config) − 1e9/pps(drop)**, paired per round. "
           "Ratios of those costs are *isolated*; ratios of pps are *end to end*. **Pipeline CPU ns/pkt** is the CPU "
           "time of trafgen and ksoftirqd per counted packet, minus the drop run's: unlike 1e9/pps it does not grow "
           "when other processes take CPU0. Spread is [min–max] over rounds. "
           "A high load average means other work shared the CPUs: compare within a run, not across runs.", ""]
    if results.get("unavailable"):
        out += ["Not available here (full reasons):", ""]
        out += [f"- **{k}**: n/a ({str(v).replace('|', '/')})" for k, v in results["unavailable"].items()] + [""]
    out += ["## Targets (as measured; never tuned to meet)", "", "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {a} | {b} | **{c}** |" for a, b, c in targets(summary, results)]
    if any(k[0] in ORDER for k in summary):
        out += ["", "## Packet scenarios", ""] + _packet_table(summary)
        out += ["", "### Ratios (medians)", ""] + _ratio_table(summary, recs)
        out += ["", "The interval: the ratio of the medians recomputed over rounds drawn again with replacement "
                "(2,000 draws, each round's drop, nft-kernel and snatgw-bpf runs kept together); 90% of the draws "
                "fall inside it. Each 3-second run has its own luck on this machine, so with few rounds it is wide: "
                "a target inside it is not settled by this run, whichever side the ratio fell on."]
        pr = _paired_table(recs)
        if pr:
            out += ["", "### bpf / nft-kernel isolated, round by round (each round's two costs against its own "
                    "drop run)", ""] + pr
    pt = _program_table(recs)
    if pt:
        out += ["", "### Where a new flow's cost goes (snatgw-bpf: the inside program's own time, from a second "
                "pass of the same traffic with run-time statistics on)", ""] + pt
    ht = _hostlimit_table(summary)
    if ht:
        out += ["", "### The per-host count's cost (snatgw-bpf without and with a host limit no host reaches)",
                ""] + ht
    at = _audit_table(recs)
    if at:
        out += ["", "### The audit log's cost (snatgw-bpf with and without `audit_log`, per round)", ""] + at
    pp = _pressure_table(recs)
    if pp:
        out += ["", "### 3c. Port pressure: sessions made and refusals (per round)", ""] + pp
    rt = _rules_table(summary, recs)
    if rt:
        out += ["", "## 5. Rule-count scaling (one established flow; matching rule last in priority)", ""] + rt
    ss = _sessions_section(results)
    if ss:
        out += ["", "## 6. Session-table scale", ""] + ss
    cs = _control_section(results)
    if cs:
        out += ["", "## 7. Control plane (load and reload via the daemon; the rule with the sessions is unchanged)",
                ""] + cs
    if results.get("sessions_cp"):
        from .sessions_cp import summary as cp_summary

        out += ["", "## 8. Control plane at a million sessions (sessions-cp, snatgw-bpf)", ""]
        out += cp_summary(results["sessions_cp"])
    if results.get("sessions_cp_nft"):
        from .sessions_cp import summary as cp_summary

        out += ["", "## 8b. Control plane at conntrack's limit (sessions-cp, snatgw-nft)", ""]
        out += cp_summary(results["sessions_cp_nft"])
    if results.get("progbench"):
        out += ["", "## BPF_PROG_TEST_RUN per-packet cost (`python -m snatgw.bench.progbench`)", "", "```",
                results["progbench"].rstrip(), "```"]
    if results.get("errors"):
        out += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    out += [""] + [f"![{i}]({i})" for i in images]
    return "\n".join(out) + "\n"
