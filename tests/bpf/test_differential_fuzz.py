"""BPF vs the model on hypothesis-generated traffic: new flows (TCP/UDP/echo, odd flags, TTLs,
sizes, DF), replies to live sessions and strangers, ICMP errors both ways (cut at random), first
and later fragments, and corrupted packets.  Same verdict, reason, bytes, target, sessions,
reason counters and rule counters."""

from collections import Counter
from dataclasses import replace
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

from tests.cases.corpus import REF_SETTINGS, ruleset, REF_RULES, FAILOVER_RULES, REF_ADDRESSES, REF_ROUTES
from tests.cases.pkts import icmp_error, with_options

from test_differential import bpf_sessions, compare_step, model_live, model_sessions
from snatgw.datapath.bpf.testrun import MIN_TESTABLE_IPV4
from snatgw.layout import CT_DIR_IN, CT_DIR_OUT, IPPROTO_ICMP, IPPROTO_TCP

pytestmark = pytest.mark.bpf

# weighted by repetition toward flows that translate, so replies and errors have sessions
INSIDE_SRC = ["198.18.40.10"] * 3 + ["198.18.40.11", "198.18.50.10", "198.18.60.5", "192.0.2.50"]
REMOTES = ["203.0.113.10"] * 3 + ["198.51.100.10"] * 2 + [
    "198.51.100.77", "198.19.2.1", "198.19.2.71", "198.19.3.9", "198.18.50.10", "198.18.40.11",
]  # fmt: skip  (the last two are inside hosts: PASS_INTERNAL)
FLAGS = ["S"] * 6 + ["SA", "A", "PA", "FA", "R", "RA", "", "SF", "U"]


class Step:
    def __init__(self, side, ingress, packet):
        self.side, self.ingress, self.packet = side, ingress, packet


@st.composite
def outbound(draw):
    src = draw(st.sampled_from(INSIDE_SRC))
    dst = draw(st.sampled_from(REMOTES))
    proto = draw(st.sampled_from(["tcp", "udp", "echo"]))
    sport = draw(st.one_of(st.sampled_from([40000, 40001, 5000, 65535, 1, 33434]), st.integers(1, 65535)))
    dport = draw(st.sampled_from([80, 53, 443]))
    ttl = draw(st.sampled_from([64] * 5 + [2, 1, 0]))
    size = draw(st.sampled_from([0] * 4 + [8, 1480, 1600]))
    df = draw(st.booleans())
    ip = IP(src=src, dst=dst, ttl=ttl, flags="DF" if df else 0, id=draw(st.integers(0, 3)))
    pay = b"x" * size
    if proto == "tcp":
        pkt = ip / TCP(sport=sport, dport=dport, flags=draw(st.sampled_from(FLAGS))) / pay
    elif proto == "udp":
        pkt = ip / UDP(sport=sport, dport=dport, chksum=0 if draw(st.booleans()) else None) / pay
    else:
        pkt = ip / ICMP(type=draw(st.sampled_from([8] * 4 + [0, 13])), id=sport) / pay
    dev = "lan50" if src.startswith("198.18.50") else "lan40"
    out = raw(pkt)
    if draw(st.integers(0, 5)) == 0:
        out = with_options(out)  # IHL 6: options are kept and skipped
    return Step("inside", dev, out)


def reply_to(engine, draw):
    """A packet from the remote of a live session to its SNAT address (or a stranger's)."""
    ins = [k for k in engine.table.entries() if k.dir == CT_DIR_IN]
    if not ins or draw(st.integers(0, 9)) == 0:
        stranger = IP(src="203.0.113.10", dst="198.19.2.72") / UDP(sport=53, dport=6000)
        return Step("outside", "eth1", raw(stranger))
    k = draw(st.sampled_from(sorted(ins)))
    ttl = draw(st.sampled_from([64] * 4 + [1]))
    ip = IP(src=str(k.saddr), dst=str(k.daddr), ttl=ttl, flags="DF" if draw(st.booleans()) else 0)
    pay = b"y" * draw(st.sampled_from([0] * 3 + [4, 1600]))
    if k.proto == IPPROTO_TCP:
        pkt = ip / TCP(sport=k.sport, dport=k.dport, flags=draw(st.sampled_from(FLAGS))) / pay
    elif k.proto == IPPROTO_ICMP:
        pkt = ip / ICMP(type=0, id=k.dport) / pay
    else:
        pkt = ip / UDP(sport=k.sport, dport=k.dport) / pay
    dev = "eth2" if str(k.daddr).startswith("198.19.3") else "eth1"
    return Step("outside", dev, raw(pkt))


def to_mapping(engine, draw):
    """A packet to a live session's SNAT (address, port) from elsewhere: a remote that has no
    session there (filtering), or an inside host (hairpinning), TCP (any flags) or UDP."""
    outs = [(k, e) for k, e in engine.table.entries().items() if k.dir == CT_DIR_OUT and k.proto != IPPROTO_ICMP]
    if not outs:
        return None
    k, e = draw(st.sampled_from(sorted(outs, key=lambda p: p[0])))
    inside = draw(st.booleans())
    src = draw(st.sampled_from(INSIDE_SRC[:5] if inside else REMOTES[:6]))
    ip = IP(src=src, dst=str(e.rw_addr), ttl=draw(st.sampled_from([64, 64, 1])))
    sport = draw(st.sampled_from([k.dport, 7000, 40000]))
    if k.proto == IPPROTO_TCP:
        pkt = ip / TCP(sport=sport, dport=e.rw_port, flags=draw(st.sampled_from(["S", "S", "SA", "A"])))
    else:
        pkt = ip / UDP(sport=sport, dport=e.rw_port) / b"m"
    if inside:
        return Step("inside", "lan50" if src.startswith("198.18.50") else "lan40", raw(pkt))
    return Step("outside", "eth2" if src.startswith("198.51.100") else "eth1", raw(pkt))


def error_about(engine, draw):
    """An ICMP error: from outside about an outbound packet, or from inside/egress about a reply."""
    pairs = [(k, e) for k, e in engine.table.entries().items() if k.dir == CT_DIR_OUT]
    if not pairs:
        return None
    k, e = draw(st.sampled_from(sorted(pairs, key=lambda p: p[0])))
    keep = draw(st.sampled_from([None, None, 20, 27, 30, 38, 48]))
    typ = draw(st.sampled_from([3, 11, 4, 12]))
    if k.proto == IPPROTO_TCP:
        l4o = TCP(sport=e.rw_port, dport=k.dport, flags="S")
        l4r = TCP(sport=k.dport, dport=k.sport, flags="SA")
    elif k.proto == IPPROTO_ICMP:
        l4o, l4r = ICMP(type=8, id=e.rw_port), ICMP(type=0, id=k.sport)
    else:
        l4o, l4r = UDP(sport=e.rw_port, dport=k.dport) / b"q", UDP(sport=k.dport, dport=k.sport) / b"r"
    side = draw(st.sampled_from(["outside", "inside", "egress"]))
    if side == "outside":
        quoted = raw(IP(src=str(e.rw_addr), dst=str(k.daddr)) / l4o)
        src = draw(st.sampled_from(["192.0.2.2", str(k.daddr)]))
        pkt = icmp_error(src, str(e.rw_addr), quoted, type=typ, keep=keep, ttl=draw(st.sampled_from([64, 1])))
        return Step("outside", "eth2" if str(e.rw_addr).startswith("198.19.3") else "eth1", pkt)
    quoted = raw(IP(src=str(k.daddr), dst=str(k.saddr)) / l4r)
    if side == "inside":
        return Step("inside", "lan40", icmp_error(str(k.saddr), str(k.daddr), quoted, type=typ, keep=keep))
    return Step("egress", "eth1", icmp_error("198.19.2.2", str(k.daddr), quoted, type=3, code=4, keep=keep))


def mutate(pkt: bytes, draw) -> bytes:
    b = bytearray(pkt)
    how = draw(st.sampled_from(["byte", "cut", "ihl", "totlen"]))
    if how == "byte" and b:
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    elif how == "cut":
        b = b[: draw(st.integers(MIN_TESTABLE_IPV4, max(MIN_TESTABLE_IPV4, len(b))))]
    elif how == "ihl":
        b[0] = 0x40 | draw(st.integers(0, 15))
    else:
        n = draw(st.integers(0, 0xFFFF))
        b[2:4] = n.to_bytes(2, "big")
    return bytes(b)


@st.composite
def traffic(draw, engine):
    steps = []
    for _ in range(draw(st.integers(1, 16))):
        kind = draw(st.sampled_from(["out"] * 3 + ["reply"] * 3 + ["error"] * 2 + ["mutate", "frag", "mapping"]))
        if kind == "out":
            s = draw(outbound())
        elif kind == "reply":
            s = reply_to(engine, draw)
        elif kind == "error":
            s = error_about(engine, draw) or draw(outbound())
        elif kind == "mapping":
            s = to_mapping(engine, draw) or draw(outbound())
        elif kind == "frag":  # a datagram's first fragment and/or the rest, in either order
            s = draw(outbound())
            p = IP(s.packet)
            l4 = raw(p.payload) + b"f" * 40
            hdr = dict(src=p.src, dst=p.dst, id=p.id, ttl=p.ttl, proto=p.proto)
            first = IP(flags="MF", frag=0, **hdr) / Raw(l4[:24])
            rest = IP(frag=3, **hdr) / Raw(l4[24:64])
            parts = draw(st.sampled_from([[first, rest], [first, rest], [first], [rest], [rest, first]]))
            for part in parts[:-1]:
                steps.append(Step(s.side, s.ingress, raw(part)))
                yield_engine_step(engine, steps[-1], len(steps))
            s = Step(s.side, s.ingress, raw(parts[-1]))
        else:
            s = draw(outbound())
            s = Step(s.side, s.ingress, mutate(s.packet, draw))
        steps.append(s)
        yield_engine_step(engine, s, len(steps))
    return steps


def yield_engine_step(engine, s, i):
    """Steps are generated against the model's live state, so run the model as we go.  Model
    time advances 1 ms a step: the programs run the same steps in real time, well within a
    second, so the model must not reach a time bound they cannot (FRAG_HOLD, FRAG_TIMEOUT)."""
    s.result = engine.process(s.packet, s.side, s.ingress, i / 1000)


#: endpoint-independent mapping: the filtering that admits anyone, and the one that admits the
#: addresses its endpoints talk to (their sessions' replies, errors and fragments as ever)
EIM = {"from": "198.18.0.0/16", "snat_ip": "198.19.2.71-198.19.2.72", "algo": "sh", "mapping": "endpoint-independent"}
RULESETS = {"ref": REF_RULES, "failover": FAILOVER_RULES,
            "eim-eif": [dict(EIM, filtering="endpoint-independent", port_preserve="yes")],
            "eim-adf": [dict(EIM, filtering="address-dependent")]}  # fmt: skip


TABLES = (64, 3)  # session table sizes: roomy, and one that fills up


@pytest.fixture(scope="module")
def fuzz_progs(refnet):
    from snatgw.datapath.bpf.testrun import ProgHarness

    with ProgHarness(refnet, max_sessions=TABLES[0]) as big:
        with ProgHarness(refnet, max_sessions=TABLES[1]) as small:
            yield {TABLES[0]: big, TABLES[1]: small}


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), rules=st.sampled_from(sorted(RULESETS)), narrow=st.booleans(),
       drop=st.booleans(), table=st.sampled_from(TABLES), limit=st.sampled_from([0, 0, 2]))  # fmt: skip
def test_generated_traffic_matches_model(fuzz_progs, data, rules, narrow, drop, table, limit):
    """Random flows, replies, errors, fragments and corrupt packets: BPF agrees with the model,
    with and without a host limit (the per-host count kept as sessions are made, or not)."""
    from snatgw.model import Engine, StaticRouter

    s = replace(REF_SETTINGS, unmatched_drop=drop, max_sessions=table, max_sessions_per_host=limit,
                **({"port_min": 5000, "port_max": 5002} if narrow else {}))  # fmt: skip
    rs = ruleset(RULESETS[rules])
    prog = fuzz_progs[table]
    prog.clear_sessions()
    prog.zero_counters()
    prog.apply(rs, s, renumber=True)  # (a fresh engine numbers the new_gw egresses afresh)
    engine = Engine(rs, s, StaticRouter(REF_ROUTES, REF_ADDRESSES))
    steps = data.draw(traffic(engine))
    judged = Counter()
    for i, step in enumerate(steps):
        if len(step.packet) < MIN_TESTABLE_IPV4:
            continue
        run = prog.run(step.side, step.packet, step.ingress)
        event(f"{step.side} {step.result.reason.name}")
        compare_step(i, step, step.result, run)
        if run.verdict is not None:
            judged[step.result.reason] += 1
    assert bpf_sessions(prog) == model_sessions(engine)
    assert prog.live_counts() == model_live(engine)
    assert prog.reasons() == dict(judged)
    assert prog.rule_stats() == {rid: {"packets": c.packets, "bytes": c.bytes, "sessions": c.sessions}
                                 for rid, c in engine.rule_stats.items()}  # fmt: skip
