"""Sessions over time: the TCP state machine through the engine, expiry per state with the
injected clock, table full and port exhaustion leaving nothing behind, reload and new_gw moves,
flush."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address as IP4

import pytest
from cases.corpus import FAILOVER_RULES, REF_ADDRESSES, REF_ROUTES, REF_RULES, REF_SETTINGS, ruleset
from cases.pkts import ISP2, R1, A, echo, tcp, udp

from snatgw.layout import CT_F_NEW_GW, CtState, Reason
from snatgw.model import Engine, StaticRouter
from snatgw.rules import Rule, RuleSet

NAT = "198.19.2.72"


def state(engine, now=0.0) -> str:
    (s,) = engine.sessions(now)
    return s.state


def out(engine, flags, sport=40000, now=0.0):
    return engine.process(tcp(A, R1, sport, 80, flags), "inside", "lan40", now)


def back(engine, flags, port=21541, now=0.0):
    return engine.process(tcp(R1, NAT, 80, port, flags), "outside", "eth1", now)


@pytest.mark.parametrize("steps,final", [
    ([("o", "S")], "SYN_RECV"),
    ([("o", "S"), ("b", "SA"), ("o", "A")], "ESTABLISHED"),
    ([("o", "S"), ("o", "A")], "ESTABLISHED"),  # IN_ONLY before any reply
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("o", "FA")], "CLOSE_WAIT"),
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("o", "FA"), ("b", "FA")], "TIME_WAIT"),
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("b", "FA")], "FIN_WAIT"),
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("b", "FA"), ("o", "FA")], "TIME_WAIT"),
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("b", "RA")], "CLOSE"),
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("o", "R")], "CLOSE"),
    ([("o", "S"), ("b", "RA")], "CLOSE"),
    ([("o", "S"), ("o", "F")], "TIME_WAIT"),  # IN_ONLY FIN from SYN_RECV
    ([("o", "S"), ("b", "SA"), ("o", "A"), ("o", "")], "CLOSE"),  # no flag: CLOSE
])  # fmt: skip
def test_tcp_state_machine_through_the_engine(engine, steps, final):
    """TCP sessions follow layout.TCP_FSM: IN_ONLY before a reply, IN after, OUT for replies."""
    for who, flags in steps:
        res = out(engine, flags) if who == "o" else back(engine, flags)
        assert res.reason in (Reason.XLATE_NEW, Reason.XLATE_OUT, Reason.XLATE_IN)
    assert state(engine) == final


@pytest.mark.parametrize("make,st,timeout", [
    (lambda e: out(e, "S"), "SYN_RECV", 240),
    (lambda e: (out(e, "S"), back(e, "SA"), out(e, "A")), "ESTABLISHED", 7440),
    (lambda e: (out(e, "S"), back(e, "SA"), out(e, "A"), out(e, "FA"), back(e, "FA")), "TIME_WAIT", 120),
    (lambda e: (out(e, "S"), back(e, "RA")), "CLOSE", 10),
    (lambda e: e.process(udp(A, R1, 5353, 53), "inside", "lan40", 0.0), "UDP", 300),
    (lambda e: e.process(echo(A, R1, 5), "inside", "lan40", 0.0), "ICMP", 60),
])  # fmt: skip
def test_expiry_per_state(engine, make, st, timeout):
    """A session lives exactly its state's timeout after its last packet, then expire() removes
    both of its keys."""
    make(engine)
    assert state(engine) == st
    assert engine.expire(float(timeout)) == 0 and len(engine.table) == 1
    assert engine.expire(timeout + 0.001) == 1
    assert len(engine.table) == 0 and engine.table.entries() == {}


def test_expiry_uses_last_packet_of_either_direction(engine):
    """A reply refreshes the session: expiry counts from the later of both directions."""
    addr, port = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0.0).nat
    assert engine.process(udp(R1, str(addr), 53, port), "outside", "eth1", 200.0).reason == Reason.XLATE_IN
    assert engine.expire(301.0) == 0
    assert engine.expire(500.5) == 1


def test_expired_session_still_translates_until_gc(engine):
    """Lookups never look at the clock: an overdue session translates until expire() runs."""
    engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0.0)
    assert engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 10_000.0).reason == Reason.XLATE_OUT


def test_custom_timeouts(engine):
    """Timeouts come from Settings (with_timeouts)."""
    e = Engine(ruleset(REF_RULES), REF_SETTINGS.with_timeouts(udp=5), StaticRouter.ref())
    e.process(udp(A, R1, 5353, 53), "inside", "lan40", 0.0)
    assert e.expire(5.0) == 0 and e.expire(5.5) == 1


def test_table_full_refuses_and_leaves_nothing(engine):
    """At max_sessions live sessions a new flow is dropped and no key of it is left."""
    e = Engine(ruleset(REF_RULES), replace(REF_SETTINGS, max_sessions=1), StaticRouter.ref())
    assert e.process(udp(A, R1, 1, 53), "inside", "lan40", 0).reason == Reason.XLATE_NEW
    before = e.table.entries()
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 0).reason == Reason.DROP_TABLE_FULL
    assert e.table.entries() == before
    e.expire(1000.0)
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 1000).reason == Reason.XLATE_NEW


def test_port_exhaustion_with_tiny_range():
    """With one SNAT port and `on_exhausted drop`, a second flow to the same remote endpoint is
    dropped (no other address is tried), but another remote port can reuse the port."""
    s = replace(REF_SETTINGS, port_min=6000, port_max=6000, on_exhausted="drop")
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    assert e.process(udp(A, R1, 1, 53), "inside", "lan40", 0).nat == (IP4(NAT), 6000)
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 0).reason == Reason.DROP_PORT_EXHAUSTED
    assert len(e.table) == 1
    assert e.process(udp(A, R1, 2, 54), "inside", "lan40", 0).nat == (IP4(NAT), 6000)


def test_spill_takes_the_pool_in_order_after_the_chosen_address():
    """sdh spills by default: with one SNAT port the chosen address (.72) is full after one
    flow, the next ones get .73, then .71 (wrapping), then the pool is exhausted."""
    e = Engine(ruleset(REF_RULES), replace(REF_SETTINGS, port_min=6000, port_max=6000), StaticRouter.ref())
    got = [e.process(udp(A, R1, sp, 53), "inside", "lan40", 0) for sp in (1, 2, 3, 4)]
    assert [r.nat for r in got[:3]] == [(IP4(a), 6000) for a in ("198.19.2.72", "198.19.2.73", "198.19.2.71")]
    assert got[3].reason == Reason.DROP_PORT_EXHAUSTED
    assert e.addr_live[IP4("198.19.2.72")].refusals == 1 and e.host_live[IP4(A)].refusals == 1
    assert {str(a): c.sessions for a, c in e.addr_live.items()} == {
        "198.19.2.71": 1, "198.19.2.72": 1, "198.19.2.73": 1}


def test_port_search_is_bounded_by_tries():
    """The search stops after port_tries candidates even when later ports are free."""
    s = replace(REF_SETTINGS, port_min=5000, port_max=5009, port_tries=1, on_exhausted="drop")
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    assert e.process(udp(A, R1, 100, 53), "inside", "lan40", 0).reason == Reason.XLATE_NEW
    assert e.process(udp(A, R1, 100 + 10 * 256, 53), "inside", "lan40", 0).reason == Reason.DROP_PORT_EXHAUSTED


def test_never_more_tries_than_ports_and_every_port_is_found():
    """With 10 ports and port_tries 1024, ten flows sharing a source port toward one endpoint
    all get a port (the sequence visits each port once) and the eleventh is refused."""
    s = replace(REF_SETTINGS, port_min=5000, port_max=5009, port_tries=1024, on_exhausted="drop")
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    hosts = [f"198.18.40.{i}" for i in range(10, 21)]
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": NAT})])
    e.apply(rules)
    got = [e.process(udp(h, R1, 123, 123), "inside", "lan40", 0) for h in hosts]
    assert sorted(r.nat[1] for r in got[:10]) == list(range(5000, 5010))
    assert got[10].reason == Reason.DROP_PORT_EXHAUSTED


def test_hosts_sharing_a_source_port_do_not_walk_one_sequence():
    """1,500 NTP-like hosts (source port 123) toward one server port through one address all
    get a port within 128 tries (the original's sequence refused host 1,025 onward)."""
    s = replace(REF_SETTINGS, port_tries=128, max_sessions=4096)
    rules = RuleSet([Rule.from_dict({"from": "198.18.0.0/16", "snat_ip": NAT})])
    # the hosts are routed back to lan40 (the reverse-path check): 198.18.32.0/19 on-link there
    router = StaticRouter(list(REF_ROUTES) + [("198.18.32.0/19", "lan40", None)],
                          {k: list(v) for k, v in REF_ADDRESSES.items()})
    e = Engine(rules, s, router)
    hosts = [IP4(int(IP4("198.18.40.0")) + i) for i in range(2, 1503) if i != 255]  # gateway, broadcast
    got = [e.process(udp(str(h), R1, 123, 123), "inside", "lan40", 0).reason for h in hosts]
    assert got.count(Reason.XLATE_NEW) == 1500


def test_refused_flow_is_remembered_then_searched_again():
    """A refused flow's next packets within REFUSED_SECS are DROP_REFUSED_RECENTLY (no search);
    after that it is searched again and gets a port that was freed."""
    s = replace(REF_SETTINGS, port_min=6000, port_max=6000, on_exhausted="drop")
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    e.process(udp(A, R1, 1, 53), "inside", "lan40", 0)
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 10).reason == Reason.DROP_PORT_EXHAUSTED
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 11).reason == Reason.DROP_REFUSED_RECENTLY
    assert e.host_live[IP4(A)].refusals == 1  # a marker hit is not another refusal
    e.flush()
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 11.5).reason == Reason.DROP_REFUSED_RECENTLY
    assert e.process(udp(A, R1, 2, 53), "inside", "lan40", 12).reason == Reason.XLATE_NEW


def test_host_limit_refuses_one_host_not_the_next():
    """max_sessions_per_host 2: the host's third flow is DROP_HOST_LIMIT, another host behind
    the same address still gets its flows; a rule's own limit wins over the global one."""
    s = replace(REF_SETTINGS, max_sessions_per_host=2)
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    got = [e.process(udp(A, R1, sp, 53), "inside", "lan40", 0).reason for sp in (1, 2, 3)]
    assert got == [Reason.XLATE_NEW, Reason.XLATE_NEW, Reason.DROP_HOST_LIMIT]
    assert e.process(udp("198.18.40.11", R1, 3, 53), "inside", "lan40", 0).reason == Reason.XLATE_NEW
    assert e.host_live[IP4(A)].sessions == 2 and e.host_live[IP4(A)].refusals == 1
    rules = [dict(REF_RULES[0]), dict(REF_RULES[1], max_sessions_per_host=0), dict(REF_RULES[2])]
    e2 = Engine(ruleset(rules), s, StaticRouter.ref())
    assert all(e2.process(udp(A, R1, sp, 53), "inside", "lan40", 0).reason == Reason.XLATE_NEW for sp in range(5))


def test_reload_keeps_sessions_whose_address_stays_in_the_pool(engine):
    """apply() of a widened pool keeps a live session with its mapping, now under the edited
    rule; new flows pick from the new pool."""
    engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0)
    rules = [REF_RULES[0], dict(REF_RULES[1], snat_ip="198.19.2.71-198.19.2.80"), REF_RULES[2]]
    assert engine.apply(ruleset(rules)) == 0
    res = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 1)
    assert (res.reason, res.nat[0]) == (Reason.XLATE_OUT, IP4(NAT))
    assert str(res.rule.pool) == "198.19.2.71-198.19.2.80"  # the session follows its edited rule


def test_reload_removes_sessions_whose_address_left_the_pool(engine):
    """A pool edit that drops a live session's SNAT address removes the session: its next
    datagram starts a new one from the new pool (spec "Rule changes and live sessions", turn 2)."""
    engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0)
    engine.process(udp(A, "198.51.100.10", 5353, 53), "inside", "lan40", 0)  # rule 1: untouched
    rules = [REF_RULES[0], dict(REF_RULES[1], snat_ip="198.19.2.80"), REF_RULES[2]]
    assert engine.apply(ruleset(rules)) == 1
    assert len(engine.table) == 1
    res = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 1)
    assert (res.reason, res.nat[0]) == (Reason.XLATE_NEW, IP4("198.19.2.80"))


def test_failover_edit_moves_a_udp_flow_to_the_backup_with_its_address(engine):
    """The failover edit (rule 2: new_gw 198.19.3.1 and ISP2's pool): the live UDP flow's session
    is removed, and its next datagram leaves by eth2 with an ISP2 address; the TCP session of
    the same rule is gone too (its next segment is no SYN: dropped, never leaked)."""
    first = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0)
    assert first.oif == "eth1" and str(first.nat[0]).startswith("198.19.2.")
    assert out(engine, "S").reason == Reason.XLATE_NEW
    assert engine.apply(ruleset(FAILOVER_RULES)) == 2
    res = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 1)
    assert (res.reason, res.oif, res.nexthop) == (Reason.XLATE_NEW, "eth2", IP4(ISP2))
    assert str(res.nat[0]).startswith("198.19.3.")
    assert out(engine, "A", now=1).reason == Reason.DROP_NO_SESSION
    # and back: the ISP2 address is outside the original pool again
    assert engine.apply(ruleset(REF_RULES)) == 1
    res = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 2)
    assert (res.reason, res.oif, str(res.nat[0])[:10]) == (Reason.XLATE_NEW, "eth1", "198.19.2.7")


def test_new_gw_change_moves_live_sessions_on_the_link_that_holds_their_address():
    """A new_gw edit to another next hop on the same uplink moves the rule's live sessions there
    at once, keeping their SNAT tuple; undoing it moves them back to the route."""
    router = StaticRouter(REF_ROUTES, {**REF_ADDRESSES})
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, router)
    first = out(e, "S")
    assert first.oif == "eth1"
    moved = [REF_RULES[0], dict(REF_RULES[1], new_gw="198.19.2.9"), REF_RULES[2]]
    assert e.apply(ruleset(moved)) == 0
    res = out(e, "A", now=1)
    assert (res.reason, res.oif, str(res.nexthop), res.nat) == (Reason.XLATE_OUT, "eth1", "198.19.2.9", first.nat)
    (pair,) = e.table.pairs()
    assert pair.out.flags & CT_F_NEW_GW
    assert e.apply(ruleset(REF_RULES)) == 0
    res = out(e, "A", now=2)
    assert (res.oif, str(res.nexthop)) == ("eth1", "198.19.2.1")
    assert not next(iter(e.table.pairs())).out.flags & CT_F_NEW_GW


def test_new_gw_move_to_a_link_without_the_address_removes_the_session(engine):
    """new_gw to ISP2 with ISP1's pool kept: eth2 does not hold the session's address, so the
    session goes; new flows of the rule still take the (operator's) ISP1 pool."""
    out(engine, "S")
    moved = [REF_RULES[0], dict(REF_RULES[1], new_gw="198.19.3.1"), REF_RULES[2]]
    assert engine.apply(ruleset(moved)) == 1 and len(engine.table) == 0


def test_new_gw_move_of_an_address_no_uplink_holds_keeps_the_session():
    """When no outside device holds the SNAT address (a routed pool on lo, say), nothing says the
    new link does not own it: the session moves and stays."""
    addrs = {k: [a for a in v if not a.startswith("198.19.2.7")] for k, v in REF_ADDRESSES.items()}
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter(REF_ROUTES, addrs))
    first = out(e, "S")
    assert e.apply(ruleset([REF_RULES[0], dict(REF_RULES[1], new_gw="198.19.3.1"), REF_RULES[2]])) == 0
    res = out(e, "A", now=1)
    assert (res.reason, res.oif, res.nat) == (Reason.XLATE_OUT, "eth2", first.nat)


def test_removed_rule_sessions_live_until_expiry(engine):
    """Deleting a rule keeps its sessions translating (as netfilter) until they expire."""
    engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0)
    engine.apply(ruleset([REF_RULES[0]]))
    assert engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 1).reason == Reason.XLATE_OUT
    assert engine.process(udp(A, R1, 5354, 53), "inside", "lan40", 1).reason == Reason.PASS_NO_RULE


def test_reload_with_settings_changes_table_size(engine):
    """apply() with settings takes the new limits for new flows."""
    engine.process(udp(A, R1, 1, 53), "inside", "lan40", 0)
    engine.apply(ruleset(REF_RULES), replace(REF_SETTINGS, max_sessions=1))
    assert engine.process(udp(A, R1, 2, 53), "inside", "lan40", 0).reason == Reason.DROP_TABLE_FULL


def test_flush_by_rule_and_all(engine):
    """flush(rule_id) removes only that rule's sessions; flush() removes the rest."""
    engine.process(udp(A, R1, 1, 53), "inside", "lan40", 0)  # rule 2
    engine.process(udp(A, "198.51.100.10", 1, 53), "inside", "lan40", 0)  # rule 1
    assert engine.flush(Rule.from_dict(REF_RULES[1]).rule_id) == 1
    assert len(engine.table) == 1
    assert engine.flush() == 1 and engine.table.entries() == {}


def test_flush_by_inside_and_by_snat_address(engine):
    """flush(inside=) removes that host's sessions; flush(nat=) those with that SNAT address;
    filters combine (all must hold)."""
    engine.process(udp(A, R1, 1, 53), "inside", "lan40", 0)
    b = engine.process(udp("198.18.40.11", R1, 1, 53), "inside", "lan40", 0)
    engine.process(udp("198.18.40.12", R1, 1, 53), "inside", "lan40", 0)
    assert engine.flush(inside=IP4(A), nat=IP4("198.19.3.99")) == 0
    assert engine.flush(inside=IP4(A)) == 1 and len(engine.table) == 2
    assert engine.flush(nat=b.nat[0]) >= 1
    assert all(s.nat.split(":")[0] != str(b.nat[0]) for s in engine.sessions(0))


def test_new_session_state_values(engine):
    """A new TCP session starts in SYN_RECV (first SYN through IN_ONLY from NONE)."""
    out(engine, "S")
    (pair,) = engine.table.pairs()
    assert pair.out.state == CtState.SYN_RECV and pair.inn.state == CtState.NONE


def test_empty_port_range_exhausts_instead_of_raising():
    """port_max < port_min gives no candidates: the new flow is DROP_PORT_EXHAUSTED."""
    e = Engine(ruleset(REF_RULES), replace(REF_SETTINGS, port_min=6001, port_max=6000), StaticRouter.ref())
    assert e.process(udp(A, R1, 1, 53), "inside", "lan40", 0).reason == Reason.DROP_PORT_EXHAUSTED


def test_entries_pack_to_the_bpf_layouts(engine):
    """Model keys and entries pack to struct ct_key / ct_entry bytes that unpack to the same
    fields (addresses and ports in wire order), as the BPF map holds them."""
    from snatgw.layout import CT_ENTRY, CT_KEY

    engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 2.0)
    (pair,) = engine.table.pairs()
    kb = pair.out_key.to_bytes()
    assert len(kb) == CT_KEY.size and kb[:4] == IP4(A).packed and kb[8:10] == (5353).to_bytes(2, "big")
    d = CT_ENTRY.unpack(pair.out.to_bytes({"eth1": 7, "lan40": 3}))
    assert (d["rw_addr"], d["rw_port"], d["ifindex"], d["nexthop"]) == (
        int(IP4(NAT)), pair.out.rw_port, 7, int(IP4("198.19.2.1")))
    assert (d["state"], d["last_seen"], d["mtu"]) == (CtState.UDP, 2_000_000_000, pair.out.mtu)
    # the IN entry: the route back found at creation, A itself (on-link), as the BPF fills it
    assert CT_ENTRY.unpack(pair.inn.to_bytes({"lan40": 3}))["nexthop"] == int(IP4(A))


def test_a_port_taken_between_lookup_and_insert_moves_the_search_on():
    """The race of two CPUs for one port (BPF: the lookup said free, the NOEXIST insert says
    EEXIST): the flow takes the next candidate, and nothing of it is left on the lost port."""
    from snatgw.model.conntrack import CtEntry, CtKey, CtTable
    from snatgw.rules import port_candidates, port_seed

    class Racing(CtTable):
        """Another CPU inserts the first IN key this search tries, just before it does."""

        def __init__(self, n):
            super().__init__(n)
            self.raced: CtKey | None = None

        def insert(self, key, entry):
            if key.dir == 1 and self.raced is None:
                self.raced = key
                super().insert(key, CtEntry(peer=key, rw_addr=key.saddr, rw_port=1, oif="x", nexthop=None,
                                            rule_id=0, mtu=1500, last_seen=0.0))  # fmt: skip
            return super().insert(key, entry)

    e = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    e.table = e.nat.ct = Racing(REF_SETTINGS.max_sessions)
    res = e.process(udp(A, R1, 40000, 53), "inside", "lan40", 0)
    first, second = list(port_candidates(40000, 5000, 65535, 2, port_seed(IP4(A), IP4(R1), 40000, 53, 17)))
    assert res.reason == Reason.XLATE_NEW and e.table.raced.dport == first and res.nat[1] == second
    assert e.table.lookup(e.table.raced).rw_port == 1  # the other CPU's entry, untouched


def test_expiry_recounts_the_live_counts_so_a_host_limit_frees_up():
    """As the bpf sweep: expire() counts sessions again, so a host at its limit gets new flows
    once its sessions have expired; a host left without sessions goes, refusals and all (the
    addresses keep theirs)."""
    s = replace(REF_SETTINGS, max_sessions_per_host=2)
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    for sp in (1, 2, 3):
        e.process(udp(A, R1, sp, 53), "inside", "lan40", 0)
    assert (e.host_live[IP4(A)].sessions, e.host_live[IP4(A)].refusals) == (2, 1)
    e.expire(400)  # UDP sessions idle 300 s expire
    assert IP4(A) not in e.host_live and sum(c.refusals for c in e.addr_live.values()) == 1
    assert sum(c.sessions for c in e.addr_live.values()) == 0 and sum(c.sessions for c in e.rule_live.values()) == 0
    assert e.process(udp(A, R1, 4, 53), "inside", "lan40", 400).reason == Reason.XLATE_NEW


def test_without_a_host_limit_hosts_are_counted_by_the_recount_only():
    """No rule has a host limit (host_counting off, CFG_F_HOST_COUNT clear): new sessions do not
    count for their host (the per-rule and per-address counts still do); a refusal does; the
    expiry's recount counts the hosts' sessions as of that moment."""
    e = Engine(ruleset(REF_RULES), replace(REF_SETTINGS, port_min=6000, port_max=6000), StaticRouter.ref())
    assert not e.host_counting
    got = [e.process(udp(A, R1, sp, 53), "inside", "lan40", 0).reason for sp in (1, 2, 3, 4)]
    assert got == [Reason.XLATE_NEW] * 3 + [Reason.DROP_PORT_EXHAUSTED]
    assert {str(h): (c.sessions, c.refusals) for h, c in e.host_live.items()} == {A: (0, 1)}
    assert sum(c.sessions for c in e.rule_live.values()) == 3 and sum(c.sessions for c in e.addr_live.values()) == 3
    e.expire(10)
    assert {str(h): (c.sessions, c.refusals) for h, c in e.host_live.items()} == {A: (3, 1)} and e.counted_at == 10
    e.process(udp("198.18.40.11", R1, 9, 54), "inside", "lan40", 11)  # a new host: not counted until the next
    assert IP4("198.18.40.11") not in e.host_live


def test_a_host_limit_turned_on_by_reload_judges_a_recounted_count():
    """apply() that brings the first host limit recounts before the limit judges: A's three
    sessions made while nobody counted them count, so A's next flow is refused at limit 3, B
    still gets its flow; when the limit goes again counting stops (the counts stay as they were)."""
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    for sp in (1, 2, 3):
        assert e.process(udp(A, R1, sp, 53), "inside", "lan40", 0).reason == Reason.XLATE_NEW
    assert IP4(A) not in e.host_live
    e.apply(ruleset([REF_RULES[0], dict(REF_RULES[1], max_sessions_per_host=3), REF_RULES[2]]))
    assert e.host_counting and e.host_live[IP4(A)].sessions == 3
    assert e.process(udp(A, R1, 4, 53), "inside", "lan40", 1).reason == Reason.DROP_HOST_LIMIT
    assert e.process(udp("198.18.40.11", R1, 4, 53), "inside", "lan40", 1).reason == Reason.XLATE_NEW
    assert {str(h): (c.sessions, c.refusals) for h, c in e.host_live.items()} == {A: (3, 1), "198.18.40.11": (1, 0)}
    e.apply(ruleset(REF_RULES))
    assert not e.host_counting
    assert e.process(udp(A, R1, 5, 53), "inside", "lan40", 2).reason == Reason.XLATE_NEW
    assert e.host_live[IP4(A)].sessions == 3  # no longer counted: the next recount says 4


def _memo_engine(**kw):
    s = replace(REF_SETTINGS, port_min=6000, port_max=6003, **kw)  # 4 ports: 4 tries per address
    return Engine(ruleset(REF_RULES), s, StaticRouter.ref())


def memo_steps():
    """A's flows to R1:53 over 4 SNAT ports (sport m * 256: first candidate 6000 + (m + 1) % 4),
    with sessions removed between them: (kind, sport or None, now) -> what the test expects."""
    return [
        ("flow", 1024, 10.0), ("flow", 1280, 10.0), ("flow", 1536, 10.0), ("flow", 1792, 10.0),  # .72 full
        ("flow", 2048, 10.0),  # .72 searched in full: a memo; .73
        ("remove", 1536, 10.2),  # frees .72:6003
        ("flow", 2304, 10.5),  # first candidate 6002 taken, memo young: .73 (6003 not found)
        ("remove", 1280, 10.6),  # frees .72:6002
        ("flow", 3328, 10.7),  # first candidate 6002 free: taken, memo or not
        ("flow", 2816, 11.0),  # memo expired: searched in full, 6003 found
    ]


def run_memo_steps(e) -> list:
    from snatgw.model.conntrack import out_key

    got = []
    for kind, sport, now in memo_steps():
        if kind == "remove":
            e.table.remove(out_key(IP4(A), IP4(R1), sport, 53, 17))
            continue
        r = e.process(udp(A, R1, sport, 53), "inside", "lan40", now)
        got.append((r.reason, r.nat and (str(r.nat[0]), r.nat[1])))
    return got


def test_spill_memo_costs_a_freed_port_but_never_a_freed_first_candidate():
    """docs/datapath.md step 13: while .72's memo is young a port freed there is not found by a
    flow whose first candidate is taken (it spills: the memo's cost in accuracy); a freed first
    candidate is still taken; once the memo is 1 s old the address is searched in full again."""
    e = _memo_engine()
    got = run_memo_steps(e)
    X = Reason.XLATE_NEW
    assert got == [(X, (NAT, 6001)), (X, (NAT, 6002)), (X, (NAT, 6003)), (X, (NAT, 6000)),
                   (X, ("198.19.2.73", got[4][1][1])), (X, ("198.19.2.73", got[5][1][1])),
                   (X, (NAT, 6002)), (X, (NAT, 6003))]  # fmt: skip
    assert (e.spill.hits, e.spill.written) == (1, 1)


def test_spill_memo_map_full_never_refuses():
    """An LRU memo map of one entry (losing memos) changes no flow's outcome, only the tries."""
    from snatgw.model.nat import SpillMemos

    ref, small = _memo_engine(), _memo_engine()
    small.spill = SpillMemos(size=1)
    pkts = [(sp, 53 + sp % 2) for sp in range(1, 40)]  # two remote ports: two memos fight for one entry
    a = [ref.process(udp(A, R1, sp, dp), "inside", "lan40", 5.0) for sp, dp in pkts]
    b = [small.process(udp(A, R1, sp, dp), "inside", "lan40", 5.0) for sp, dp in pkts]
    assert [(r.reason, r.nat) for r in a] == [(r.reason, r.nat) for r in b]
    assert len(small.spill.memos) == 1 and small.spill.written > ref.spill.written
    assert sum(r.reason == Reason.DROP_PORT_EXHAUSTED for r in a) == 39 - 2 * 12  # 3 addresses x 4 ports


def test_spill_memo_leaves_endpoint_independent_rules_alone():
    """mapping endpoint-independent (TCP, UDP): its searches neither read nor write memos."""
    rules = RuleSet([Rule.from_dict({"from": "198.18.0.0/16", "snat_ip": NAT, "algo": "sh",
                                     "mapping": "endpoint-independent"})])  # fmt: skip
    e = Engine(rules, replace(REF_SETTINGS, port_min=6000, port_max=6001), StaticRouter.ref())
    got = [e.process(udp(A, R1, sp, 53), "inside", "lan40", 1.0).reason for sp in (1, 2, 3, 4)]
    assert got == [Reason.XLATE_NEW] * 2 + [Reason.DROP_PORT_EXHAUSTED] * 2
    assert e.spill.memos == {} and (e.spill.hits, e.spill.written) == (0, 0)


def _alloc(e) -> tuple[int, int]:
    a = e.alloc_counts()
    return a["port_searches"], a["port_search_tries"]


def test_port_search_counts_step_by_step():
    """docs/datapath.md step 13's search counters after each step of the corpus scenario
    port_search_counts: an uncontended flow 1 try, a taken first candidate 2, a full address
    (memo) then a spill 3, a memo skip no try, an established packet no search."""
    from cases.corpus import SCENARIOS

    sc = next(s for s in SCENARIOS if s.name == "port_search_counts")
    e = sc.make_engine()
    got = []
    for i, st in enumerate(sc.steps):
        e.process(st.packet, st.side, st.ingress, st.when(i), for_us=st.for_us)
        got.append(_alloc(e))
    assert got == [(1, 1), (2, 3), (3, 6), (4, 9), (4, 9), (5, 10)]
    assert (e.spill.hits, e.spill.written) == (1, 1)


def test_refusals_before_the_search_count_none():
    """A host-limit refusal, a refusal marker's drop and a packet that cannot start a session
    run no port search; a refused search counts its tries; zero_alloc_counts clears all four."""
    e = Engine(ruleset(REF_RULES), replace(REF_SETTINGS, max_sessions_per_host=1, port_min=6000, port_max=6000,
                                           on_exhausted="drop"), StaticRouter.ref())  # fmt: skip
    steps = [(udp(A, R1, 1, 53), Reason.XLATE_NEW), (udp(A, R1, 2, 53), Reason.DROP_HOST_LIMIT),
             (udp(A, R1, 2, 53), Reason.DROP_REFUSED_RECENTLY), (tcp(A, R1, 3, 80, "A"), Reason.DROP_NO_SESSION),
             (udp("198.18.40.11", R1, 1, 53), Reason.DROP_PORT_EXHAUSTED)]  # fmt: skip
    assert [e.process(p, "inside", "lan40", 1.0).reason for p, _ in steps] == [r for _, r in steps]
    assert _alloc(e) == (2, 2)  # A's first flow; .11's (sdh: A's address, its one port taken, refused)
    e.zero_alloc_counts()
    assert set(e.alloc_counts().values()) == {0}


def test_a_redirected_packet_leaves_without_link_padding():
    """Padding after the IP total length is cut from what is redirected (as the kernel cuts it
    before forwarding), and only that: the translated bytes are the unpadded packet's."""
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    pkt = udp(A, R1, 7, 53)
    plain = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref()).process(pkt, "inside", "lan40", 0)
    res = e.process(pkt + b"\xaa" * 6, "inside", "lan40", 0)
    assert res.reason == Reason.XLATE_NEW and res.packet == plain.packet and len(res.packet) == len(pkt)
