"""`snatgw purge`: remove every trace of both backends in this network namespace (nft table,
our ip rules/routes and conntrack entries, our TC filters on every device, the pin directory,
the namespace's owner lock file a daemon killed with SIGKILL left in /run/snatgw/owner, and the
`rps_cpus` masks such a daemon left written: put back from its state file),
refusing while a daemon owns the namespace (daemon/owner.py) or answers on the control socket,
unless --force.
"""

from __future__ import annotations

import os
import socket as _socket
import sys

from ...config.schema import Settings
from ...daemon.client import resolve_socket
from ...daemon.control import NoDaemon, request
from ...daemon.owner import current_owner, describe, foreign, remove_stale_lock
from ...errors import DaemonError

HELP = "remove every trace of snatgw's datapaths in this network namespace (no daemon may run)"
DESCRIPTION = """Remove what a stopped (SIGTERM) or killed daemon of either backend left in this
network namespace: the nft backend's `table ip snatgw`, its ip rules and routes (proto 201,
prefs/tables 31000-31999) and its conntrack entries; the bpf backend's TC filters (handle and
priority 0x534e only) on every device, and a device's clsact qdisc that carried one once
no other filter is on it, its new_gw ip rules and routes (proto 201,
prefs/tables 30000-30999), and the pinned maps in the pin directory (the sessions); both
backends' leak guard, `table ip snatgw_guard`; and the namespace's owner lock file
(/run/snatgw/owner) when no daemon holds it, with the receive packet steering masks a killed
daemon left written (`rps_cpus`): each queue gets back the mask its state file says it had.
This is how the datapath is removed on purpose: a daemon that exits (SIGTERM, `systemctl stop` or
restart, an upgrade) leaves it translating for the next one.  Refuses (exit 4) while a daemon owns
this network namespace or answers on the control socket: stop it first (--force purges anyway;
a running daemon then puts its hooks back at its next tick).
Run it in the gateway's namespace: `nsenter --net=/run/netns/NS snatgw purge ...` (with
`rps_cpus` masks to put back: docs/operations.md "In a network namespace", whose one command
gives both the host's bpffs and the namespace's /sys)."""


def register(p) -> None:
    p.add_argument("config", nargs="?", help="config file: its pin_dir and control_socket are used")
    p.add_argument("--pin-dir", metavar="DIR",
                   help="bpffs directory of the pinned maps (default: the config's, else /sys/fs/bpf/snatgw)")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: the config's, $SNATGW_SOCKET)")
    p.add_argument("--inside", action="append", metavar="IF",
                   help="as for `run` (accepted; filters are removed on every device anyway)")
    p.add_argument("--outside", action="append", metavar="IF", help="as for `run` (see --inside)")
    p.add_argument("--force", action="store_true",
                   help="purge even while a daemon owns this namespace (it restores its hooks at its next tick)")


def _settings(args) -> Settings:
    if not args.config:
        return Settings()
    from ...daemon.service import load_config

    return load_config(args.config, require_rules=False).settings


def _restore_rps() -> list[str]:
    """The `rps_cpus` masks a daemon killed left written: every queue its state file names gets
    back the mask it had (daemon/rps.py, the daemon's own stop), then the file goes.  A /sys that
    is not this namespace's is written nothing and the file kept (said), as by the daemon."""
    from ...daemon.owner import state_path
    from ...daemon.rps import RpsManager

    path = state_path("rps")
    if not os.path.exists(path):
        return []
    m = RpsManager(state=path)
    events = m.restore()
    if m.refused is not None:
        print(f"snatgw purge: note: the rps_cpus masks in {path} are not put back: {m.refused} "
              "(run purge with this namespace's own /sys and the host's bpffs: the one command of "
              "docs/operations.md \"In a network namespace\")", file=sys.stderr)
        return []
    if m.state_error is not None:
        print(f"snatgw purge: note: {m.state_error}", file=sys.stderr)
    done = [f"rps_cpus of {ev}" for ev in events]
    if not os.path.exists(path):
        done.append(f"rps_cpus state file {path}")
    return done


def _say_unseen_pins(pin_dir: str) -> None:
    """A pin dir on no bpffs here (`ip netns exec` gives each command a /sys without the host's
    bpffs): the daemon's pins, if any, are where this purge cannot see them; say so, or it would
    report the datapath removed while the session table stays pinned."""
    from ...datapath.bpf.loader import fs_type

    if fs_type(pin_dir) != "bpf":
        print(f"snatgw purge: note: the pin directory {pin_dir} is on no bpf filesystem here (a /sys without "
              "the host's bpffs, as `ip netns exec` mounts): pinned maps of a daemon are not seen, nor removed; "
              "run `nsenter --net=/run/netns/NS snatgw purge` for them (with rps_cpus masks of a killed daemon to "
              "put back as well: the one command of docs/operations.md \"In a network namespace\")", file=sys.stderr)


def run(args) -> int:
    settings = _settings(args)
    sock = args.socket or (settings.control_socket if args.config else resolve_socket(None))
    owner = current_owner()
    if owner is not None and foreign(owner):  # not a daemon: no owner lock, another user's name
        print(f"snatgw purge: note: the namespace owner name is held by a process of another user "
              f"({describe(owner)}), not by a snatgw daemon (no owner lock): purging", file=sys.stderr)
        owner = None
    if owner is not None and not args.force:
        raise DaemonError(f"a snatgw daemon ({describe(owner)}) owns the datapath of this network namespace: "
                          "stop it first (SIGTERM), then purge (or --force)")
    try:
        request(sock, {"op": "status"}, timeout=5.0)
    except NoDaemon:
        pass
    except DaemonError as e:
        if not args.force:
            raise DaemonError(f"cannot tell whether a daemon runs on {sock} ({e}); not purging") from None
    else:
        if not args.force:
            raise DaemonError(f"a snatgw daemon answers on {sock}: stop it first (SIGTERM), then purge")
    from ...datapath.cleanup import purge

    pin_dir = args.pin_dir or settings.pin_dir
    _say_unseen_pins(pin_dir)
    removed = purge(pin_dir)
    if owner is None:  # (a daemon that owns the namespace, with --force, keeps its own masks)
        removed += _restore_rps()
    stale = remove_stale_lock()  # a daemon killed with SIGKILL left it (one file per namespace)
    if stale:
        removed.append(f"owner lock {stale}")
    present = {name for _, name in _socket.if_nameindex()}
    for name in (args.inside or []) + (args.outside or []):
        if name not in present:
            print(f"note: interface {name!r} does not exist (in this network namespace)")
    for what in removed:
        print(f"removed {what}")
    if not removed:
        print(f"nothing of snatgw's found in this network namespace (pin dir {pin_dir})")
    return 0
