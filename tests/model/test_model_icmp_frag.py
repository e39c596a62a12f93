"""ICMP errors all three ways (TCP, UDP and echo quoted) and fragments, field by field."""

from __future__ import annotations

from cases.pkts import ISP1, R1, ROUTER, A, echo, fragments, icmp_error, tcp, udp
from scapy_oracle import inner_l4_problems, problems
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from snatgw.layout import FRAG_HOLD, FRAG_TIMEOUT, RECIRC_DEV, Reason, Verdict

NAT, PORT = "198.19.2.72", 21541


def inner_of(pkt: bytes) -> IP:
    ihl = (pkt[0] & 0x0F) * 4
    return IP(pkt[ihl + 8 :])


def test_error_from_outside_about_tcp_goes_back_inside(engine):
    """A router's frag-needed about an outbound segment: outer destination, quoted source and
    port become A:40000; outer source kept; every checksum verifies, the quoted TCP one too."""
    engine.process(tcp(A, R1, 40000, 80, "S"), "inside", "lan40", 0)
    quoted = tcp(NAT, R1, PORT, 80, "S", ttl=63)
    res = engine.process(icmp_error(ISP1, NAT, quoted, 3, 4, keep=len(quoted), ttl=60), "outside", "eth1", 1)
    assert (res.verdict, res.reason, res.oif) == (Verdict.REDIRECT, Reason.XLATE_ICMP_ERR_IN, "lan40")
    out = IP(res.packet)
    inner = inner_of(res.packet)
    assert (out.src, out.dst, out.ttl) == (ISP1, A, 59)
    assert (inner.src, inner.dst, inner[TCP].sport, inner[TCP].dport) == (A, R1, 40000, 80)
    assert problems(res.packet) == [] and inner_l4_problems(res.packet) == []


def test_error_from_outside_about_udp_and_zero_checksum(engine):
    """Port unreachable about UDP: quoted checksum adjusted, or left zero when it was zero."""
    addr, port = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0).nat
    for zero in (False, True):
        quoted = udp(str(addr), R1, port, 53, ttl=63, zero_csum=zero)
        res = engine.process(icmp_error(R1, str(addr), quoted, 3, 3, keep=len(quoted)), "outside", "eth1", 1)
        inner = inner_of(res.packet)
        assert (inner.src, inner[UDP].sport) == (A, 5353)
        assert problems(res.packet) == []
        if zero:
            assert inner[UDP].chksum == 0
        else:
            assert inner_l4_problems(res.packet) == []


def test_error_about_echo_request_translates_identifier(engine):
    """Time exceeded about a translated echo request (traceroute -I) returns to A with A's
    identifier in the quoted echo, whose checksum is adjusted too."""
    addr, ident = engine.process(echo(A, R1, 0x1234, ttl=2), "inside", "lan40", 0).nat
    quoted = echo(str(addr), R1, ident, ttl=1)
    res = engine.process(icmp_error(ROUTER, str(addr), quoted, 11, 0, keep=len(quoted)), "outside", "eth1", 1)
    inner = inner_of(res.packet)
    assert res.reason == Reason.XLATE_ICMP_ERR_IN
    assert (IP(res.packet).dst, inner.src, inner[ICMP].id) == (A, A, 0x1234)
    assert problems(res.packet) == [] and inner_l4_problems(res.packet) == []


def test_short_quoted_tcp_translates_without_its_checksum(engine):
    """With fewer than 18 quoted TCP bytes the port is translated, the checksum bytes absent."""
    engine.process(tcp(A, R1, 40000, 80, "S"), "inside", "lan40", 0)
    quoted = tcp(NAT, R1, PORT, 80, "S", ttl=63)
    res = engine.process(icmp_error(ROUTER, NAT, quoted, 3, 1, keep=20 + 12), "outside", "eth1", 1)
    assert res.reason == Reason.XLATE_ICMP_ERR_IN
    raw_inner = res.packet[28:]
    assert int.from_bytes(raw_inner[20:22], "big") == 40000 and problems(res.packet) == []


def test_error_from_inside_about_reply_goes_out_as_snat(engine):
    """A's port unreachable about a reply leaves with outer source and quoted destination set to
    the SNAT tuple, TTL-1, toward the session's egress."""
    addr, port = engine.process(udp(A, R1, 5353, 53), "inside", "lan40", 0).nat
    quoted = udp(R1, A, 53, 5353, ttl=63)
    res = engine.process(icmp_error(A, R1, quoted, 3, 3, keep=len(quoted)), "inside", "lan40", 1)
    out, inner = IP(res.packet), inner_of(res.packet)
    assert (res.verdict, res.reason, res.oif, str(res.nexthop)) == (
        Verdict.REDIRECT, Reason.XLATE_ICMP_ERR_OUT, "eth1", ISP1)
    assert (out.src, out.dst, out.ttl) == (str(addr), R1, 63)
    assert (inner.src, inner.dst, inner[UDP].sport, inner[UDP].dport) == (R1, str(addr), 53, port)
    assert problems(res.packet) == [] and inner_l4_problems(res.packet) == []


def test_error_from_inside_about_echo_reply(engine):
    """An inside error quoting an echo reply gets the SNAT identifier in the quote."""
    addr, ident = engine.process(echo(A, R1, 0x99), "inside", "lan40", 0).nat
    res = engine.process(icmp_error(A, R1, echo(R1, A, 0x99, reply=True), 3, 3), "inside", "lan40", 1)
    inner = inner_of(res.packet)
    assert res.reason == Reason.XLATE_ICMP_ERR_OUT
    assert (inner.dst, int.from_bytes(res.packet[28 + 20 + 4 : 28 + 20 + 6], "big")) == (str(addr), ident)
    assert problems(res.packet) == []


def test_egress_error_keeps_outer_header(engine):
    """The gateway's own error about a reply: only the quote changes; outer addresses and TTL
    stay; verdict PASS."""
    addr, port = engine.process(tcp(A, R1, 40000, 80, "S"), "inside", "lan40", 0).nat
    pkt = icmp_error("198.19.2.2", R1, tcp(R1, A, 80, 40000, "PA", ttl=63), 3, 4)
    res = engine.process(pkt, "egress", "eth1", 1)
    out, inner = IP(res.packet), inner_of(res.packet)
    assert (res.verdict, res.reason) == (Verdict.PASS, Reason.XLATE_ICMP_ERR_OUT)
    assert (out.src, out.dst, out.ttl) == ("198.19.2.2", R1, IP(pkt).ttl)
    assert (inner.dst, int.from_bytes(res.packet[28 + 22 : 28 + 24], "big")) == (str(addr), port)
    assert res.packet[:20] == pkt[:20] and problems(res.packet) == []


def test_errors_about_nothing_pass_or_drop(engine):
    """Errors quoting no session: from outside to a pool address pass as PASS_NO_SESSION_IN; from
    inside, matching a rule, they are dropped (DROP_NO_SESSION: passed, they would leak the
    host's address); on egress they pass as PASS_ICMP_OTHER."""
    q = tcp(NAT, R1, PORT, 80, "S")
    assert engine.process(icmp_error(ROUTER, NAT, q, 3, 1), "outside", "eth1", 0).reason == Reason.PASS_NO_SESSION_IN
    q = udp(R1, A, 53, 5353)
    assert engine.process(icmp_error(A, R1, q, 3, 3), "inside", "lan40", 0).reason == Reason.DROP_NO_SESSION
    assert engine.process(icmp_error(ISP1, R1, q, 3, 3), "egress", "eth1", 0).reason == Reason.PASS_ICMP_OTHER


def test_first_and_later_fragments_outbound_and_reply(engine):
    """A first fragment makes the session and is remembered; the later fragment gets the same
    source rewrite (and TTL-1, header checksum) and egress; the reply's fragments come back."""
    f1, f2 = fragments(A, R1, 5353, 53)
    r1 = engine.process(f1, "inside", "lan40", 0)
    r2 = engine.process(f2, "inside", "lan40", 0)
    assert (r1.reason, r2.reason) == (Reason.XLATE_NEW, Reason.XLATE_FRAG)
    assert (r2.oif, r2.nexthop) == (r1.oif, r1.nexthop)
    o1, o2 = IP(r1.packet), IP(r2.packet)
    assert o2.src == o1.src == str(r1.nat[0]) and o2.ttl == 63 and problems(r2.packet) == []
    assert r2.packet[20:] == f2[20:]
    # the whole datagram, reassembled from the translated fragments, has a valid UDP checksum
    whole = IP(src=o1.src, dst=o1.dst, proto=17) / Raw(r1.packet[20:] + r2.packet[20:])
    assert problems(bytes(whole)) == []
    addr, port = r1.nat
    b1, b2 = fragments(R1, str(addr), 53, port, ident=0x7777)
    rb1, rb2 = engine.process(b1, "outside", "eth1", 1), engine.process(b2, "outside", "eth1", 1)
    assert (rb1.reason, rb2.reason, rb2.oif, rb2.nexthop) == (Reason.XLATE_IN, Reason.XLATE_FRAG, "lan40", rb1.nexthop)
    assert str(rb2.nexthop) == A  # the session's route back: A on-link
    assert IP(rb2.packet).dst == A


def test_remembered_fragment_times_out(engine):
    """A first fragment is remembered FRAG_TIMEOUT seconds; a later fragment after that is
    unknown: held (for all we know its own first fragment is yet to come), never translated."""
    f1, f2 = fragments(A, R1, 5353, 53)
    engine.process(f1, "inside", "lan40", 0)
    assert engine.process(f2, "inside", "lan40", FRAG_TIMEOUT).reason == Reason.XLATE_FRAG
    assert engine.process(f2, "inside", "lan40", FRAG_TIMEOUT + 0.5).reason == Reason.FRAG_HELD


def test_unknown_later_fragment_held_then_dropped_on_both_sides(engine):
    """A later fragment with no remembered first fragment is held (sent round the recirculation
    device untouched), inside and outside, for FRAG_HOLD seconds since the datagram's first
    hold; after that it is dropped."""
    _, f2 = fragments(A, R1, 5353, 53)
    r = engine.process(f2, "inside", "lan40", 0)
    assert (r.verdict, r.reason, r.oif, r.packet) == (Verdict.REDIRECT, Reason.FRAG_HELD, RECIRC_DEV, f2)
    assert engine.process(f2, "recirc", RECIRC_DEV, FRAG_HOLD).reason == Reason.FRAG_HELD
    assert engine.process(f2, "recirc", RECIRC_DEV, FRAG_HOLD + 0.5).reason == Reason.DROP_FRAG_UNKNOWN
    assert engine.process(f2, "inside", "lan40", FRAG_HOLD + 1).reason == Reason.DROP_FRAG_UNKNOWN
    _, g2 = fragments(R1, NAT, 53, 1000)
    assert engine.process(g2, "outside", "eth1", 0).reason == Reason.FRAG_HELD
    assert engine.process(g2, "recirc", RECIRC_DEV, FRAG_HOLD + 0.5).reason == Reason.DROP_FRAG_UNKNOWN


def test_without_a_recirculation_device_an_early_fragment_is_dropped(engine):
    """Engine(recirc=None) (a datapath without the recirculation device) drops a later
    fragment that comes before its first, as before the holding."""
    engine.recirc = None
    _, f2 = fragments(A, R1, 5353, 53)
    assert engine.process(f2, "inside", "lan40", 0).reason == Reason.DROP_FRAG_UNKNOWN


def test_a_held_fragment_of_a_first_fragment_the_kernel_answers_never_leaves(engine):
    """The first fragment has TTL 1 (the kernel answers, no marker is left): the held rest
    keeps coming back held until FRAG_HOLD, then is dropped; never sent untranslated."""
    t1, t2 = fragments(A, R1, 5353, 53, ident=0x7171)
    t1 = t1[:8] + b"\x01" + t1[9:]
    assert engine.process(t2, "inside", "lan40", 0).reason == Reason.FRAG_HELD
    assert engine.process(t1, "inside", "lan40", 0.1).reason == Reason.PASS_TTL
    assert engine.process(t2, "recirc", RECIRC_DEV, 1).reason == Reason.FRAG_HELD
    assert engine.process(t2, "recirc", RECIRC_DEV, FRAG_HOLD + 0.1).verdict == Verdict.DROP


def test_pass_marker_times_out_and_a_translated_first_fragment_replaces_it(engine):
    """A passed first fragment's marker lasts FRAG_TIMEOUT seconds like a rewrite; a translated
    first fragment with the same key replaces a marker, so its rest is translated, not leaked."""
    p1, p2 = fragments(A, "198.18.40.1", 5353, 53, ident=0x6262)
    assert engine.process(p1, "inside", "lan40", 0).reason == Reason.PASS_LOCAL
    assert engine.process(p2, "inside", "lan40", FRAG_TIMEOUT).reason == Reason.PASS_FRAG_UNTRANSLATED
    assert engine.process(p2, "inside", "lan40", FRAG_TIMEOUT + 0.5).reason == Reason.FRAG_HELD
    e1, e2 = fragments(A, R1, 0x99, 0, proto="icmp", ident=0x6363)
    reply1 = e1[:20] + b"\x00" + e1[21:]  # an echo REPLY's first fragment: dropped, no marker
    assert engine.process(reply1, "inside", "lan40", 0).reason == Reason.DROP_NO_SESSION
    r1 = engine.process(e1, "inside", "lan40", 0)  # the echo request, same key: translated
    r2 = engine.process(e2, "inside", "lan40", 0)
    assert (r1.reason, r2.reason) == (Reason.XLATE_NEW, Reason.XLATE_FRAG)
    assert IP(r2.packet).src == str(r1.nat[0])
