"""`snatgw run`: the gateway daemon (see snatgw.daemon.main for what it does)."""

from __future__ import annotations

from ...daemon import main as _daemon

HELP = "run the gateway daemon: start the datapath, serve the control socket, reload on SIGHUP"
DESCRIPTION = """Run the gateway in the foreground (it never forks; systemd runs it as is).

Loads CONFIG, starts the backend, prints one line containing `ready` on stdout once the
datapath is attached, then serves the control socket (`snatgw reload|adm|conns|stats`).
SIGHUP re-reads CONFIG and applies it atomically (an invalid config is logged and the old one
kept). On start, the other backend's leftovers in this network namespace are removed (a
warning names them). SIGTERM/SIGINT exit 0 and leave state for the next daemon:
  bpf: the TC programs are detached; the pinned maps (sessions) stay in the pin directory.
  nft: table ip snatgw, its policy routing (proto 201) and conntrack entries stay INSTALLED,
       so the kernel keeps translating (new flows too) until the next start replaces them.
`snatgw purge` removes all of it (with no daemon running)."""


def register(p) -> None:
    _daemon.register(p)


def run(args) -> int:
    return _daemon.run(args)
