"""datapath/bpf/synctable.judge without a datapath: what a record must fit, and its cost with a
large rule set (it runs for every record the peer sends, its refresh walk included)."""

from __future__ import annotations

import ipaddress
import random
import socket
import time

from snatgw import layout as L
from snatgw.config.parse import parse_text
from snatgw.daemon import synccodec as C
from snatgw.datapath.bpf import synctable as T
from snatgw.layout import IPPROTO_ICMP, IPPROTO_UDP, CtState
from snatgw.rules import Route

N = 10_000


def _config():
    rules = "".join(f"  snat_rule {{ from 10.{i // 256}.{i % 256}.0/24  snat_ip 198.19.{i // 250}.{i % 250 + 1} }}\n"
                    for i in range(N))  # fmt: skip
    return parse_text("snatgw {\n    inside lan0\n    outside wan0\n    port_range 5000-65535\n    backend bpf\n}\n"
                      "virtual_server fwmark 1 {\n" + rules + "}\n")  # fmt: skip


def test_judge_with_10000_rules_is_one_look_up_a_record_not_a_scan_of_every_pool():
    """The hairpin check (the remote one of our pool addresses) was a scan of every rule's pool,
    5 ms a record with 10,000 rules: a peer's walk of 10,000 sessions a minute of the worker.
    Each record is judged the same, in microseconds now."""
    cfg = _config()
    rules = {r.rule_id: r for r in cfg.rules}
    pools = {r.rule_id: r.pool for r in cfg.rules}
    rule = next(r for r in cfg.rules if str(r.src) == "10.0.7.0/24")

    def rec(remote: str, nport: int = 6000):
        return C.Record(C.OP_UPDATE, IPPROTO_UDP, int(CtState.UDP), 0, socket.inet_aton("10.0.7.9"), 40000,
                        socket.inet_aton(remote), 53, socket.inet_aton(str(rule.pool.first)), nport, rule.rule_id, 0)

    assert T.judge(rec("203.0.113.10"), rules, pools, cfg.settings) is not None
    for hairpin in ("198.19.0.1", "198.19.39.250", "198.19.20.7"):  # first, last, between: pool addresses
        assert T.judge(rec(hairpin), rules, pools, cfg.settings) is None, hairpin
    assert T.judge(rec("198.19.40.1"), rules, pools, cfg.settings) is not None  # past the last pool
    assert T.judge(rec("203.0.113.10", nport=80), rules, pools, cfg.settings) is None  # not in port_range
    # a bound far from both (judged here ~8 us a record, the scan 5 ms): the two pytest runs of
    # `make test` side by side must not make a CPU's slow moment look like a scan
    t = time.perf_counter()
    for i in range(3000):
        assert T.judge(rec(f"203.0.113.{i % 250 + 1}"), rules, pools, cfg.settings) is not None
    took = time.perf_counter() - t
    assert took < 3.0, f"{took:.2f} s for 3,000 records (a scan of every pool: ~15 s)"


def test_judge_rejects_what_is_not_carried():
    """ICMP queries are not carried (docs/operations.md): the peer never sends them, and a record
    of one (a key holder's, another version's) is rejected like any record no rule allows."""
    cfg = _config()
    rules = {r.rule_id: r for r in cfg.rules}
    pools = {r.rule_id: r.pool for r in cfg.rules}
    rule = next(iter(cfg.rules))
    base = C.Record(C.OP_UPDATE, IPPROTO_UDP, int(CtState.UDP), 0, socket.inet_aton("10.0.0.9"), 40000,
                    socket.inet_aton("203.0.113.10"), 53, socket.inet_aton(str(rule.pool.first)), 6000, rule.rule_id, 0)
    assert T.judge(base, rules, pools, cfg.settings) is not None
    icmp = base._replace(proto=IPPROTO_ICMP, state=int(CtState.ICMP))
    assert T.judge(icmp, rules, pools, cfg.settings) is None


def _rules(text: str):
    return parse_text("snatgw {\n    inside lan0\n    outside lo\n    port_range 5000-65535\n    backend bpf\n}\n"
                      "virtual_server fwmark 1 {\n" + text + "}\n").rules  # fmt: skip


def test_first_is_match_over_many_random_rule_sets():
    """RuleSet.first (an index) answers what RuleSet.match (the datapath's order: a walk of
    every rule) does, for rules of every kind of condition and flows in and out of them."""
    rnd = random.Random(7)
    nets = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "10.2.0.0/16", "203.0.113.0/24",
            "203.0.113.128/25", "203.0.113.10/32"]  # fmt: skip
    for _ in range(60):
        lines, seen = [], set()
        for _ in range(rnd.randrange(1, 25)):
            src, dst = rnd.choice(nets), rnd.choice(nets)
            gw = rnd.choice([None, "192.0.2.1", "192.0.2.2"])
            oif = rnd.choice([None, "lo", "wan1"])
            if (src, dst, gw, oif) in seen:
                continue
            seen.add((src, dst, gw, oif))
            lines.append(f"  snat_rule {{ from {src}  to {dst}" + (f"  gw {gw}" if gw else "")
                         + (f"  oif {oif}" if oif else "") + "  snat_ip 198.51.100.1 }\n")  # fmt: skip
        rs = _rules("".join(lines))
        for _ in range(40):
            src = ipaddress.IPv4Address(rnd.choice(["10.1.2.3", "10.1.2.9", "10.1.9.9", "10.2.3.4", "10.9.9.9",
                                                    "203.0.113.10", "192.168.1.1"]))  # fmt: skip
            dst = ipaddress.IPv4Address(rnd.choice(["203.0.113.10", "203.0.113.200", "203.0.113.5", "10.1.2.3",
                                                    "8.8.8.8"]))  # fmt: skip
            route = Route(rnd.choice(["lo", "wan1", "wan2"]), ipaddress.IPv4Address(rnd.choice(["192.0.2.1",
                                                                                                "192.0.2.2"])))
            assert rs.first(src, dst, route) is rs.match(src, dst, route), (lines, src, dst, route)


def test_first_with_10000_rules_is_an_index_not_a_walk():
    """A peer's record asks it for each record: 10,000 rules walked were 40 ms a record."""
    cfg = _config()
    route = Route("wan0", ipaddress.IPv4Address("192.0.2.1"))
    t = time.perf_counter()
    for i in range(1000):
        src = ipaddress.IPv4Address(f"10.{(i * 7) // 256 % 40}.{(i * 7) % 256}.9")
        assert cfg.rules.first(src, ipaddress.IPv4Address("203.0.113.10"), route).src.network_address == \
            ipaddress.IPv4Address(f"10.{(i * 7) // 256 % 40}.{(i * 7) % 256}.0")
    took = time.perf_counter() - t
    assert took < 4.0, f"{took:.2f} s for 1,000 (here ~25 ms; a walk of the rules: ~40 s)"


def test_routed_as_rule_wants_the_rule_the_datapath_would_choose():
    """The record's rule must be the first match with the routes here: a more specific rule
    before it takes the flow (other_rule), none with the route's device (no_rule)."""
    rs = _rules("  snat_rule { from 10.0.0.0/8  oif lo  snat_ip 198.51.100.1 }\n"
                "  snat_rule { from 10.1.0.0/16  snat_ip 198.51.100.2 }\n"
                "  snat_rule { from 10.9.0.0/16  to 203.0.113.0/24  oif wan9  snat_ip 198.51.100.3 }\n")  # fmt: skip
    wide = next(r for r in rs if str(r.src) == "10.0.0.0/8")
    narrow = next(r for r in rs if str(r.src) == "10.1.0.0/16")
    oif9 = next(r for r in rs if r.oif == "wan9")
    roles = {1: L.IFACE_OUTSIDE, 2: L.IFACE_INSIDE}
    rt, back = (1, ipaddress.IPv4Address("192.0.2.1"), 1500), (2, ipaddress.IPv4Address("10.1.2.3"), 1500)
    a = ipaddress.IPv4Address
    remote = a("203.0.113.10")
    assert T.routed_as_rule(wide, rs, a("10.2.0.1"), remote, rt, back, roles) is None
    assert T.routed_as_rule(wide, rs, a("10.1.2.3"), remote, rt, back, roles) == "other_rule"
    assert T.routed_as_rule(narrow, rs, a("10.1.2.3"), remote, rt, back, roles) is None
    assert T.routed_as_rule(oif9, rs, a("10.9.0.1"), remote, rt, back, roles) == "other_rule"  # wide's, via lo
    assert T.routed_as_rule(oif9, _rules("  snat_rule { from 10.9.0.0/16  oif wan9  snat_ip 198.51.100.3 }\n"),
                            a("10.9.0.1"), remote, rt, back, roles) == "no_rule"  # fmt: skip
    assert T.routed_as_rule(wide, rs, a("10.2.0.1"), remote, rt, back, {1: L.IFACE_INSIDE}) == "rejected"


class _Map:
    def __init__(self, counts: dict):
        self.d = {socket.inet_aton(k): L.LIVE_COUNT.pack(sessions=v, refusals=5) for k, v in counts.items()}

    def get(self, k):
        return self.d.get(k)


def test_host_counts_follow_the_installs_and_ends_and_add_installs_while_the_datapath_counts():
    """A host at its limit is full; each install adds one, to the map too (by ``add``: the sweep
    object's atomic add; the datapath's count, which a later job and the host's next new flow
    read) while CFG_F_HOST_COUNT is on; an end lowers the job's count only (the sweep recounts
    the map)."""
    m = _Map({"10.0.0.1": 1})
    maps = type("M", (), {"maps": {L.MAP_HOST_SESS: m}})()
    added = []
    h = T.HostCounts(maps, counting=True, add=lambda host, n: added.append((host, n)))
    one, two = socket.inet_aton("10.0.0.1"), socket.inet_aton("10.0.0.2")
    assert not h.full(one, 2) and not h.full(one, 0) and not h.full(two, 1)
    h.add(one)
    assert h.full(one, 2) and not h.full(one, 0) and not h.full(one, 3)
    assert added == [(one, 1)]
    h.ended(one)
    assert not h.full(one, 2) and added == [(one, 1)]
    T.HostCounts(maps, counting=False, add=lambda host, n: added.append((host, n))).add(two)
    assert added == [(one, 1)]
