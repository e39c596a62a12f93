"""`snatgw adm`: the patched ipvsadm's SNAT syntax against the running daemon (reference §5).

Parsing is snatgw.config.adm (pure); this module sends changes over the control socket and
prints listings in the original's formats: `-L -n` (rule rows with its column widths, in
snatgw's precedence order), `-L -n -c` (§5.4), `-S`, `--stats`, `--rate`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TextIO

from ...config.adm import (FWMARK, MUTATING, SCHEDULER, AdmTable, AdmUsageError, parse_args,
                           parse_restore, save_lines)
from ...errors import SnatgwError
from ...rules import Rule
from ..render import dump_json

HELP = "ipvsadm syntax for the SNAT rules (-A -K -k -H -L -S -R -C -Z), against the daemon"
ADD_HELP = False

USAGE = f"""snatgw adm: the lvs-snat ipvsadm syntax, applied through the running snatgw daemon
Usage:
  snatgw adm -A -f 1 -s {SCHEDULER}          enable the SNAT service
  snatgw adm -D -f 1                          disable it (removes every rule)
  snatgw adm -K|k -f 1 -F src-address/mask [-T dest-address/mask] [-W gw] -U minip-maxip
                  [-O algo] [--oif dev] [-N new-gw] [-b]
  snatgw adm -H -f 1 -F src-address/mask [-T dest-address/mask] [-W gw] [--oif dev]
                  [-U minip-maxip] [-O algo] [-N new-gw]     (-U -O -N are ignored)
  snatgw adm -L|l [-n] [-c] [--stats|--rate] [-X|--exact] [-j|--json]
  snatgw adm -S [-n]          save: -A then one -K per rule, in definition order
  snatgw adm -R               restore from stdin: replaces the rules with -S output (all or none)
  snatgw adm -C               clear (the service and its rules)
  snatgw adm -Z               zero the counters
  snatgw adm -h
Commands:
  --add-service -A  --delete-service -D  --add-snat -K  --edit-snat -k  --delete-snat -H
  --list -L|-l  --save -S  --restore -R  --clear -C  --zero -Z  --help -h
Options:
  --fwmark-service -f 1      the SNAT service (only fwmark 1)
  --scheduler -s {SCHEDULER}
  --from -F addr[/len]       source net (no /len: a host, /32)
  --to -T addr[/len]         destination net (default 0.0.0.0/0)
  --gw -W addr               the route's next hop must be this (0.0.0.0: any)
  --oif dev                  the route's egress device must be this (exact name)
  --new-gw -N addr           send matching flows to this next hop (0.0.0.0: none)
  --snat-ip -U a[-b]         SNAT address pool
  --algo -O sh|sdh|random    address selection (default sdh)
  --numeric -n  --connection -c  --stats  --rate  --fullnat -b (accepted)
  --exact -X                 counters in full, not K/M/G (-X capital, as in ipvsadm, whose
                             -x is a real server's upper threshold)
  --json -j                  listings only: the daemon's answer as one JSON object
  --socket PATH              control socket (default $SNATGW_SOCKET or /run/snatgw/control.sock)
Rules are listed in snatgw's precedence order (most specific first), not sorted by gw."""

# reference §5.3: rule rows are "  -> " + these widths, left-justified, trailing padding kept
WIDTHS = (20, 20, 17, 16, 32, 8, 17, 10, 10)
TITLE = ("SourceAddr", "DestAddr", "GW", "Oif", "SnatIp", "Algo", "NewGW", "ActConn", "InActConn")
CONN_FMT = "{:<3} {:<6} {:<11} {:<30} {:<30} {:<30} {:<30}"  # reference §5.4


def _row(values) -> str:
    return "  -> " + "".join(f"{str(v):<{w}}" for v, w in zip(values, WIDTHS))


def conn_counts(sessions) -> dict[int, tuple[int, int]]:
    """rule_id -> (ActConn = established TCP, InActConn = every other session); ``sessions``
    may be a stream (one session at a time in memory)."""
    out: dict[int, list[int]] = {}
    for s in sessions:
        c = out.setdefault(s.get("rule_id", 0), [0, 0])
        c[0 if (s["proto"] == "tcp" and s["state"] == "ESTABLISHED") else 1] += 1
    return {k: (a, b) for k, (a, b) in out.items()}


def format_list(rules: list[dict], service: bool, sessions, size: int) -> str:
    """`-L -n`: rules in the order given (the daemon sends precedence order)."""
    counts = conn_counts(sessions)
    lines = [f"IP Virtual Server version 1.2.2 (size={size})",
             "Prot LocalAddress:Port Scheduler Flags", _row(TITLE)]
    if service:
        lines.append(f"FWM  {FWMARK} {SCHEDULER}")
        for r in rules:
            act, inact = counts.get(r["rule_id"], (0, 0))
            pool = r["snat_ip"].split("-")
            lines.append(_row((r["from"], r["to"], r["gw"] or "0.0.0.0", r["oif"] or "",
                               pool[0] if pool[0] == pool[-1] else r["snat_ip"], r["algo"],
                               r["new_gw"] or "0.0.0.0", act, inact)))
    return "\n".join(lines)


def _mmss(secs: float) -> str:
    s = max(0, int(secs + 0.5))
    return f"{s // 60:02d}:{s % 60:02d}"


def conn_lines(sessions):
    """`-L -n -c`, line by line: source = inside host, virtual = remote, local = SNAT
    addr:port, destination = remote."""
    yield "IPVS connection entries"
    yield CONN_FMT.format("pro", "expire", "state", "source", "virtual", "local", "destination")
    for s in sessions:
        yield CONN_FMT.format(s["proto"].upper(), _mmss(s["expires"]), s["state"], s["inside"],
                              s["remote"], s["nat"], s["remote"])


def format_conns(sessions) -> str:
    return "\n".join(conn_lines(sessions))


def largenum(n: float, exact: bool) -> str:
    """ipvsadm's print_largenum: 8 columns, K/M/G/T beyond 8 digits unless --exact."""
    n = int(n)
    if exact or len(str(n)) <= 8:
        return f"{n:>8}"
    for div, unit in ((10**3, "K"), (10**6, "M"), (10**9, "G"), (10**12, "T")):
        if len(str(n // div)) <= 7:
            return f"{n // div:>7}{unit}"
    return f"{n // 10**12:>7}T"


def format_stats(rules: list[dict], stats: dict, exact: bool = False, rate: dict | None = None) -> str:
    """`--stats` (or `--rate` when ``rate`` is given): one row per rule, with its text (the
    original showed every rule as gw:0, so rules could not be told apart)."""
    if rate is not None:
        cols, src = ("CPS", "PPS", "BPS"), rate.get("rules", {})
        keys = ("sessions", "packets", "bytes")
    else:
        cols, src = ("Conns", "Pkts", "Bytes"), stats.get("rules", {})
        keys = ("sessions", "packets", "bytes")
    lines = [f"{'Prot LocalAddress:Port':<33} {cols[0]:>8} {cols[1]:>8} {cols[2]:>8}", "  -> Rule"]
    tot = [0.0, 0.0, 0.0]
    rows = []
    for r in rules:
        c = src.get(str(r["rule_id"]), {})
        vals = [c.get(k, 0) for k in keys]
        tot = [a + b for a, b in zip(tot, vals)]
        rows.append(f"  -> #{r['priority']:<3} {' '.join(largenum(v, exact) for v in vals)}  {r['text']}")
    lines.append(f"{f'FWM  {FWMARK}':<33} {' '.join(largenum(v, exact) for v in tot)}")
    if rate is None and stats.get("pressure"):  # port pressure: table fill, per address, top hosts
        from .stats import render_pressure

        rows += [""] + render_pressure(stats["pressure"])[:-1]
    al = (rate or {}).get("allocator")
    if al:  # bpf: how hard the port searches worked over the interval (a sign of port pressure)
        per = al.get("tries_per_search")
        rows += ["", f"port search: {al.get('searches_per_sec', 0):.1f} searches/s, "
                     f"{'-' if per is None else f'{per:.2f}'} tries per search"]  # fmt: skip
    return "\n".join(lines + rows)


def _rules_of(resp: dict) -> list[Rule]:
    return [Rule.from_dict(d, d.get("where")) for d in resp["defined"]]


def _emit(text: str, out: TextIO) -> None:
    """Write and flush now, so a reader that closed the pipe (`| head`) is seen inside main()."""
    print(text, file=out)
    out.flush()


def silence_stdout() -> None:
    """stdout's reader went away: point fd 1 at /dev/null so the flush at exit cannot fail too."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no real fd (captured output): nothing to do
        pass


def argv_op(argv) -> str:
    """The command option as the user wrote it (for messages)."""
    from ...config.adm import _COMMANDS

    return next((a for a in argv if a in _COMMANDS), "it")


def list_json(sock: str, cmd) -> dict:
    """The JSON of a listing: -L rules (precedence order) with live session counts, -c the
    sessions, --stats the counters, --rate per-second rates."""
    from ...daemon.client import call, session_stream
    from ...datapath.backend import SessionFilter

    if cmd.conns:  # main() streams this one (list_conns_json); kept for callers of list_json
        sessions, _, _ = session_stream(sock, None, lambda rules: SessionFilter(), fallback=False)
        return {"sessions": list(sessions)}
    if cmd.rate:
        resp = call(sock, {"op": "rate"})
        return {"service": resp["service"], "rules": resp["rules"], "rate": resp["rate"]}
    if cmd.stats:
        resp = call(sock, {"op": "stats"})
        return {"service": resp["service"], "rules": resp["rules"], "stats": resp["stats"]}
    resp = call(sock, {"op": "rules"})
    live: dict[int, int] = {}
    sessions, _, _ = session_stream(sock, None, lambda rules: SessionFilter(), fallback=False)
    for s in sessions:  # counted as they stream
        live[s["rule_id"]] = live.get(s["rule_id"], 0) + 1
    rules = [{**r, "sessions": live.get(r["rule_id"], 0)} for r in resp["rules"]]
    return {"service": resp["service"], "max_sessions": resp["max_sessions"], "rules": rules}


def main(argv: list[str], stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from ...daemon.client import call, resolve_socket, session_stream
    from ...datapath.backend import SessionFilter

    out = stdout or sys.stdout
    try:
        cmd = parse_args(argv)
        if cmd.op == "help":
            _emit(USAGE, out)
            return 0
        if cmd.json and cmd.op != "list":
            raise AdmUsageError("--json: only listings (-L, -L -c, -L --stats, -L --rate) print JSON, "
                                f"not {argv_op(argv)}")
        sock = resolve_socket(cmd.socket)
        if cmd.json and cmd.conns:  # {"sessions": [...]} written as the sessions stream
            sessions, _, _ = session_stream(sock, None, lambda rules: SessionFilter(), fallback=False)
            out.write('{"sessions": [')
            for i, sess in enumerate(sessions):
                out.write((",\n  " if i else "\n  ") + json.dumps(sess))
            out.write("\n]}\n")
            out.flush()
            return 0
        if cmd.json:
            _emit(dump_json(list_json(sock, cmd)), out)
            return 0
        if cmd.op == "restore":
            cmds = parse_restore((stdin or sys.stdin).read())
            if cmds:
                _warn(call(sock, {"op": "adm", "commands": [list(c.argv) for c in cmds], "restore": True}))
            return 0
        if cmd.op in MUTATING:
            _warn(call(sock, {"op": "adm", "commands": [list(argv)]}))
            return 0
        if cmd.op == "zero":
            call(sock, {"op": "zero"})
            return 0
        if cmd.op == "save":
            resp = call(sock, {"op": "rules"})
            lines = save_lines(AdmTable(resp["service"], tuple(_rules_of(resp))))
            if lines:
                _emit("\n".join(lines), out)
            return 0
        # list
        if cmd.conns:  # streamed (the bpf backend's pins are read here, batch by batch)
            sessions, _, _ = session_stream(sock, None, lambda rules: SessionFilter(), fallback=False)
            for line in conn_lines(sessions):
                out.write(line + "\n")
            out.flush()
        elif cmd.rate:
            resp = call(sock, {"op": "rate"})
            _emit(format_stats(resp["rules"], {}, cmd.exact, rate=resp["rate"]), out)
        elif cmd.stats:
            resp = call(sock, {"op": "stats"})
            _emit(format_stats(resp["rules"], resp["stats"], cmd.exact), out)
        else:
            resp = call(sock, {"op": "rules"})
            sessions, _, _ = session_stream(sock, None, lambda rules: SessionFilter(), fallback=False)
            _emit(format_list(resp["rules"], resp["service"], sessions, resp["max_sessions"]), out)
        return 0
    except AdmUsageError as e:
        print(f"snatgw adm: {e}", file=sys.stderr)
        return e.exit_code
    except SnatgwError as e:
        print(f"snatgw adm: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # output piped into `head` or `true` and closed: not an error of ours (as snatgw main())
        if out is sys.stdout:
            silence_stdout()
        return 0


def register(p) -> None:
    import argparse

    p.add_argument("args", nargs=argparse.REMAINDER, help="ipvsadm arguments (see snatgw adm --help)")


def _warn(resp: dict) -> None:
    """What the daemon warns of about the rules it applied (an --oif that is no uplink)."""
    for w in resp.get("warnings") or ():
        print(f"snatgw adm: warning: {w}", file=sys.stderr)


def run(args) -> int:
    return main(args.args)
