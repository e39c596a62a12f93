"""`check`'s "can never match" warnings are sound: no packet ever picks a rule they name
(hypothesis over small rule sets in a small address space)."""

from __future__ import annotations

import sys

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


def pairwise_shadowed(rs: RuleSet) -> list[tuple[Rule, list[Rule]]]:
    """The definition, pair by pair (what check ran until it took minutes on 10,000 rules)."""
    out = []
    for i, r in enumerate(rs.rules):
        before = [e for e in rs.rules[:i] if r.dst.subnet_of(e.dst) and (e.gw is None or e.gw == r.gw)
                  and (e.oif is None or e.oif == r.oif) and e.src.overlaps(r.src)]  # fmt: skip
        lo, hi = int(r.src.network_address), int(r.src.broadcast_address)
        reach, used = lo, []
        for e in sorted(before, key=lambda e: int(e.src.network_address)):
            if int(e.src.network_address) > reach:
                break
            if int(e.src.broadcast_address) >= reach:
                reach, used = int(e.src.broadcast_address) + 1, used + [e]
        if reach > hi:
            out.append((r, used))
    return out


@st.composite
def nested_net(draw, base: int, lo: int, hi: int):
    plen = draw(st.integers(lo, hi))
    off = draw(st.integers(0, 255)) >> (32 - plen) << (32 - plen) if plen > 24 else 0
    return IPv4Network((base + off, plen))


wide_rule = st.builds(
    Rule, src=nested_net(BASE, 24, 32), pool=st.just(POOL),
    dst=st.one_of(st.just(IPv4Network("0.0.0.0/0")), nested_net(int(IPv4Address("203.0.113.0")), 24, 27)),
    gw=st.sampled_from([None] * 2 + GWS[1:]), oif=st.sampled_from([None] * 2 + OIFS[1:]))


@settings(max_examples=300, deadline=None)
@given(st.lists(wide_rule, min_size=1, max_size=40, unique_by=lambda r: r.identity))
def test_shadow_index_finds_what_the_pairwise_definition_finds(defined):
    """The indexed search reports the same rules, with the same covering rules, as the pairwise one."""
    rs = RuleSet(defined)
    assert rs.shadowed() == pairwise_shadowed(rs)


def ten_thousand_rules() -> tuple[list[Rule], set[tuple]]:
    """10,000 rules in the shapes that made check quadratic, and the identities of those lost:
    /32 sources under catch-alls, one source with many destinations, a /16 covered by 256 /24s
    of two route-condition groups jointly, and 256 rules beside it with nothing under them."""
    p = lambda s: Rule.from_dict({**s, "snat_ip": "198.19.2.71-198.19.2.80"})  # noqa: E731
    rules = [p({"from": f"10.{i // 256}.{i % 256}.1/32", "oif": "eth1"}) for i in range(4000)]
    rules += [p({"from": "10.0.0.0/8", "to": f"198.18.{i // 256}.{i % 256}/32"}) for i in range(4000)]
    rules += [p({"from": f"172.16.{i}.0/24", "gw": "198.19.2.1" if i % 2 else None}) for i in range(256)]
    lost = p({"from": "172.16.0.0/16", "gw": "198.19.2.1", "oif": "eth2"})
    rules += [lost, p({"from": "172.16.0.0/16", "to": "203.0.113.0/24"})]  # not lost: 172.16.x/24 are wider
    rules += [p({"from": f"192.168.{i}.0/24", "to": "192.0.2.0/24", "oif": "eth2"}) for i in range(256)]
    rules += [p({"from": f"192.168.{i}.0/24", "oif": "eth1", "gw": "198.19.2.1"}) for i in range(256)]
    rules += [p({"from": f"100.64.{i // 256}.{i % 256}/32", "to": "0.0.0.0/1"}) for i in range(10_000 - len(rules) - 1)]
    rules.append(p({"from": "0.0.0.0/0", "oif": "eth1"}))
    return rules, {lost.identity}


class CallBudget:
    """A profile hook that fails the test once the code under it makes more than ``limit``
    function calls (Python and C): a bound on work that does not depend on the machine."""

    def __init__(self, limit: int):
        self.limit, self.calls = limit, 0

    def __call__(self, frame, event, arg):
        if event in ("call", "c_call"):
            self.calls += 1
            if self.calls > self.limit:
                raise AssertionError(f"more than {self.limit} calls")

    def __enter__(self):
        sys.setprofile(self)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


def test_shadow_search_over_10000_rules_is_near_linear():
    """check's never-match search over 10,000 rules makes at most 100 calls per rule (the
    pairwise search made one subnet test per pair, 50 million) and finds the one lost rule."""
    rules, lost = ten_thousand_rules()
    assert len(rules) == 10_000
    rs = RuleSet(rules)
    with CallBudget(100 * len(rules)):
        found = rs.shadowed()
    assert {r.identity for r, _ in found} == lost
    (_, cover), = found
    assert len(cover) == 256 and {str(e.src.netmask) for e in cover} == {"255.255.255.0"}
