"""`snatgw status [-j] [--socket PATH]`: the running gateway's health for people and monitoring
(control op `health`, snatgw.daemon.health): programs and hooks per device, maps and their fill,
sessions, the last reload and its result, link states, errors since start.  Exit 0 healthy, 1
unhealthy (each problem on a line), 4 when no daemon answers."""

from __future__ import annotations

import time

from ...daemon.client import call, resolve_socket
from ..render import dump_json, table

HELP = "the running gateway's health: hooks, maps, sessions, last reload, links (exit 0 healthy)"
DESCRIPTION = """\
Ask the running daemon how the gateway is: its programs and the hook each is attached to (still
attached?), its maps and how full they are, sessions against max_sessions, the last reload or
`snatgw adm` batch and whether it worked, and of the last reload (or the start) also how it
came (signal: SIGHUP or `systemctl reload`, which print nothing; control: `snatgw reload`), its
error or its warnings, the state of every inside and outside device, and
the error events logged since start.

Exit status, for monitoring (e.g. a Nagios/Icinga check or a systemd timer):
  0  healthy
  1  unhealthy: the problems are printed, one per line (a program no longer attached, a link
     missing, down or without carrier, the last reload failed, the session table 90% full)
  4  no daemon answers on the control socket
"""

EXIT_UNHEALTHY = 1


def register(p) -> None:
    p.add_argument("-j", "--json", action="store_true", help="one JSON object (the daemon's health report)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")


def _ago(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return "".join(f"{v}{u}" for v, u in ((d, "d"), (h, "h"), (m, "m")) if v) + f"{s}s"


def render_text(r: dict) -> str:
    head = "healthy" if r["healthy"] else f"UNHEALTHY ({len(r['problems'])} problem{'s' * (len(r['problems']) != 1)})"
    out = [f"snatgw: {head}",
           f"  daemon     pid {r['pid']}, backend {r['backend']}, up {_ago(r['uptime'])}, {r['rules']} rules, "
           f"config {r['config'] or '-'}"]
    la = r.get("last_apply")
    if la:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(la["at"]))
        result = "ok" if la["ok"] else f"FAILED: {la['error']}"
        out.append(f"  last apply {la['kind']} {la['what'] or ''} at {when}: {result}".replace("  at", " at"))
    else:
        out.append(f"  last apply none since start ({r['reloads']} reloads)")
    out += reload_text(r.get("last_reload"))
    out.append(f"  log        {r['errors']} errors, {r['warnings']} warnings since start"
               + (f"; last error: {r['last_error_event'].get('event')}" if r.get("last_error_event") else ""))
    reads = r.get("counter_reads") or {}
    if reads.get("failed"):  # nftables' named counters: stats answer the last figures read
        out.append(f"  counters   {reads['failed']} failed reads of nft's named counters since start"
                   + (f"; failing now: {reads['last_error']}" if reads.get("last_error") else ""))
    rd = r.get("renamed_detach") or {}
    if rd.get("failed"):  # bpf: our programs on a device renamed away, not taken off (logged once)
        failing = "; ".join(f"{n}: {why}" for n, why in rd.get("failing", {}).items())
        out.append(f"  renamed    {rd['failed']} failed tries to take our programs off devices renamed away"
                   + (f"; failing now: {failing}" if failing else ""))
    dp = r["datapath"]
    if "error" in dp:
        out += ["", f"datapath: {dp['error']}"]
    else:
        out += ["", "hooks:"]
        rows = [[h["device"] or "-", h["hook"], h["program"], h["prog_id"], "attached" if h["attached"] else "MISSING"]
                for h in dp["hooks"]]
        out.append(table(rows, ("device", "hook", "program", "id", "state"), "  ") if rows else "  none")
        out += ["", "maps:"]
        # an array (has_fill False) has every slot: no fill, as metrics and the alerts have it
        rows = [[m["name"], m["entries"], m["max_entries"],
                 f"{100 * m['entries'] / m['max_entries']:.1f}%" if m["max_entries"] and m.get("has_fill", True)
                 else "-"] for m in dp["maps"]]  # fmt: skip
        out.append(table(rows, ("map", "entries", "max", "fill"), "  "))
        out += ["", f"sessions: {dp['sessions']} of {dp['max_sessions']}"]
        rs = r.get("table_resized")
        if rs:  # bpf: this daemon's start carried the table over to another max_sessions
            ct = (rs.get("maps") or {}).get("snat_ct") or {}
            later = sum((ct.get(p) or {}).get("copied", 0) for p in ("after_attach", "after_grace"))
            out.append(f"session table resized at start from {rs['from']} to {rs['to']} sessions: "
                       f"{ct.get('first', 0)} entries copied, then {later} made meanwhile, in {rs['seconds']} s")
        if dp.get("route_back"):  # bpf: a new session's route back (docs/datapath.md step 13)
            out.append(f"route back: {dp['route_back']['text']}")
    out += ["", "links:"]
    roles = {n: "inside" for n in r.get("inside", [])} | {n: "outside" for n in r.get("outside", [])}
    rows = [[n, roles.get(n, "-"), st["operstate"], "yes" if st["carrier"] else "no", "up" if st["up"] else "down"]
            for n, st in r["links"].items()]
    out.append(table(rows, ("device", "role", "state", "carrier", "admin"), "  ") if rows else "  none configured")
    if r.get("link_health"):
        out += ["", "probed links:"]
        rows = [[n, lk["state"], f"{lk['since']:.1f}s", "yes" if lk["carrier"] else "no", f"{lk['last_reply']:.2f}s",
                 f"{lk['received']}/{lk['sent']}", lk["backup_gw"] if lk["on_backup"] else "-"]
                for n, lk in r["link_health"].items()]
        out.append(table(rows, ("link", "state", "for", "carrier", "last reply", "replies", "rules on"), "  "))
    out += ["", rps_text(r.get("rps"))] if r.get("rps") else []
    a = r.get("audit") or {}
    if a.get("enabled"):
        lost = f"{a.get('lost_datapath') or 0} lost in the datapath, {a.get('lost_write', 0)} by failed writes"
        if a.get("lost_queue"):
            lost += f", {a['lost_queue']} queued too many"
        out += ["", f"audit log: {a['target']}: {a['records']} records written, {lost}; "
                    f"{a.get('write_errors', 0)} write errors, {a.get('rotations', 0)} rotations"
                + (f"; last error: {a['last_error']}" if a.get("last_error") else "")]
    if (r.get("sync") or {}).get("enabled"):
        out += ["", sync_text(r["sync"])]
    if r["problems"]:
        out += ["", "problems:"] + [f"  - {p}" for p in r["problems"]]
    return "\n".join(out)


#: how a reload came (Service.reload_record's ``via``), as status says it
RELOAD_VIA_TEXT = {"signal": "signal (SIGHUP, systemctl reload)", "control": "control socket (snatgw reload)"}


def reload_text(lr: dict | None) -> list[str]:
    """The start's or the last reload's lines: when, how, applied or refused (with the error),
    then its warnings, one a line (a reload by signal has no other place that shows them but
    the log).  Nothing from a daemon before 1 Dec 2026 (no ``via``)."""
    if not lr or "via" not in lr:
        return []
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(lr["at"]))
    how = RELOAD_VIA_TEXT.get(lr["via"], lr["via"])
    if lr["ok"]:
        n = lr.get("warnings_total", 0)
        result = f"applied, {lr['rules']} rules" + (f", {n} warning{'s' * (n != 1)}" if n else ", no warnings")
    else:
        result = f"REFUSED: {lr['error']} (the previous config runs, {lr['rules']} rules)"
    if lr["via"] == "start":
        out = [f"  last reload none: started at {when} with {lr.get('config') or '-'}: {result}"]
    else:
        out = [f"  last reload by {how} at {when}, {lr.get('config') or '-'}: {result}"]
    out += [f"             warning: {w}" for w in lr.get("warnings") or ()]
    more = lr.get("warnings_total", 0) - len(lr.get("warnings") or ())
    if more > 0:
        out.append(f"             ... and {more} more (snatgw check lists the config's)")
    return out


def sync_text(y: dict) -> str:
    """The session sync's lines (status and stats)."""
    last = y.get("seconds_since_peer")
    # (foreign: not from sync_peer:sync_port, counted apart from the decoder's drops; as the metrics show it)
    dropped = {**y.get("drops", {}), "foreign": y.get("foreign", 0)}
    drops = ", ".join(f"{k} {v}" for k, v in dropped.items() if v) or "none"
    return "\n".join([
        f"session sync with {y['peer']} (from {y['local']}): last valid datagram "
        + (f"{last:.1f}s ago" if last is not None else "never")
        + (f" (heartbeat every {y['interval']:g}s, refresh every {y['refresh']:g}s)" if "interval" in y else "")
        + (f"; the peer speaks protocol version {y['peer_version']}, this gateway {y['version']}: upgrade both"
           if y.get("peer_version") is not None else ""),
        f"  sent: {y['sent_datagrams']} datagrams, {y['sent_records']} records (new/ended {y['ring_records']}, "
        f"refresh {y['walk_records']} in {y['walks']} walks); queued {y['send_queue']}",
        f"  received: {y['received_datagrams']} datagrams, {y['received_records']} records: installed "
        f"{y['installed']}, refreshed {y['refreshed']}, ended {y['ended']}, rejected {y['rejected']}, earlier rule "
        f"{y.get('other_rule', 0)}, no rule {y.get('no_rule', 0)}, host limit {y.get('host_limit', 0)}, conflicts "
        f"{y['conflicts']}, table full {y['table_full']}, no route {y['no_route']}, stale end "
        f"{y.get('stale_end', 0)}, end unknown {y.get('end_unknown', 0)}, bad {y.get('bad_records', 0)}",
        f"  dropped: {drops}" + (f"; last error: {y['last_error']}" if y.get("last_error") else ""),
    ])  # fmt: skip


def rps_text(rps: dict) -> str:
    """The receive packet steering lines: the setting, then per device each rx queue's mask (or
    why it has none of ours)."""
    if rps["setting"] == "off" and not rps.get("devices"):
        return "rps_cpus: off (the devices' receive packet steering is left as it is)"
    head = f"rps_cpus: {rps['setting']}" + (f" (mask {rps['mask']})" if rps.get("mask") else "")
    if rps.get("note"):
        head += f"; {rps['note']}"
    if rps.get("refused"):
        return head + f"\n  NOT APPLIED: {rps['refused']}"
    if rps.get("state_error"):  # (a daemon killed now would leave its masks for the devices' own)
        head += f"\n  masks before in memory only: {rps['state_error']}"
    rows = []
    for name, d in rps.get("devices", {}).items():
        queues = " ".join(f"{q}={m}" for q, m in d["queues"].items()) or "-"
        before = " ".join(f"{q}={m}" for q, m in d["previous"].items()) or "-"
        rows.append([name, queues, before, d.get("error") or "ok"])
    return head + ("\n" + table(rows, ("device", "rps_cpus now", "before", "state"), "  ") if rows else "")


def run(args) -> int:
    r = call(resolve_socket(args.socket), {"op": "health"})
    r.pop("ok", None)
    print(dump_json(r) if args.json else render_text(r))
    return 0 if r["healthy"] else EXIT_UNHEALTHY
