"""`snatgw flush (--rule N | --rule-id ID | --inside ADDR | --nat ADDR)... | --all`: remove live
sessions from the running daemon's datapath (socket op `flush`).  Filters combine: a session
goes when it matches every one given.  A flow whose session is gone starts a new one with its
next packet (TCP: only with a SYN; mid-stream segments are dropped, never leaked)."""

from __future__ import annotations

from ...daemon.client import call, resolve_socket
from ...errors import EXIT_BAD_INPUT, SnatgwError
from ...rules import parse_addr
from ..render import dump_json
from .conns import parse_rule_id

HELP = "remove live sessions: of a rule, an inside host, a SNAT address, or all"
DESCRIPTION = """\
Remove live sessions from the running daemon (socket op `flush`).  Give --all, or one or more
filters; a session is removed when it matches every filter given:

  --rule N       the rule listed as #N by `snatgw stats` / `snatgw adm -L` (priority order of
                 the running rules, resolved by the daemon when it flushes)
  --rule-id ID   the rule's stable id (`rule_id` in --json listings, decimal or 0x-hex, or the
                 `id:<hex>` that listings show for a rule no longer in the running config;
                 survives edits of the rule's pool, algo and new_gw, and other rules' changes)
  --inside ADDR  sessions of this inside host
  --nat ADDR     sessions translated to this SNAT address

Prints how many sessions were removed.  Exit status 0 on success, 2 on bad arguments, 4 when
no daemon answers or it refuses the request.
"""


class _Usage(SnatgwError):
    exit_code = EXIT_BAD_INPUT


def register(p) -> None:
    p.add_argument("--rule", type=int, metavar="N", help="rule #N of the running listing")
    p.add_argument("--rule-id", metavar="ID", help="rule by its stable id (decimal, 0x-hex or id:<hex>)")
    p.add_argument("--inside", metavar="ADDR", help="inside host address")
    p.add_argument("--nat", metavar="ADDR", help="SNAT (public) address")
    p.add_argument("--all", action="store_true", help="every session")
    p.add_argument("-j", "--json", action="store_true", help="print the daemon's answer as JSON")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")


def request(args) -> dict:
    """The control request for these arguments; _Usage when they say nothing or too much."""
    filters = {k: v for k, v in (("priority", args.rule), ("rule_id", args.rule_id),
                                 ("inside", args.inside), ("nat", args.nat)) if v is not None}  # fmt: skip
    if args.all and filters:
        raise _Usage("--all removes every session: give it alone, or give filters instead")
    if not args.all and not filters:
        raise _Usage("say which sessions: --rule N, --rule-id ID, --inside ADDR, --nat ADDR, or --all")
    if "priority" in filters and "rule_id" in filters:
        raise _Usage("give --rule or --rule-id, not both")
    if "rule_id" in filters:
        try:
            filters["rule_id"] = parse_rule_id(filters["rule_id"])
        except ValueError:
            raise _Usage(f"--rule-id: expected a rule id (decimal, 0x-hex or id:<hex>), got {args.rule_id!r}") from None
    for k in ("inside", "nat"):
        if k in filters:
            filters[k] = str(parse_addr(filters[k], f"--{k}"))
    return {"op": "flush", **filters}


def run(args) -> int:
    resp = call(resolve_socket(args.socket), request(args))
    if args.json:
        print(dump_json({k: v for k, v in resp.items() if k != "ok"}))
    else:
        n = resp["flushed"]
        print(f"flushed {n} session{'s' if n != 1 else ''}")
    return 0
