"""Hand cases for the programs (datapath.md steps), run by BPF_PROG_TEST_RUN in the REF netns:
verdict and TC action, reason counter, output bytes checked with scapy (fresh checksums),
sessions and rule counters."""

from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import raw

from snatgw.datapath.bpf.testrun import CLOCK_BASE
from snatgw.layout import CT_DIR_IN, CT_DIR_OUT, RECIRC_DEV, CtState, Reason, Verdict
from snatgw.model import Engine, StaticRouter
from snatgw.rules import Rule, RuleSet

from tests.cases.corpus import REF_RULES, REF_SETTINGS, RULE_SDH, ruleset
from tests.cases.pkts import A, B, R1, R2, echo, fragments, snat_of, tcp, udp

pytestmark = pytest.mark.bpf

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7


@pytest.fixture
def prog(make_prog):
    return make_prog(ruleset(REF_RULES), REF_SETTINGS)


def checksums_ok(pkt: bytes) -> bool:
    """Every checksum of ``pkt`` equals what scapy computes from scratch."""
    p = IP(pkt)
    q = p.copy()
    del q.chksum
    for layer in (TCP, UDP, ICMP):
        if q.haslayer(layer) and not (layer is UDP and p[UDP].chksum == 0):
            del q[layer].chksum
    return raw(IP(raw(q))) == raw(p)


def test_new_udp_flow_is_translated_and_redirected(prog):
    """A new UDP flow gets the rule's SNAT address and first free port, TTL-1, valid checksums."""
    r = prog.run("inside", udp(A, R1, 40000, 53), "lan40")
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    assert (r.retval, r.verdict, r.reason) == (TC_ACT_REDIRECT, Verdict.REDIRECT, Reason.XLATE_NEW)
    assert (r.oif, r.nexthop) == ("eth1", IPv4Address("198.19.2.1"))
    p = IP(r.packet)
    assert (p.src, p[UDP].sport, p.dst, p[UDP].dport, p.ttl) == (addr, port, R1, 53, 63)
    assert checksums_ok(r.packet)
    assert prog.reasons() == {Reason.XLATE_NEW: 1}
    assert prog.rule_stats()[RULE_SDH.rule_id]["sessions"] == 1


def test_reply_is_translated_back_to_the_inside_host(prog):
    """A reply to the SNAT address/port reaches the inside host and port on its device."""
    prog.run("inside", udp(A, R1, 40000, 53), "lan40")
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    r = prog.run("outside", udp(R1, addr, 53, port, b"answer"), "eth1")
    # the next hop toward A is resolved once per session: A is on-link on lan40
    assert (r.retval, r.reason, r.oif) == (TC_ACT_REDIRECT, Reason.XLATE_IN, "lan40")
    assert r.nexthop == IPv4Address(A)
    p = IP(r.packet)
    assert (p.src, p.dst, p[UDP].sport, p[UDP].dport, p.ttl) == (R1, A, 53, 40000, 63)
    assert checksums_ok(r.packet)
    assert prog.rule_stats()[RULE_SDH.rule_id]["packets"] == 2


def test_zero_udp_checksum_stays_zero(prog):
    """A UDP datagram without checksum (0) is sent without one."""
    r = prog.run("inside", udp(A, R1, 40000, 53, zero_csum=True), "lan40")
    assert r.reason == Reason.XLATE_NEW and IP(r.packet)[UDP].chksum == 0


def test_echo_identifier_is_translated_with_valid_checksum(prog):
    """An echo request's identifier is the port: rewritten, ICMP checksum updated."""
    r = prog.run("inside", echo(A, R1, 777), "lan40")
    addr, port = snat_of(RULE_SDH, A, R1, 777)
    p = IP(r.packet)
    assert (r.reason, p.src, p[ICMP].id) == (Reason.XLATE_NEW, addr, port)
    assert checksums_ok(r.packet)
    back = prog.run("outside", echo(R1, addr, port, reply=True), "eth1")
    assert (back.reason, IP(back.packet).dst, IP(back.packet)[ICMP].id) == (Reason.XLATE_IN, A, 777)


def test_tcp_session_walks_the_state_machine(prog):
    """SYN makes SYN_RECV; SYN-ACK back, then ACK: ESTABLISHED; REPLIED set by the reply."""
    prog.run("inside", tcp(A, R1, 40000, 80, "S"), "lan40")
    out_key = (IPv4Address(A), IPv4Address(R1), 40000, 80, 6, CT_DIR_OUT)
    assert prog.ct()[out_key]["state"] == CtState.SYN_RECV
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    prog.run("outside", tcp(R1, addr, 80, port, "SA"), "eth1")
    prog.run("inside", tcp(A, R1, 40000, 80, "A"), "lan40")
    e = prog.ct()[out_key]
    assert e["state"] == CtState.ESTABLISHED and e["flags"] & 1
    r = prog.run("inside", tcp(A, R1, 40000, 80, "PA", payload=b"data"), "lan40")
    assert r.reason == Reason.XLATE_OUT and checksums_ok(r.packet)


def test_session_pair_has_both_keys_pointing_at_each_other(prog):
    """Both keys exist, each entry's peer is the other key, and the IN key holds the SNAT tuple."""
    prog.run("inside", tcp(A, R2, 40000, 443, "S"), "lan40")
    ct = prog.ct()
    assert len(ct) == 2
    (ok, oe), = [(k, e) for k, e in ct.items() if k[5] == CT_DIR_OUT]
    (ik, ie), = [(k, e) for k, e in ct.items() if k[5] == CT_DIR_IN]
    assert oe["peer"] == ik and ie["peer"] == ok
    assert (ik[1], ik[3]) == (IPv4Address(oe["rw_addr"]), oe["rw_port"])
    assert (oe["ifindex"], ie["ifindex"]) == (prog.net.ifindex["eth2"], prog.net.ifindex["lan40"])


def test_tcp_without_session_that_is_not_a_syn_is_dropped(prog):
    """A mid-stream ACK that matches a rule but has no session is dropped."""
    r = prog.run("inside", tcp(A, R1, 40000, 80, "A"), "lan40")
    assert (r.retval, r.reason) == (TC_ACT_SHOT, Reason.DROP_NO_SESSION)
    assert prog.ct() == {}


def test_local_destination_and_ttl_one_pass_untranslated(prog):
    """Traffic to the gateway itself and a TTL-1 packet go to the kernel unchanged."""
    p = udp(A, "198.19.2.71", 40000, 53)
    r = prog.run("inside", p, "lan40")
    assert (r.retval, r.reason, r.packet) == (TC_ACT_OK, Reason.PASS_LOCAL, p)
    p = udp(A, R1, 40000, 53, ttl=1)
    r = prog.run("inside", p, "lan40")
    assert (r.retval, r.reason, r.packet) == (TC_ACT_OK, Reason.PASS_TTL, p)
    assert prog.ct() == {}


def test_unmatched_flow_passes_or_is_dropped_by_setting(make_prog):
    """No rule: PASS_NO_RULE normally, DROP_UNMATCHED under `unmatched drop`."""
    p = udp("192.0.2.50", R1, 40000, 53)
    r = make_prog(ruleset(REF_RULES), REF_SETTINGS).run("inside", p, "lan40")
    assert (r.retval, r.reason) == (TC_ACT_OK, Reason.PASS_NO_RULE)
    r = make_prog(ruleset(REF_RULES), replace(REF_SETTINGS, unmatched_drop=True)).run("inside", p, "lan40")
    assert (r.retval, r.reason) == (TC_ACT_SHOT, Reason.DROP_UNMATCHED)


def test_over_mtu_with_df_passes_and_without_df_is_translated_for_the_kernel(prog):
    """1600 bytes with DF: PASS_FRAG_NEEDED untranslated; without DF: PASS_TRANSLATED."""
    big = udp(A, R1, 40000, 53, payload=b"z" * 1572, flags="DF")
    r = prog.run("inside", big, "lan40")
    assert (r.retval, r.reason, r.packet) == (TC_ACT_OK, Reason.PASS_FRAG_NEEDED, big)
    r = prog.run("inside", udp(A, R1, 40000, 53, payload=b"z" * 1572), "lan40")
    assert (r.retval, r.verdict, r.reason) == (TC_ACT_OK, Verdict.PASS_TRANSLATED, Reason.XLATE_NEW)
    assert IP(r.packet).src == snat_of(RULE_SDH, A, R1, 40000)[0] and checksums_ok(r.packet)


def test_later_fragment_follows_its_first_fragment(prog):
    """The first fragment is translated and remembered; the rest gets the same addresses;
    a fragment of an unknown datagram is held: redirected, untouched, to the recirculation device."""
    first, rest = fragments(A, R1, 40000, 53)
    r1 = prog.run("inside", first, "lan40")
    r2 = prog.run("inside", rest, "lan40")
    assert (r1.reason, r2.reason, r2.retval) == (Reason.XLATE_NEW, Reason.XLATE_FRAG, TC_ACT_REDIRECT)
    assert IP(r2.packet).src == IP(r1.packet).src and checksums_ok(r2.packet)
    assert (r2.oif, r2.nexthop) == (r1.oif, r1.nexthop)
    _, other = fragments(A, R1, 40000, 53, ident=0x1111)
    r3 = prog.run("inside", other, "lan40")
    assert (r3.retval, r3.reason, r3.oif, r3.packet) == (TC_ACT_REDIRECT, Reason.FRAG_HELD, RECIRC_DEV, other)


def test_full_table_refuses_new_flow_and_leaves_no_half_session(make_prog):
    """With room for two sessions, the third flow is DROP_TABLE_FULL and the map holds 4 keys."""
    s = replace(REF_SETTINGS, max_sessions=2)
    prog = make_prog(ruleset(REF_RULES), s, max_sessions=2)
    for sport in (1001, 1002):
        assert prog.run("inside", udp(A, R1, sport, 53), "lan40").reason == Reason.XLATE_NEW
    r = prog.run("inside", udp(A, R1, 1003, 53), "lan40")
    assert (r.retval, r.reason) == (TC_ACT_SHOT, Reason.DROP_TABLE_FULL)
    assert len(prog.ct()) == 4


def test_port_search_exhausts_a_narrow_range(make_prog):
    """Ports 5000-5001 hold two flows to one remote port; with on_exhausted drop the third is
    DROP_PORT_EXHAUSTED."""
    s = replace(REF_SETTINGS, port_min=5000, port_max=5001, on_exhausted="drop")
    prog = make_prog(ruleset(REF_RULES), s)
    got = [prog.run("inside", udp(A, R1, sp, 53), "lan40").reason for sp in (1001, 1002, 1003)]
    assert got == [Reason.XLATE_NEW, Reason.XLATE_NEW, Reason.DROP_PORT_EXHAUSTED]
    assert len(prog.ct()) == 4


def test_refusal_markers_of_a_predecessor_and_after_a_quiet_time_are_honoured(make_prog):
    """Step 6 looks markers up only while one may be young (the program remembers its last
    refusal): a marker left before this program was loaded (a restarted daemon adopting the
    pinned map) still drops its flow; after seconds without a refusal, a new one is met again;
    at REFUSED_SECS it is not."""
    from snatgw import layout as L

    s = replace(REF_SETTINGS, port_min=5000, port_max=5000, on_exhausted="drop")
    prog = make_prog(RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71"})]), s)
    key = L.CT_KEY.pack(saddr=IPv4Address(A).packed, daddr=IPv4Address(R1).packed, sport=(1001).to_bytes(2, "big"),
                        dport=(53).to_bytes(2, "big"), proto=17, dir=CT_DIR_OUT)  # fmt: skip
    at = int((10 + CLOCK_BASE) * 1e9)
    prog.maps[L.MAP_REFUSED].put(key, L.REFUSAL.pack(at=at, addr=IPv4Address("198.19.2.71").packed,
                                                     reason=int(Reason.DROP_PORT_EXHAUSTED)))  # fmt: skip
    assert prog.run("inside", udp(A, R1, 1001, 53), "lan40", now=11).reason == Reason.DROP_REFUSED_RECENTLY
    assert prog.run("inside", udp(A, R1, 1002, 53), "lan40", now=20).reason == Reason.XLATE_NEW
    assert prog.run("inside", udp(A, R1, 1003, 53), "lan40", now=21).reason == Reason.DROP_PORT_EXHAUSTED
    assert prog.run("inside", udp(A, R1, 1003, 53), "lan40", now=22.9).reason == Reason.DROP_REFUSED_RECENTLY
    assert prog.run("inside", udp(A, R1, 1003, 53), "lan40", now=21 + L.REFUSED_SECS).reason == \
        Reason.DROP_PORT_EXHAUSTED


def test_port_tries_bound_is_respected(make_prog):
    """Two hosts with one SNAT address and the same source port share a first candidate:
    with port_tries=1 the second flow is exhausted, with 2 it gets the next port."""
    rules = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71"})])
    for tries, second in ((1, Reason.DROP_PORT_EXHAUSTED), (2, Reason.XLATE_NEW)):
        prog = make_prog(rules, replace(REF_SETTINGS, port_tries=tries))
        assert prog.run("inside", udp(A, R1, 40000, 53), "lan40").reason == Reason.XLATE_NEW
        assert prog.run("inside", udp(B, R1, 40000, 53), "lan40").reason == second


def test_each_packet_counts_exactly_one_reason(prog):
    """N packets of mixed fates add up to N in the reason counters."""
    pkts = [udp(A, R1, 40000, 53), udp(A, R1, 40000, 53), tcp(A, R1, 1, 80, "A"),
            udp(A, "198.19.2.71", 1, 1), b"\x60" + bytes(39)]  # fmt: skip
    for p in pkts:
        prog.run("inside", p, "lan40")
    assert sum(prog.reasons().values()) == len(pkts)


def test_rule_scan_reaches_the_last_of_16k_rules(make_prog):
    """16384 rule slots: a flow matching only the last one is translated by it."""
    filler = [Rule.from_dict({"from": f"10.{i // 256}.{i % 256}.0/24", "snat_ip": "198.19.2.71"})
              for i in range(16383)]  # fmt: skip
    # priority puts longer source prefixes first: a /15 sorts after every /24 filler
    last = Rule.from_dict({"from": "198.18.0.0/15", "snat_ip": "198.19.2.73"})
    rs = RuleSet(filler + [last])
    assert rs.rules[-1] == last
    prog = make_prog(rs, REF_SETTINGS)
    r = prog.run("inside", udp(A, R1, 40000, 53), "lan40")
    assert (r.reason, IP(r.packet).src) == (Reason.XLATE_NEW, "198.19.2.73")


def test_egress_leaves_ordinary_packets_alone_and_uncounted(prog):
    """The egress program passes a non-ICMP-error packet unchanged without counting it."""
    p = udp("198.19.2.72", R1, 5000, 53)
    r = prog.run("egress", p, "eth1")
    assert (r.retval, r.verdict, r.packet) == (TC_ACT_OK, None, p)
    assert prog.reasons() == {}


def test_replies_to_a_host_behind_an_inside_router_go_to_that_router(prog, refnet):
    """The reply next hop is the route back to the inside host, resolved at session creation."""
    import subprocess

    route = ["198.18.60.0/24", "via", "198.18.40.254", "dev", "lan40"]
    subprocess.run(["ip", "-n", refnet.name, "route", "add", *route], check=True)
    try:
        r = prog.run("inside", udp("198.18.60.5", R1, 40000, 53), "lan40")
        assert r.reason == Reason.XLATE_NEW
        p = IP(r.packet)
        back = prog.run("outside", udp(R1, p.src, 53, p[UDP].sport), "eth1")
        assert (back.reason, back.oif) == (Reason.XLATE_IN, "lan40")
        assert back.nexthop == IPv4Address("198.18.40.254")
    finally:
        subprocess.run(["ip", "-n", refnet.name, "route", "del", *route], check=False)


def test_gro_aggregate_is_judged_by_its_segment_size(prog):
    """A 3000-byte TCP aggregate of 1448-byte segments with DF is translated, not passed
    untranslated as too big (which would let the kernel forward it with the private source)."""
    prog.run("inside", tcp(A, R1, 40000, 80, "S"), "lan40")
    big = raw(IP(src=A, dst=R1, flags="DF") / TCP(sport=40000, dport=80, flags="A") / (b"g" * 2960))
    r = prog.run("inside", big, "lan40", gso_size=1448)
    assert (r.reason, r.verdict) == (Reason.XLATE_OUT, Verdict.REDIRECT)
    assert IP(r.packet).src == snat_of(RULE_SDH, A, R1, 40000)[0]
    r = prog.run("inside", big, "lan40")  # the same bytes as one datagram: too big
    assert r.reason == Reason.PASS_FRAG_NEEDED


def test_non_ipv4_ethertype_passes_uncounted_as_ipv4(prog):
    """An ARP frame (ethertype 0x0806) is PASS_NOT_IPV4, untouched."""
    from snatgw.datapath.bpf import libbpf as B

    frame = bytes.fromhex("ffffffffffff0200000000010806") + bytes(28)
    with prog.net.enter():
        ret, out, _, _ = B.test_run(prog.fds["inside"], frame, prog.ctx("lan40"))
    assert (ret, out[: len(frame)]) == (TC_ACT_OK, frame)
    assert prog.reasons() == {Reason.PASS_NOT_IPV4: 1}


def test_unroutable_destination_passes_to_the_kernel(prog, refnet):
    """A destination behind a blackhole route: PASS_NO_ROUTE, no session."""
    import subprocess

    route = ["blackhole", "203.0.113.128/25"]
    subprocess.run(["ip", "-n", refnet.name, "route", "add", *route], check=True)
    try:
        p = udp(A, "203.0.113.200", 40000, 53)
        r = prog.run("inside", p, "lan40")
        assert (r.retval, r.reason, r.packet) == (TC_ACT_OK, Reason.PASS_NO_ROUTE, p)
        assert prog.ct() == {}
    finally:
        subprocess.run(["ip", "-n", refnet.name, "route", "del", *route], check=False)


def test_refuse_icmp_is_rate_limited_like_the_model(make_prog):
    """refuse_icmp yes: within one second at most REFUSE_ICMP_PER_SEC refused packets come back
    as ICMP host unreachable, the rest are dropped; the next second starts again (BPF and
    model alike, packet for packet)."""
    from snatgw.layout import REFUSE_ICMP_PER_SEC

    s = replace(REF_SETTINGS, max_sessions_per_host=1, refuse_icmp=True)
    prog = make_prog(ruleset(REF_RULES), s)
    engine = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    got = []
    for i, now in enumerate([3.0] + [5.0] * (REFUSE_ICMP_PER_SEC + 20) + [6.0]):
        pkt = udp(A, R1, 1000 + i, 53)
        run, res = prog.run("inside", pkt, "lan40", now=now), engine.process(pkt, "inside", "lan40", now)
        assert (run.verdict, run.reason, run.packet) == (res.verdict, res.reason, res.packet), f"packet {i}"
        got.append(run.verdict)
    assert got[1 : REFUSE_ICMP_PER_SEC + 1] == [Verdict.REDIRECT] * REFUSE_ICMP_PER_SEC
    assert got[REFUSE_ICMP_PER_SEC + 1 : -1] == [Verdict.DROP] * 20 and got[-1] == Verdict.REDIRECT


@pytest.mark.parametrize("dst_mac", [bytes.fromhex("020000c0ffee"), bytes.fromhex("ffffffffffff"),
                                     bytes.fromhex("01005e000001")], ids=["other-host", "broadcast", "multicast"])
def test_a_frame_not_sent_to_the_device_is_left_to_the_kernel(prog, dst_mac):
    """Step 1a: an IPv4 frame to another host's MAC, or an L2 broadcast or multicast, on either
    side: PASS_NOT_FOR_US, untouched, no session (the kernel drops another host's frames and
    forwards none of them); the model says the same.  Not IPv4 stays PASS_NOT_IPV4."""
    from snatgw.datapath.bpf import libbpf as B

    engine = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    cases = [("inside", udp(A, R1, 40000, 53), "lan40"), ("inside", tcp(A, R1, 40001, 80, flags="S"), "lan40"),
             ("outside", udp(R1, "198.19.2.5", 53, 40000), "eth1")]
    for side, pkt, dev in cases:
        r = prog.run(side, pkt, dev, dst_mac=dst_mac)
        m = engine.process(pkt, side, dev, 0.0, for_us=False)
        assert (r.retval, r.verdict, r.reason, r.packet) == (TC_ACT_OK, Verdict.PASS, Reason.PASS_NOT_FOR_US, pkt)
        assert (m.verdict, m.reason) == (Verdict.PASS, Reason.PASS_NOT_FOR_US)
    assert prog.ct() == {} and len(engine.table) == 0
    assert prog.reasons() == {Reason.PASS_NOT_FOR_US: 3}
    frame = dst_mac + bytes.fromhex("0200000000010806") + bytes(28)  # ARP: not IPv4 first
    with prog.net.enter():
        ret, _, _, _ = B.test_run(prog.fds["inside"], frame, prog.ctx("lan40"))
    assert ret == TC_ACT_OK and prog.reasons()[Reason.PASS_NOT_IPV4] == 1
    r = prog.run("inside", udp(A, R1, 40000, 53), "lan40")  # the same flow sent to the device
    assert r.reason == Reason.XLATE_NEW


def test_a_frame_to_a_vrrp_virtual_mac_is_the_gateways(prog):
    """keepalived's use_vmac: the hosts send to 00:00:5e:00:01:{VRID}, which the device the
    programs are on counts as another host's (its macvlan device takes the frame only after
    TC); step 1a takes it as sent to the gateway and translates it.  00:00:5e:00:02:.. (VRRP
    for IPv6) and a neighbour of it stay another host's (frame_for_us, the model's)."""
    from snatgw.datapath.bpf.testrun import REF_MAC
    from snatgw.model.engine import frame_for_us

    own = bytes.fromhex(REF_MAC.replace(":", ""))
    for i, (mac, ours) in enumerate([("00005e000128", True), ("00005e0001ff", True), ("00005e000228", False),
                                     ("00005e010128", False), ("01005e000128", False)]):
        dst = bytes.fromhex(mac)
        assert frame_for_us(dst, own) == ours, mac
        r = prog.run("inside", udp(A, R1, 42000 + i, 53), "lan40", dst_mac=dst)
        assert r.reason == (Reason.XLATE_NEW if ours else Reason.PASS_NOT_FOR_US), mac
