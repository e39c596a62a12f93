"""Malformed input: truncated headers at every length, inconsistent lengths and random bytes
never raise; the malformed-packet rule of step 2 holds exactly."""

from __future__ import annotations

import ipaddress

import pytest
from cases.pkts import R1, ROUTER, A, echo, icmp_error, tcp, udp, with_options
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snatgw.layout import Reason, Verdict

SIDES = [("inside", "lan40"), ("outside", "eth1"), ("egress", "eth1")]
SAMPLES = {
    "tcp": tcp(A, R1, 40000, 80, "S", payload=b"abc"),
    "udp": udp(A, R1, 5353, 53),
    "echo": echo(A, R1, 5),
    "error": icmp_error(ROUTER, "198.19.2.72", tcp("198.19.2.72", R1, 21541, 80, "S"), 3, 1),
    "options": with_options(tcp(A, R1, 40000, 80, "S")),
}
L4_END = {"tcp": 40, "udp": 28, "echo": 28, "error": 28, "options": 44}


@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("side,dev", SIDES)
def test_truncation_at_every_length_is_malformed(engine, name, side, dev):
    """Cutting a packet anywhere before its end (total length then exceeds the bytes) is
    DROP_MALFORMED on inside/outside, never an exception; egress passes it unless its source
    is a private one (the leak guard: any IPv4 header with a `from` source, not a pool address, is a leak)."""
    pkt = SAMPLES[name]
    for n in range(len(pkt)):
        res = engine.process(pkt[:n], side, dev, 0)
        assert res.packet == pkt[:n]
        if side == "egress":
            src = ipaddress.IPv4Address(pkt[12:16])
            leak = n >= 20 and any(src in r.src for r in engine.rules) and not any(src in r.pool for r in engine.rules)
            assert res.verdict == (Verdict.DROP if leak else Verdict.PASS), n
        else:
            assert (res.verdict, res.reason) == (Verdict.DROP, Reason.DROP_MALFORMED), n


@pytest.mark.parametrize("name", SAMPLES)
def test_consistent_truncation_malformed_exactly_without_full_l4_header(engine, name):
    """With the total length fixed up to the cut, a packet is malformed exactly when the IP
    header or the L4 header (TCP 20, UDP 8, ICMP 8; ICMP errors: inner header + 8) is cut."""
    pkt = SAMPLES[name]
    need = L4_END[name] + (28 if name == "error" else 0)
    for n in range(20, len(pkt) + 1):
        cut = bytearray(pkt[:n])
        cut[2:4] = n.to_bytes(2, "big")
        res = engine.process(bytes(cut), "outside", "eth1", 0)
        assert (res.reason == Reason.DROP_MALFORMED) == (n < need), n


def test_header_length_rules(engine):
    """IHL < 5, total length below the header or above the bytes are malformed; bytes beyond
    the total length (link padding) are no part of the packet: cut as it is redirected."""
    syn = tcp(A, R1, 40000, 80, "S")
    for bad in (bytes([0x44]) + syn[1:], syn[:2] + b"\x00\x13" + syn[4:], syn[:2] + b"\x00\x29" + syn[4:]):
        assert engine.process(bad, "inside", "lan40", 0).reason == Reason.DROP_MALFORMED
    res = engine.process(syn + b"\xee" * 6, "inside", "lan40", 0)
    assert res.reason == Reason.XLATE_NEW and len(res.packet) == len(syn) and b"\xee" not in res.packet


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=120), st.sampled_from(SIDES))
def test_random_bytes_never_raise(engine, data, side):
    """Any byte string gets a Result on every side."""
    res = engine.process(data, side[0], side[1], 0)
    assert isinstance(res.verdict, Verdict) and isinstance(res.reason, Reason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(SAMPLES)), st.lists(st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=6),
       st.sampled_from(SIDES))  # fmt: skip
def test_mutated_packets_never_raise(engine, name, edits, side):
    """Valid packets with random bytes overwritten (lengths, IHL, offsets, types) never raise."""
    b = bytearray(SAMPLES[name])
    for off, val in edits:
        if off < len(b):
            b[off] = val
    res = engine.process(bytes(b), side[0], side[1], 0)
    assert isinstance(res.reason, Reason)
