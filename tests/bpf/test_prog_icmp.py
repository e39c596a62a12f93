"""Hand cases for ICMP errors (datapath.md "ICMP errors"): outside -> inside, inside -> outside
and egress; the embedded packet is rewritten and every checksum stays valid; truncated
quotes are dropped; errors about nothing pass."""

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import raw

from snatgw.layout import Reason
from snatgw.model.checksum import verify

from tests.cases.corpus import REF_RULES, REF_SETTINGS, RULE_SDH, ruleset
from tests.cases.pkts import A, R1, ROUTER, icmp_error, snat_of, tcp, udp

pytestmark = pytest.mark.bpf


@pytest.fixture
def prog(make_prog):
    p = make_prog(ruleset(REF_RULES), REF_SETTINGS)
    assert p.run("inside", tcp(A, R1, 40000, 80, "S"), "lan40").reason == Reason.XLATE_NEW
    assert p.run("inside", udp(A, R1, 40001, 53), "lan40").reason == Reason.XLATE_NEW
    return p


def all_checksums_valid(pkt: bytes) -> bool:
    """Outer IP header, ICMP message, embedded IP header."""
    ihl = (pkt[0] & 15) * 4
    tot = int.from_bytes(pkt[2:4], "big")
    inner = pkt[ihl + 8 :]
    iihl = (inner[0] & 15) * 4
    return verify(pkt[:ihl]) and verify(pkt[ihl:tot]) and verify(inner[:iihl])


def test_error_from_outside_reaches_the_inside_host_with_its_own_tuple(prog):
    """A router's port-unreachable about A's translated SYN goes to A quoting A's own tuple."""
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    quoted = raw(IP(src=addr, dst=R1, ttl=63) / TCP(sport=port, dport=80, flags="S", seq=1000))
    r = prog.run("outside", icmp_error(ROUTER, addr, quoted, keep=40), "eth1")
    assert (r.reason, r.oif, r.retval) == (Reason.XLATE_ICMP_ERR_IN, "lan40", 7)
    p = IP(r.packet)
    assert (p.dst, p.ttl) == (A, 63)
    q = IP(raw(p)[28:])
    assert (q.src, q.sport) == (A, 40000)
    assert all_checksums_valid(r.packet)
    # the quoted TCP checksum (complete quote) is valid for the rewritten tuple as well
    t = IP(raw(q)).copy()
    del t[TCP].chksum
    assert IP(raw(t))[TCP].chksum == q[TCP].chksum


def test_error_from_inside_about_a_reply_leaves_with_the_snat_tuple(prog):
    """A's port-unreachable about R1's reply leaves from the SNAT address quoting the SNAT tuple."""
    addr, port = snat_of(RULE_SDH, A, R1, 40001)
    quoted = raw(IP(src=R1, dst=A, ttl=63) / UDP(sport=53, dport=40001) / b"reply")
    r = prog.run("inside", icmp_error(A, R1, quoted), "lan40")
    assert (r.reason, r.oif, r.nexthop) == (Reason.XLATE_ICMP_ERR_OUT, "eth1", IPv4Address("198.19.2.1"))
    p = IP(r.packet)
    q = IP(raw(p)[28:])
    assert (p.src, q.dst, q[UDP].dport) == (addr, addr, port)
    assert all_checksums_valid(r.packet)


def test_gateway_error_on_egress_quotes_the_snat_tuple(prog):
    """The gateway's own frag-needed about a translated reply is fixed on egress, outer untouched."""
    addr, port = snat_of(RULE_SDH, A, R1, 40001)
    quoted = raw(IP(src=R1, dst=A, ttl=63) / UDP(sport=53, dport=40001) / b"reply")
    pkt = icmp_error("198.19.2.2", R1, quoted, type=3, code=4)
    r = prog.run("egress", pkt, "eth1")
    assert (r.retval, r.reason) == (0, Reason.XLATE_ICMP_ERR_OUT)
    q = IP(r.packet[28:])
    assert r.packet[:20] == pkt[:20] and (q.dst, q[UDP].dport) == (addr, port)
    assert all_checksums_valid(r.packet)


def test_error_without_a_session_passes_or_is_dropped(prog):
    """Errors quoting unknown tuples: outside (to a pool address) PASS_NO_SESSION_IN; inside,
    matching a rule, DROP_NO_SESSION (passed, it would leave with the host's address)."""
    quoted = raw(IP(src="198.19.2.71", dst=R1) / UDP(sport=9, dport=9))
    r = prog.run("outside", icmp_error(ROUTER, "198.19.2.71", quoted), "eth1")
    assert r.reason == Reason.PASS_NO_SESSION_IN
    quoted = raw(IP(src=R1, dst=A) / UDP(sport=9, dport=9))
    r = prog.run("inside", icmp_error(A, R1, quoted), "lan40")
    assert (r.retval, r.reason) == (2, Reason.DROP_NO_SESSION)


def test_truncated_quote_is_dropped_as_malformed(prog):
    """An error quoting less than the inner header + 8 bytes is DROP_MALFORMED."""
    addr, port = snat_of(RULE_SDH, A, R1, 40000)
    quoted = raw(IP(src=addr, dst=R1) / TCP(sport=port, dport=80))
    r = prog.run("outside", icmp_error(ROUTER, addr, quoted, keep=27), "eth1")
    assert (r.retval, r.reason) == (2, Reason.DROP_MALFORMED)
