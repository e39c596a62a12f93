"""Frames the gateway's inside or uplink device receives but that were not sent to its MAC: another
host's (a bridge floods a frame whose destination it has not learnt, or forgot; a capture put
the device in promiscuous mode) or an L2 broadcast.  The kernel routes only frames sent to the
device (ip_rcv drops another host's, ip_forward forwards only PACKET_HOST): neither backend may
translate and send them on, or a gateway beside the one a frame was meant for would send a
second copy of the flow out under its own mapping (seen in the HA pair: the BACKUP translated
the frames the bridges flooded to it once the MASTER's ports were gone)."""

import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from snatgw.lab.clients import ECHO_PORT

from .conftest import FrameSender, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1 = "203.0.113.10"
OTHER_MAC = bytes.fromhex("020000c0ffee")  # no device of the lab has it
BROADCAST = bytes.fromhex("ffffffffffff")


def test_a_frame_sent_to_another_mac_or_broadcast_is_never_translated(agw):
    """An inside host's UDP datagrams toward S1 in frames to another MAC and to the broadcast
    MAC: the server gets none, no session is made (bpf: counted PASS_NOT_FOR_US); the same
    datagram sent to the gateway's MAC is translated and answered (the test can fail)."""
    lab, servers = agw.lab, agw.lab.servers
    tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
    gw_mac = tx.dst
    before = agw.reasons().get("PASS_NOT_FOR_US", 0)
    try:
        for i, dst in enumerate((OTHER_MAC, BROADCAST)):
            tx.dst = dst
            for k in range(5):
                tx.send(raw(IP(src="198.18.40.10", dst=S1, ttl=64) / UDP(sport=41000 + i, dport=ECHO_PORT)
                            / f"notforus-{i}-{k}".encode()))  # fmt: skip
        settle(0.5)
        landed = servers.wait_for(lambda e: str(e.get("data", "")).startswith("notforus-"), timeout=0.5)
        after = agw.reasons().get("PASS_NOT_FOR_US", 0)
        made = [s for s in _inside_of_every_session(agw) if s in ("198.18.40.10:41000", "198.18.40.10:41001")]
        tx.dst = gw_mac  # the control: the same datagram to the gateway's MAC goes through
        tx.send(raw(IP(src="198.18.40.10", dst=S1, ttl=64) / UDP(sport=41002, dport=ECHO_PORT) / b"forus-0"))
        ok = servers.wait_for(lambda e: e.get("data") == "forus-0", timeout=2)
    finally:
        tx.close()
    assert landed is None, landed
    assert made == [], made
    if agw.backend == "bpf":
        assert after - before >= 10
    assert ok is not None


def _inside_of_every_session(agw) -> list[str]:
    """The inside "IP:PORT" of every session the gateway holds."""
    from snatgw.daemon.control import request

    got = request(agw.lab.socket_path, {"op": "sessions"}, timeout=20)
    assert got["ok"], got
    return [s["inside"] for s in got["sessions"]]
