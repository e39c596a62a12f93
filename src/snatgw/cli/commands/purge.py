"""`snatgw purge`: remove every trace of both backends in this network namespace (nft table,
our ip rules/routes and conntrack entries, our TC filters on every device, the pin directory),
refusing while a daemon answers on the control socket.
"""

from __future__ import annotations

import socket as _socket

from ...config.schema import Settings
from ...daemon.client import resolve_socket
from ...daemon.control import NoDaemon, request
from ...errors import DaemonError

HELP = "remove every trace of snatgw's datapaths in this network namespace (no daemon may run)"
DESCRIPTION = """Remove what a stopped (SIGTERM) or killed daemon of either backend left in this
network namespace: the nft backend's `table ip snatgw`, its ip rules and routes (proto 201,
prefs/tables 31000-31999) and its conntrack entries; the bpf backend's TC filters (handle and
priority 0x534e only) on every device, and the pinned maps in the pin directory (the sessions).
Refuses (exit 4) while a daemon answers on the control socket: stop it first.
Run it in the gateway's namespace: `nsenter --net=/run/netns/NS snatgw purge ...`."""


def register(p) -> None:
    p.add_argument("config", nargs="?", help="config file: its pin_dir and control_socket are used")
    p.add_argument("--pin-dir", metavar="DIR",
                   help="bpffs directory of the pinned maps (default: the config's, else /sys/fs/bpf/snatgw)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: the config's, $SNATGW_SOCKET)")
    p.add_argument("--inside", action="append", metavar="IF",
                   help="as for `run` (accepted; filters are removed on every device anyway)")
    p.add_argument("--outside", action="append", metavar="IF", help="as for `run` (see --inside)")


def _settings(args) -> Settings:
    if not args.config:
        return Settings()
    from ...daemon.service import load_config

    return load_config(args.config, require_rules=False).settings


def run(args) -> int:
    settings = _settings(args)
    sock = args.socket or (settings.control_socket if args.config else resolve_socket(None))
    try:
        request(sock, {"op": "status"}, timeout=5.0)
    except NoDaemon:
        pass
    except DaemonError as e:
        raise DaemonError(f"cannot tell whether a daemon runs on {sock} ({e}); not purging") from None
    else:
        raise DaemonError(f"a snatgw daemon answers on {sock}: stop it first (SIGTERM), then purge")
    from ...datapath.cleanup import purge

    pin_dir = args.pin_dir or settings.pin_dir
    removed = purge(pin_dir)
    present = {name for _, name in _socket.if_nameindex()}
    for name in (args.inside or []) + (args.outside or []):
        if name not in present:
            print(f"note: interface {name!r} does not exist (in this network namespace)")
    for what in removed:
        print(f"removed {what}")
    if not removed:
        print(f"nothing of snatgw's found in this network namespace (pin dir {pin_dir})")
    return 0
