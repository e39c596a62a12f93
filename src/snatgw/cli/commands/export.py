"""`snatgw export CONFIG --format nft|nft-json|iptables`: print the rule set the nft backend would
install (nft text for `nft -f`, its JSON for `nft -j -f`, or iptables-restore lines), with the
policy routing for new_gw and notes on what differs from lvs-snat/the bpf datapath as comments."""

from __future__ import annotations

import argparse
import json
import sys

from ...config.parse import parse_file
from ...errors import EXIT_OK
from ...layout import Algo
from ...datapath.nft import render as R
from ...datapath.nft.iptables import render_iptables

HELP = "print the rules as nftables or iptables commands (migration, review)"
DESCRIPTION = """\
Print the rule set of CONFIG as the nftables backend installs it (table ip snatgw) or as
iptables-restore input, plus the `ip rule`/`ip route` commands new_gw needs, with notes on
what differs from snatgw's own datapath (address choice, ports, gw before routing).

  snatgw export lab.conf --format nft > snatgw.nft && nft -f snatgw.nft
  snatgw export lab.conf --format iptables | iptables-restore --noflush
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="config file (keepalived.conf style)")
    p.add_argument("--format", choices=("nft", "nft-json", "iptables"), default="nft",
                   help="nft text (default), nft JSON (one transaction), or iptables-restore lines")


def notes_for(cfg) -> list[str]:
    algos = sorted({r.algo for r in cfg.rules if r.pool.size > 1})
    out = [R.ALGO_NOTES[a] for a in algos]
    if len(cfg.rules):
        out.append(R.PORT_NOTE)
    if any(r.new_gw for r in cfg.rules):
        out.append("new_gw: a NEW flow is steered in prerouting on a prediction of its route "
                   "(`fib daddr oifname`), later packets follow the ct mark; reverse-path filtering "
                   "must be off or loose on the uplinks (replies come back on the new link)")
    out.append("timeouts: UDP and the TCP states (" + ", ".join(n for n, _ in R.NFT_TCP_STATES)
               + ") come from the snatgw block (ct timeout objects; conntrack's syn_sent2, retrans and "
               "unacknowledged keep the kernel's); ICMP has no nft policy: the backend sets the namespace's "
               "net.netfilter.nf_conntrack_icmp_timeout to `icmp`, which loading this text does not")
    return out


def run(args: argparse.Namespace) -> int:
    cfg = parse_file(args.config)
    if args.format == "iptables":
        text, extra = render_iptables(cfg.rules, cfg.settings)
        notes = notes_for(cfg) + extra
        print("\n".join(f"# note: {n}" for n in notes))
        print(text, end="")
        return EXIT_OK
    p = R.plan(cfg.rules, cfg.settings)
    if args.format == "nft-json":  # nft 1.0.6 drops ct timeout policies given in JSON: see render
        print(json.dumps(R.to_json(p), indent=1))
        if p.timeouts or p.sets:  # said, on stderr (stdout is the JSON): the batch alone is not the table
            print("snatgw export: note: nft 1.0.6 (Debian 12) reads this JSON with its ct timeout policies "
                  "dropped (the objects load empty: the kernel's timeouts, not the snatgw block's) and its "
                  "sets without the dynamic flag (a second load fails: File exists); the backend creates those "
                  "objects from text first. `snatgw export --format nft` loads as is, and its notes apply here "
                  "too", file=sys.stderr)
        return EXIT_OK
    notes = notes_for(cfg) + list(p.notes)
    print(f"# snatgw export {cfg.source}: load with `nft -f FILE` (replaces table ip snatgw atomically)")
    print("\n".join(f"# note: {n}" for n in notes))
    print(f"table {R.FAMILY} {R.TABLE}")
    print(f"flush table {R.FAMILY} {R.TABLE}")
    print(R.to_text(p), end="")
    routing = R.routing_text(p)
    if routing:
        print("# policy routing for new_gw (run as shell commands; all tagged proto "
              f"{R.RT_PROTO}):")
        print("\n".join(f"#   {ln}" if not ln.startswith("#") else ln for ln in routing.splitlines()))
    return EXIT_OK


__all__ = ["HELP", "DESCRIPTION", "register", "run", "notes_for", "Algo"]
