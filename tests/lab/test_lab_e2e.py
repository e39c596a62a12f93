"""End to end through `snatgw run` in the lab, for each backend (bpf, nft), with real sockets:
per-rule egress and SNAT address, the three algorithms against snatgw.rules.select_addr,
new_gw, ICMP errors back to the inside socket, reload and restart with an open TCP session,
and nothing let in unasked.  A backend not built yet xfails (strict=False); nothing skips.
Each test's docstring says whether bpf and nft must agree exactly or where they may differ."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from ipaddress import IPv4Address

import pytest

from snatgw.layout import Algo
from snatgw.lab import clients
from snatgw.lab.demo import FLOW_SOURCES, PROTOS, Flow, expect, send
from snatgw.lab.netns import ns_socket
from snatgw.lab.topology import SERVERS
from snatgw.rules import select_addr

pytestmark = [pytest.mark.root, pytest.mark.lab]

#: backends that reproduce the original's address choice exactly (select_addr); the nft backend
#: leaves the choice to the kernel (docs/nftables.md): sh -> nf_nat `persistent` (hash of src),
#: sdh -> nf_nat's default (hash of src, dst), random -> `jhash ip saddr . ip daddr . th sport mod
#: N` (port-dependent, as the original's random).  So nft's address is in the rule's pool and
#: sticky per (src) / (src, dst) / (src, dst, sport), but not the pick of lvs-snat's jhash.
EXACT = {"bpf": True, "nft": False}

FLOWS = [(node, src, str(dst), proto) for node, src in FLOW_SOURCES for dst in SERVERS for proto in PROTOS]


def _addr(peer: str) -> str:
    return peer.split(":")[0]


def assert_address(gw, rule, src, dst, sport, seen: str) -> None:
    """The SNAT address as the backend promises it: select_addr's (exact) or one of the pool."""
    if EXACT[gw.backend]:
        assert seen == str(select_addr(rule.pool, rule.algo, IPv4Address(src), IPv4Address(dst), sport))
    else:
        assert IPv4Address(seen) in rule.pool


def _rule(gw, src, dst):
    r = gw.rules.match(IPv4Address(src), IPv4Address(dst), gw.lab.route(dst, src=src))
    assert r is not None
    return r


@pytest.mark.parametrize("node,src,dst,proto", FLOWS, ids=[f"{s}-{d}-{p}" for _, s, d, p in FLOWS])
def test_each_flow_leaves_by_its_rules_link_with_the_models_address(gw, node, src, dst, proto):
    """The server sees the SNAT address select_addr picks, arriving over the rule's link.
    Link: bpf and nft must agree exactly.  Address: bpf must be select_addr's; nft may differ
    within the rule's pool (the kernel's hash picks it, not lvs-snat's jhash)."""
    gw.check()
    f = Flow(node, src, dst, proto)
    send(gw.lab, f, gw.servers)
    expect(gw.lab, gw.rules, f)
    assert not f.error
    assert f.link == f.expect_link
    assert_address(gw, _rule(gw, src, dst), src, dst, f.sport, f.seen)


def test_sh_gives_an_inside_source_one_address_for_every_destination(gw):
    """Rule 3 (sh): 198.18.50.10 and .11 each keep one address toward both servers and any port.
    One address per source: both backends.  Which one: bpf exactly select_addr's; nft may differ
    within the pool (nf_nat `persistent` hashes the source with the kernel's own hash)."""
    gw.check()
    for src in ("198.18.50.10", "198.18.50.11"):
        rule = _rule(gw, src, "203.0.113.10")
        assert rule.algo == Algo.SH
        seen = {_addr(clients.udp_echo(gw.lab, "in50", dst, src=src)["peer"]) for dst in SERVERS for _ in range(3)}
        seen |= {_addr(clients.tcp_echo(gw.lab, "in50", dst, src=src)["peer"]) for dst in SERVERS}
        assert len(seen) == 1
        assert_address(gw, rule, src, "0.0.0.0", 0, seen.pop())


def test_sdh_keeps_one_address_per_source_and_destination_across_ports(gw):
    """Rule 2 (sdh): eight UDP source ports of one (src, dst) pair all leave from one address.
    One address for all ports: both backends.  Which one: bpf exactly select_addr's; nft may
    differ within the pool (nf_nat's default hash of src and dst)."""
    gw.check()
    src, dst = "198.18.40.12", "203.0.113.10"
    rule = _rule(gw, src, dst)
    assert rule.algo == Algo.SDH
    seen = {_addr(clients.udp_echo(gw.lab, "in40", dst, src=src, sport=41000 + i)["peer"]) for i in range(8)}
    assert len(seen) == 1
    assert_address(gw, rule, src, dst, 0, seen.pop())


def test_random_picks_the_address_from_the_source_port_as_the_model_does(gw):
    """Rule 1 (random): per source port, the address is select_addr's; several ports, several
    addresses.  Both backends: a UDP and a TCP flow from the same (src, dst, sport) leave from the
    same address, and twelve source ports spread over more than one address.  bpf must equal
    select_addr exactly; nft may differ within the pool (its own jhash of src . dst . sport)."""
    gw.check()
    src, dst = "198.18.40.11", "198.51.100.10"
    rule = _rule(gw, src, dst)
    assert rule.algo == Algo.RANDOM
    ports = range(40000, 40012)
    want = {p: str(select_addr(rule.pool, rule.algo, IPv4Address(src), IPv4Address(dst), p)) for p in ports}
    assert len(set(want.values())) > 1  # the test can tell random from sdh
    seen = {p: _addr(clients.udp_echo(gw.lab, "in40", dst, src=src, sport=p)["peer"]) for p in ports}
    again = {p: _addr(clients.tcp_echo(gw.lab, "in40", dst, src=src, sport=p)["peer"]) for p in ports}
    assert again == seen  # a second flow (another conntrack entry) with the same (src, dst, sport)
    assert len(set(seen.values())) > 1  # port-dependent: not one address per (src, dst) as sdh
    assert all(IPv4Address(a) in rule.pool for a in seen.values())
    if EXACT[gw.backend]:
        assert seen == want


def test_new_gw_sends_traffic_past_the_routing_table(gw):
    """198.18.50.10 -> 198.51.100.10 is routed to ISP2 but rule 3's new_gw takes it out via ISP1.
    bpf and nft must agree exactly (link and the pool's network)."""
    gw.check()
    assert gw.lab.route("198.51.100.10").oif == "eth2"
    for reply in (clients.tcp_echo(gw.lab, "in50", "198.51.100.10", src="198.18.50.10"),
                  clients.udp_echo(gw.lab, "in50", "198.51.100.10", src="198.18.50.10")):
        assert reply["link"] == "isp1"
        assert _addr(reply["peer"]).startswith("198.19.2.")


def test_udp_port_unreachable_reaches_the_inside_socket_with_original_addresses(gw):
    """ICMP port unreachable from the server is translated back: ECONNREFUSED on the inside socket.
    bpf and nft must agree exactly (errno, offender, ICMP type and code)."""
    gw.check()
    for node, src, dst in (("in40", "198.18.40.10", "203.0.113.10"), ("in50", "198.18.50.10", "198.51.100.10")):
        e = clients.udp_error(gw.lab, node, dst, port=clients.CLOSED_PORT, src=src)
        assert (e["errno"], e["offender"], e["type"], e["code"]) == ("ECONNREFUSED", dst, 3, 3)


def test_ttl_exceeded_from_isp1_reaches_the_inside_socket(gw):
    """A TTL-2 datagram dies at isp1; the time-exceeded from 198.19.2.1 reaches the inside socket.
    bpf and nft must agree exactly."""
    gw.check()
    e = clients.udp_error(gw.lab, "in40", "203.0.113.10", port=clients.ECHO_PORT, src="198.18.40.10", ttl=2)
    assert (e["errno"], e["offender"], e["type"]) == ("EHOSTUNREACH", "198.19.2.1", 11)


def test_reload_keeps_an_open_tcp_session(gw):
    """A TCP connection of a rule the failover does not change, open across a reload (to the
    failover config and back), keeps working, seen by the server from the same address and
    port.  bpf and nft must agree exactly."""
    gw.check()
    try:
        with clients.TcpSession(gw.lab, "in40", "198.51.100.10", src="198.18.40.11") as s:
            before = s.exchange()
            gw.lab.reload_gateway(gw.failover_conf)
            during = s.exchange()
            gw.lab.reload_gateway(gw.conf)
            after = s.exchange()
        assert before["peer"] == during["peer"] == after["peer"]
        # and new flows follow the new rules
        gw.lab.reload_gateway(gw.failover_conf)
        new = clients.tcp_echo(gw.lab, "in40", "203.0.113.10", src="198.18.40.10")
        assert new["link"] == "isp2" and _addr(new["peer"]).startswith("198.19.3.")
    finally:
        gw.restore()


def test_udp_flow_recovers_on_isp2_with_an_isp2_address_after_a_failover_edit(gw):
    """A UDP flow (one socket) that had an ISP1 address: after the failover reload (its rule gets
    new_gw 198.19.3.1 and ISP2's pool) its next datagram reaches the server through isp2 from an
    ISP2 address, and back on ISP1 after the reload back (spec "Rule changes and live
    sessions", turn 2: the session whose address left the pool is removed).  bpf and nft must
    agree exactly."""
    gw.check()
    try:
        with ns_socket(gw.lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3.0)
            s.bind(("198.18.40.10", 0))
            s.connect(("203.0.113.10", clients.ECHO_PORT))

            def exchange():
                s.send(b"ping")
                return json.loads(s.recv(65536))

            seen = [exchange()]
            gw.lab.reload_gateway(gw.failover_conf)
            seen.append(exchange())
            gw.lab.reload_gateway(gw.conf)
            seen.append(exchange())
        assert [(x["link"], _addr(x["peer"])[:10]) for x in seen] == [
            ("isp1", "198.19.2.7"), ("isp2", "198.19.3.7"), ("isp1", "198.19.2.7")]
    finally:
        gw.restore()


def test_daemon_restart_keeps_an_open_tcp_session(gw):
    """Stopping and starting `snatgw run` leaves an open TCP connection working, same mapping.
    bpf and nft must agree exactly (bpf keeps its pinned session map; nft its conntrack entry)."""
    gw.check()
    try:
        with clients.TcpSession(gw.lab, "in40", "198.51.100.10", src="198.18.40.12") as s:
            before = s.exchange()
            gw.lab.stop_gateway()
            gw.lab.start_gateway(gw.conf, gw.backend)
            after = s.exchange()
        assert before["peer"] == after["peer"]
    finally:
        gw.restore()


def test_sessions_survive_a_restart_across_which_their_devices_were_recreated(gw):
    """The daemon stopped (state kept), an inside device and an uplink recreated meanwhile
    under their names (another ifindex, as a VLAN or PPP device comes back), the daemon
    started: a UDP flow through both goes on with its mapping within a second, nothing of it
    leaving an uplink untranslated.  bpf adopted sessions that redirected to the old ifindexes
    (the hook check that makes sessions follow a device only compares within one daemon's
    life), so the flow stayed black-holed until its session expired; nft's conntrack never
    names devices.  bpf and nft must agree exactly."""
    from snatgw.lab import leakwatch

    gw.check()
    try:
        with ns_socket(gw.lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            s.bind(("198.18.40.12", 0))
            s.connect(("198.51.100.10", clients.ECHO_PORT))  # rule 1: out of eth2

            def exchange(deadline: float):
                end = time.monotonic() + deadline
                while time.monotonic() < end:
                    s.send(b"ping")
                    with contextlib.suppress(OSError):  # (socket.timeout: an OSError)
                        return json.loads(s.recv(65536))
                return None

            before = exchange(3.0)
            gw.lab.stop_gateway()
            watch = None
            try:
                gw.lab.recreate_link("lan40")
                gw.lab.recreate_link("eth2")
                watch = leakwatch.uplinks(gw.lab, ("198.18.0.0/16",))
                gw.lab.start_gateway(gw.conf, gw.backend)
                after = exchange(1.5)
            finally:
                leaks = watch.stop() if watch is not None else []
        assert before is not None and after is not None and after["peer"] == before["peer"], (before, after)
        assert leaks == []
    finally:
        gw.restore()


def test_unsolicited_packets_to_snat_addresses_reach_nobody_inside(gw):
    """UDP and TCP SYNs from the internet to every SNAT address and a range of ports arrive at the
    gateway (isp1/isp2 forward them) but no inside host sees any of them.  bpf and nft must
    agree exactly."""
    gw.check()
    probe = "meta l4proto { tcp, udp } th sport { 9998, 9999 }"
    inside = [clients.count_packets(gw.lab, node, probe) for node in ("in40", "in50")]
    via_isp = [clients.count_packets(gw.lab, isp, probe, hook="forward") for isp in ("isp1", "isp2")]
    targets = [str(a) for r in gw.rules for a in r.pool.addresses()]
    udp = ns_socket(gw.lab.ns("net"), socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("203.0.113.10", 9999))
    for addr in set(targets):
        for port in list(range(5000, 5010)) + list(range(32768, 32778)) + [7007, 40000]:
            udp.sendto(b"unsolicited", (addr, port))
        t = ns_socket(gw.lab.ns("net"), socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("203.0.113.10", 9998))
        t.settimeout(0.3)
        try:
            t.connect((addr, 40000))
        except OSError:
            pass
        finally:
            t.close()
    udp.close()
    # a reply trip proves everything sent before it has been through the lab
    clients.udp_echo(gw.lab, "in40", "203.0.113.10")
    assert sum(c() for c in via_isp) >= len(set(targets)) * 22
    assert [c() for c in inside] == [0, 0]


def test_flush_verb_removes_an_inside_hosts_sessions_from_the_running_datapath(gw):
    """`snatgw flush --inside ADDR` against the running daemon removes that host's sessions
    (conns no longer lists them) and leaves others; the host's next datagram makes a new one.
    bpf and nft must agree exactly."""
    from snatgw.lab.gateway import snatgw_json

    gw.check()
    clients.udp_echo(gw.lab, "in40", "203.0.113.10", src="198.18.40.10")
    clients.udp_echo(gw.lab, "in40", "198.51.100.10", src="198.18.40.11")

    def inside_hosts():
        return {s["inside"].split(":")[0] for s in snatgw_json(gw.lab, "conns")["sessions"]}

    assert {"198.18.40.10", "198.18.40.11"} <= inside_hosts()
    got = snatgw_json(gw.lab, "flush", "--inside", "198.18.40.10")
    assert got["flushed"] >= 1 and got["inside"] == "198.18.40.10"
    left = inside_hosts()
    assert "198.18.40.10" not in left and "198.18.40.11" in left
    clients.udp_echo(gw.lab, "in40", "203.0.113.10", src="198.18.40.10")
    assert "198.18.40.10" in inside_hosts()


def test_conns_of_a_rule_number_past_the_last_rule_is_an_error_not_an_empty_listing(gw):
    """`conns --rule 9` with 3 running rules: 9 is no rule number, no running rule's id and no
    session's: exit 2 saying so (it listed nothing, exit 0, as if there were no sessions), on
    the daemon's own stream of each backend (bpf: its pinned maps; nft: conntrack)."""
    from snatgw.lab.gateway import snatgw_argv
    from snatgw.lab.netns import run

    gw.check()
    clients.udp_echo(gw.lab, "in50", "198.51.100.10", src="198.18.50.10")  # a session of rule #3
    cp = run(snatgw_argv("conns", "--socket", gw.lab.socket_path, "--rule", "9"), check=False)
    assert (cp.returncode, cp.stdout) == (2, ""), cp
    assert cp.stderr == "snatgw conns: --rule 9: no rule #9 (there are 3 rules) and no sessions of rule id 9\n"
    cp = run(snatgw_argv("conns", "--socket", gw.lab.socket_path, "--json", "--rule", "3"), check=False)
    assert cp.returncode == 0 and "198.18.50.10:" in cp.stdout


def test_explain_live_answers_with_the_running_rules_after_a_reload(gw):
    """After the gateway is reloaded to the failover config, `explain --live` against the REF file
    answers with the running (failover) rule's ISP2 address, says the rules differ, and the
    flow really leaves that way.  bpf and nft must agree exactly."""
    from snatgw.lab.gateway import snatgw_json

    gw.check()
    try:
        gw.lab.reload_gateway(gw.failover_conf)
        d = snatgw_json(gw.lab, "explain", "--live", gw.conf, "--src", "198.18.40.10:40000",
                        "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1", "--new-gw-oif", "eth2")
        assert d is not None and d["live"]["differs"] and len(d["live"]["changed"]) == 1
        assert d["oif"] == "eth2" and d["snat"]["addr"].startswith("198.19.3.")
        seen = clients.tcp_echo(gw.lab, "in40", "203.0.113.10", src="198.18.40.10")
        assert seen["link"] == "isp2" and _addr(seen["peer"]).startswith("198.19.3.")
    finally:
        gw.restore()


def test_status_reports_hooks_maps_and_a_lost_carrier_on_the_running_gateway(gw):
    """`snatgw status` on the running gateway: healthy with every hook attached and the maps read
    (exit 0); with isp2's end of the uplink down, eth2 has no carrier: exit 1 naming it; healthy
    again when it comes back.  bpf and nft must agree exactly (their hooks differ: TC programs
    per device, nft base chains)."""
    from snatgw.lab.gateway import snatgw_argv
    from snatgw.lab.netns import run

    def status():
        cp = run(snatgw_argv("status", "--socket", gw.lab.socket_path, "-j"), check=False, timeout=30)
        return cp.returncode, json.loads(cp.stdout)

    gw.check()
    clients.udp_echo(gw.lab, "in40", "203.0.113.10", src="198.18.40.10")
    rc, d = status()
    assert (rc, d["healthy"], d["problems"]) == (0, True, [])
    hooks = d["datapath"]["hooks"]
    assert hooks and all(h["attached"] for h in hooks)
    if gw.backend == "bpf":
        assert {(h["device"], h["hook"]) for h in hooks} >= {("lan40", "ingress"), ("eth1", "ingress"),
                                                            ("eth2", "egress")}
        ct = next(m for m in d["datapath"]["maps"] if m["name"] == "snat_ct")
        assert ct["entries"] >= 2 and d["datapath"]["sessions"] >= 1
    assert d["links"]["eth2"]["carrier"] is True
    try:
        gw.lab.run("isp2", "ip", "link", "set", "dev", "up", "down")
        rc, d = status()
        assert rc == 1 and d["links"]["eth2"]["carrier"] is False
        assert [p for p in d["problems"] if p.startswith("link eth2: no carrier")]
    finally:
        gw.lab.run("isp2", "ip", "link", "set", "dev", "up", "up")
    rc, d = status()
    assert rc == 0, d["problems"]
