"""rules.leak_guard_nets: the egress guard's LPM entries (docs/datapath.md "egress program")."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

from snatgw import layout as L
from snatgw.rules import Pool, Rule, leak_guard_nets, leak_guard_passes, pool_sources


def rule(src: str, pool: str) -> Rule:
    return Rule(src=IPv4Network(src), pool=Pool.parse(pool))


def judged(nets: dict[IPv4Network, int], addr: str) -> int | None:
    """The kind of the longest match, as the LPM trie answers (None: no entry)."""
    a = IPv4Address(addr)
    hits = [n for n in nets if a in n]
    return nets[max(hits, key=lambda n: n.prefixlen)] if hits else None


def test_pool_prefixes_inside_a_from_net_pass_and_nothing_else_changes():
    nets = leak_guard_nets([rule("198.18.0.0/15", "198.19.1.1-198.19.1.11"), rule("10.0.0.0/8", "203.0.113.5")])
    assert nets[IPv4Network("198.18.0.0/15")] == L.FROM_NET_RULE
    assert nets[IPv4Network("10.0.0.0/8")] == L.FROM_NET_RULE
    # a pool outside every `from` net is in too: step 2a drops it as a source, held or not
    assert judged(nets, "203.0.113.5") == L.FROM_NET_POOL
    for i in range(1, 12):
        assert judged(nets, f"198.19.1.{i}") == L.FROM_NET_POOL
    for a in ("198.19.1.0", "198.19.1.12", "198.18.0.1", "198.19.255.255"):
        assert judged(nets, a) == L.FROM_NET_RULE
    # exactly the pool: the prefixes cover it and nothing beside it
    covered = {a for n, k in nets.items() if k == L.FROM_NET_POOL for a in n}
    assert covered == {IPv4Address(f"198.19.1.{i}") for i in range(1, 12)} | {IPv4Address("203.0.113.5")}


def test_a_from_net_inside_a_pool_keeps_the_full_check():
    nets = leak_guard_nets([rule("0.0.0.0/0", "198.19.2.80-198.19.2.83"), rule("198.19.2.82/32", "198.19.2.71")])
    assert judged(nets, "198.19.2.80") == L.FROM_NET_POOL
    assert judged(nets, "198.19.2.82") == L.FROM_NET_RULE  # the longer match: a `from` net
    assert judged(nets, "198.19.2.84") == L.FROM_NET_RULE


def test_a_pool_equal_to_a_from_net_stays_a_from_net():
    nets = leak_guard_nets([rule("198.19.3.0/24", "198.19.3.0-198.19.3.255"), rule("0.0.0.0/0", "198.19.9.1")])
    assert nets[IPv4Network("198.19.3.0/24")] == L.FROM_NET_RULE
    assert judged(nets, "198.19.9.1") == L.FROM_NET_POOL


def test_pool_prefixes_are_capped_beside_the_from_nets(monkeypatch):
    """Pool prefixes only spare work: they never push a `from` net out of the map."""
    monkeypatch.setattr("snatgw.rules.MAX_FROM_NETS", 5)
    rules = [rule("0.0.0.0/0", f"198.19.4.{i * 2 + 1}") for i in range(10)]
    rules += [rule(f"198.18.{i}.0/24", "198.19.5.1") for i in range(3)]
    nets = leak_guard_nets(rules)
    assert len(nets) == 5
    assert sum(k == L.FROM_NET_RULE for k in nets.values()) == 4  # every `from` net
    assert judged(nets, "198.19.4.1") == L.FROM_NET_POOL  # the first rule's pool first
    assert judged(nets, "198.19.4.3") == L.FROM_NET_RULE  # no room: the full check


def test_random_rule_sets_agree_with_the_definition():
    """Whatever the rules, an address judged FROM_NET_POOL is a pool address and no `from` net
    is longer there; every `from` net is in, and (no cap reached) every pool address."""
    rnd = random.Random(7)
    for _ in range(200):
        rules = []
        for _ in range(rnd.randint(1, 6)):
            base = rnd.choice([0x0A000000, 0xC6120000, 0xC6130000]) | rnd.getrandbits(16)
            src = IPv4Network((base, rnd.choice([0, 8, 15, 16, 24, 30, 32])), strict=False)
            first = 0xC6130000 | rnd.getrandbits(10)
            rules.append(Rule(src=src, pool=Pool(IPv4Address(first), IPv4Address(first + rnd.randint(0, 40)))))
        nets = leak_guard_nets(rules)
        assert all(nets.get(r.src) == L.FROM_NET_RULE for r in rules)
        for _ in range(50):
            a = IPv4Address(0xC6130000 | rnd.getrandbits(11))
            hits = [r.src for r in rules if a in r.src]
            in_pool = any(a in r.pool for r in rules)
            longest_from = max((n.prefixlen for n in hits), default=None)
            kind = judged(nets, str(a))
            if kind == L.FROM_NET_POOL:
                assert in_pool
                assert not hits or max(n.prefixlen for n in nets if a in n) > longest_from
            elif hits:
                assert kind == L.FROM_NET_RULE
            else:
                assert kind is None and not in_pool  # every pool address is in (no cap here)



def _random_rules(rnd: random.Random) -> list[Rule]:
    """1-6 rules with random `from` nets (some covering 198.19.0.0/21, some not) and pools there."""
    rules = []
    for _ in range(rnd.randint(1, 6)):
        base = rnd.choice([0x00000000, 0xC6130000]) | rnd.getrandbits(11)
        src = IPv4Network((base, rnd.choice([0, 16, 21, 24, 28, 30, 31, 32])), strict=False)
        first = 0xC6130000 | rnd.getrandbits(10)
        rules.append(Rule(src=src, pool=Pool(IPv4Address(first), IPv4Address(first + rnd.randint(0, 40)))))
    return rules

def test_the_guard_tables_passes_are_exactly_what_the_trie_judges_a_pool():
    """rules.leak_guard_passes (the nft guard table's exemption on the bpf backend) holds an
    address iff the LPM trie's longest match for it is FROM_NET_POOL: the kernel-fragmented
    translated packet and the redirected one are judged alike."""
    assert [str(n) for n in leak_guard_passes([rule("0.0.0.0/0", "198.19.2.80-198.19.2.83"),
                                               rule("198.19.2.82/32", "198.19.2.71")])] == [
        "198.19.2.71/32", "198.19.2.80/31", "198.19.2.83/32"]  # fmt: skip
    assert leak_guard_passes([rule("198.18.0.0/16", "198.19.2.71-198.19.2.73")]) == []  # no pool inside a `from`
    rnd = random.Random(11)
    for _ in range(200):
        rules = _random_rules(rnd)
        nets, passes = leak_guard_nets(rules), leak_guard_passes(rules)
        for _ in range(60):
            a = IPv4Address(0xC6130000 | rnd.getrandbits(11))
            if any(a in r.src for r in rules):  # the guard table judges the `from` nets' sources
                assert any(a in p for p in passes) == (judged(nets, str(a)) == L.FROM_NET_POOL), (rules, a)
            else:
                assert not any(a in p for p in passes)


def test_pool_sources_are_exactly_the_addresses_the_trie_judges_a_pool():
    """rules.pool_sources (the nft backend's antispoof set) holds an address iff the LPM trie's
    longest match for it is FROM_NET_POOL, inside a `from` net or not: both backends refuse
    the same sources from inside (step 2a), a pool in no `from` net included."""
    assert [str(n) for n in pool_sources([rule("198.18.50.0/24", "198.18.40.200")])] == ["198.18.40.200/32"]
    assert leak_guard_passes([rule("198.18.50.0/24", "198.18.40.200")]) == []  # in no `from` net
    assert [str(n) for n in pool_sources([rule("0.0.0.0/0", "198.19.2.80-198.19.2.83"),
                                          rule("198.19.2.82/32", "198.19.2.71")])] == [
        "198.19.2.71/32", "198.19.2.80/31", "198.19.2.83/32"]  # fmt: skip
    rnd = random.Random(12)
    for _ in range(200):
        rules = _random_rules(rnd)
        nets, sources = leak_guard_nets(rules), pool_sources(rules)
        for _ in range(60):
            a = IPv4Address(0xC6130000 | rnd.getrandbits(11))
            assert any(a in p for p in sources) == (judged(nets, str(a)) == L.FROM_NET_POOL), (rules, a)
