"""End to end through `snatgw run` in the lab: traffic between the inside networks is never
translated by either backend (PASS_INTERNAL, although the /16 rule would match it), and on bpf a translated
datagram over the uplink's MTU without DF reaches the server (PASS_TRANSLATED: the kernel
fragments it, which needs the accept_local the backend sets on the inside devices)."""

from __future__ import annotations

import socket
import time

import pytest

from snatgw.lab.clients import ECHO_PORT
from snatgw.lab.netns import ns_socket

pytestmark = [pytest.mark.root, pytest.mark.lab]

IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DONT = getattr(socket, "IP_PMTUDISC_DONT", 0)


def _udp(gw, node: str, addr: str, port: int = 0) -> socket.socket:
    s = ns_socket(gw.lab.ns(node), socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.bind((addr, port))
    return s


@pytest.mark.parametrize("gateway_module", ["bpf", "nft"], indirect=True)
def test_inside_hosts_reach_each_other_with_their_own_addresses(gw):
    """UDP in40 -> in50 and back, and a TCP connection, arrive with the inside source address
    (translated, they would have left toward ISP1 and never arrived)."""
    gw.check()
    with _udp(gw, "in50", "198.18.50.10", 7101) as far, _udp(gw, "in40", "198.18.40.10") as near:
        near.sendto(b"ping", ("198.18.50.10", 7101))
        data, peer = far.recvfrom(100)
        assert (data, peer[0]) == (b"ping", "198.18.40.10")
        far.sendto(b"pong", peer)
        data, back = near.recvfrom(100)
        assert (data, back) == (b"pong", ("198.18.50.10", 7101))
    with ns_socket(gw.lab.ns("in50"), socket.AF_INET, socket.SOCK_STREAM) as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("198.18.50.11", 7102))
        lst.listen(1)
        lst.settimeout(3)
        with ns_socket(gw.lab.ns("in40"), socket.AF_INET, socket.SOCK_STREAM) as c:
            c.settimeout(3)
            c.connect(("198.18.50.11", 7102))
            conn, peer = lst.accept()
            with conn:
                c.sendall(b"internal")
                assert conn.recv(100) == b"internal" and peer[0] == "198.18.40.10"


def _send_big(gw, tok: str, size: int = 1450) -> dict | None:
    """A datagram of ``size`` bytes of data (1478 in all) without DF from 198.18.40.12 to the
    echo server, then a small one after it; what the server saw of the big one.  The small one
    (translated and forwarded by the program, no fragmenting) must arrive: once it has, the big
    one is waited for 0.5 s more, not 3 s (a lab hop takes milliseconds; it is absent only when
    dropped)."""
    with _udp(gw, "in40", "198.18.40.12") as s:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        s.sendto((tok + "x" * (size - len(tok))).encode(), ("203.0.113.10", ECHO_PORT))
        s.sendto(f"after-{tok}".encode(), ("203.0.113.10", ECHO_PORT))
    after = gw.servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data", "") == f"after-{tok}",
                                timeout=3)
    assert after is not None, f"the small datagram after {tok} did not reach the server"
    return gw.servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data", "").startswith(tok),
                               timeout=0.5)


@pytest.mark.parametrize("gateway_module", ["bpf"], indirect=True)  # nft: the kernel's own NAT path
def test_translated_datagram_over_the_uplink_mtu_is_fragmented_by_the_kernel(gw):
    """With eth1's MTU lowered to 1400, a 1478-byte datagram without DF is translated and handed
    to the kernel, which fragments it: the server sees the SNAT address; so is a 3000-byte one
    the host itself cut into fragments of 1500, its later fragments too (they were redirected
    into eth1 as they were, which dropped them).  The backend set accept_local=1 on the inside
    devices; with 0 the kernel drops such a packet as martian."""
    gw.check()
    conf = "net.ipv4.conf.lan40.accept_local"
    assert gw.lab.run("gw", "sysctl", "-n", conf).stdout.strip() == "1"
    assert gw.lab.run("gw", "sysctl", "-n", "net.ipv4.conf.eth1.accept_local").stdout.strip() == "0"
    for node, dev in (("gw", "eth1"), ("isp1", "up")):  # both ends of the link
        gw.lab.run(node, "ip", "link", "set", "dev", dev, "mtu", "1400")
    try:
        seen = _send_big(gw, "bigdf0a")
        frags = _send_big(gw, "bigdf0c", 3000)
        gw.lab.run("gw", "sysctl", "-q", "-w", f"{conf}=0")
        lost = _send_big(gw, "bigdf0b")
    finally:
        gw.lab.run("gw", "sysctl", "-q", "-w", f"{conf}=1")
        for node, dev in (("gw", "eth1"), ("isp1", "up")):
            gw.lab.run(node, "ip", "link", "set", "dev", dev, "mtu", "1500")
    assert seen is not None and seen["peer"].startswith("198.19.2.7") and seen["link"] == "isp1"
    assert frags is not None and frags["peer"].startswith("198.19.2.7") and frags["link"] == "isp1", frags
    assert lost is None


IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_MTU = getattr(socket, "IP_MTU", 14)


@pytest.mark.parametrize("tx", ["on", "off"])
@pytest.mark.parametrize("gateway_module", ["bpf", "nft"], indirect=True)
def test_a_new_gw_link_narrower_than_the_route_tells_the_host_its_mtu(gw, tx):
    """REF's /16 rule sends lan50's flows by new_gw 198.19.2.1 (eth1) also where the route says
    eth2 (198.51.100.0/24).  With eth1 at MTU 1400, a 1450-byte datagram with DF from in50 to
    the second server comes back to its host as fragmentation needed, mtu 1400, and one that
    fits reaches the server by isp1.  bpf handed the first to the kernel, whose route leaves by
    eth2 at 1500: it met the leak guard (DROP_LEAK) and the host never learnt the MTU, a black
    hole for TCP as much (a 200 KB upload through such a link stalled; nft's policy routing
    answered right).  With the gateway's lan50 at `tx off`, in50's datagram arrives with its
    UDP checksum still to be filled in (CHECKSUM_PARTIAL: in50's socket leaves it to the veth's
    offload) and the frag-needed built from it leaves by lan50, whose driver fills that checksum
    in at the offsets the datagram had: bpf's error had its MTU field (where the UDP checksum
    sat) overwritten, and the host learnt no MTU."""
    gw.check()
    gw.lab.run("gw", "ip", "link", "set", "dev", "eth1", "mtu", "1400")
    gw.lab.run("gw", "ethtool", "-K", "lan50", "tx", tx)
    try:
        with _udp(gw, "in50", "198.18.50.11") as s:
            s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
            s.connect(("198.51.100.10", ECHO_PORT))
            s.send(b"n" * 1422)  # 1450 bytes with DF
            deadline, mtu = time.monotonic() + 3, 0
            while time.monotonic() < deadline and mtu != 1400:
                time.sleep(0.05)
                mtu = s.getsockopt(socket.IPPROTO_IP, IP_MTU)
            s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # the error it raised (EMSGSIZE), read
            s.send(("newgwmtu" + "x" * 1364).encode())  # 1400 bytes: fits
            seen = gw.servers.wait_for(lambda e: e.get("event") == "datagram"
                                       and e.get("data", "").startswith("newgwmtu"), timeout=3)  # fmt: skip
    finally:
        gw.lab.run("gw", "ethtool", "-K", "lan50", "tx", "on")
        gw.lab.run("gw", "ip", "link", "set", "dev", "eth1", "mtu", "1500")
        gw.lab.run("in50", "ip", "route", "flush", "cache")  # the path MTU it learnt
    assert mtu == 1400
    assert seen is not None and seen["peer"].startswith("198.19.2.7") and seen["link"] == "isp1", seen


def _gw_policy_rules(gw) -> dict[int, str]:
    """The gateway namespace's new_gw policy rules of the bpf backend: {pref: table}."""
    import json

    from snatgw import layout as L

    out = gw.lab.run("gw", "ip", "-j", "rule", "show").stdout
    return {int(r["priority"]): str(r.get("table")) for r in json.loads(out)
            if L.GW_RT_BASE <= int(r["priority"]) < L.GW_RT_BASE + L.GW_SLOTS}  # fmt: skip


@pytest.mark.parametrize("gateway_module", ["bpf", "nft"], indirect=True)
def test_a_new_gw_sessions_datagram_fragmented_by_the_kernel_leaves_by_its_new_gw(gw):
    """REF's /16 rule sends in50's flows by new_gw 198.19.2.1 (eth1) also where the kernel's
    route says eth2 (198.51.100.0/24).  With eth1 at MTU 1400, a 3,000-byte datagram without DF
    (the host cuts it into 1500-byte fragments) is translated and handed to the kernel to
    fragment again: its fragments must leave by eth1 too and reassemble at the server, and none
    may reach isp2 (with eth1's SNAT address, which an ISP filtering by BCP 38 drops).  bpf
    routed them by the kernel's table, out of eth2: the datapath now marks them and the backend
    routes the mark by the new_gw (ip rule pref 30000+n).  A reload that adds a new_gw adds its
    rule; one that removes it removes it."""
    from snatgw.lab import leakwatch

    gw.check()
    for node, dev in (("gw", "eth1"), ("isp1", "up")):  # both ends of the link
        gw.lab.run(node, "ip", "link", "set", "dev", dev, "mtu", "1400")
    try:
        watch = leakwatch.start(gw.lab.ns("isp2"), "up", ["198.19.2.0/24"])  # eth1's addresses
        try:
            with _udp(gw, "in50", "198.18.50.10") as s:
                s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
                s.connect(("198.51.100.10", ECHO_PORT))
                s.send(("newgwfrag" + "x" * (3000 - 9)).encode())
                seen = gw.servers.wait_for(lambda e: e.get("event") == "datagram"
                                           and e.get("data", "").startswith("newgwfrag"), timeout=3)  # fmt: skip
        finally:
            leaks = watch.stop()
    finally:
        for node, dev in (("gw", "eth1"), ("isp1", "up")):
            gw.lab.run(node, "ip", "link", "set", "dev", dev, "mtu", "1500")
    assert leaks == [], [str(x) for x in leaks]
    assert seen is not None, "the fragmented datagram never reached the server"
    assert seen["peer"].startswith("198.19.2.7") and seen["link"] == "isp1" and len(seen["data"]) == 3000, seen
    if gw.backend != "bpf":
        return
    assert list(_gw_policy_rules(gw).values()) == ["30000"]
    try:  # the failover config adds a new_gw to eth2 (a second egress), the REF one removes it
        gw.lab.reload_gateway(gw.failover_conf)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(_gw_policy_rules(gw)) != 2:
            time.sleep(0.1)
        assert len(_gw_policy_rules(gw)) == 2
    finally:
        gw.restore()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(_gw_policy_rules(gw)) != 1:
        time.sleep(0.1)
    assert _gw_policy_rules(gw) == {30000: "30000"}
    tables = gw.lab.run("gw", "ip", "-4", "route", "show", "table", "all", "proto", "201").stdout
    assert [ln.split(" table ")[1].split()[0] for ln in tables.splitlines()] == ["30000"], tables
