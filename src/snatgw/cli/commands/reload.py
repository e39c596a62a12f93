"""`snatgw reload`: ask the running daemon to re-read its config (or another file) and apply it."""

from __future__ import annotations

import os
import sys

from ...daemon.client import call, resolve_socket

HELP = "reload the running daemon's config atomically (invalid config: nothing changes)"


def register(p) -> None:
    p.add_argument("config", nargs="?", help="config file to load instead (becomes the daemon's config)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default $SNATGW_SOCKET or the settings')")


def run(args) -> int:
    req: dict = {"op": "reload"}
    if args.config:
        req["path"] = os.path.abspath(args.config)
    resp = call(resolve_socket(args.socket), req)
    print(f"reloaded: {resp['rules']} rules")
    shown = resp.get("warnings") or ()
    for w in shown:  # what `snatgw check` warns of, e.g. an oif typo
        print(f"snatgw reload: warning: {w}", file=sys.stderr)
    more = (resp.get("warnings_total") or 0) - len(shown)  # (a daemon before 1 Dec 2026 does not say)
    if more > 0:
        print(f"snatgw reload: warning: ... and {more} more (snatgw check lists the config's)", file=sys.stderr)
    return 0
