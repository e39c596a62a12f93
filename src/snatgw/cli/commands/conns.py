"""`snatgw conns`: the NAT sessions, streamed.  With the bpf backend the CLI reads the pinned
maps itself, one batch of the table at a time, filtering as it goes (the daemon only names the
rules); other backends' daemons filter and limit on their side."""

from __future__ import annotations

import ipaddress
import itertools
import json
import sys

from ...daemon.client import session_stream
from ...datapath.backend import SessionFilter
from ...errors import EXIT_BAD_INPUT, SnatgwError
from ...layout import CtState

HELP = "list NAT sessions (proto, inside, remote, nat, state, idle, expires, rule)"
COLUMNS = ("proto", "inside", "remote", "nat", "state", "idle", "expires", "rule")
WIDTHS = (5, 21, 21, 21, 11, 7, 8)  # fixed columns: rows print as they stream (the last is free)
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1}


class BadFilter(SnatgwError):
    exit_code = EXIT_BAD_INPUT


def register(p) -> None:
    p.add_argument("-j", "--json", action="store_true", help="JSON lines: one session object per line")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")
    p.add_argument("--pin-dir", metavar="DIR", help="read pinned bpf maps here when no daemon runs")
    p.add_argument("--rule", metavar="N",
                   help="only sessions of this rule (priority number, else rule id; neither: an error)")
    p.add_argument("--inside", metavar="NET", help="only inside hosts in this address or net")
    p.add_argument("--nat", metavar="ADDR", help="only sessions on this SNAT address")
    p.add_argument("--remote", metavar="NET", help="only remote ends in this address or net")
    p.add_argument("--rport", metavar="PORT", type=int, help="only this remote port")
    p.add_argument("--proto", choices=sorted(_PROTOS), help="only this protocol")
    p.add_argument("--state", metavar="STATE", help="only this state (ESTABLISHED, SYN_RECV, UDP, ICMP, ...)")
    p.add_argument("--limit", metavar="N", type=int, help="at most N sessions")


def rule_label(rule_id: int, by_id: dict[int, dict]) -> str:
    r = by_id.get(rule_id)
    return f"#{r['priority']}" if r else (f"id:{rule_id:08x}" if rule_id else "-")


def _secs(x: float) -> str:
    return f"{max(0.0, x):.0f}s"


def rows(sessions, rules: list[dict]):
    by_id = {r["rule_id"]: r for r in rules}
    return ([s["proto"], s["inside"], s["remote"], s["nat"], s["state"], _secs(s["idle"]),
             _secs(s["expires"]), rule_label(s.get("rule_id", 0), by_id)] for s in sessions)


def fixed(cells) -> str:
    """A row in fixed columns (two spaces apart; a longer cell pushes the rest right)."""
    out = ""
    for i, c in enumerate(cells):
        c = str(c)
        out += (c.ljust(WIDTHS[i]) + "  ") if i < len(WIDTHS) else c
    return out.rstrip()


def parse_rule_id(text: str) -> int:
    """A rule's stable id as the listings show it: decimal (--json's rule_id), 0x-hex, or the
    `id:<hex>` label of a rule no longer in the running config; ValueError otherwise."""
    n = int(text[3:], 16) if text.startswith("id:") and text[3:].isalnum() else int(text, 0)
    if not 0 <= n < 1 << 32:
        raise ValueError(text)
    return n


def rule_id_of(rule: str | None, rules: list[dict]) -> int | None:
    """--rule: a priority number (#N or N) of the running rules, else a rule id (decimal, 0x, or
    the listings' id:<hex>)."""
    if rule is None:
        return None
    want = [r["rule_id"] for r in rules if str(r["priority"]) == rule.lstrip("#")]
    if want:
        return want[0]
    try:
        return parse_rule_id(rule)
    except ValueError:
        raise BadFilter(f"--rule: expected a rule's priority number or id, got {rule!r}") from None


def unknown_rule(rule: str | None, rule_id: int | None, rules: list[dict]) -> bool:
    """Whether --rule named neither a running rule's priority nor a running rule's id: then only
    sessions still in the table (a deleted rule's, `id:<hex>`) can give it a meaning."""
    return rule is not None and rule_id is not None and all(r["rule_id"] != rule_id for r in rules)


def no_such_rule(rule: str, rule_id: int, rules: list[dict], daemon: bool) -> BadFilter:
    """The error for a --rule that names no rule and no session (a mistyped number, most likely):
    an empty listing would look like "no sessions"."""
    there = f"there are {len(rules)} rules" if daemon else "no daemon runs to number the rules"
    n = rule.lstrip("#")
    if n.isdigit():
        return BadFilter(f"--rule {rule}: no rule #{n} ({there}) and no sessions of rule id {rule_id}")
    return BadFilter(f"--rule {rule}: no running rule has id id:{rule_id:08x} ({there}) and no sessions of it")


def filter_of(args, rules: list[dict]) -> SessionFilter:
    """The SessionFilter of the command-line options (a bad value: BadFilter)."""
    try:
        state = None
        if args.state is not None:
            try:
                state = int(CtState[args.state.upper()])
            except KeyError:
                raise BadFilter(f"--state: expected one of {', '.join(s.name for s in CtState)}, "
                                f"got {args.state!r}") from None  # fmt: skip
        for opt in ("inside", "nat", "remote"):  # `--inside ""` (an unset shell variable) listed every session
            if getattr(args, opt, None) == "":
                raise BadFilter(f"--{opt}: expected an address{' or net' if opt != 'nat' else ''}, got nothing")
        if args.rport is not None and not 0 <= args.rport <= 65535:
            raise BadFilter(f"--rport: expected a port 0-65535, got {args.rport}")
        return SessionFilter(
            rule_id=rule_id_of(args.rule, rules),
            inside=ipaddress.IPv4Network(args.inside, strict=False) if args.inside else None,
            nat=ipaddress.IPv4Address(args.nat) if args.nat else None,
            remote=ipaddress.IPv4Network(args.remote, strict=False) if args.remote else None,
            remote_port=args.rport, proto=_PROTOS.get(args.proto) if args.proto else None, state=state,
        )  # fmt: skip
    except ValueError as e:
        raise BadFilter(f"bad filter: {e}") from None


def _checked(sessions, args, flt: SessionFilter, rules: list[dict], source: str):
    """``sessions`` as they stream, unless --rule named no rule and the table holds no session of
    that rule id: BadFilter then, before anything is printed.  Only such a --rule costs a
    look: an empty answer of the whole filter settles it when --rule is the only filter, else
    one more listing asks for a single session of the rule id alone."""
    if not unknown_rule(args.rule, flt.rule_id, rules):
        return sessions
    sessions = iter(sessions)
    first = next(sessions, None)
    if first is not None:
        return itertools.chain((first,), sessions)
    alone = SessionFilter(rule_id=flt.rule_id)
    if flt != alone or args.limit == 0:
        more, _rules, _src = session_stream(args.socket, args.pin_dir, lambda r: alone, 1)
        found = next(iter(more), None) is not None
        getattr(more, "close", lambda: None)()  # a pinned-map reader stops now, not when collected
        if found:
            return iter(())
    raise no_such_rule(args.rule, flt.rule_id, rules, not source.startswith("pinned maps"))


def run(args) -> int:
    if args.limit is not None and args.limit < 0:
        raise BadFilter(f"--limit: expected a number >= 0, got {args.limit}")
    sessions, rules, source = session_stream(args.socket, args.pin_dir, lambda r: filter_of(args, r), args.limit)
    sessions = _checked(sessions, args, filter_of(args, rules), rules, source)  # the filter of the rules it got
    by_id = {r["rule_id"]: r for r in rules}
    out = sys.stdout
    if args.json:
        for s in sessions:
            s["rule"] = rule_label(s.get("rule_id", 0), by_id)
            out.write(json.dumps(s, separators=(",", ":")) + "\n")
        out.flush()
        return 0
    n = 0
    for row in rows(sessions, rules):  # a generator: one session at a time
        if n == 0:
            out.write(fixed(COLUMNS) + "\n")
        out.write(fixed(row) + "\n")
        n += 1
    if not n:  # --limit 0 lists none of the sessions there may be: say so, not "no sessions"
        print("no sessions listed (--limit 0)" if args.limit == 0 else "no sessions")
    if rules and n:
        print()
        for r in rules:
            print(f"#{r['priority']}: {r['text']}")
    return 0
