"""`snatgw run`: the gateway daemon (see snatgw.daemon.main for what it does)."""

from __future__ import annotations

from ...daemon import main as _daemon

HELP = "run the gateway daemon: start the datapath, serve the control socket, reload on SIGHUP"
DESCRIPTION = """Run the gateway in the foreground (it never forks; systemd runs it as is).

Loads CONFIG, starts the backend, prints one line containing `ready` on stdout once the
datapath is attached, then serves the control socket (`snatgw reload|adm|conns|stats`).
SIGHUP re-reads CONFIG and applies it atomically (an invalid config is logged and the old one
kept). SIGTERM/SIGINT detach the datapath, keep pinned sessions for the next daemon, exit 0."""


def register(p) -> None:
    _daemon.register(p)


def run(args) -> int:
    return _daemon.run(args)
