"""`check`'s "can never match" warnings are sound: no packet ever picks a rule they name
(hypothesis over small rule sets in a small address space)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from snatgw.rules import Pool, Route, Rule, RuleSet

BASE = int(IPv4Address("198.18.0.0"))
POOL = Pool(IPv4Address("198.19.2.71"), IPv4Address("198.19.2.73"))
GWS = [None, IPv4Address("198.19.2.1"), IPv4Address("198.19.3.1")]
OIFS = [None, "eth1", "eth2"]


@st.composite
def small_net(draw):
    plen = draw(st.integers(29, 31))  # inside 198.18.0.0/29, so covers happen often
    off = draw(st.integers(0, 7)) >> (32 - plen) << (32 - plen)
    return IPv4Network((BASE + off, plen))


rule = st.builds(Rule, src=small_net(), pool=st.just(POOL),
                 dst=st.sampled_from([IPv4Network("0.0.0.0/0")] * 3 + [IPv4Network("203.0.113.0/24")]),
                 gw=st.sampled_from([None] * 3 + GWS[1:]), oif=st.sampled_from([None] * 3 + OIFS[1:]))


@settings(max_examples=300, deadline=None)
@given(st.lists(rule, min_size=3, max_size=8, unique_by=lambda r: r.identity))
def test_rules_warned_as_never_matching_never_match(defined):
    """Every rule check warns about loses every packet it could match to an earlier rule."""
    rs = RuleSet(defined)
    flagged = {r.identity for r, _ in rs.shadowed()}
    for r in rs:
        if r.identity not in flagged:
            continue
        for host in r.src:
            for dst in (IPv4Address("203.0.113.10"), IPv4Address("192.0.2.10")):
                if dst not in r.dst:
                    continue
                for gw in ([r.gw] if r.gw else GWS[1:]):
                    for oif in ([r.oif] if r.oif else OIFS[1:]):
                        assert rs.match(host, dst, Route(oif, gw)) is not r
