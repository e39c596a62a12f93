"""Edge invariant 3 in the lab, both backends: an inside host cannot send with a source that
is not its own network's.  The attack of issue 10: host B sends with A's SNAT address and port
as its source, so the server's reply would land in A's session; the gateway refuses it."""

import json
import socket
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import raw

from snatgw.lab import leakwatch
from snatgw.lab.clients import ECHO_PORT
from snatgw.lab.demo import config_text
from snatgw.lab.netns import ns_socket

from .conftest import FrameSender, mac_of, scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

S1 = "203.0.113.10"


def test_spoofed_pool_source_is_refused_and_never_reaches_a_session(agw):
    """A's UDP session to S1; B (same LAN) sends as A's SNAT address:port, as the gateway's own
    addresses and as another network's host: none reaches the server, A's socket gets nothing
    but its own replies, every spoof is counted DROP_SPOOFED."""
    lab, servers = agw.lab, agw.lab.servers
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as a:
        a.settimeout(2)
        a.bind(("198.18.40.10", 0))
        a.sendto(b"hello-from-a", (S1, ECHO_PORT))
        a.recv(65536)
        seen = servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data") == "hello-from-a")
        assert seen is not None
        snat, sport = seen["peer"].rsplit(":", 1)
        n = scaled(10)
        before = agw.reasons().get("DROP_SPOOFED", 0)
        forged = [snat, "198.19.2.2", "198.18.40.1", "198.18.50.10", "192.0.2.77"]
        tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
        for i in range(n):
            for src in forged:
                tx.send(raw(IP(src=src, dst=S1) / UDP(sport=int(sport), dport=ECHO_PORT) / f"spoof-{i}".encode()))
        tx.close()
        settle(0.5)
        spoofed = agw.reasons().get("DROP_SPOOFED", 0) - before
        landed, leaked_to_a = _landed(servers, a, "spoof-")
    assert landed is None, landed
    assert not leaked_to_a
    assert spoofed >= n * len(forged)


def test_an_unheld_pool_address_in_no_from_net_is_refused_as_an_inside_source(agw):
    """Edge invariant 3 for a pool the gateway does not hold, on lan40's subnet, in no rule's
    `from` net (corpus `spoofed_pool_source_in_no_from_net`, live): the route back to it leads
    out of lan40 and no rule matches it, so only its pool prefix in the guard's trie (bpf
    step 2a; nft's antispoof set) stops in40 sending as the gateway's mapping of lan50's flow.
    in50's datagrams leave translated to it (the watcher sees that very source: it watched);
    in40's spoofs with it (UDP into lan50's mapping, TCP SYNs) reach nothing, leave no uplink
    and are counted DROP_SPOOFED."""
    lab, servers = agw.lab, agw.lab.servers
    pin = "198.18.40.200"
    agw.reload(config_text([{"from": "198.18.50.0/24", "snat_ip": pin}]))
    try:
        n = scaled(10)
        with ns_socket(lab.ns("in50"), socket.AF_INET, socket.SOCK_DGRAM) as c, agw.watch() as flagged:
            c.bind(("198.18.50.10", 0))
            for i in range(n):
                c.sendto(f"from-lan50-{i}".encode(), (S1, ECHO_PORT))
            seen = servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data") == f"from-lan50-{n - 1}")
            assert seen is not None and seen["peer"].startswith(pin + ":"), seen
            nport = int(seen["peer"].rsplit(":", 1)[1])
            before = agw.reasons().get("DROP_SPOOFED", 0)
            tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
            for i in range(n):
                tx.send(raw(IP(src=pin, dst=S1) / UDP(sport=nport, dport=ECHO_PORT) / f"spoof-{i}".encode()))
                tx.send(raw(IP(src=pin, dst=S1) / TCP(sport=20000 + i, dport=80, flags="S")))
            tx.close()
            settle(0.5)
            spoofed = agw.reasons().get("DROP_SPOOFED", 0) - before
            landed = servers.wait_for(lambda e: str(e.get("data", "")).startswith("spoof-"), timeout=0.5)
        translated = [f for f in flagged if str(f.src) == pin and b"from-lan50" in f.frame]
        leaks = [str(f) for f in flagged if f not in translated]
    finally:
        agw.restore()
    assert landed is None, landed
    assert leaks == [], leaks
    assert len(translated) >= n and agw.dropped == 0, (len(translated), agw.dropped)
    assert spoofed >= 2 * n, spoofed


@pytest.mark.parametrize("declared", [True, False], ids=["inside", "undeclared"])
def test_a_device_whose_ifindex_clashes_cannot_send_into_another_devices_session(agw, declared):
    """A session vouches for its source by the ingress ifindex's low 16 bits (docs/datapath.md
    step 2a).  A device made at ifindex lan40 + 65,536 shares them: a host behind it sends as
    A, with A's port, toward A's server.  Declared an inside device (the daemon restarted with
    it), bpf counts each frame DROP_SPOOFED (CFG_F_IIF_AMBIGUOUS turns the vouching off) and
    nft's reverse-path check drops it; left undeclared, bpf's programs never see it and the
    leak guard drops what the kernel forwards, and nft, whose conntrack would find A's session
    by the tuple alone, drops a session's packet from a device that is not inside.  Either way
    nothing reaches the server, A gets nothing, nothing private leaves an uplink."""
    lab, servers = agw.lab, agw.lab.servers
    atk = f"{lab.prefix}-atk"  # not a lab node: its namespace is made and removed here
    lan40 = json.loads(lab.ip("gw", "-j", "link", "show", "dev", "lan40").stdout)[0]["ifindex"]
    subprocess.run(["ip", "netns", "add", atk], check=True)
    try:
        lab.ip("gw", "link", "add", "lan41", "index", str(lan40 + 0x10000), "type", "veth", "peer", "name", "atk0",
               "netns", atk)  # fmt: skip
        lab.ip("gw", "link", "set", "lan41", "up")
        subprocess.run(["ip", "-n", atk, "link", "set", "atk0", "up"], check=True)
        if declared:  # the lab's gateway names its inside devices on the command line
            lab.stop_gateway()
            lab.start_gateway(agw.conf, agw.backend, extra=("--inside", "lan41"))
        with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as a, agw.watch() as leaks:
            a.settimeout(2)
            a.bind(("198.18.40.10", 0))
            a.sendto(b"hello-from-a", (S1, ECHO_PORT))
            a.recv(65536)
            sport = a.getsockname()[1]
            n = scaled(20)
            before = agw.reasons()
            tx = _sender(lab, atk)
            for i in range(n):
                tx.send(raw(IP(src="198.18.40.10", dst=S1) / UDP(sport=sport, dport=ECHO_PORT) / f"clash-{i}".encode()))
            tx.close()
            settle(0.5)
            after = agw.reasons()
            landed, got = _landed(servers, a, "clash-")
        assert landed is None, landed
        assert not got
        assert leaks == [] and agw.seen > 0
        counted = "DROP_SPOOFED" if declared or agw.backend == "nft" else "DROP_LEAK"
        assert after.get(counted, 0) - before.get(counted, 0) >= n, (counted, before, after)
    finally:
        if declared:
            lab.stop_gateway()
            lab.start_gateway(agw.conf, agw.backend)
        lab.ip("gw", "link", "del", "lan41", check=False)
        subprocess.run(["ip", "netns", "del", atk], check=False)


def _session_to_s1(servers, a: socket.socket, addr: str, tag: bytes):
    """A UDP session from ``addr`` (socket ``a``) to S1's echo port: (its SNAT address, its SNAT
    port, S1's reply as the inside host received it)."""
    a.settimeout(2)
    a.bind((addr, 0))
    a.sendto(tag, (S1, ECHO_PORT))
    a.recv(65536)
    aport = a.getsockname()[1]
    seen = servers.wait_for(lambda e: e.get("event") == "datagram" and e.get("data") == tag.decode())
    assert seen is not None
    snat, sport = seen["peer"].rsplit(":", 1)
    return snat, sport, IP(src=S1, dst=addr, ttl=62) / UDP(sport=ECHO_PORT, dport=aport) / tag


def test_an_icmp_error_from_another_inside_device_never_enters_a_session(agw):
    """Edge invariant 3 for ICMP errors (docs/datapath.md step 7; docs/nftables.md `forward`):
    A on lan40 has a UDP session to S1; B on lan50 sends a port and a host unreachable and a
    frag-needed to S1 quoting S1's reply as A received it.  Neither backend lets them out:
    conntrack alone finds A's connection by the quoted tuple (RELATED) whatever the device, so
    nft checks the inside device the connection was made on (ct mark).  Counted
    DROP_NO_SESSION on both.  A's own identical errors from lan40 still leave, translated to
    A's SNAT address and port."""
    lab, servers = agw.lab, agw.lab.servers
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as a:
        snat, sport, reply = _session_to_s1(servers, a, "198.18.40.10", b"hello-err-a")
        n = scaled(5)

        def errors(src: str) -> list[bytes]:
            # port and host unreachable, frag-needed with the link's own MTU (S1's path MTU
            # stays as it is for the rest of the tier)
            return [raw(IP(src=src, dst=S1) / ICMP(type=3, code=code, nexthopmtu=mtu) / raw(reply))
                    for code, mtu in ((3, 0), (1, 0), (4, 1500))]

        before = agw.reasons().get("DROP_NO_SESSION", 0)
        with leakwatch.uplinks(lab, [f"{S1}/32"]) as w:  # an ICMP error quoting S1's packet
            tx = FrameSender(lab, "in50", "eth0", "gw", "lan50")
            for _ in range(n):
                for e in errors("198.18.50.10"):
                    tx.send(e)
            tx.close()
            settle(0.5)
            foreign = w.stop()
        dropped = agw.reasons().get("DROP_NO_SESSION", 0) - before
        with leakwatch.uplinks(lab, [f"{S1}/32"]) as w:
            tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
            for e in errors("198.18.40.10"):
                tx.send(e)
            tx.close()
            settle(0.5)
            own = w.stop()
    assert foreign == [], [str(f) for f in foreign]
    assert dropped >= 3 * n, dropped
    assert len(own) == 3, [str(f) for f in own]
    for f in own:  # outer source and quoted destination: A's mapping, nothing of lan40
        q = IP(f.frame[14:])
        assert q.src == snat and q[ICMP].payload.dst == snat, f
        assert q[ICMP].payload.payload.dport == int(sport), f


def _landed(servers, a: socket.socket, tag: str):
    """(the server's first datagram whose data starts with ``tag`` or None, the datagrams with
    ``tag`` that reached A's socket)."""
    landed = servers.wait_for(lambda e: str(e.get("data", "")).startswith(tag), timeout=0.5)
    a.settimeout(0.3)
    got = []
    try:
        while True:
            got.append(a.recv(65536))
    except OSError:
        pass
    return landed, [d for d in got if tag.encode() in d]


def _sender(lab, atk_ns: str) -> FrameSender:
    """A FrameSender from the attacker's namespace (not a lab node) into lan41."""
    tx = FrameSender.__new__(FrameSender)
    src = json.loads(subprocess.run(["ip", "-n", atk_ns, "-j", "link", "show", "dev", "atk0"], check=True,
                                    capture_output=True, text=True).stdout)[0]["address"]  # fmt: skip
    tx.src = bytes.fromhex(src.replace(":", ""))
    tx.dst = bytes.fromhex(mac_of(lab, "gw", "lan41").replace(":", ""))
    tx.sock = ns_socket(atk_ns, socket.AF_PACKET, socket.SOCK_RAW)
    tx.sock.bind(("atk0", 0))
    tx.sent = 0
    return tx


def test_an_icmp_error_from_a_neighbour_on_the_same_link_never_enters_a_session(agw):
    """Edge invariant 3 on A's own link (docs/datapath.md "ICMP errors"; docs/nftables.md
    "ICMP errors from inside"): A (198.18.40.10) has a UDP session to S1; B (198.18.40.11, on
    the same link, its true address) sends a port unreachable and a reassembly time exceeded
    quoting S1's reply as A received it.  Only the reply's destination sends those kinds, so
    neither backend lets them out, counted DROP_ICMP_NOT_FROM_HOST on both (nft: the ct's
    original source, by the set same_host).  B's host unreachable (a router's kind): A is
    on-link, so no router stands between the gateway and A and bpf drops it too; nft cannot
    tell on-link from routed and lets it out, translated.  A's own port unreachable leaves,
    translated to A's SNAT address and port.  Careless and hostile: B's port unreachable with a
    truncated quote and one from the gateway's own lan40 address never leave; the latter is
    DROP_SPOOFED."""
    lab, servers = agw.lab, agw.lab.servers
    a_addr, b_addr = "198.18.40.10", "198.18.40.11"
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as a:
        snat, sport, reply = _session_to_s1(servers, a, a_addr, b"hello-err-nb")
        reply = raw(reply)

        def err(src: str, type_: int, code: int, quote: bytes = reply) -> bytes:
            return raw(IP(src=src, dst=S1) / ICMP(type=type_, code=code) / quote)

        n = scaled(3)
        before = agw.reasons()
        tx = FrameSender(lab, "in40", "eth0", "gw", "lan40")
        with leakwatch.uplinks(lab, [f"{S1}/32"]) as w:  # an ICMP error quoting S1's packet
            for _ in range(n):
                tx.send(err(b_addr, 3, 3))
                tx.send(err(b_addr, 11, 1))
                tx.send(err(b_addr, 3, 3, reply[:20]))  # the quote cut inside its header
                tx.send(err("198.18.40.1", 3, 3))  # the gateway's own address
            settle(0.5)
            foreign = w.stop()
        after = agw.reasons()
        with leakwatch.uplinks(lab, [f"{S1}/32"]) as w:
            tx.send(err(b_addr, 3, 1))  # host unreachable: a router's kind, from the link
            tx.send(err(a_addr, 3, 3))  # A's own port unreachable
            settle(0.5)
            own = w.stop()
        tx.close()

    def grew(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert foreign == [], [str(f) for f in foreign]
    assert grew("DROP_ICMP_NOT_FROM_HOST") >= 2 * n, (agw.backend, before, after)
    assert grew("DROP_SPOOFED") >= n, (agw.backend, before, after)
    kinds = sorted((IP(f.frame[14:])[ICMP].type, IP(f.frame[14:])[ICMP].code) for f in own)
    assert kinds == ([(3, 3)] if agw.backend == "bpf" else [(3, 1), (3, 3)]), (agw.backend, own)
    for f in own:  # outer source and quoted destination: A's mapping, nothing of lan40
        q = IP(f.frame[14:])
        assert q.src == snat and q[ICMP].payload.dst == snat, f
        assert q[ICMP].payload.payload.dport == int(sport), f
