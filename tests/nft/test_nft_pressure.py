"""The nft backend under port pressure (root, mark nft), with real traffic from the lab's inside
hosts: max_sessions refuses new flows past the bound (it was ignored: 500 sessions with a bound
of 200), max_sessions_per_host stops one host and not the next (`ct count`), and a flow the
kernel finds no free port for is counted DROP_PORT_EXHAUSTED, not XLATE_NEW."""

from __future__ import annotations

import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from snatgw.lab.netns import ns_socket

pytestmark = [pytest.mark.nft, pytest.mark.root]

S1 = "203.0.113.10"  # leaves via eth1 (198.19.2.0/24 pool)
A, B = "198.18.40.10", "198.18.40.11"


def burst(lab, src: str, sports, dst: str = S1, dport: int = 9) -> None:
    """One UDP datagram per source port from ``src`` in in40 (raw socket: no local sockets);
    one template, the source port patched in (UDP checksum 0: none; the kernel fills the IP's)."""
    tpl = bytearray(raw(IP(src=src, dst=dst) / UDP(sport=1, dport=dport, chksum=0) / b"pressure"))
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        for sp in sports:
            tpl[20:22] = sp.to_bytes(2, "big")
            s.sendto(tpl, (dst, 0))


def settle(b, pred, timeout: float = 5.0):
    """The backend's stats once ``pred(stats)`` holds (packets cross a veth asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        st = b.stats()
        if pred(st) or time.monotonic() > end:
            return st


def conf(settings: str, rule: str = "snat_ip 198.19.2.71-198.19.2.73") -> str:
    return (f"snatgw {{\n inside lan40 lan50\n outside eth1 eth2\n {settings}\n}}\n"
            f"virtual_server fwmark 1 {{\n snat_rule {{ from 198.18.40.0/24 {rule} }}\n}}\n")


def test_max_sessions_refuses_new_flows_once_the_table_is_full(lab, backend):
    """max_sessions 200: once a GC tick (expire) finds 200 or more sessions, every new flow is
    refused and counted DROP_TABLE_FULL, live ones keep their place; below it again, new
    flows are accepted.  Between ticks a burst can overshoot (docs/nftables.md)."""
    with backend(conf("max_sessions 200")) as b:
        burst(lab, A, range(30000, 30250))
        settle(b, lambda s: s.sessions >= 250)
        b.expire()
        burst(lab, A, range(31000, 31100))
        st = settle(b, lambda s: s.reasons["DROP_TABLE_FULL"] >= 100)
        assert st.reasons["DROP_TABLE_FULL"] == 100 and st.sessions == 250
        b.flush()
        b.expire()
        burst(lab, A, range(32000, 32010))
        st = settle(b, lambda s: s.sessions >= 10)
    assert st.sessions == 10 and st.reasons["DROP_TABLE_FULL"] == 100


def test_host_limit_stops_one_host_not_the_next(lab, backend):
    """max_sessions_per_host 10: A's 30 flows make 10 sessions, B behind the same pool still
    gets its 5."""
    with backend(conf("max_sessions_per_host 10")) as b:
        burst(lab, A, range(31000, 31030))
        burst(lab, B, range(31000, 31005))
        st = settle(b, lambda s: s.reasons["DROP_HOST_LIMIT"] >= 20 and s.sessions >= 15)
        hosts = {h["host"]: h["sessions"] for h in st.pressure["hosts"]}
    assert hosts == {A: 10, B: 5}
    assert st.reasons["DROP_HOST_LIMIT"] == 20


def test_exhausted_flows_are_counted_as_exhaustion_not_as_sessions(lab, backend):
    """Ten SNAT ports on one address, fifteen flows to one server port: ten sessions, and the
    five the kernel found no port for are DROP_PORT_EXHAUSTED, not XLATE_NEW."""
    with backend(conf("port_range 6000-6009", "snat_ip 198.19.2.71")) as b:
        burst(lab, A, range(32000, 32015))
        st = settle(b, lambda s: s.reasons["DROP_PORT_EXHAUSTED"] >= 5)
        nat = sorted(s.nat for s in b.sessions() if s.inside.startswith(A + ":"))
    assert nat == [f"198.19.2.71:{p}" for p in range(6000, 6010)]
    assert (st.reasons["XLATE_NEW"], st.reasons["DROP_PORT_EXHAUSTED"]) == (10, 5)
    assert {a["addr"]: a["sessions"] for a in st.pressure["addresses"]} == {"198.19.2.71": 10}


def test_reload_keeps_counting_against_the_limits(lab, backend):
    """A reload (the rule set replaced in one transaction) keeps the table full and keeps the
    hosts' live sessions counted against max_sessions_per_host (the ct count set survives
    `flush table`)."""
    with backend(conf("max_sessions 20\n max_sessions_per_host 15")) as b:
        burst(lab, A, range(33000, 33015))
        burst(lab, B, range(33000, 33005))
        settle(b, lambda s: s.sessions >= 20)
        b.apply(b._config)  # the same config again: a reload (it judges the table again)
        burst(lab, B, range(33100, 33110))
        st = settle(b, lambda s: s.reasons["DROP_TABLE_FULL"] >= 10, timeout=2.0)
        assert st.sessions == 20 and st.reasons["DROP_TABLE_FULL"] == 10
        b.flush()
        b.expire()  # below max_sessions again
        for i in range(15):  # A's 15 live sessions again, then a reload: A is still at its limit
            burst(lab, A, [34000 + i])
        settle(b, lambda s: s.sessions >= 15)
        b.apply(b._config)
        burst(lab, A, range(34100, 34105))
        st = settle(b, lambda s: s.reasons["DROP_HOST_LIMIT"] >= 5, timeout=2.0)
    assert st.reasons["DROP_HOST_LIMIT"] == 5


def test_a_reload_that_changes_the_host_limit_says_the_kernel_counts_it_afresh(lab, backend, caplog):
    """Another max_sessions_per_host value is another ct count set, which knows none of the
    hosts' live sessions: the reload warns, naming the rule and both values, and the host's
    flows are counted from the reload on, as docs/nftables.md says (A at 15 of 15, the limit
    raised to 20: 10 more flows are made, not 5).  An unchanged value warns of nothing."""
    import logging

    from snatgw.config.parse import parse_text

    with backend(conf("max_sessions_per_host 15")) as b:
        burst(lab, A, range(35000, 35020))
        settle(b, lambda s: s.reasons["DROP_HOST_LIMIT"] >= 5)
        with caplog.at_level(logging.WARNING, logger="snatgw.nft"):
            b.apply(b._config)
            assert "max_sessions_per_host changed" not in caplog.text and b.apply_warnings == []
            b.apply(parse_text(conf("max_sessions_per_host 20"), "r.conf"))
        assert "max_sessions_per_host changed (r.conf:7: 15 -> 20)" in caplog.text, caplog.text
        (w,) = b.apply_warnings  # for the reload's answer (`snatgw reload` prints it)
        assert w.startswith("max_sessions_per_host changed (r.conf:7: 15 -> 20): the kernel counts") and w in caplog.text
        burst(lab, A, range(35100, 35110))
        st = settle(b, lambda s: s.reasons["XLATE_NEW"] >= 25, timeout=2.0)
    assert (st.reasons["XLATE_NEW"], st.reasons["DROP_HOST_LIMIT"]) == (25, 5)
