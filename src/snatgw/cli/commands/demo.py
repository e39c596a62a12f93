"""`snatgw demo` (what `make demo` runs): the seed's rules in the lab, traffic, failover, sessions."""

from __future__ import annotations

HELP = "build the lab, run the gateway on the seed's rules, show flows, fail over, clean up"
DESCRIPTION = """\
Builds the multi-ISP lab (docs/lab.md), writes the seed's example rules on lab addresses, starts
`snatgw run` in the gateway namespace, sends TCP, UDP and ping from 198.18.40.10/.11/.12 and
198.18.50.10 to 203.0.113.10 and 198.51.100.10, and prints per flow the rule, the source address
the server saw, the ISP link it arrived on, and what the model predicts.  Then ISP 1 fails over
(rule 2 replaced by new_gw 198.19.3.1 via reload), the flows run again, and `snatgw conns` is
shown.  Everything is removed at the end.  Exit 0 when every flow is as predicted.  Interrupted
(Ctrl-C, SIGTERM), it removes the lab, says so on stderr in one line (naming what it could not
remove) and exits 130 (SIGINT) or 143 (SIGTERM).
"""


def register(p) -> None:
    p.add_argument("--backend", choices=("bpf", "nft"), default="bpf")
    p.add_argument("--name", default="demo", help="lab name (state file /run/snatgw/lab/NAME.json)")
    p.add_argument("--prefix", help="namespace prefix (default sg + 4 hex)")


def run(args) -> int:
    from ...lab.demo import demo

    return demo(backend=args.backend, name=args.name, prefix=args.prefix)
