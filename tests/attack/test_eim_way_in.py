"""Edge invariant 2 with `filtering endpoint-independent` (issue 12): the one way in it opens
is to a live mapping's own inside endpoint.  A mapping is made (a UDP exchange from an inside
host), then an outsider probes every pool address and port near it, every protocol, and the
inside addresses: only the UDP datagrams to that mapping reach the inside, at that host and
port; whatever the host answers leaves translated (leak watchers).  The nft backend refuses
the option (docs/nftables.md) and lets nothing in."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import raw

from snatgw.lab import clients as C
from snatgw.lab.demo import SETTINGS

from .conftest import FrameSender, scaled, settle
from .test_no_way_in import PROBER, probes

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

HOST, SPORT = "198.18.40.10", 40123
POOLS = [f"198.19.2.{i}" for i in (71, 72, 73)] + [f"198.19.3.{i}" for i in (71, 72, 73)]
EIF = (SETTINGS + "virtual_server fwmark 1 {\n"
       "  snat_rule { from 198.18.0.0/16 oif eth1 snat_ip 198.19.2.71-198.19.2.73 algo sh "
       "mapping endpoint-independent filtering endpoint-independent }\n"
       "  snat_rule { from 198.18.0.0/16 oif eth2 snat_ip 198.19.3.71-198.19.3.73 algo sh "
       "mapping endpoint-independent filtering endpoint-independent }\n}\n")  # fmt: skip


def mapping_probes(addr: str, port: int, n: int) -> tuple[list[bytes], int]:
    """Probes to every pool address at ports around ``port`` (TCP SYN/ACK, UDP, echo); returns
    them and how many are UDP to (addr, port) exactly (the ones EIF must let in)."""
    out, hits = [], 0
    for i in range(n):
        dst = POOLS[i % len(POOLS)] if i % 3 else addr
        dport = (port, port + 1, port - 1, SPORT, 53)[i % 5]
        kind = i % 4
        ip = IP(src=PROBER, dst=dst, id=i)
        if kind == 0:
            p = ip / UDP(sport=5000 + i, dport=dport) / b"eif"
            hits += (dst, dport) == (addr, port)
        elif kind == 1:
            p = ip / TCP(sport=5000 + i, dport=dport, flags="S")
        elif kind == 2:
            p = ip / TCP(sport=5000 + i, dport=dport, flags="A")
        else:
            p = ip / ICMP(type=8, id=dport) / b"eif"
        out.append(raw(p))
    return out, hits


def test_endpoint_independent_filtering_opens_only_the_live_mappings_endpoint(agw):
    lab = agw.lab
    if agw.backend == "nft":
        with pytest.raises(Exception, match="filtering: expected address-port-dependent with backend nft"):
            agw.reload(EIF)
    else:
        agw.reload(EIF)
    try:
        seen = C.udp_echo(lab, "in40", "203.0.113.10", src=HOST, sport=SPORT)["peer"]
        addr, port = seen.rsplit(":", 1)[0], int(seen.rsplit(":", 1)[1])
        right = C.count_packets(lab, "in40", f"ip saddr {PROBER} ip daddr {HOST} udp dport {SPORT}", table="sgeif_ok")
        anyin40 = C.count_packets(lab, "in40", f"ip saddr {PROBER}")
        anyin50 = C.count_packets(lab, "in50", f"ip saddr {PROBER}")
        pkts, hits = mapping_probes(addr, port, scaled(120))
        with agw.watch() as leaks:
            tx = FrameSender(lab, "isp1", "up", "gw", "eth1")
            for p in pkts + probes(scaled(35)):
                tx.send(p)
            tx.close()
            settle(0.5)
        got = {"right": right(), "in40": anyin40(), "in50": anyin50()}
        assert leaks == [], leaks[:3]
        if agw.backend == "nft":  # refused: address-and-port-dependent as before, nothing in
            assert got == {"right": 0, "in40": 0, "in50": 0}, got
        else:  # exactly the UDP datagrams to the live mapping, at its endpoint
            assert hits > 0 and got == {"right": hits, "in40": hits, "in50": 0}, (got, hits)
            assert agw.reasons().get("XLATE_IN_NEW", 0) >= 1
    finally:
        agw.restore()
