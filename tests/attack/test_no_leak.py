"""Edge invariant 1 in the lab, both backends: no packet with a source in a rule's `from` net
leaves an uplink untranslated (a leak watcher on the ISP side of each uplink counts them)."""

import socket
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.packet import raw

from snatgw.lab import clients as C
from snatgw.lab import leakwatch
from snatgw.lab.clients import ECHO_PORT
from snatgw.lab.demo import SETTINGS
from snatgw.lab.netns import ns_socket

from .conftest import FrameSender, scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1 = "203.0.113.10"
#: a rule for 198.18.40.0/24 toward ISP 2's net only: flows to S1 match no rule
PARTIAL = SETTINGS + ("virtual_server fwmark 1 {\n  snat_rule { from 198.18.40.0/24  to 198.51.100.0/24"
                      "  snat_ip 198.19.3.71 }\n}\n")


def test_routed_flow_from_a_from_net_is_stopped_at_the_uplink(agw):
    """A flow from a `from` net that no rule matches is routed by the kernel (unmatched pass)
    and would leave eth1 untranslated: the egress guard drops and counts every packet."""
    agw.reload(PARTIAL)
    try:
        n = scaled(20)
        before = agw.reasons().get("DROP_LEAK", 0)
        with agw.watch(["198.18.40.0/24"]) as leaks:
            with ns_socket(agw.lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("198.18.40.10", 0))
                for i in range(n):
                    s.sendto(b"leak-%d" % i, (S1, 7007))
            settle()
        after = agw.reasons().get("DROP_LEAK", 0)
    finally:
        agw.restore()
    assert leaks == [], [str(f) for f in leaks[:5]]
    assert after - before >= n


# ---------------------------------------------------------------- a catch-all `from`
#: Every source is in a `from` net, so both pools lie strictly inside one: the egress guard's
#: pool prefixes (docs/datapath.md "egress program: the leak guard", FROM_NET_POOL).  Flows to
#: S1's net leave eth1 as the lab's pool addresses (local on eth1); flows to S2's net leave eth2
#: as UNHELD, a pool address the gateway does not hold (its ISP routes it to the gateway: a
#: static neighbour on isp2, as a routed pool would be); 192.0.2.0/24 matches no rule's `to`,
#: so a flow there is routed untranslated (unmatched pass) and must be stopped at the uplink.
S2 = "198.51.100.10"
A, B = "198.18.40.10", "198.18.50.10"
UNHELD = "198.19.3.80"
BESIDE = "198.19.3.81"  # beside the pool: in the catch-all, not ours
CATCH_ALL = SETTINGS + (
    "virtual_server fwmark 1 {\n"
    "  snat_rule { from 0.0.0.0/0  to 203.0.113.0/24  gw 198.19.2.1  oif eth1  snat_ip 198.19.2.71-198.19.2.73 }\n"
    f"  snat_rule {{ from 0.0.0.0/0  to 198.51.100.0/24  gw 198.19.3.1  oif eth2  snat_ip {UNHELD} }}\n}}\n")


@pytest.fixture
def catch_all(agw):
    """The catch-all config, and ISP 2 sending UNHELD's traffic to the gateway's eth2."""
    from .conftest import mac_of

    lab = agw.lab
    lab.ip("isp2", "neigh", "replace", UNHELD, "lladdr", mac_of(lab, "gw", "eth2"), "dev", "up", "nud", "permanent")
    agw.reload(CATCH_ALL)
    try:
        yield agw
    finally:
        agw.restore()
        lab.ip("isp2", "neigh", "del", UNHELD, "dev", "up", check=False)


def _udp(src: str, dst: str, i: int, tag: bytes = b"raw") -> bytes:
    return raw(IP(src=src, dst=dst, id=0x5100 + i) / UDP(sport=41000 + i, dport=ECHO_PORT) / (tag + b"-%d" % i))


def test_catch_all_translates_and_stops_inside_sources_at_the_uplink(catch_all):
    """Under `from 0.0.0.0/0`: an inside host's UDP and TCP leave as pool addresses and their
    replies come back; its flow that no rule matches (routed by the kernel), and packets with
    an inside source that root on the gateway writes to a raw IP socket, never leave: counted
    DROP_LEAK (nft: the leak_guard chain; bpf: the guard table before the egress program)."""
    agw = catch_all
    lab, n = agw.lab, scaled(10)
    before = agw.reasons().get("DROP_LEAK", 0)
    with agw.watch() as leaks:
        u = C.udp_echo(lab, "in40", S1, src=A)
        t = C.tcp_echo(lab, "in40", S1, src=A)
        with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((A, 0))
            for i in range(n):
                s.sendto(b"unmatched-%d" % i, ("192.0.2.2", ECHO_PORT))
        refused = _raw_ip_from_gateway(lab, A, S1, n)
        settle()
    after = agw.reasons().get("DROP_LEAK", 0)
    assert leaks == [], [str(f) for f in leaks[:5]]
    assert agw.seen >= 4 and agw.dropped == 0  # the echoes' frames at least
    pool = ("198.19.2.71", "198.19.2.72", "198.19.2.73")
    assert u["peer"].rsplit(":", 1)[0] in pool and t["peer"].rsplit(":", 1)[0] in pool, (u, t)
    assert refused == n  # netfilter's drop in postrouting: sendto() says EPERM
    assert after - before >= 2 * n


def _settled(agw, reason: str, quiet: float = 0.3, bound: float = 5.0) -> int:
    """The reason's count once it has not moved for ``quiet`` s (at most ``bound`` s): an earlier
    test's last packets, still on their way under load, are not this test's (the catch-all
    test's unmatched datagrams came to DROP_LEAK here: 17 where 10 were sent)."""
    deadline = time.monotonic() + bound
    last = agw.reasons().get(reason, 0)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = agw.reasons().get(reason, 0)
        if now == last:
            break
        last = now
    return last


def _raw_ip_from_gateway(lab, src: str, dst: str, n: int) -> int:
    """``n`` datagrams from ``src`` written by the gateway itself (a raw IP socket: output and
    postrouting, as the gateway's own traffic); how many netfilter refused (EPERM)."""
    refused = 0
    with ns_socket(lab.ns("gw"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as r:
        for i in range(n):
            try:
                r.sendto(_udp(src, dst, i), (dst, 0))
            except PermissionError:
                refused += 1
    return refused


def test_catch_all_pool_address_the_gateway_does_not_hold(catch_all):
    """UNHELD is a pool prefix of the egress guard (FROM_NET_POOL) but no address of the gateway.
    bpf: translated traffic leaves as UNHELD and its replies come back, also when the kernel
    must fragment it (PASS_TRANSLATED, through netfilter: the guard table passes pool prefixes
    as the egress program does); frames written straight to eth2 (AF_PACKET: past netfilter,
    only the egress program judges them) leave from UNHELD and eth2's own address, while an
    inside source and the address beside the pool are dropped, DROP_LEAK; the gateway's own
    packets from UNHELD (a raw IP socket) leave too.
    nft: its leak_guard passes only addresses of the uplink (`fib saddr . oif type local`), so
    a flow translated to UNHELD, and the gateway's own packets from it, are dropped and counted
    DROP_LEAK (docs/nftables.md)."""
    agw = catch_all
    lab, n = agw.lab, scaled(5)
    before = _settled(agw, "DROP_LEAK")
    with agw.watch() as leaks, leakwatch.uplinks(lab, [f"{UNHELD}/31", "198.19.3.2/32"]) as out:
        refused = _raw_ip_from_gateway(lab, UNHELD, S2, n)
        if agw.backend == "nft":
            with pytest.raises(socket.timeout):
                C.udp_echo(lab, "in50", S2, src=B, timeout=1.0)
        else:
            u = C.udp_echo(lab, "in50", S2, src=B)
            assert u["peer"].rsplit(":", 1)[0] == UNHELD and u["link"] == "isp2", u
            _kernel_fragments_it(agw)
            tx = FrameSender(lab, "gw", "eth2", "isp2", "up")
            for i in range(n):
                for src in (A, BESIDE, UNHELD, "198.19.3.2"):
                    tx.send(_udp(src, S2, i, b"pkt"))
            tx.close()
        settle()
    after = agw.reasons().get("DROP_LEAK", 0)
    assert leaks == [], [str(f) for f in leaks[:5]]
    froms = sorted({str(f.src) for f in out.leaks})
    if agw.backend == "nft":
        assert froms == [] and refused == n and after - before >= n + 1
    else:
        assert froms == ["198.19.3.2", UNHELD] and out.dropped == 0 and refused == 0
        assert after - before == 2 * n  # A and BESIDE, by the egress program
        for tag in (b"raw-", b"pkt-"):
            assert len([f for f in out.leaks if str(f.src) == UNHELD and tag in f.frame]) == n, tag
        # the big datagram left in fragments (the kernel's: bpf never fragments), from UNHELD
        assert [f for f in out.leaks if str(f.src) == UNHELD and f.frame[14 + 6] & 0x20]


def _kernel_fragments_it(agw) -> None:
    """A 1,450-byte datagram without DF toward S2 while eth2's MTU is 1,400: translated and
    handed to the kernel (VERDICT_PASS_TRANSLATED, counted XLATE_NEW), which fragments it and
    sends the fragments through netfilter's postrouting, where the guard table judges them;
    the server gets it whole, from UNHELD."""
    lab = agw.lab
    lab.ip("gw", "link", "set", "dev", "eth2", "mtu", "1400")
    try:
        with ns_socket(lab.ns("in50"), socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER: IP_PMTUDISC_DONT (no DF)
            s.bind((B, 0))
            s.sendto(b"big-" + b"y" * 1446, (S2, ECHO_PORT))
            got = lab.servers.wait_for(lambda e: e.get("event") == "datagram"
                                       and str(e.get("data", "")).startswith("big-"), timeout=2)  # fmt: skip
    finally:
        lab.ip("gw", "link", "set", "dev", "eth2", "mtu", "1500")
    assert got is not None and got["peer"].rsplit(":", 1)[0] == UNHELD, got


def _frames_at_the_uplinks(lab, send, keep) -> list[bytes]:
    """Run ``send()`` with a raw capture on each uplink tap; the frames ``keep`` accepts."""
    caps = []
    try:
        for node, dev in leakwatch.UPLINK_TAPS:
            s = ns_socket(lab.ns(node), socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
            s.bind((dev, 0x0800))
            s.settimeout(0.05)
            caps.append(s)
        send()
        got = []
        for s in caps:
            while True:
                try:
                    frame, _ = s.recvfrom(65535)
                except (TimeoutError, BlockingIOError):
                    break
                if keep(frame):
                    got.append(frame)
        return got
    finally:
        for s in caps:
            s.close()


def test_link_padding_of_an_inside_frame_never_reaches_the_uplink(agw):
    """Bytes after the IP total length (the sender's link padding: stale NIC memory on hosts
    with "Etherleak" drivers) are cut before the frame leaves by an uplink, new and established
    flows alike, as kernel forwarding cuts them (bpf redirected them as they came)."""
    lab = agw.lab
    tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")

    def send():
        for i in range(3):  # the first makes the session, the next two are established
            tx.send(raw(IP(src="198.18.40.10", dst=S1) / UDP(sport=41234, dport=ECHO_PORT) / f"pad-{i}".encode())
                    + b"\xee" * 24)
        settle()

    try:  # not the echo's answers, nor in40's port unreachable about them
        got = _frames_at_the_uplinks(lab, send, lambda f: f[23] == 17 and f[30:34] == socket.inet_aton(S1)
                                     and b"pad-" in f)  # fmt: skip
    finally:
        tx.close()
    assert {f[42:47] for f in got} == {b"pad-0", b"pad-1", b"pad-2"}, got  # (a tap may see a frame twice)
    for f in got:
        assert len(f) == 14 + int.from_bytes(f[16:18], "big") and b"\xee" * 4 not in f, f.hex()


def test_a_source_routed_packet_from_inside_never_leaves_translated_or_not(agw):
    """A datagram with a loose or strict source route (IP options LSRR/SSRR), new and of a live
    flow, leaves no uplink: the kernel drops source-routed packets before forwarding and both
    backends leave them to it (bpf translated and redirected them, source route and all); the
    same datagram without options still goes out translated."""
    lab = agw.lab
    tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
    route = bytes([198, 51, 100, 99])

    def send():
        for i, opt in enumerate((b"\x83\x07\x04" + route + b"\x00", None, b"\x89\x07\x04" + route + b"\x00")):
            ip_hdr = IP(src="198.18.40.10", dst=S1, options=[opt]) if opt else IP(src="198.18.40.10", dst=S1)
            tx.send(raw(ip_hdr / UDP(sport=41240, dport=ECHO_PORT) / f"srr-{i}".encode()))
            settle()

    try:
        got = _frames_at_the_uplinks(lab, send, lambda f: b"srr-" in f)
    finally:
        tx.close()
    tags = {f[f.index(b"srr-"):f.index(b"srr-") + 5] for f in got}
    assert tags == {b"srr-1"}, [f.hex() for f in got]  # the plain one (its session made here) only
    for f in got:
        assert f[14] == 0x45 and f[26:30] != socket.inet_aton("198.18.40.10"), f.hex()  # translated, no options
