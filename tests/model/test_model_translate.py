"""Hand-written cases for the numbered steps: what a translated packet looks like, which rule
and egress a flow gets, and the spec's selection vectors."""

from __future__ import annotations

from ipaddress import IPv4Address as IP4

import pytest
from cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from cases.pkts import ISP1, ISP2, R1, R2, STRANGER, A, B, C, echo, other_proto, tcp, udp, with_options
from scapy_oracle import problems
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from snatgw.layout import CT_F_NEW_GW, Algo, Reason, Verdict
from snatgw.model import Engine, StaticRouter
from snatgw.rules import Pool, Rule, RuleSet, port_candidates, select_addr


def run(engine, pkt, side="inside", dev="lan40", now=0.0):
    return engine.process(pkt, side, dev, now)


def test_new_tcp_flow_rewrites_source_ttl_and_checksums(engine):
    """A SYN from A to R1 leaves as 198.19.2.72:21541 (sdh rule, first port candidate), TTL-1,
    valid checksums, redirected to eth1 via 198.19.2.1."""
    res = run(engine, tcp(A, R1, 40000, 80, "S", ttl=64))
    out = IP(res.packet)
    assert (res.verdict, res.reason) == (Verdict.REDIRECT, Reason.XLATE_NEW)
    assert (out.src, out[TCP].sport, out.dst, out[TCP].dport, out.ttl) == ("198.19.2.72", 21541, R1, 80, 63)
    assert (res.oif, res.nexthop) == ("eth1", IP4(ISP1))
    assert res.nat == (IP4("198.19.2.72"), 21541)
    assert res.rule.identity == Rule.from_dict(REF_RULES[1]).identity
    assert problems(res.packet) == []


def test_reply_translates_back_to_the_original_tuple(engine):
    """The reply to the SNAT tuple reaches A:40000 on lan40 with TTL-1 and valid checksums, sent
    to the session's route back: A itself, on-link."""
    run(engine, tcp(A, R1, 40000, 80, "S"))
    res = run(engine, tcp(R1, "198.19.2.72", 80, 21541, "SA", ttl=50), "outside", "eth1")
    out = IP(res.packet)
    assert (res.verdict, res.reason, res.oif, res.nexthop) == (Verdict.REDIRECT, Reason.XLATE_IN, "lan40", IP4(A))
    assert (out.src, out[TCP].sport, out.dst, out[TCP].dport, out.ttl) == (R1, 80, A, 40000, 49)
    assert problems(res.packet) == []


def test_spec_selection_vectors():
    """The spec's vectors (pool 1.1.2.100-110) hold for select_addr and the port search."""
    pool = Pool(IP4("1.1.2.100"), IP4("1.1.2.110"))
    a10, a11, g = IP4("192.168.40.10"), IP4("192.168.40.11"), IP4("8.8.8.8")
    assert select_addr(pool, Algo.SH, a10, g, 0) == IP4("1.1.2.100")
    assert select_addr(pool, Algo.SH, a11, g, 0) == IP4("1.1.2.109")
    assert select_addr(pool, Algo.SDH, a10, g, 0) == IP4("1.1.2.106")
    assert select_addr(pool, Algo.SDH, a11, g, 0) == IP4("1.1.2.103")
    assert select_addr(pool, Algo.RANDOM, a10, g, 40000) == IP4("1.1.2.105")
    assert next(iter(port_candidates(40000, 5000, 65535, 1))) == 21541
    assert next(iter(port_candidates(1024, 5000, 65535, 1))) == 5005


@pytest.mark.parametrize("src,dst,dev,proto_sport,want_addr,want_oif,want_nh", [
    (A, R1, "lan40", 40000, "198.19.2.72", "eth1", ISP1),  # rule 2, sdh
    (B, R1, "lan40", 40000, "198.19.2.72", "eth1", ISP1),  # rule 2, sdh
    (A, R2, "lan40", 40000, "198.19.3.73", "eth2", ISP2),  # rule 1, random
    (B, R2, "lan40", 40000, "198.19.3.72", "eth2", ISP2),  # rule 1, random
    (C, R2, "lan50", 40000, "198.19.2.72", "eth1", ISP1),  # rule 3, sh, new_gw beats the route
    ("198.18.50.11", R1, "lan50", 40000, "198.19.2.72", "eth1", ISP1),  # rule 3, sh
])  # fmt: skip
def test_ref_rules_pick_pool_address_and_egress(engine, src, dst, dev, proto_sport, want_addr, want_oif, want_nh):
    """Each REF rule chooses its pool's address by its algorithm (the spec's vectors mapped onto
    REF) and its egress (route, or new_gw)."""
    res = run(engine, udp(src, dst, proto_sport, 53), dev=dev)
    assert res.reason == Reason.XLATE_NEW
    assert (str(res.nat[0]), res.oif, str(res.nexthop)) == (want_addr, want_oif, want_nh)


def test_new_gw_session_is_flagged(engine):
    """A session made by a new_gw rule carries CT_F_NEW_GW in its OUT entry."""
    run(engine, udp(C, R2, 1, 2), dev="lan50")
    (pair,) = engine.table.pairs()
    assert pair.out.flags & CT_F_NEW_GW


def test_rule_conditions_oif_and_gw_both_must_hold():
    """A rule naming oif and gw matches only when both hold (gw compared with the route's next
    hop); one naming only gw matches any device."""
    rules = RuleSet([
        Rule.from_dict({"from": "198.18.40.0/24", "oif": "eth2", "gw": "198.19.2.1", "snat_ip": "198.19.3.71"}),
        Rule.from_dict({"from": "198.18.40.0/24", "gw": "198.19.3.1", "snat_ip": "198.19.3.72"}),
    ])  # fmt: skip
    e = Engine(rules, REF_SETTINGS, StaticRouter.ref())
    assert e.process(udp(A, R1, 1, 2), "inside", "lan40", 0).reason == Reason.PASS_NO_RULE
    res = e.process(udp(A, R2, 1, 2), "inside", "lan40", 0)
    assert str(res.nat[0]) == "198.19.3.72"


def test_no_route_passes():
    """A destination the FIB cannot reach is left to the kernel (PASS_NO_ROUTE)."""
    router = StaticRouter([("198.51.100.0/24", "eth2", "198.19.3.1"), ("203.0.113.0/24", "blackhole", None)],
                          {"lan40": ["198.18.40.1/24"], "eth2": ["198.19.3.2/24"]})  # fmt: skip
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, router)
    assert e.process(udp(A, "192.0.2.200", 1, 2), "inside", "lan40", 0).reason == Reason.PASS_NO_ROUTE
    assert e.process(udp(A, R1, 1, 2), "inside", "lan40", 0).reason == Reason.PASS_NO_ROUTE
    assert e.process(udp(A, R2, 1, 2), "inside", "lan40", 0).reason == Reason.XLATE_NEW


def test_new_gw_unreachable_or_off_link():
    """new_gw with no route passes (PASS_NO_ROUTE); an off-link new_gw is reached through its
    route's gateway and device."""
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "new_gw": "192.0.2.77", "snat_ip": "198.19.3.71"})])
    router = StaticRouter([("192.0.2.0/24", "eth2", "198.19.3.1"), ("203.0.113.0/24", "eth1", "198.19.2.1")],
                          {"lan40": ["198.18.40.1/24"], "eth1": ["198.19.2.2/24"], "eth2": ["198.19.3.2/24"]})
    res = Engine(rules, REF_SETTINGS, router).process(udp(A, R1, 1, 2), "inside", "lan40", 0)
    assert (res.reason, res.oif, str(res.nexthop)) == (Reason.XLATE_NEW, "eth2", "198.19.3.1")
    lonely = StaticRouter([("203.0.113.0/24", "eth1", "198.19.2.1")], {"lan40": ["198.18.40.1/24"]})
    e = Engine(rules, REF_SETTINGS, lonely)
    res = e.process(udp(A, R1, 1, 2), "inside", "lan40", 0)
    assert (res.verdict, res.reason) == (Verdict.PASS, Reason.PASS_NO_ROUTE)
    assert len(e.table) == 0


def test_echo_identifier_translated_and_restored(engine):
    """Two hosts pinging R1 with one identifier through one SNAT address get distinct SNAT
    identifiers; each reply returns to its host with its own identifier."""
    r1 = run(engine, echo(A, R1, 7))
    r2 = run(engine, echo(B, R1, 7))
    assert r1.nat[0] == r2.nat[0] and r1.nat[1] != r2.nat[1]
    assert IP(r1.packet)[ICMP].id == r1.nat[1] and problems(r1.packet) == []
    back = run(engine, echo(R1, str(r2.nat[0]), r2.nat[1], reply=True), "outside", "eth1")
    out = IP(back.packet)
    assert (out.dst, out[ICMP].id, back.reason) == (B, 7, Reason.XLATE_IN)
    assert problems(back.packet) == []


def test_udp_zero_checksum_stays_zero_and_nonzero_verifies(engine):
    """UDP with checksum 0 leaves with 0; with a checksum it verifies after translation."""
    z = run(engine, udp(A, R1, 5353, 53, zero_csum=True))
    assert IP(z.packet)[UDP].chksum == 0
    n = run(engine, udp(A, R1, 5354, 53))
    assert IP(n.packet)[UDP].chksum != 0 and problems(n.packet) == []


def test_wrong_checksum_stays_wrong(engine):
    """A TCP segment with a wrong checksum still has one after translation (never recomputed)."""
    good = tcp(A, R1, 40000, 80, "S")
    bad = good[:36] + bytes([good[36] ^ 0x01]) + good[37:]
    res = run(engine, bad)
    assert res.reason == Reason.XLATE_NEW and any(p.startswith("tcp") for p in problems(res.packet))


def test_ip_options_are_kept(engine):
    """IP options survive translation byte for byte and the header checksum still verifies."""
    pkt = with_options(tcp(A, R1, 40000, 80, "S"))
    res = run(engine, pkt)
    assert res.packet[20:24] == pkt[20:24] and IP(res.packet)[TCP].sport == 21541
    assert problems(res.packet) == []


def test_counters_per_reason_and_rule(engine):
    """Every packet counts one reason; a session's rule counts its translated packets and bytes
    both ways and one session."""
    syn = tcp(A, R1, 40000, 80, "S")
    run(engine, syn)
    run(engine, tcp(R1, "198.19.2.72", 80, 21541, "SA"), "outside", "eth1")
    run(engine, other_proto(STRANGER, R1))
    rid = Rule.from_dict(REF_RULES[1]).rule_id
    c = engine.rule_stats[rid]
    assert (c.packets, c.bytes, c.sessions) == (2, 80, 1)
    assert engine.reasons == {Reason.XLATE_NEW: 1, Reason.XLATE_IN: 1, Reason.PASS_NO_RULE: 1}


def test_sessions_report(engine):
    """sessions() lists inside, remote and SNAT tuples, state, idle and expiry; packets and
    bytes are counted per rule, not per session (None: not counted, as in the BPF datapath)."""
    run(engine, tcp(A, R1, 40000, 80, "S"), now=10.0)
    run(engine, tcp(R1, "198.19.2.72", 80, 21541, "SA"), "outside", "eth1", now=11.0)
    (s,) = engine.sessions(15.0)
    assert (s.proto, s.inside, s.remote, s.nat, s.state) == ("tcp", f"{A}:40000", f"{R1}:80",
                                                             "198.19.2.72:21541", "SYN_RECV")
    assert (s.idle, s.expires) == (4.0, 236.0)
    assert (s.packets_out, s.bytes_out, s.packets_in, s.bytes_in) == (None, None, None, None)
    assert "packets_out" not in s.as_dict() and "bytes_in" not in s.as_dict()  # absent, not a made-up 0
    c = engine.rule_stats[s.rule_id]
    assert (c.packets, c.bytes) == (2, 80)


def test_pass_and_drop_leave_bytes_untouched(engine):
    """PASS and DROP results carry the input bytes unchanged."""
    for pkt in (tcp("192.0.2.50", R1, 1, 2, "S"), tcp(A, R1, 1, 2, "A"), other_proto("192.0.2.50", R1),
                other_proto(R2, R1)):
        res = run(engine, pkt)
        assert res.verdict in (Verdict.PASS, Verdict.DROP) and res.packet == pkt


def test_bad_side_is_a_programming_error(engine):
    """An unknown side name raises ValueError (not a packet outcome)."""
    with pytest.raises(ValueError, match="side"):
        engine.process(tcp(A, R1, 1, 2), "sideways", "lan40", 0)


def test_checksum_corner_scenario_outputs():
    """The corpus's checksum corners: a UDP translation summing to zero is sent as 0xFFFF both
    ways; a TCP checksum spelled 0x0000 or 0xFFFF gives identical output bytes."""
    from cases.corpus import SCENARIOS

    sc = next(s for s in SCENARIOS if s.name == "checksum_corners")
    e = sc.make_engine()
    outs = [e.process(st.packet, st.side, st.ingress, st.when(i), for_us=st.for_us).packet for i, st in enumerate(sc.steps)]
    assert outs[0][26:28] == outs[1][26:28] == b"\xff\xff"
    assert outs[2][36:38] == b"\x00\x00"
    assert outs[3] == outs[4]
    assert [p[:3] for p in problems(outs[5])] == ["ip "]  # the wrong IP checksum stays wrong


def _ones(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _pseudo_sum_ok(pkt: bytes) -> bool:
    """The L4 checksum of a UDP-Lite/DCCP-like datagram (full coverage) over its pseudo-header."""
    l4 = pkt[20:]
    pseudo = pkt[12:20] + bytes([0, pkt[9]]) + len(l4).to_bytes(2, "big")
    return _ones(pseudo + l4) == 0xFFFF


@pytest.mark.parametrize("proto", [136, 33])
def test_udplite_and_dccp_keep_a_valid_pseudo_header_checksum(engine, proto):
    """Address-only translation of UDP-Lite and DCCP adjusts their own checksum, which covers the
    addresses; the reply comes back with a valid one too."""
    body = bytearray(b"\x13\x88\x00\x35\x00\x00\x00\x00" + b"lite-payload")  # ports, coverage 0, sum
    hdr = bytes(IP(src=A, dst=R1, proto=proto) / Raw(bytes(body)))[:20]
    pseudo = hdr[12:20] + bytes([0, proto]) + len(body).to_bytes(2, "big")
    body[6:8] = (0xFFFF - _ones(pseudo + bytes(body))).to_bytes(2, "big")
    pkt = hdr + bytes(body)
    assert _pseudo_sum_ok(pkt)
    out = run(engine, pkt)
    assert out.reason == Reason.XLATE_NEW and _pseudo_sum_ok(out.packet)
    nat = str(out.nat[0])
    rhdr = bytes(IP(src=R1, dst=nat, proto=proto) / Raw(bytes(body)))[:20]
    rbody = bytearray(body)
    rbody[6:8] = b"\0\0"
    rbody[6:8] = (0xFFFF - _ones(rhdr[12:20] + bytes([0, proto]) + len(rbody).to_bytes(2, "big") + bytes(rbody))).to_bytes(2, "big")
    back = run(engine, rhdr + bytes(rbody), "outside", "eth1")
    assert back.reason == Reason.XLATE_IN and _pseudo_sum_ok(back.packet)
