"""The nft backend with real traffic (root, mark nft): TCP, UDP and ping from the lab's inside
hosts through <P>-gw, asserting the source address and link the server saw per rule, new_gw
steering, a reload that keeps open sessions (and moves an edited rule's sessions to its new
new_gw), the no-session TCP drop, `unmatched drop`, and that stop() leaves nothing behind."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest

from snatgw.config.parse import parse_text
from snatgw.datapath.nft import render as R
from snatgw.lab import clients as C
from snatgw.lab.netns import ns_socket

from tests.nft.conftest import FAILOVER, REF, cfg

pytestmark = [pytest.mark.nft, pytest.mark.root]

S1, S2 = "203.0.113.10", "198.51.100.10"  # leave via eth1/isp1 and eth2/isp2 by the routing table


def _ip(peer: str) -> IPv4Address:
    return IPv4Address(peer.rsplit(":", 1)[0])


def _in(addr: IPv4Address, first: str, last: str) -> bool:
    return IPv4Address(first) <= addr <= IPv4Address(last)


def _isp1(a):
    return _in(a, "198.19.2.71", "198.19.2.73")


def _isp2(a):
    return _in(a, "198.19.3.71", "198.19.3.73")


@contextmanager
def _no_nft_process(monkeypatch):
    """Inside the block subprocess.run refuses to start `nft`: what is read must come by netlink."""
    real_run = subprocess.run

    def no_nft(argv, *a, **kw):
        assert "nft" not in [str(x) for x in argv], argv
        return real_run(argv, *a, **kw)

    monkeypatch.setattr(subprocess, "run", no_nft)
    try:
        yield
    finally:
        monkeypatch.setattr(subprocess, "run", real_run)


@pytest.mark.parametrize(
    "node,src,dst,link,pool",
    [
        ("in40", "198.18.40.10", S1, "isp1", _isp1),  # rule 2: gw 198.19.2.1 oif eth1, sdh
        ("in40", "198.18.40.11", S2, "isp2", _isp2),  # rule 1: gw 198.19.3.1 oif eth2, random
        ("in50", "198.18.50.10", S2, "isp1", _isp1),  # rule 3: new_gw 198.19.2.1 overrides the route
    ],
)
def test_each_flow_leaves_by_its_rule_with_its_pool(lab, backend, node, src, dst, link, pool):
    """TCP, UDP and ping: the server sees a pool address of the rule and the rule's link."""
    with backend():
        t = C.tcp_echo(lab, node, dst, src=src)
        u = C.udp_echo(lab, node, dst, src=src)
        p = C.ping(lab, node, dst, src=src, servers=lab.servers)
    assert pool(_ip(t["peer"])) and t["link"] == link
    assert pool(_ip(u["peer"])) and u["link"] == link
    assert p["reply"] and pool(IPv4Address(p["seen"]["peer"])) and p["seen"]["link"] == link


def test_sh_gives_an_inside_host_one_address_for_every_destination(lab, backend):
    """algo sh (persistent): 198.18.50.10 appears as one address to both servers, every time."""
    with backend():
        seen = {_ip(C.tcp_echo(lab, "in50", dst, src="198.18.50.10")["peer"]) for dst in (S1, S2, S1, S2)}
    assert len(seen) == 1


def test_sdh_keeps_one_address_per_source_and_destination(lab, backend):
    """algo sdh (nf_nat default): repeated connections of one (src, dst) share one address."""
    with backend():
        seen = {_ip(C.tcp_echo(lab, "in40", S1, src="198.18.40.12")["peer"]) for _ in range(4)}
    assert len(seen) == 1 and _isp1(seen.pop())


def test_random_spreads_one_source_over_the_pool_by_source_port(lab, backend):
    """algo random (jhash of src, dst, sport): different source ports use several pool addresses."""
    with backend():
        seen = {_ip(C.udp_echo(lab, "in40", S2, src="198.18.40.10", sport=20000 + i)["peer"]) for i in range(12)}
        again = _ip(C.udp_echo(lab, "in40", S2, src="198.18.40.10", sport=20000)["peer"])
    assert len(seen) >= 2 and all(_isp2(a) for a in seen)
    assert again in seen


def _rx(lab, node: str) -> int:
    """Packets received on the ISP router's `up` link (from the gateway)."""
    out = json.loads(lab.run(node, "ip", "-j", "-s", "link", "show", "dev", "up").stdout)
    return int(out[0]["stats64"]["rx"]["packets"])


def test_reload_keeps_unchanged_rules_sessions_and_removes_those_whose_address_left(lab, backend):
    """Atomic reload to the failover config: an open TCP session of an unchanged rule survives
    with its address; the edited rule's session (its ISP1 address left the rule's pool) has
    its conntrack entry deleted; new flows take the new pool by isp2."""
    rule2 = cfg(REF).rules.rules[1]
    with backend(REF) as b:
        kept = C.TcpSession(lab, "in40", S2, src="198.18.40.11")  # rule 1, unchanged
        moved = C.TcpSession(lab, "in40", S1, src="198.18.40.10")  # rule 2, gets new_gw and pool
        try:
            k0, m0 = kept.exchange(), moved.exchange()
            assert m0["link"] == "isp1" and _isp1(_ip(m0["peer"]))
            assert [s.rule_id for s in b.sessions() if s.inside == moved.local] == [rule2.rule_id]
            b.apply(cfg(FAILOVER))
            left = [s for s in b.sessions() if s.inside == moved.local]
            k1 = kept.exchange()
            fresh = C.tcp_echo(lab, "in40", S1, src="198.18.40.12")
        finally:
            kept.close()
            # its conntrack entry is gone: a FIN would be INVALID, dropped (no_session), and
            # retransmitted by in40 for minutes into later tests' counters; a reset is sent once
            moved.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            moved.close()
    assert k1["peer"] == k0["peer"] and k1["link"] == "isp2"
    assert left == [] and b.last_removed >= 1
    assert _isp2(_ip(fresh["peer"])) and fresh["link"] == "isp2"


def test_failover_edit_moves_a_udp_flow_to_isp2_with_an_isp2_address(lab, backend):
    """A UDP flow (one socket, one source port) that had an ISP1 address goes on after the
    failover edit through isp2 with an ISP2 address (spec "Rule changes and live sessions")."""
    with backend(REF) as b, ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.bind(("198.18.40.10", 0))
        s.connect((S1, C.ECHO_PORT))

        def exchange():
            s.send(b"ping")
            return json.loads(s.recv(65536))

        before = exchange()
        b.apply(cfg(FAILOVER))
        after = exchange()
    assert before["link"] == "isp1" and _isp1(_ip(before["peer"]))
    assert after["link"] == "isp2" and _isp2(_ip(after["peer"]))


def _tcp_ack(src: str, dst: str, sport: int, dport: int) -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1000, 2000, 5 << 4, 0x10, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(hdr))
    return hdr[:16] + struct.pack("!H", C._icmp_csum(pseudo + hdr)) + hdr[18:]


@pytest.mark.parametrize("loose", ["1", "0"])
def test_tcp_ack_without_a_session_is_dropped_and_counted(lab, backend, loose):
    """A bare ACK that matches a rule but has no session never leaves (untranslated) - counted,
    whether conntrack calls it NEW (tcp_loose=1, the default) or INVALID (tcp_loose=0)."""
    lab.run("gw", "sysctl", "-q", "-w", f"net.netfilter.nf_conntrack_tcp_loose={loose}")
    with backend() as b:
        before = b.stats().reasons["DROP_NO_SESSION"]
        rx = _rx(lab, "isp1")
        with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as s:
            s.bind(("198.18.40.10", 0))
            for i in range(3):
                s.sendto(_tcp_ack("198.18.40.10", S1, 41000 + i, 7007), (S1, 0))
        after = None
        for _ in range(20):
            after = b.stats().reasons["DROP_NO_SESSION"]
            if after >= before + 3:
                break
        leaked = _rx(lab, "isp1") - rx  # packets that reached ISP 1 meanwhile (ARP at most)
    lab.run("gw", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_loose=1")
    assert after >= before + 3
    assert leaked < 3


def test_unmatched_drop_refuses_flows_no_rule_matches(lab, backend):
    """With `unmatched drop`, in50's flow (no rule for 198.18.50.0/24) is dropped and counted."""
    text = ("snatgw {\n inside lan40 lan50\n unmatched drop\n}\nvirtual_server fwmark 1 {\n"
            " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    with backend(text) as b:
        ok = C.udp_echo(lab, "in40", S1, src="198.18.40.10")
        with pytest.raises(OSError):
            C.udp_echo(lab, "in50", S1, src="198.18.50.10", timeout=1.0)
        dropped = b.stats().reasons["DROP_UNMATCHED"]
    assert _ip(ok["peer"]) == IPv4Address("198.19.2.71")
    assert dropped >= 1


def test_sessions_and_stats_come_from_conntrack_and_counters(lab, backend):
    """sessions() lists the flow with inside, remote and NAT address and its rule; stats count it."""
    with backend() as b:
        with C.TcpSession(lab, "in50", S1, src="198.18.50.11") as t:
            seen = t.exchange()
            sessions = [s for s in b.sessions() if s.inside == t.local]
            stats = b.stats()
    (s,) = sessions
    rule = cfg(REF).rules.rules[2]
    assert (s.proto, s.state, s.remote, s.nat) == ("tcp", "ESTABLISHED", f"{S1}:7007", seen["peer"])
    assert s.rule_id == rule.rule_id
    assert 7000 < s.expires <= 7440  # tcp_established from the settings, not the kernel's 5 days
    assert 0 <= s.idle < 60
    assert stats.rules[rule.rule_id].packets > 0 and stats.rules[rule.rule_id].sessions >= 1
    assert stats.reasons["XLATE_NEW"] >= 1
    # per-session counters: conntrack keeps none while nf_conntrack_acct is 0 (a namespace's
    # default): none reported, where they used to be a made-up 0 in `conns --json`
    assert s.packets_out is None and "packets_out" not in s.as_dict()


def test_sessions_carry_conntracks_counters_when_it_keeps_them(lab, backend):
    """With nf_conntrack_acct 1 in the gateway's namespace, a session's packets and bytes per
    direction come from conntrack."""
    lab.run("gw", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1")
    try:
        with backend() as b:
            with C.TcpSession(lab, "in50", S1, src="198.18.50.11") as t:
                t.exchange()
                (s,) = [s for s in b.sessions() if s.inside == t.local]
    finally:
        lab.run("gw", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=0")
    assert s.packets_out >= 2 and s.packets_in >= 2 and s.bytes_out > 0 and s.bytes_in > 0
    assert s.as_dict()["packets_out"] == s.packets_out


def test_a_rules_sessions_made_are_counted_for_the_rate_and_its_live_ones_apart(lab, backend):
    """A rule's `sessions` are those it made (its new_ counter), in stats and in the rate's samples
    (counters()), as the bpf backend counts them (ipvsadm's Conns; `adm -L --rate`'s CPS); `live`
    is how many live now (the metric's gauge).  counters() gave 0 for every rule, so nft's CPS
    was always 0, and stats gave the live count."""
    rule = cfg(REF).rules.rules[2]  # 198.18.0.0/16: in50's flows
    with backend() as b:
        before = b.counters().rules[rule.rule_id].sessions
        for sport in (41001, 41002):
            C.udp_echo(lab, "in50", S1, src="198.18.50.11", sport=sport)
        made, st = b.counters().rules[rule.rule_id].sessions, b.stats().rules[rule.rule_id]
    assert made - before == 2 and st.sessions == made and st.live == 2


def test_stats_read_the_counters_by_netlink_without_an_nft_process(lab, backend, monkeypatch):
    """stats() (metrics scrapes, `adm --rate`) read the table's named counters through
    nf_tables netlink (datapath/nftnl.py): no `nft` process, and the figures `nft list
    counters` gives: between an `nft` listing just before and one just after (a packet may
    cross the gateway meanwhile: an earlier test's orphaned socket retransmitting its FIN,
    counted no_session), and exactly those figures when the two listings agree."""

    def listed() -> dict:
        out = json.loads(lab.run("gw", "nft", "-j", "list", "counters", "table", R.FAMILY, R.TABLE).stdout)
        return {o["counter"]["name"]: (o["counter"]["packets"], o["counter"]["bytes"])
                for o in out["nftables"] if "counter" in o}  # fmt: skip

    rule = cfg(REF).rules.rules[1]  # 198.18.40.10 -> S1 leaves by rule 2
    name = R.counter_name(rule)
    with backend() as b:
        C.udp_echo(lab, "in40", S1, src="198.18.40.10")
        for _ in range(5):  # a read the listings bracket exactly, if the lab is quiet enough
            before = listed()
            with _no_nft_process(monkeypatch):
                got = b._counters()
                stats = b.stats()
            after = listed()
            if before == after:
                break
    assert set(got) == set(before) == set(after) and R.C_SPOOFED in got
    for k in got:
        assert all(before[k][i] <= got[k][i] <= after[k][i] for i in (0, 1)), (k, before, got, after)
    assert before != after or got == before, (before, got)
    assert got[name][0] >= 2  # the datagram and its reply
    assert got[name][0] <= stats.rules[rule.rule_id].packets <= after[name][0]


def test_the_hook_check_reads_the_table_by_netlink_and_restores_what_went(lab, backend, monkeypatch):
    """check_hooks (every tick) learns the table's chains and rule count by nf_tables netlink
    (nftnl.table_shape: what `nft -j list table` shows), with no `nft` process while all is in
    place; a flushed chain, then a deleted table, are found and put back."""
    from snatgw.datapath import nftnl

    with backend() as b:
        listed = json.loads(lab.run("gw", "nft", "-j", "list", "table", R.FAMILY, R.TABLE).stdout)["nftables"]
        want = ({o["chain"]["name"] for o in listed if "chain" in o}, sum(1 for o in listed if "rule" in o))
        chains = {name for name, _ in R._chain_defs()}  # what the hook check asks about
        assert want[0] == chains and want[1] > 10
        assert nftnl.table_shape(R.FAMILY, R.TABLE, chains, b.netns) == want
        with _no_nft_process(monkeypatch):
            assert b.check_hooks() == []
        lab.run("gw", "nft", "flush", "chain", R.FAMILY, R.TABLE, "forward")
        assert [m for m in b.check_hooks() if m.endswith(" rules")]
        assert nftnl.table_shape(R.FAMILY, R.TABLE, chains, b.netns) == want
        lab.run("gw", "nft", "delete", "table", R.FAMILY, R.TABLE)
        assert nftnl.table_shape(R.FAMILY, R.TABLE, chains, b.netns) is None
        assert b.check_hooks() == [f"nft table {R.FAMILY} {R.TABLE}"]
        assert nftnl.table_shape(R.FAMILY, R.TABLE, chains, b.netns) == want


def test_a_large_table_is_counted_by_the_gc_tick_not_by_every_stats(lab, backend, monkeypatch):
    """Issue 14 on nft: above COUNT_FRESH_MAX conntrack entries stats() answers with the GC
    tick's last count (a dump is ~1 s per 100k entries) and the tick counts again only after
    GC_DUTY-1 times its own duration; at or below, stats() counts afresh."""
    import snatgw.datapath.nft.backend as NB

    with backend() as b:
        with C.TcpSession(lab, "in50", S1, src="198.18.50.11") as t:
            t.exchange()
            monkeypatch.setattr(NB, "COUNT_FRESH_MAX", 0)  # "large": every table
            b.expire()  # the tick counts
            counted = b._tally_cache
            assert counted is not None and sum(counted.by_mark.values()) >= 1
            counted.by_mark[next(iter(counted.by_mark))] += 1000  # a marker: stats must give this
            assert b.stats().sessions == sum(counted.by_mark.values())
            b._next_tally = float("inf")
            b.expire()  # paced: no new count
            assert b._tally_cache is counted
            monkeypatch.setattr(NB, "COUNT_FRESH_MAX", 10**9)  # small again: counted afresh
            assert b.stats().sessions == sum(counted.by_mark.values()) - 1000


def test_above_the_listing_limit_stats_say_why_the_lists_are_empty(lab, backend, monkeypatch):
    """Above PRESSURE_LIST_MAX sessions nft takes no per-host and per-address lists (a listing
    per count): stats say so ("unlisted", hosts_counted None, no hosts_total) instead of
    answering empty lists and 0 hosts, which read as no pressure at all; at or below, the lists."""
    import snatgw.datapath.nft.backend as NB

    with backend() as b:
        with C.TcpSession(lab, "in50", S1, src="198.18.50.11") as t:
            t.exchange()
            listed = b.stats().pressure
            assert listed["hosts_total"] >= 1 and listed["hosts"] and listed["addresses"]
            assert "unlisted" not in listed and listed["hosts_counted"] == "live"
            monkeypatch.setattr(NB, "PRESSURE_LIST_MAX", 0)
            p = b.stats().pressure
    assert p["hosts"] == [] and p["addresses"] == [] and "hosts_total" not in p
    assert p["hosts_counted"] is None and "only up to 0" in p["unlisted"]
    assert p["table"]["sessions"] == listed["table"]["sessions"]


def _table(lab) -> list:
    out = json.loads(lab.run("gw", "nft", "-j", "list", "table", "ip", "snatgw").stdout)["nftables"]
    items = []
    for o in out:
        for kind, body in o.items():
            if kind == "metainfo":
                continue
            body = {k: v for k, v in body.items() if k not in ("handle", "packets", "bytes")}
            items.append({kind: body})
    return items


def test_exported_text_loads_as_the_same_rule_set_the_backend_applies(lab, backend, tmp_path):
    """`snatgw export --format nft` output, loaded with nft -f, equals the backend's table."""
    from snatgw.cli.main import main

    conf = tmp_path / "ref.conf"
    conf.write_text(REF)
    with backend():
        applied = _table(lab)
        out = tmp_path / "ref.nft"
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(["export", str(conf), "--format", "nft"]) == 0
        out.write_text(buf.getvalue())
        lab.run("gw", "nft", "-f", str(out))
        loaded = _table(lab)
    assert loaded == applied


def test_stop_leaves_no_table_rules_routes_or_sessions(lab, backend):
    """After stop(): no table ip snatgw, no ip rule or route of ours, no marked conntrack entry."""
    with backend(FAILOVER) as b:
        C.tcp_echo(lab, "in50", S1, src="198.18.50.10")
        assert lab.run("gw", "ip", "rule", "show").stdout.count("lookup 31") == 2
        b.stop()
    assert "snatgw" not in lab.run("gw", "nft", "list", "tables").stdout
    assert "lookup 31" not in lab.run("gw", "ip", "rule", "show").stdout
    assert lab.run("gw", "ip", "route", "show", "table", "all", "proto", str(R.RT_PROTO)).stdout.strip() == ""
    assert "mark=13974" not in lab.run("gw", "cat", "/proc/net/nf_conntrack").stdout
    parse_text(REF)  # (the config itself is untouched)


def test_restart_with_kept_state_keeps_an_open_session(lab, backend):
    """stop(keep_state=True) leaves the kernel translating; a new backend adopts, the TCP session
    keeps its address throughout, and the last stop() removes everything."""
    with backend(REF) as first:
        with C.TcpSession(lab, "in50", S1, src="198.18.50.11") as t:
            a = t.exchange()
            first.stop(keep_state=True)
            b = t.exchange()
            with backend(REF) as second:
                c = t.exchange()
                second.stop()
    assert a["peer"] == b["peer"] == c["peer"] and _isp1(_ip(a["peer"]))
    assert "snatgw" not in lab.run("gw", "nft", "list", "tables").stdout


def test_traffic_to_the_gateway_itself_is_not_steered_or_marked(lab, backend):
    """A ping from an inside host to the gateway's own address is answered and not marked."""
    with backend():
        lab.run("in50", "ping", "-c", "1", "-W", "2", "198.18.50.1")
        ct = lab.run("gw", "cat", "/proc/net/nf_conntrack").stdout
    mine = [ln for ln in ct.splitlines() if "dst=198.18.50.1 " in ln and "icmp" in ln]
    assert mine and all(f"mark={R.MARK_TAG >> 16}" not in ln and "mark=13974" not in ln for ln in mine)


def test_an_unroutable_new_gw_is_applied_with_a_warning_and_its_flows_refused(lab, backend, caplog):
    """A new_gw with no route and no oif (its uplink down or gone, or a typo) is applied, as
    bpf applies it, with a warning naming the rule's line; its table holds an unreachable
    route, so its flows are refused at the gateway instead of leaving by the main table's
    route.  (It was refused, which refused a failover reload while an uplink was down.)"""
    import logging

    bad = ("virtual_server fwmark 1 {\n"
           " snat_rule { from 198.18.40.0/24 new_gw 192.0.2.200 snat_ip 198.19.2.71 }\n}\n")
    with backend(REF) as b:
        lab.ip("gw", "route", "add", "unreachable", "192.0.2.200/32")
        try:
            with caplog.at_level(logging.WARNING, logger="snatgw.nft"):
                b.apply(cfg(bad))
            assert "nft-test.conf:2: new_gw: no route to 192.0.2.200" in caplog.text
            assert list(_policy_routes(lab).values()) == ["unreachable default"]
            assert _datagram(lab, "in40", "198.18.40.10", S1) is None
        finally:
            lab.ip("gw", "route", "del", "unreachable", "192.0.2.200/32")


def test_gre_through_the_gateway_keeps_sessions_and_counts_right(lab, backend):
    """Issue 10: one GRE packet killed the daemon (conntrack's `timeout=30,` token overwrote the
    parsed timeout).  A real GRE packet from in40 crosses the gateway, then sessions and stats
    (read through ctnetlink, snatgw's marks filtered in the kernel) work and count exactly the
    marked entries `conntrack -L` shows; the text parser reads the GRE line right too."""
    from snatgw.datapath.nft.backend import parse_conntrack

    with backend() as b:
        with C.TcpSession(lab, "in40", S1, src="198.18.40.10") as t:
            t.exchange()
            with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_RAW, 47) as g:
                g.bind(("198.18.40.10", 0))
                g.sendto(struct.pack("!HH", 0, 0x0800) + bytes(28), (S1, 0))  # GRE carrying 28 bytes
            ct = lab.run("gw", "conntrack", "-L", "-o", "extended").stdout
            proc = lab.run("gw", "cat", "/proc/net/nf_conntrack", check=False).stdout  # `timeout=30,` here
            gre = [d for d in parse_conntrack(proc or ct) if d["proto"] == "gre"]
            assert gre and all(isinstance(d["timeout"], int) and d["timeout"] <= 30 for d in gre), proc or ct
            ours = sum(1 for d in parse_conntrack(ct) if d["mark"] & R.MARK_MASK == R.MARK_TAG)
            sessions = b.sessions()
            stats = b.stats()
    assert gre[0]["mark"] & R.MARK_MASK == R.MARK_TAG  # the GRE entry is snatgw's (NATed, marked)
    assert ours == 2 and stats.sessions == ours == len(sessions)
    assert {s.proto for s in sessions} == {"tcp", "gre"} and t.local in {s.inside for s in sessions}


def test_a_reader_in_another_process_lists_with_the_daemons_marks_filtered(lab, backend):
    """What `snatgw conns` does with an nft daemon: a reader built from the daemon's status
    (marks, netns) streams conntrack itself, with filters and a limit."""
    from snatgw.datapath.backend import SessionFilter
    from snatgw.datapath.nft.backend import NftBackend

    with backend() as b:
        with C.TcpSession(lab, "in40", S1, src="198.18.40.10") as t:
            t.exchange()
            C.udp_echo(lab, "in50", S2, src="198.18.50.10")
            extra = b.status_extra()
            r = NftBackend.reader(b.settings, extra["marks"], extra["netns"])
            tcp = list(r.iter_sessions(SessionFilter(proto=6)))
            udp = list(r.iter_sessions(SessionFilter(inside=IPv4Network("198.18.50.0/24"))))
            one = list(r.iter_sessions(limit=1))
    assert [s.inside for s in tcp] == [t.local] and tcp[0].rule_id != 0
    assert [s.proto for s in udp] == ["udp"] and udp[0].rule_id != 0 and len(one) == 1


def test_reload_back_to_a_rule_whose_sessions_outlived_it(lab, backend):
    """Rule 1's UDP session lives on in conntrack while a reload drops the rule; the reload that
    brings rule 1 back applies (it raised KeyError on the rule's id, `snatgw reload`: "internal
    error") and keeps the session: its address is in the rule's pool."""
    rule1 = "  snat_rule { from 198.18.40.0/24  gw 198.19.3.1  oif eth2  snat_ip 198.19.3.71-198.19.3.73  algo random }\n"
    assert rule1 in REF
    with backend(REF) as b, ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.bind(("198.18.40.11", 0))
        s.connect((S2, C.ECHO_PORT))
        s.send(b"ping")
        first = json.loads(s.recv(65536))
        b.apply(cfg(REF.replace(rule1, "")))
        b.apply(cfg(REF))
        s.send(b"ping")
        again = json.loads(s.recv(65536))
    assert _isp2(_ip(first["peer"])) and again["peer"] == first["peer"]


def test_a_connection_from_before_device_ids_keeps_its_rule_and_new_ones_get_theirs(lab, backend):
    """Upgrade (docs/nftables.md, ICMP errors from inside): a new flow from lan40 gets lan40's
    id in ct mark bits 10-15; a connection as an earlier version made it (the bare rule mark:
    made here with `mark_dev` emptied, then the rule set applied again, as an upgrade does)
    still is its rule's: the same mapping, listed and counted under the rule, and flushed by
    rule, as one with an id is."""
    from snatgw.datapath.backend import SessionFilter

    rule = cfg(REF).rules.rules[1]  # 198.18.40.10 -> S1
    bare = R.mark_of(R.assign_slots(cfg(REF).rules)[rule.identity])
    dev = R.device_ids(cfg(REF).settings.inside)["lan40"]

    def marks(port: int) -> list[int]:
        out = lab.run("gw", "conntrack", "-L", "-p", "udp", "--sport", str(port), check=False).stdout
        return [int(w[5:]) for w in out.split() if w.startswith("mark=")]

    with backend() as b, ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3.0)
        s.bind(("198.18.40.10", 0))
        s.connect((S1, C.ECHO_PORT))
        port = s.getsockname()[1]

        def exchange():
            s.send(b"ping")
            return json.loads(s.recv(65536))

        lab.run("gw", "nft", "flush", "chain", R.FAMILY, R.TABLE, "mark_dev")  # the earlier version
        first = exchange()
        old = marks(port)
        b.apply(cfg(REF))  # the upgrade: the whole rule set again, mark_dev with it
        packets = b.stats().rules[rule.rule_id].packets
        again = exchange()
        listed = [x.rule_id for x in b.sessions() if x.inside == f"198.18.40.10:{port}"]
        by_rule = [x for x in b.iter_sessions(SessionFilter(rule_id=rule.rule_id)) if x.inside.endswith(f":{port}")]
        counted = b.stats().rules[rule.rule_id].packets - packets
        fresh = C.udp_echo(lab, "in40", S1, src="198.18.40.10")
        fresh_port = int(fresh["inside"].rsplit(":", 1)[1])
        made = marks(fresh_port)
        flushed = b.flush(rule.rule_id)
        left = marks(port) + marks(fresh_port)
    assert old == [bare] and made == [bare | dev << 10]
    assert again["peer"] == first["peer"] and listed == [rule.rule_id] and len(by_rule) == 1
    assert counted >= 2  # the datagram and its reply, under the rule
    assert flushed >= 2 and left == []


def _policy_routes(lab) -> dict[int, str]:
    out = {}
    for rt in json.loads(lab.run("gw", "ip", "-j", "route", "show", "table", "all").stdout):
        t = str(rt.get("table", ""))
        if t.isdigit() and R.RT_BASE <= int(t) < R.RT_BASE + R.SLOTS:
            out[int(t)] = (f"unreachable {rt['dst']}" if rt.get("type") == "unreachable"
                           else f"{rt['dst']} via {rt.get('gateway')} dev {rt.get('dev')}")  # fmt: skip
    return out


def _datagram(lab, node: str, src: str, dst: str, wait: float = 1.0) -> dict | None:
    """Send one UDP datagram; what the server saw of it (its event), or None: whether or not
    the reply finds its way back."""
    tok = C._token()
    with ns_socket(lab.ns(node), socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        try:
            s.sendto(tok.encode(), (dst, C.ECHO_PORT))
        except OSError:  # (unreachable, said at once)
            pass
        return lab.servers.wait_for(lambda ev: ev.get("data") == tok, timeout=wait)


def test_a_failover_reload_while_isp1_is_down_is_applied_and_its_new_gw_flows_do_not_take_isp2(lab, backend):
    """ISP 1's uplink down as a PPP, DHCP or admin-down uplink goes (the kernel removes its
    routes): the seed's failover reload (rule 2 to ISP 2) was refused, because rule 3 keeps
    new_gw 198.19.2.1 without an oif and nothing routes it now ("new_gw: no route"), so the
    failover could not be made while it was needed; bpf applies it with a warning.  And rule
    3's flows, their table route gone with the uplink, took the main table's route out of
    ISP 2 with ISP 1's SNAT address for as long as the uplink stayed down.  Now such a new_gw's
    table holds an unreachable route until it is routed again (the hook check puts the real
    one there within ROUTING_RECHECK of the uplink's return): its flows are refused at the
    gateway, never sent out of the other ISP."""
    with backend(REF) as b:
        try:
            lab.ip("gw", "link", "set", "eth1", "down")
            b._routing_next = 0.0
            b.check_hooks()
            assert _datagram(lab, "in50", "198.18.50.10", S2) is None  # (was: via isp2, an isp1 address)
            b.apply(cfg(FAILOVER))
            (table,) = _policy_routes(lab).keys() & {e.table for e in b._plan.routes if str(e.new_gw) == "198.19.2.1"}
            assert _policy_routes(lab)[table] == "unreachable default"
            assert _datagram(lab, "in50", "198.18.50.10", S2) is None
            lab.ip("gw", "link", "set", "eth1", "up")
            lab.ip("gw", "route", "replace", "default", "via", "198.19.2.1", "dev", "eth1")
            b._routing_next = 0.0
            assert b.check_hooks() == [f"new_gw policy route (table {table}: default via 198.19.2.1 dev eth1)"]
            got = _datagram(lab, "in50", "198.18.50.10", S2)
            assert got is not None and _isp1(_ip(got["peer"])) and got["link"] == "isp1"
        finally:
            lab.ip("gw", "link", "set", "eth1", "up")
            lab.ip("gw", "route", "replace", "default", "via", "198.19.2.1", "dev", "eth1")


def test_new_gw_policy_routing_comes_back_after_its_uplink_flaps(lab, backend):
    """The kernel removes a new_gw table's route when its uplink goes down; nothing put it back
    (every new_gw flow then took the main table's route, the other ISP with this one's SNAT
    address, until a reload).  The hook check puts it back once the uplink is up again, and its
    ip rule when that went; a flow steered by new_gw leaves by its uplink again; nothing is done
    while all is in place."""
    with backend(REF) as b:
        before = _policy_routes(lab)
        assert list(before.values()) == ["default via 198.19.2.1 dev eth1"]
        (table,) = before
        b._routing_next = 0.0
        assert b.check_hooks() == []  # all in place
        lab.ip("gw", "link", "set", "eth1", "down")
        assert _policy_routes(lab) == {}  # the kernel took it
        b._routing_next = 0.0  # while it stays down: refused, never the main table's route; nothing raised
        assert b.check_hooks() == [f"new_gw policy route (table {table}: unreachable, no route to 198.19.2.1)"]
        assert _policy_routes(lab) == {table: "unreachable default"}
        b._routing_next = 0.0
        assert b.check_hooks() == []  # (in place: not again)
        lab.ip("gw", "link", "set", "eth1", "up")
        b._routing_next = 0.0  # (it looks every ROUTING_RECHECK seconds)
        assert b.check_hooks() == [f"new_gw policy route (table {table}: default via 198.19.2.1 dev eth1)"]
        assert _policy_routes(lab) == before
        lab.ip("gw", "rule", "del", "pref", str(table))
        b._routing_next = 0.0
        assert b.check_hooks() == [f"new_gw ip rule (pref {table})"]
        rules = json.loads(lab.run("gw", "ip", "-j", "rule", "show").stdout)
        assert any(int(r.get("priority", -1)) == table and str(r.get("table")) == str(table) for r in rules)
        assert b.check_hooks() == []  # (not again within the period)
        # the new_gw rule (from 198.18.0.0/16, sh) steers in50's flow to S2 out of eth1 / isp1,
        # which the main table would send out of eth2
        got = C.udp_echo(lab, "in50", S2, src="198.18.50.10")
        assert _isp1(_ip(got["peer"])) and got["link"] == "isp1"
