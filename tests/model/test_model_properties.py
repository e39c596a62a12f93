"""Hypothesis over random flows through the REF engine: replies translate back to the original
tuple, no two live sessions share an external tuple, every output checksum verifies (scapy)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from cases.corpus import REF_RULES, REF_SETTINGS, ruleset
from cases.pkts import echo, tcp, udp
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy_oracle import problems
from scapy.layers.inet import ICMP, IP, TCP, UDP

from snatgw.layout import CT_DIR_OUT, Reason, Verdict
from snatgw.model import Engine, StaticRouter

INSIDE = st.one_of(
    st.builds(lambda h: (f"198.18.40.{h}", "lan40"), st.integers(2, 254)),
    st.builds(lambda h: (f"198.18.50.{h}", "lan50"), st.integers(2, 254)),
)
REMOTE = st.one_of(
    st.builds(lambda h: f"203.0.113.{h}", st.integers(1, 254)),
    st.builds(lambda h: f"198.51.100.{h}", st.integers(1, 254)),
    st.just("198.19.2.5"), st.just("198.19.3.1"),
)
FLOW = st.tuples(INSIDE, REMOTE, st.sampled_from(["tcp", "udp", "echo"]), st.integers(0, 65535),
                 st.integers(1, 65535), st.integers(2, 255))  # fmt: skip


def request(src, dst, kind, sport, dport, ttl) -> bytes:
    if kind == "tcp":
        return tcp(src, dst, sport, dport, "S", ttl=ttl)
    if kind == "udp":
        return udp(src, dst, sport, dport, ttl=ttl)
    return echo(src, dst, sport, ttl=ttl)


def reply(src, dst, kind, sport, dport) -> bytes:
    """From the remote ``src``:``sport`` to ``dst``:``dport`` (echo: identifier dport)."""
    if kind == "tcp":
        return tcp(src, dst, sport, dport, "SA")
    if kind == "udp":
        return udp(src, dst, sport, dport)
    return echo(src, dst, dport, reply=True)


def ports_of(p: IP, kind: str) -> tuple[int, int]:
    if kind == "echo":
        return p[ICMP].id, 0
    layer = TCP if kind == "tcp" else UDP
    return p[layer].sport, p[layer].dport


@settings(max_examples=60, deadline=None)
@given(st.lists(FLOW, min_size=1, max_size=12), st.sampled_from([(5000, 65535), (5000, 5003)]))
def test_random_flows_and_replies(flows, prange):
    """Every new flow is translated (or refused only for lack of ports), its reply goes back
    to the original inside tuple, the table never shares an external tuple, and every
    checksum of every output verifies."""
    s = replace(REF_SETTINGS, port_min=prange[0], port_max=prange[1])
    e = Engine(ruleset(REF_RULES), s, StaticRouter.ref())
    for i, ((src, dev), dst, kind, sport, dport, ttl) in enumerate(flows):
        if kind == "echo":
            dport = 0
        res = e.process(request(src, dst, kind, sport, dport, ttl), "inside", dev, float(i))
        assert res.reason in (Reason.XLATE_NEW, Reason.XLATE_OUT, Reason.DROP_PORT_EXHAUSTED)
        if res.verdict == Verdict.DROP:
            assert prange == (5000, 5003)
            continue
        out = IP(res.packet)
        assert problems(res.packet) == []
        assert (out.src, ports_of(out, kind)[0]) == (str(res.nat[0]), res.nat[1])
        assert out.dst == dst and out.ttl == ttl - 1
        back = e.process(reply(dst, str(res.nat[0]), kind, dport, res.nat[1]), "outside", res.oif, i + 0.5)
        assert back.reason == Reason.XLATE_IN
        inner = IP(back.packet)
        assert problems(back.packet) == []
        assert (inner.src, inner.dst) == (dst, src) and back.oif == dev
        if kind == "echo":
            assert inner[ICMP].id == sport
        else:
            assert ports_of(inner, kind) == (dport, sport)
        ext = [(k.proto, en.rw_addr, en.rw_port, k.daddr, k.dport)
               for k, en in e.table.entries().items() if k.dir == CT_DIR_OUT]  # fmt: skip
        assert len(ext) == len(set(ext)) == len(e.table)
        assert res.nat[0] in res.rule.pool


@settings(max_examples=40, deadline=None)
@given(st.lists(FLOW, min_size=1, max_size=8))
def test_outbound_packets_of_a_session_keep_its_mapping(flows):
    """A flow's later packets leave with the same SNAT tuple as its first."""
    e = Engine(ruleset(REF_RULES), REF_SETTINGS, StaticRouter.ref())
    first = {}
    for (src, dev), dst, kind, sport, dport, ttl in flows + flows:
        dport = 0 if kind == "echo" else dport
        res = e.process(request(src, dst, kind, sport, dport, ttl), "inside", dev, 0.0)
        key = (src, dst, kind, sport, dport)
        first.setdefault(key, res.nat)
        assert res.nat == first[key]
        assert IPv4Address(IP(res.packet).src) == res.nat[0]
