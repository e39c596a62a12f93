"""`snatgw lab up|down|status|exec`: the multi-ISP network-namespace lab (docs/lab.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ...errors import SnatgwError
from ...lab.netns import NoSuchLab, nsenter
from ...lab.topology import NODES, Lab, down_all, leftover_prefixes, list_labs

HELP = "build, inspect and remove the multi-ISP netns lab (up, down, status, exec)"
DESCRIPTION = """\
The lab: namespaces <P>-in40 <P>-in50 (inside hosts), <P>-gw (the gateway), <P>-isp1 <P>-isp2
(ISP routers) and <P>-net (servers 203.0.113.10, 198.51.100.10).  State: /run/snatgw/lab/NAME.json.

  snatgw lab up [--name N] [--prefix P]        (N up already: exit 0, nothing done; N up with
                                                another prefix, or P another lab's: exit 2)
  snatgw lab status [--name N] [--json]
  snatgw lab exec [--name N] NODE -- CMD...      (nodes: in40 in50 gw isp1 isp2 net)
  snatgw lab down [--name N | --all]
"""


def register(p) -> None:
    sub = p.add_subparsers(dest="lab_verb", metavar="up|down|status|exec", required=True)
    up = sub.add_parser("up", help="build the lab")
    up.add_argument("--name", default="default")
    up.add_argument("--prefix", help="namespace prefix, 'sg' + up to 10 of [a-z0-9] (default sg + 4 hex)")
    down = sub.add_parser("down", help="remove the lab (namespaces, links, pins, socket, state)")
    g = down.add_mutually_exclusive_group()
    g.add_argument("--name", default=None)
    g.add_argument("--all", action="store_true", help="every lab, and leftovers found by prefix")
    st = sub.add_parser("status", help="namespaces, addresses, routes, gateway")
    st.add_argument("--name", default=None)
    st.add_argument("-j", "--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command in a lab node's network namespace")
    ex.add_argument("--name", default="default")
    ex.add_argument("node", choices=NODES)
    # the rest of the line, its options included (`gw ip -br a`: argparse took -br for one of
    # snatgw's and failed with the top-level usage); a `--` before it is dropped
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="command (a -- before it is optional)")


def _need(name: str) -> Lab:
    Lab.check_args(name, None)  # (`--name ../x` read /run/snatgw/x.json and offered `lab up --name ../x`)
    lab = Lab.load(name)
    if lab is None or not lab.exists():
        raise NoSuchLab(f"no lab named {name!r} is up; `snatgw lab up --name {name}`")
    return lab


def _down_hint() -> str:
    """What `lab down` of an unknown name could have meant: the labs that are up (by name)
    and any leftover namespaces of no lab (by prefix, which only --all removes)."""
    unreadable: list[str] = []
    alive = {lab.name: lab.exists() for lab in list_labs(unreadable)}  # (each asks for the namespaces)
    up = [name for name, yes in alive.items() if yes]
    gone = [name for name, yes in alive.items() if not yes]  # a state file whose namespaces went
    left = sorted(leftover_prefixes())
    hint = f"; labs up: {' '.join(up)} (`snatgw lab down --name NAME`)" if up else "; no lab is up"
    if gone:
        hint += f"; state of labs whose namespaces are gone: {' '.join(gone)} (`snatgw lab down --name NAME` clears it)"
    if left:
        hint += f"; leftover namespaces by prefix: {' '.join(left)} (`snatgw lab down --all` removes them and every lab)"
    if unreadable:
        hint += f"; unreadable lab state: {' '.join(unreadable)} (`snatgw lab down --all` removes it)"
    return hint


def run(args) -> int:
    if args.lab_verb == "up":
        # the lab asked for is up already: done, as `ip link set X up` of a link that is up
        # (it exited 3, "the lab failed", and scripts had to tell that from a failed build)
        lab = Lab.running(args.name, args.prefix)
        if lab is not None:
            print(f"lab {lab.name} is up already: prefix {lab.prefix}, namespaces "
                  + " ".join(lab.ns(n) for n in NODES) + " (nothing done)")
            return 0
        lab = Lab.up(args.name, args.prefix, keep=True)
        print(f"lab {lab.name} up: prefix {lab.prefix}, namespaces "
              + " ".join(lab.ns(n) for n in NODES))
        print(f"  try: snatgw lab exec --name {lab.name} in40 -- ping -c1 198.18.40.1")
        return 0
    if args.lab_verb == "down":
        if args.all:
            done = down_all()
            print("removed: " + (" ".join(done) if done else "nothing (no lab was up)"))
            return 0
        name = args.name or "default"
        Lab.check_args(name, None)
        lab = Lab.load(name)
        if lab is None:
            raise NoSuchLab(f"no lab named {name!r}" + _down_hint())
        lab.down()
        print(f"lab {name} down (prefix {lab.prefix})")
        return 0
    if args.lab_verb == "status":
        unreadable: list[str] = []
        labs = [_need(args.name)] if args.name is not None else list_labs(unreadable)
        for path in unreadable:
            print(f"snatgw: {path}: unreadable lab state, left out (`snatgw lab down --all` removes it)",
                  file=sys.stderr)
        st = [lab.status() for lab in labs]
        if args.json:
            print(json.dumps(st, indent=1))
            return 0
        if not st:
            left = sorted(leftover_prefixes())
            print("no lab is up" + (f" (leftover prefixes: {' '.join(left)})" if left else ""))
            return 0
        for s in st:
            _print_status(s)
        return 0
    if args.lab_verb == "exec":
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise SnatgwError(f"exec: no command to run in {args.node} (snatgw lab exec NODE -- CMD...)")
        lab = _need(args.name)
        argv = nsenter(lab.ns(args.node), *cmd)
        sys.stdout.flush()
        os.execvp(argv[0], argv)
    return 2


def _print_status(s: dict) -> None:
    gw = s["gateway"]
    print(f"lab {s['name']} (prefix {s['prefix']})")
    for node, info in s["nodes"].items():
        if not info["exists"]:
            print(f"  {node:5} {info['namespace']}: MISSING")
            continue
        addrs = "; ".join(f"{i} {' '.join(a)}" for i, a in info["addresses"].items() if a and i != "lo"
                          or i == "lo" and len(a) > 1)
        print(f"  {node:5} {info['namespace']}: {addrs}")
        for r in info["routes"]:
            print(f"          route {r}")
    state = "not running"
    if gw["running"]:
        state = f"running, pid {gw['pid']}" + "".join(
            f", {k} {gw[k]}" for k in ("backend", "config") if gw.get(k))
    print(f"  gateway: {state}; socket {gw['socket']}; pins {gw['pin_dir']}"
          f" ({'present' if gw['pins'] else 'none'})")
