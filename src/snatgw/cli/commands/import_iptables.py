"""`snatgw import-iptables FILE [--masq-addr IF=IP]...`: iptables SNAT rules (iptables-save output
or `iptables -t nat -A POSTROUTING ...` lines) -> snatgw config text on stdout.  Exit 0 when all
carried over, 1 when something was flagged (listed in the output and on stderr), 2 unreadable."""

from __future__ import annotations

import argparse
import sys
from ipaddress import IPv4Address

from ...config.parse import read_config
from ...errors import EXIT_BAD_INPUT, EXIT_OK, ConfigError, SnatgwError
from ...migrate import import_iptables, render_imported

HELP = "convert iptables SNAT rules (iptables-save or command lines) into a snatgw config"
DESCRIPTION = """\
Read iptables SNAT rules and print the equivalent snatgw config:
  -s -> from, -d -> to, -o -> oif, --to-source -> snat_ip,
  --persistent (also the seed's --persitent) -> algo sh, --random/--random-fully -> algo random,
  neither -> algo sdh (the kernel's default hashes source and destination).
MASQUERADE needs an address: --masq-addr eth1=198.19.2.71.  Lines that cannot be carried over
(other tables or chains, -p/--dport, negations, -j DNAT ...) become `# not carried over:` comments
and are summarised on stderr.  FILE may be - for stdin.
Exit status: 0 everything carried over, 1 something flagged, 2 unreadable input.
"""


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="iptables-save output or iptables commands (- = stdin)")
    p.add_argument("--masq-addr", action="append", default=[], metavar="IF=IP",
                   help="address to use for MASQUERADE rules leaving via IF (repeatable)")


def _masq(items: list[str]) -> dict[str, IPv4Address]:
    out = {}
    for item in items:
        ifname, sep, addr = item.partition("=")
        try:
            if not sep or not ifname:
                raise ValueError
            out[ifname] = IPv4Address(addr)
        except ValueError:
            raise SnatgwError(f"--masq-addr: expected IFACE=IPv4, got {item!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    masq = _masq(args.masq_addr)
    try:
        if args.file == "-":
            text, source = sys.stdin.read().removeprefix("\ufeff"), "<stdin>"
        else:  # as a config is read: a regular file, bounded (/dev/zero or a FIFO is refused, not read
            # until memory runs out), UTF-8 with a byte order mark dropped (a Windows editor's `*nat`)
            text, source = read_config(args.file, "an iptables-save file"), args.file
    except (OSError, UnicodeDecodeError) as e:
        print(f"snatgw import-iptables: {args.file}: cannot read: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ConfigError as e:
        print(f"snatgw import-iptables: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    imp = import_iptables(text, source, masq)
    sys.stdout.write(render_imported(imp, source))
    if not imp.ok:
        print(f"snatgw import-iptables: {len(imp.rules)} rule(s) carried over, "
              f"{len(imp.flagged)} line(s) not, {len(imp.warnings)} warning(s):", file=sys.stderr)
        for line, why in imp.flagged:
            print(f"  not carried over: {line}: {why}", file=sys.stderr)
        for line, why in imp.warnings:
            print(f"  warning: {line}: {why}", file=sys.stderr)
        return 1
    return EXIT_OK
