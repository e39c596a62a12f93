"""`snatgw conns`: the NAT sessions, from the running daemon (or the bpf pins when none runs)."""

from __future__ import annotations

from ...daemon.client import sessions_and_rules
from ..render import dump_json, table

HELP = "list NAT sessions (proto, inside, remote, nat, state, idle, expires, rule)"
COLUMNS = ("proto", "inside", "remote", "nat", "state", "idle", "expires", "rule")


def register(p) -> None:
    p.add_argument("-j", "--json", action="store_true", help="one JSON object: {source, sessions: [...]}")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")
    p.add_argument("--pin-dir", metavar="DIR", help="read pinned bpf maps here when no daemon runs")
    p.add_argument("--rule", metavar="N", help="only sessions of this rule (priority number or rule id)")


def rule_label(rule_id: int, by_id: dict[int, dict]) -> str:
    r = by_id.get(rule_id)
    return f"#{r['priority']}" if r else (f"id:{rule_id:08x}" if rule_id else "-")


def _secs(x: float) -> str:
    return f"{max(0.0, x):.0f}s"


def rows(sessions: list[dict], rules: list[dict]) -> list[list]:
    by_id = {r["rule_id"]: r for r in rules}
    return [[s["proto"], s["inside"], s["remote"], s["nat"], s["state"], _secs(s["idle"]),
             _secs(s["expires"]), rule_label(s.get("rule_id", 0), by_id)] for s in sessions]


def select(sessions: list[dict], rules: list[dict], rule: str | None) -> list[dict]:
    if rule is None:
        return sessions
    want = {r["rule_id"] for r in rules if str(r["priority"]) == rule.lstrip("#")}
    if not want:
        want = {int(rule, 0)} if rule.lstrip("-").isdigit() or rule.startswith("0x") else set()
    return [s for s in sessions if s.get("rule_id") in want]


def run(args) -> int:
    sessions, rules, source = sessions_and_rules(args.socket, args.pin_dir)
    sessions = sorted(select(sessions, rules, args.rule), key=lambda s: (s["proto"], s["inside"], s["remote"]))
    if args.json:
        print(dump_json({"source": source, "sessions": sessions,
                         "rules": {str(r["rule_id"]): r["text"] for r in rules}}))
        return 0
    print(table(rows(sessions, rules), COLUMNS) if sessions else "no sessions")
    if rules and sessions:
        print()
        for r in rules:
            print(f"#{r['priority']}: {r['text']}")
    return 0
