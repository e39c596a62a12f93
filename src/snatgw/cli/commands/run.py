"""`snatgw run`: the gateway daemon (see snatgw.daemon.main for what it does)."""

from __future__ import annotations

from ...daemon import main as _daemon

HELP = "run the gateway daemon: start the datapath, serve the control socket, reload on SIGHUP"
DESCRIPTION = """Run the gateway in the foreground (it never forks; systemd runs it as is).

Loads CONFIG (a config without snat_rule is refused unless it says `allow_empty yes`), takes
this network namespace (one daemon per namespace: a second `snatgw run` exits 4 naming the
first), starts the backend, prints one line containing `ready` on stdout once the datapath is
attached, then serves the control socket (`snatgw reload|adm|conns|stats`).  SIGHUP re-reads
CONFIG and applies it atomically (an invalid config is logged, reported to systemd as
`STATUS=reload failed: ...`, and the old one kept).  Every tick it expires sessions and puts
back datapath hooks someone removed (logged as hooks_restored).  On start, the other backend
found in this network namespace is taken over: its established TCP and UDP sessions are carried
over with their mappings and its leftovers removed (a warning names them) once our own datapath
is in place.  SIGTERM/SIGINT exit 0 and leave the datapath TRANSLATING for the next daemon:
  bpf: the TC programs stay attached and the maps (sessions) pinned; the next daemon adopts
       the pins and replaces the programs in place (no moment without translation).
  nft: table ip snatgw, its policy routing (proto 201) and conntrack entries stay installed;
       the next start replaces the rule set in one transaction.
A SIGTERM/SIGINT during the start exits 0 too, logged `stopping ... during=start`: before the
datapath's start nothing of it is touched (`stopped datapath="not started"`); during it, the
start ends first, `ready` is not printed and the datapath is kept as above.
`snatgw purge` removes the datapath on purpose (with no daemon running)."""


def register(p) -> None:
    _daemon.register(p)


def run(args) -> int:
    return _daemon.run(args)
