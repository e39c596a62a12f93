"""The bpf backend's new_gw policy routing (docs/datapath.md, "new_gw and the kernel").

A packet of a new_gw session that the datapath translates and hands to the kernel (it is over
the egress MTU without DF: the kernel fragments it; or a later fragment likewise) would be
routed by the kernel's own table, which may name another uplink: it would leave there with
this uplink's SNAT address.  So the datapath marks it (snat_gw_marks: its egress (device, next
hop) -> layout.GW_MARK_BASE + n) and this module installs, per such egress n:

    ip route replace default via NEXTHOP dev DEV [onlink] table GW_RT_BASE+n proto GW_RT_PROTO
    ip rule add pref GW_RT_BASE+n fwmark MARK/0xffffffff lookup GW_RT_BASE+n proto GW_RT_PROTO

Ours are exactly the ip rules with a pref in GW_RT_BASE..+GW_SLOTS-1 *and* proto GW_RT_PROTO, and
the routes with that proto in those tables (datapath/policyroutes.py, shared with the nft
backend's range): nothing else is ever removed.  One daemon per network
namespace (daemon/owner.py) owns them; the nft backend's range (31000-31999) is another.
Runs `ip` in the calling thread's network namespace.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Address

from ... import layout as L
from ...errors import BackendError
from ..policyroutes import PolicyRange


@dataclass(frozen=True)
class GwRoute:
    """One new_gw egress's routing: number n, its device and next hop."""

    n: int
    dev: str
    nexthop: IPv4Address

    @property
    def table(self) -> int:
        return L.GW_RT_BASE + self.n

    @property
    def mark(self) -> int:
        return L.GW_MARK_BASE + self.n

    def commands(self) -> list[list[str]]:
        """`ip` argv lists (without `ip`): the route first (a rule without it would send the
        marked packets on to the main table), then the rule."""
        t, p = str(self.table), str(L.GW_RT_PROTO)
        return [["route", "replace", "default", "via", str(self.nexthop), "dev", self.dev, "onlink",
                 "table", t, "proto", p],
                ["rule", "add", "pref", t, "fwmark", f"0x{self.mark:08x}/0xffffffff", "lookup", t, "proto", p]]  # fmt: skip


def _ip(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:  # (as clang and nft are named when missing)
        raise BackendError("ip not found: the bpf backend's new_gw routing needs iproute2; install it "
                           "(scripts/setup.sh)") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackendError(f"ip {' '.join(args)}: {e}") from None
    if check and r.returncode != 0:
        raise BackendError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


#: our ip rule prefs and tables (datapath/policyroutes.py decides what is ours)
RANGE = PolicyRange(L.GW_RT_BASE, L.GW_SLOTS, L.GW_RT_PROTO)


def our_rules() -> dict[int, dict]:
    """Our ip rules (pref in range and proto GW_RT_PROTO) by pref."""
    return RANGE.rules(_ip)


def our_tables() -> set[int]:
    """Tables in our range holding a route of ours (proto GW_RT_PROTO)."""
    return set(RANGE.tables(_ip))


def install(routes: list[GwRoute]) -> dict[GwRoute, str]:
    """Routes replaced in place (a changed next hop swaps in one step), rules added where
    missing.  Inert until the datapath marks packets with their marks (snat_gw_marks).
    Returns the ones `ip` refused, with its error (the others are installed)."""
    have = our_rules()
    failed = {}
    for g in routes:
        route, rule = g.commands()
        try:
            _ip(route)
            x = have.get(g.table)
            if x is not None and str(x.get("fwmark", "")) not in (hex(g.mark), f"0x{g.mark:08x}"):
                _ip(["rule", "del", "pref", str(g.table)], check=False)  # (ours, another mark: a leftover)
                x = None
            if x is None:
                _ip(rule)
        except BackendError as e:
            failed[g] = str(e)
    return failed


def remove(keep: set[int] = frozenset()) -> list[str]:
    """Our rules and routes except those of tables ``keep``; returns what went (for the log)."""
    return RANGE.remove(_ip, keep)


__all__ = ["RANGE", "GwRoute", "install", "our_rules", "our_tables", "remove"]
