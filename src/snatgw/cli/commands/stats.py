"""`snatgw stats`: counters per rule (packets, bytes, sessions, with the rule) and per reason,
and the port pressure: the table's fill, sessions and refusals per SNAT address, the inside
hosts with the most sessions, the port searches (how many, how long: candidates tried per
search) and the spill memo's counters (bpf)."""

from __future__ import annotations

from ...daemon.client import stats_and_rules
from ...layout import SPILL_MEMO_MS, Reason
from ..render import dump_json, table

HELP = "show counters: per rule (packets, bytes, sessions) and per reason (snatgw.layout.Reason)"


def register(p) -> None:
    p.add_argument("-j", "--json", action="store_true", help="one JSON object")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")
    p.add_argument("--pin-dir", metavar="DIR", help="read pinned bpf maps here when no daemon runs")
    p.add_argument("--all", action="store_true", help="also list reasons whose count is zero")


def summarize(stats: dict, rules: list[dict], all_reasons: bool = False) -> dict:
    """Stats.as_dict() + rules -> {sessions, rules: [...priority order...], reasons: {name: n}};
    a rule's ``sessions`` are those it made, ``live`` those live now (None: not known)."""
    counters = stats.get("rules", {})
    out_rules = []
    for r in rules:
        c = counters.get(str(r["rule_id"]), {})
        out_rules.append({"priority": r["priority"], "rule_id": r["rule_id"], "rule": r["text"],
                          "packets": c.get("packets", 0), "bytes": c.get("bytes", 0),
                          "sessions": c.get("sessions", 0), "live": c.get("live") if c else 0})  # none yet
    known = {r["rule_id"] for r in rules}
    for rid, c in counters.items():  # counters of rules no longer configured (or no rule list)
        if int(rid) not in known:
            out_rules.append({"priority": None, "rule_id": int(rid), "rule": None, "packets": c.get("packets", 0),
                              "bytes": c.get("bytes", 0), "sessions": c.get("sessions", 0), "live": c.get("live")})
    reasons = {r.name: int(stats.get("reasons", {}).get(r.name, 0)) for r in Reason}
    reasons.update({k: int(v) for k, v in stats.get("reasons", {}).items() if k not in reasons})
    if not all_reasons:
        reasons = {k: v for k, v in reasons.items() if v}
    out = {"sessions": stats.get("sessions", 0), "rules": out_rules, "reasons": reasons}
    if stats.get("pressure"):
        out["pressure"] = stats["pressure"]
    if stats.get("audit"):
        out["audit"] = stats["audit"]
    if stats.get("sync"):
        out["sync"] = stats["sync"]
    if stats.get("per_cpu"):
        out["per_cpu"] = [int(n) for n in stats["per_cpu"]]
    return out


def per_cpu_line(counts: list[int]) -> str:
    """Packets per CPU on one line, with each CPU's share (receive packet steering's spread)."""
    total = sum(counts)
    share = (lambda n: f" ({100 * n / total:.0f}%)") if total else (lambda n: "")
    return "packets per CPU: " + ", ".join(f"cpu{i} {n}{share(n)}" for i, n in enumerate(counts))


def render_pressure(p: dict) -> list[str]:
    """The pressure part of `stats` (and `adm -L --stats`) as text lines."""
    t = p.get("table", {})
    fill = f" ({100 * t['fill']:.1f}% full)" if t.get("fill") is not None else ""
    out = [f"session table: {t.get('sessions', 0)} of {t.get('max_sessions', '?')}{fill}", ""]
    if p.get("unlisted"):
        out += [f"(no lists per SNAT address and inside host: {p['unlisted']})", ""]
    def refused(n) -> str | int:
        return "-" if n is None else n

    if p.get("addresses"):
        out += [table([[a["addr"], a["sessions"], refused(a["refusals"])] for a in p["addresses"]],
                      ("SNAT address", "sessions", "refusals")), ""]  # fmt: skip
    if p.get("hosts"):
        out.append(table([[h["host"], h["sessions"], refused(h["refusals"])] for h in p["hosts"]],
                         (f"inside host (top {len(p['hosts'])} of {p.get('hosts_total', len(p['hosts']))})",
                          "sessions", "refusals")))  # fmt: skip
        if p.get("hosts_counted") == "sweep":
            out.append(hosts_as_of(p.get("hosts_age_seconds")))
        out.append("")
    if p.get("refusals_known") is False and (p.get("addresses") or p.get("hosts")):
        out += [REFUSALS_UNKNOWN, ""]
    a = p.get("allocator")
    if a is not None and "port_searches" in a:
        out.append(port_search_line(a))
    if a is not None:
        out += [f"spill memo: {a.get('spill_memo_hits', 0)} address searches cut short after the first candidate "
                f"(the address was found full toward that remote < {SPILL_MEMO_MS / 1000:g} s before); "
                f"{a.get('spill_memos_written', 0)} full searches found no free port", ""]
    return out


#: under the lists when the datapath cannot say whose flow it refused (nft)
REFUSALS_UNKNOWN = ("(refusals per SNAT address and inside host: not known with the nft backend, the kernel does "
                    "not say whose flow it refused; DROP_PORT_EXHAUSTED and DROP_HOST_LIMIT count them all)")


def port_search_line(a: dict) -> str:
    """The port searches' line: how many, the candidates they tried, the mean per search since
    start and (from a daemon's rate samples) over the last interval: the search growing longer
    is the sign of pressure before any refusal."""
    def mean(x) -> str:
        return "-" if x is None else f"{x:.2f}"

    line = (f"port search: {a['port_searches']} searches tried {a.get('port_search_tries', 0)} candidates, "
            f"{mean(a.get('tries_per_search'))} per search since start")
    li = a.get("last_interval")
    if li:
        line += (f"; {mean(li.get('tries_per_search'))} over the last {li['seconds']:g} s "
                 f"({li['searches_per_sec']:.1f} searches/s)")
    return line


def hosts_as_of(age) -> str:
    """The note under the hosts' table when no host limit has the datapath count them."""
    when = "" if age is None else f", {age:.1f} s ago"
    return (f"(inside hosts' sessions as of the last sweep{when}: no rule has max_sessions_per_host, "
            f"so the datapath does not count them as they are made; refusals are counted)")


def run(args) -> int:
    stats, rules, source = stats_and_rules(args.socket, args.pin_dir)
    s = summarize(stats, rules, args.all)
    if args.json:
        print(dump_json({"source": source, **s}))
        return 0
    print(f"sessions: {s['sessions']}   (from {source})\n")
    print(table([[f"#{r['priority']}" if r["priority"] else f"id:{r['rule_id']:08x}", r["packets"], r["bytes"],
                  r["sessions"], r["rule"] or ("(not in the running config)" if rules else "(no daemon: text unknown)")]
                 for r in s["rules"]],
                ("rule", "packets", "bytes", "sessions", "text")))
    print()
    if s.get("pressure"):
        print("\n".join(render_pressure(s["pressure"])))
    print(table([[k, v] for k, v in s["reasons"].items()], ("reason", "packets")) if s["reasons"]
          else "reasons: all zero")
    if s.get("per_cpu"):
        print("\n" + per_cpu_line(s["per_cpu"]))
    a = s.get("audit") or {}
    if a.get("enabled"):
        print(f"\naudit log {a['target']}: {a['records']} records, lost: {a.get('lost_datapath') or 0} "
              f"(datapath: ring full / events overrun), {a.get('lost_write', 0)} (write failures), "
              f"{a.get('lost_queue', 0)} (queue); {a.get('write_errors', 0)} write errors")
    if (s.get("sync") or {}).get("enabled"):
        from .status import sync_text

        print("\n" + sync_text(s["sync"]))
    return 0
