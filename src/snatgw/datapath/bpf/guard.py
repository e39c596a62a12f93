"""The leak guard's second line for the bpf backend: a stateless nftables chain, table
``ip snatgw_guard``, that drops a packet leaving an uplink with a source in a rule's `from` net
that is not an address of that uplink, the same judgement as the egress program (snat_egress,
docs/datapath.md "The edge invariants").

Why a second line: the egress program is a TC filter, and a TC filter can vanish under a running
daemon (`tc filter del`, `tc qdisc del dev eth1 clsact`, a tool that resets qdiscs).  Until the
daemon's next tick puts it back, the kernel would route an inside host's packets out untranslated;
the lab measured 8 such frames in one such window.  This chain is not a TC hook: removing the
programs leaves it in place, so that window drops instead of leaking (and removing this table
leaves the programs in place; the tick restores either).

Cost: translated packets meet it only when the kernel must fragment them (the programs redirect
the others past netfilter); packets the kernel forwards or sends itself do, one rule with no
conntrack.  Its drops go to the named counter ``leak``, which stats read by netlink
(``dropped()``: no process per call).  The bpf backend lets the pool prefixes its egress
program passes at once by (``passes``: rules.leak_guard_passes), so a kernel-fragmented
translated packet from a pool address the gateway does not hold leaves as the rest of its
flow does.  The nft backend keeps this table
too, beside the same rule in its own table (`leak_guard`): `nft delete table ip snatgw` then
drops instead of leaking (measured: 34 inside-source frames out in that window before).  A
backend taking over from the other rewrites the table; a stop without keep_state and `snatgw
purge` remove it (datapath/cleanup.py).
"""

from __future__ import annotations

import logging
import subprocess
from ipaddress import IPv4Network, collapse_addresses

from ...errors import BackendError
from .. import nftnl
from ..netns import nsenter

log = logging.getLogger("snatgw.bpf")

TABLE = "snatgw_guard"
FAMILY = "ip"
#: after the nft backend's own leak_guard chain (200), which counts its drops as DROP_LEAK; for
#: the bpf backend netfilter's postrouting comes before the TC egress program anyway, so its
#: stats add this table's counter to DROP_LEAK
PRIORITY = 300
#: the named counter of the drops: kept by a re-install (`flush table` leaves objects), so
#: DROP_LEAK never goes back when a reload rewrites the rule; gone with the table
COUNTER = "leak"


def _nft(argv: list[str], netns: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(nsenter(netns) + ["nft", *argv], input=stdin, capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    except FileNotFoundError:
        raise BackendError("nft not found: the leak guard's second line needs nftables (scripts/setup.sh)") from None


def guard_text(nets, outside, passes=()) -> str:
    """One `nft -f` transaction: (re)create the table with its single rule (nothing to guard
    without `from` nets or uplinks: the table stays, empty).  ``passes``: sources let by
    before the FIB's judgement (the bpf backend: rules.leak_guard_passes, the pool prefixes
    its egress program passes at once)."""
    # a rule's src is an IPv4Network already: IPv4Network() of one parses its text again, 0.18 s
    # for 10,000 rules, at every start and reload
    nets = sorted({n if isinstance(n, IPv4Network) else IPv4Network(n) for n in nets},
                  key=lambda n: (int(n.network_address), n.prefixlen))
    passes = list(collapse_addresses(IPv4Network(n) for n in passes))
    lines = [f"add table {FAMILY} {TABLE}", f"flush table {FAMILY} {TABLE}",
             f"add counter {FAMILY} {TABLE} {COUNTER}",
             f"add chain {FAMILY} {TABLE} postrouting {{ type filter hook postrouting priority {PRIORITY}; policy accept; }}"]
    if nets and outside:
        unless = f"ip saddr != {{ {', '.join(str(n) for n in passes)} }} " if passes else ""
        lines.append(f"add rule {FAMILY} {TABLE} postrouting oifname {{ {', '.join(sorted(outside))} }} "
                     f"ip saddr {{ {', '.join(str(n) for n in nets)} }} {unless}fib saddr . oif type != local "
                     f"counter name \"{COUNTER}\" drop "
                     f"comment \"snatgw: no private source leaves an uplink untranslated\"")
    return "\n".join(lines) + "\n"


def install(nets, outside, netns: str | None = None, passes=()) -> None:
    """Put the guard in place (atomically replacing a previous one)."""
    p = _nft(["-f", "-"], netns, guard_text(nets, outside, passes))
    if p.returncode != 0:
        raise BackendError(f"leak guard table {FAMILY} {TABLE}: nft -f failed: {p.stderr.strip()}")


def present(netns: str | None = None) -> bool:
    """The table and its chain are there (the hook check asks every tick: by netlink, no
    process; `nft list chain` if netlink fails, as the nft backend asks for its own table)."""
    try:
        return nftnl.chain_exists(FAMILY, TABLE, "postrouting", netns)
    except BackendError as e:
        log.warning("leak guard: %s; asking nft", e)
    return _nft(["list", "chain", FAMILY, TABLE, "postrouting"], netns).returncode == 0


def dropped(netns: str | None = None) -> int:
    """Packets the guard dropped so far (0 when it is absent): its named counter, read through
    nf_tables netlink (datapath/nftnl.py), no `nft` process per call (stats, metrics scrapes,
    `adm --rate`).  BackendError when netlink fails."""
    return nftnl.counters(FAMILY, TABLE, netns).get(COUNTER, (0, 0))[0]


def reset(netns: str | None = None) -> bool:
    """Zero the drops counter (the bpf backend's zero(): DROP_LEAK counts them); False when it
    could not (no table, nft failed)."""
    return _nft(["reset", "counter", FAMILY, TABLE, COUNTER], netns).returncode == 0


def remove(netns: str | None = None) -> bool:
    """Delete the table; True when there was one."""
    return _nft(["delete", "table", FAMILY, TABLE], netns).returncode == 0


__all__ = ["TABLE", "COUNTER", "guard_text", "install", "present", "dropped", "reset", "remove"]
