"""Link health and automatic failover, the configuration side: the ``link NAME { ... }`` block,
which rules belong to a link, and the rules in force while links are down.

A link is one ISP next hop (lvs-snat's gw/new_gw).  The daemon probes it (snatgw.daemon.links)
and, while it is down, moves its rules to the backup: each of the link's rules gets
``new_gw backup_gw`` and, when ``backup_snat_ip`` is given, that pool, which is exactly the
seed's hand-written failover edit (same rule identity, so the counters stay and the sessions
follow the spec's "Rule changes and live sessions": a session whose address left the pool is
removed and its flow starts again on the backup).  When the link is healthy again for ``hold``
seconds the rules go back.

Grammar (top level, beside ``snatgw { }`` and ``virtual_server fwmark 1 { }``)::

    link isp1 {
        gw 198.19.2.1                  # the next hop this link is (required)
        oif eth1                       # its device (default: the route to gw, asked at start)
        probe 203.0.113.10 198.51.100.10   # ICMP echo targets, one or more (required)
        source 198.19.2.2              # probe source (default: oif's address in gw's subnet)
        interval 0.5                   # seconds between probe rounds (0.05..60, default 1)
        fall 3                         # down when no reply for fall x interval, or no carrier
        rise 3                         # up again after rise answered rounds in a row
        hold 30                        # ... and this many seconds up before the rules go back
        backup_gw 198.19.3.1           # where the link's rules go while it is down (required)
        backup_snat_ip 198.19.3.71-198.19.3.73   # and with which pool (default: their own)
    }

A rule belongs to a link when its next hop is the link's: ``new_gw`` equal to the link's gw;
or no new_gw and ``gw`` equal to it; or neither and ``oif`` equal to the link's oif.  Rules
with none of these follow the routing table and are not moved (`snatgw check` lists each
link's rules).  Detection: probes are answered by any one target per round; a link is down
``fall x interval`` seconds after its last reply (BFD's dead timer), at once on carrier loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from ipaddress import IPv4Address

from ..rules import Pool, Rule, RuleSet

LINK_KEYWORDS = ("gw", "oif", "probe", "source", "interval", "fall", "rise", "hold", "backup_gw", "backup_snat_ip")
INTERVAL_RANGE = (0.05, 60.0)
MAX_TARGETS = 8


@dataclass(frozen=True)
class Link:
    name: str
    gw: IPv4Address
    probe: tuple[IPv4Address, ...]
    backup_gw: IPv4Address
    oif: str | None = None
    source: IPv4Address | None = None
    interval: float = 1.0
    fall: int = 3
    rise: int = 3
    hold: float = 30.0
    backup_pool: Pool | None = None
    where: str | None = None

    @property
    def dead_after(self) -> float:
        """Seconds without a reply after which the link is down."""
        return self.fall * self.interval

    def owns(self, r: Rule) -> bool:
        if r.new_gw is not None:
            return r.new_gw == self.gw
        if r.gw is not None:
            return r.gw == self.gw
        return self.oif is not None and r.oif == self.oif

    def as_dict(self) -> dict:
        return {"name": self.name, "gw": str(self.gw), "oif": self.oif, "probe": [str(p) for p in self.probe],
                "source": str(self.source) if self.source else None, "interval": self.interval,
                "fall": self.fall, "rise": self.rise, "hold": self.hold, "backup_gw": str(self.backup_gw),
                "backup_snat_ip": str(self.backup_pool) if self.backup_pool else None, "where": self.where}


def link_rules(link: Link, rules: RuleSet) -> list[Rule]:
    """The rules of ``link`` in priority order."""
    return [r for r in rules if link.owns(r)]


def failed_over(rule: Rule, link: Link) -> Rule:
    """``rule`` as it runs while ``link`` is down: to the backup next hop, with the backup pool."""
    return replace(rule, new_gw=link.backup_gw, pool=link.backup_pool or rule.pool)


def failover(rules: RuleSet, links: tuple[Link, ...], down: set[str] | frozenset[str]) -> RuleSet:
    """The rules in force while the links named in ``down`` are down (definition order kept, so
    priorities and ids do not change).  A rule is moved by the first down link owning it."""
    if not down:
        return rules
    active = [lk for lk in links if lk.name in down]
    out = []
    for r in rules.defined:
        owner = next((lk for lk in active if lk.owns(r)), None)
        out.append(failed_over(r, owner) if owner else r)
    return RuleSet(out)


__all__ = ["Link", "LINK_KEYWORDS", "link_rules", "failed_over", "failover"]
