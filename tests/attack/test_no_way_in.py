"""Edge invariant 2 in the lab, both backends: from the uplinks only replies to sessions (and
errors about them) reach inside hosts.  Unsolicited packets of every kind, sent as raw frames
from the ISP side to inside addresses, are counted where they must not arrive: on the hosts."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

from snatgw.lab import clients as C

from .conftest import FrameSender, scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

PROBER = "203.0.113.66"  # an outsider (not one of the lab's servers)
TARGETS = ("198.18.40.10", "198.18.40.11", "198.18.40.12", "198.18.50.10", "198.18.50.11")


def probes(n: int) -> list[bytes]:
    """n packets to inside addresses: UDP, TCP SYN and ACK, echo, timestamp, GRE, a fragment."""
    kinds = [
        lambda d, i: IP(src=PROBER, dst=d, id=i) / UDP(sport=4000 + i, dport=53) / b"probe",
        lambda d, i: IP(src=PROBER, dst=d, id=i) / TCP(sport=4000 + i, dport=22, flags="S"),
        lambda d, i: IP(src=PROBER, dst=d, id=i) / TCP(sport=4000 + i, dport=22, flags="A"),
        lambda d, i: IP(src=PROBER, dst=d, id=i) / ICMP(type=8, id=i) / b"probe",
        lambda d, i: IP(src=PROBER, dst=d, id=i) / ICMP(type=13, id=i),
        lambda d, i: IP(src=PROBER, dst=d, id=i, proto=47) / Raw(b"\x00\x00\x08\x00" + b"g" * 20),
        lambda d, i: IP(src=PROBER, dst=d, id=i, flags="MF", proto=17) / Raw(b"f" * 24),
    ]
    return [raw(kinds[i % len(kinds)](TARGETS[i % len(TARGETS)], i)) for i in range(n)]


def test_unsolicited_packets_never_reach_inside_hosts(agw):
    """Probes from ISP 1 and ISP 2 to every inside address: none arrives (counted on the
    hosts), each is counted DROP_INBOUND; the servers still reach inside hosts' sessions."""
    lab = agw.lab
    got = {node: C.count_packets(lab, node, f"ip saddr {PROBER}") for node in ("in40", "in50")}
    n = scaled(98)
    before = agw.reasons().get("DROP_INBOUND", 0)
    for isp, dev in (("isp1", "eth1"), ("isp2", "eth2")):
        tx = FrameSender(lab, isp, "up", "gw", dev)
        for p in probes(n):
            tx.send(p)
        tx.close()
    settle(0.5)
    dropped = agw.reasons().get("DROP_INBOUND", 0) - before
    arrived = {node: read() for node, read in got.items()}
    assert arrived == {"in40": 0, "in50": 0}
    # nft: conntrack's defragmenter holds a lone first fragment until it times out (never
    # forwarded), so the fragments are not counted there
    frags = sum(1 for p in probes(n) if p[6] & 0x20)
    assert dropped >= 2 * (n - (frags if agw.backend == "nft" else 0))
    # a session still gets its replies in
    assert C.udp_echo(lab, "in40", "203.0.113.10", src="198.18.40.10")["data"]


def test_inbound_routed_lets_them_in_and_still_leaks_nothing(agw):
    """`inbound routed` (the operator's choice): the same probes are routed to the inside hosts
    and none is counted DROP_INBOUND; whatever the hosts answer leaves translated or not at
    all (the leak watchers on both uplinks see no inside source).  Then the default again."""
    from snatgw.lab.demo import REF_RULES, config_text

    lab = agw.lab
    agw.reload(config_text(REF_RULES).replace("unmatched pass", "unmatched pass\n    inbound routed"))
    try:
        got = {node: C.count_packets(lab, node, f"ip saddr {PROBER}") for node in ("in40", "in50")}
        n = scaled(35)
        before = agw.reasons().get("DROP_INBOUND", 0)
        with agw.watch() as leaks:
            tx = FrameSender(lab, "isp1", "up", "gw", "eth1")
            for p in probes(n):
                tx.send(p)
            tx.close()
            settle(0.5)
        arrived = {node: read() for node, read in got.items()}
        assert agw.reasons().get("DROP_INBOUND", 0) == before
        assert arrived["in40"] > 0 and arrived["in50"] > 0, arrived
        assert leaks == [], leaks[:3]
    finally:
        agw.restore()
