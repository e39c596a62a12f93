"""Port pressure on both backends, through `snatgw run` in the lab (root; issue 11): a host that
fills its SNAT address's ports toward one server spills to the pool's next addresses (bpf;
the kernel's nf_nat cannot) or is refused, and refused cheaply (bpf: the refusal marker); a
host limit stops one host and not the next behind the same address, and (`refuse_icmp
yes`) tells the refused host so with ICMP host unreachable; established flows of others keep
working while one host floods new flows.  Small port ranges stand in for the 64k
of the benchmark (scenario 3c): the behaviour is the same, the sizes stay in the bench.
Every test runs under leak watchers on both uplinks (snatgw.lab.leakwatch, from before its
gateway starts to after it stopped): under spill, refusal, the host limit and the flood, no
frame with an inside source (198.18.0.0/16) may leave, and the watchers must have seen the
test's translated traffic."""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time

import pytest

from snatgw.config.parse import parse_text
from snatgw.daemon.client import call
from snatgw.lab import clients as C
from snatgw.lab import leakwatch
from snatgw.lab.gateway import snatgw_json
from snatgw.lab.netns import ns_socket
from snatgw.layout import REFUSED_SECS

pytestmark = [pytest.mark.lab, pytest.mark.root]

S1 = "203.0.113.10"  # leaves via eth1 (gw 198.19.2.1)
A, B = "198.18.40.10", "198.18.40.11"
POOL = ("198.19.2.71", "198.19.2.72", "198.19.2.73")
INSIDE_NETS = ("198.18.0.0/16",)
#: every test sends at least this many datagrams that leave translated (the fewest: 50 sessions)
MIN_SEEN = 50


def conf(settings: str, rule: str) -> str:
    return (f"snatgw {{\n inside lan40 lan50\n outside eth1 eth2\n {settings}\n}}\n"
            f"virtual_server fwmark 1 {{\n snat_rule {{ from 198.18.40.0/24 {rule} }}\n}}\n")


@pytest.fixture(scope="module", params=["bpf", "nft"])
def pressure_lab(request):
    from snatgw.lab.topology import Lab

    lab = Lab.up(f"pytest-{os.getpid()}-pp{request.param}", prefix=f"sgp{os.getpid() % 0xFFFF:04x}{request.param[0]}")
    try:
        lab.add_snat_addresses(parse_text(conf("", f"snat_ip {POOL[0]}-{POOL[-1]}")).rules)
        lab.servers = lab.start_servers()
        lab.backend = request.param
        yield lab
    finally:
        lab.down()


@pytest.fixture(autouse=True)
def uplinks_carry_no_inside_source(pressure_lab):
    """Watch both uplinks for the whole test (autouse: set up before `gateway`, torn down after
    it); zero inside sources out, and enough frames seen that a blind watcher fails too."""
    with leakwatch.uplinks(pressure_lab, INSIDE_NETS) as w:
        yield w
    assert w.leaks == [], f"{len(w.leaks)} inside-source frames on the uplinks: {[str(f) for f in w.leaks[:5]]}"
    assert w.seen >= MIN_SEEN and w.dropped == 0, (w.seen, w.dropped)


@pytest.fixture
def gateway(pressure_lab):
    """Start `snatgw run` on a config text (a fresh daemon per test); stopped afterwards."""
    lab = pressure_lab

    def start(text: str):
        path = os.path.join(lab.workdir, "pressure.conf")
        with open(path, "w") as f:
            f.write(text)
        lab.start_gateway(path, lab.backend)
        return lab

    try:
        yield start
    finally:
        lab.stop_gateway()
        # the daemon keeps its state on SIGTERM (for a restart): the next test starts clean
        lab.run("gw", sys.executable, "-m", "snatgw.cli.main", "purge", "--pin-dir", lab.pin_dir,
                "--socket", lab.socket_path, check=False)


def burst(lab, src: str, sports, dport: int = 9, rounds: int = 1) -> None:
    """One UDP datagram per source port from ``src`` (raw socket in in40) to S1, ``rounds`` times."""
    C.udp_burst(lab, "in40", src, S1, sports, dport, rounds)


def stats(lab) -> dict:
    return call(lab.socket_path, {"op": "stats"})["stats"]


def sessions_of(lab, host: str) -> list[dict]:
    return [s for s in call(lab.socket_path, {"op": "sessions"})["sessions"] if s["inside"].startswith(host + ":")]


def settle(lab, pred, timeout: float = 5.0) -> dict:
    end = time.monotonic() + timeout
    while True:
        st = stats(lab)
        if pred(st) or time.monotonic() > end:
            return st


def reason(st: dict, name: str) -> int:
    return int(st["reasons"].get(name, 0))


def test_a_host_that_fills_its_address_spills_over_or_is_refused(gateway, pressure_lab):
    """50 ports per address, 120 flows of one host to one server port (sdh: spill by default).
    bpf: 50 on the chosen address, 50 on the next, 20 on the one after (pool order, wrapping),
    the full ones judged by spill memos (a full search each, then one try per flow); a second
    host's flows toward the same server port all land on the address with room left;
    nft: the kernel keeps to the chosen address, 50 sessions, 70 counted as exhausted."""
    lab = gateway(conf("port_range 6000-6049", f"snat_ip {POOL[0]}-{POOL[-1]} algo sdh"))
    burst(lab, A, range(40000, 40120))
    st = settle(lab, lambda s: reason(s, "XLATE_NEW") + reason(s, "DROP_PORT_EXHAUSTED") >= 120)
    per_addr: dict[str, int] = {}
    for s in sessions_of(lab, A):
        addr = s["nat"].rsplit(":", 1)[0]
        per_addr[addr] = per_addr.get(addr, 0) + 1
    if lab.backend == "bpf":
        from snatgw.rules import Pool, select_index
        from ipaddress import IPv4Address

        first = select_index(Pool(IPv4Address(POOL[0]), IPv4Address(POOL[-1])), parse_text(
            conf("", f"snat_ip {POOL[0]}-{POOL[-1]}")).rules.rules[0].algo, IPv4Address(A), IPv4Address(S1), 0)
        order = [POOL[(first + k) % 3] for k in range(3)]
        assert per_addr == {order[0]: 50, order[1]: 50, order[2]: 20}
        assert reason(st, "DROP_PORT_EXHAUSTED") == 0
        assert {a["addr"]: a["sessions"] for a in st["pressure"]["addresses"]} == per_addr
        alloc = st["pressure"]["allocator"]  # 2 memos and 88 hits when the burst takes < 1 s
        assert alloc["spill_memos_written"] >= 2 and alloc["spill_memo_hits"] >= 1
        # one search per new flow, and they grew long: the first full address's search alone
        # tried its 50 ports (read again: all 120 flows are counted by now)
        alloc = stats(lab)["pressure"]["allocator"]
        assert alloc["port_searches"] >= reason(st, "XLATE_NEW") == 120
        assert alloc["port_search_tries"] >= alloc["port_searches"] + 49 and alloc["tries_per_search"] > 1
        # explain --live judges a new flow against the running table: A's next flow finds the
        # first two addresses full and gets a port on the third, and the flow really does
        d = snatgw_json(lab, "explain", "--live", "--proto", "udp", "--src", f"{A}:40500", "--dst", f"{S1}:9",
                        "--oif", "eth1", "--gw", "198.19.2.1")
        assert d is not None and d["snat"]["addr"] == order[2], d
        burst(lab, A, [40500])
        settle(lab, lambda s: reason(s, "XLATE_NEW") >= 121)
        (got,) = [s["nat"] for s in sessions_of(lab, A) if s["inside"] == f"{A}:40500"]
        assert got == f"{d['snat']['addr']}:{d['snat']['port']}"
        burst(lab, B, range(40000, 40005))
        settle(lab, lambda s: reason(s, "XLATE_NEW") >= 126)
        assert sorted(s["nat"].rsplit(":", 1)[0] for s in sessions_of(lab, B)) == [order[2]] * 5
    else:
        assert list(per_addr.values()) == [50]
        assert (reason(st, "XLATE_NEW"), reason(st, "DROP_PORT_EXHAUSTED")) == (50, 70)
        assert "allocator" not in st["pressure"]  # nf_nat's search is not counted: absent, not 0
        # explain answers as the bpf datapath would and says that nf_nat picks here
        d = snatgw_json(lab, "explain", "--live", "--proto", "udp", "--src", f"{A}:40500", "--dst", f"{S1}:9",
                        "--oif", "eth1", "--gw", "198.19.2.1")
        assert d is not None and any(n.startswith("backend nft: the kernel's nf_nat picks") for n in d["notes"]), d


def test_refused_flows_cost_one_lookup_on_bpf_and_a_search_again_on_nft(gateway, pressure_lab):
    """on_exhausted drop, 50 ports: 60 flows sent twice.  bpf: 10 refused after a search, their
    second packets hit the refusal marker (DROP_REFUSED_RECENTLY), and `explain --live` of a
    flow refused then names its marker until it is REFUSED_SECS old; nft: every packet of a
    refused flow is a new conntrack entry that searches again (20 exhausted)."""
    lab = gateway(conf("port_range 6000-6049\n on_exhausted drop", f"snat_ip {POOL[0]}-{POOL[-1]}"))
    burst(lab, A, range(41000, 41060), rounds=2)
    if lab.backend == "bpf":
        st = settle(lab, lambda s: reason(s, "DROP_REFUSED_RECENTLY") >= 10)
        assert (reason(st, "XLATE_NEW"), reason(st, "DROP_PORT_EXHAUSTED"), reason(st, "DROP_REFUSED_RECENTLY")) == (
            50, 10, 10)
        (addr,) = [a for a in st["pressure"]["addresses"] if a["sessions"]]
        assert (addr["sessions"], addr["refusals"]) == (50, 10)
        # explain --live reads a flow's refusal marker in snat_refused: refused just now, its
        # packets are dropped until the marker is REFUSED_SECS old (asked again at the end)
        burst(lab, A, [41100])
        settle(lab, lambda s: reason(s, "DROP_PORT_EXHAUSTED") >= 11)
        refused_by = time.monotonic()  # (the marker was written before this)
        ask = ("explain", "--live", "--proto", "udp", "--src", f"{A}:41100", "--dst", f"{S1}:9", "--oif", "eth1",
               "--gw", "198.19.2.1")
        d = snatgw_json(lab, *ask)
        m = d and d["refusal_marker"]
        assert m and (m["reason"], m["met"], m["packets"]) == ("DROP_PORT_EXHAUSTED", True, "DROP_REFUSED_RECENTLY"), d
        assert 0 <= m["age_s"] < REFUSED_SECS and m["addr"] == addr["addr"] and d["reason"] == "DROP_PORT_EXHAUSTED", d
        # no host limit: the host's refusals count at once, its sessions by the sweep's recount
        # (gc_interval 1 s), and stats say so, with the age once the sweep has returned (the GC
        # thread's walk publishes the counts a moment before the daemon notes its time)
        st = settle(lab, lambda s: s["pressure"]["hosts"][0]["sessions"] == 50
                    and s["pressure"].get("hosts_age_seconds") is not None)  # fmt: skip
        assert st["pressure"]["hosts"] == [{"host": A, "sessions": 50, "refusals": 11}]  # (41100's too)
        assert st["pressure"]["hosts_counted"] == "sweep" and st["pressure"]["hosts_age_seconds"] >= 0
        # the marker REFUSED_SECS old: passed by, and explain says nothing of it
        time.sleep(max(0.0, refused_by + REFUSED_SECS + 0.05 - time.monotonic()))
        d = snatgw_json(lab, *ask)
        assert d and d["refusal_marker"] is None and d["reason"] == "DROP_PORT_EXHAUSTED", d
    else:
        st = settle(lab, lambda s: reason(s, "DROP_PORT_EXHAUSTED") >= 20)
        assert (reason(st, "XLATE_NEW"), reason(st, "DROP_PORT_EXHAUSTED")) == (50, 20)
        # nf_nat does not say whose flow it refused: unknown per address and host, not 0
        (addr,) = st["pressure"]["addresses"]
        assert (addr["sessions"], addr["refusals"], st["pressure"]["refusals_known"]) == (50, None, False)
    assert len(sessions_of(lab, A)) == 50


def test_host_limit_stops_one_host_not_the_next_behind_the_same_address(gateway, pressure_lab):
    """One SNAT address, max_sessions_per_host 60: A's 150 flows make 60 sessions and 90
    refusals (DROP_HOST_LIMIT); B behind the same address still gets flows, end to end; a
    reload to 200 lets A's refused flows in at their next packet.  Expiry
    sweeps run during the burst (gc_interval 0.1): a session made while a walk counts is counted
    once (the walk's number, docs/datapath.md "Expiry in the bpf backend"); before that, a sweep
    there counted it twice and refused A's 60th flow (59 sessions, 91 refusals)."""
    lab = gateway(conf("max_sessions_per_host 60\n gc_interval 0.1", f"snat_ip {POOL[0]}"))
    burst(lab, A, range(42000, 42150))
    st = settle(lab, lambda s: reason(s, "DROP_HOST_LIMIT") >= 90)
    seen = [C.udp_echo(lab, "in40", S1, src=B, sport=43000 + i) for i in range(5)]
    assert all(r["peer"].startswith(POOL[0] + ":") for r in seen)
    assert len(sessions_of(lab, A)) == 60 and reason(st, "DROP_HOST_LIMIT") == 90
    assert len(sessions_of(lab, B)) == 5
    if lab.backend == "bpf":  # a limit: the datapath counts each host's sessions as they are made
        assert st["pressure"]["hosts_counted"] == "live"
        assert {"host": A, "sessions": 60, "refusals": 90} in st["pressure"]["hosts"]
    # a reload raising the limit: A's refused flows are judged by it at their next packet (bpf:
    # the apply forgets the refusal markers, which dropped them as DROP_REFUSED_RECENTLY for 2 s)
    path = os.path.join(lab.workdir, "pressure.conf")
    with open(path, "w") as f:
        f.write(conf("max_sessions_per_host 200\n gc_interval 0.1", f"snat_ip {POOL[0]}"))
    lab.reload_gateway(path)
    burst(lab, A, range(42060, 42150))
    st = settle(lab, lambda s: reason(s, "XLATE_NEW") >= 155)
    assert (len(sessions_of(lab, A)), reason(st, "DROP_REFUSED_RECENTLY")) == (150, 0)


def test_established_flows_of_others_keep_working_during_a_flood(gateway, pressure_lab):
    """B's open TCP connection and its UDP flow answer every exchange while A floods new flows
    (bounded: 30,000 datagrams from random ports) into a 200-port range."""
    lab = gateway(conf("port_range 6000-6199", f"snat_ip {POOL[0]}-{POOL[-1]} algo sdh"))
    with C.TcpSession(lab, "in40", S1, src=B) as t, \
            ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as u:  # fmt: skip
        u.settimeout(3.0)
        u.bind((B, 44000))
        u.connect((S1, C.ECHO_PORT))
        t.exchange()
        u.send(b"before")
        u.recv(65536)
        import random

        ports = random.Random(11).sample(range(1024, 65536), 30000)
        flood = threading.Thread(target=burst, args=(lab, A, ports))
        flood.start()
        try:
            answers = []
            while flood.is_alive() or len(answers) < 10:
                answers.append(t.exchange()["peer"])
                u.send(b"during")
                answers.append(u.recv(65536))
        finally:
            flood.join()
    assert len(answers) >= 20  # every exchange was answered (a lost one raises a timeout)
    st = stats(lab)
    assert reason(st, "XLATE_NEW") + reason(st, "DROP_PORT_EXHAUSTED") > 200  # the flood did reach it


def test_a_host_over_its_limit_hears_host_unreachable_on_both_backends(gateway, pressure_lab):
    """refuse_icmp yes, max_sessions_per_host 60, one SNAT address: after A's 60 flows, A's next
    datagram comes back to its socket as ICMP host unreachable (type 3 code 1, EHOSTUNREACH)
    from the gateway's lan40 address: the bpf datapath builds it, the nft backend's refuse_host
    chain has the kernel reject it (before, nft dropped it in silence).  Either way it is one
    DROP_HOST_LIMIT, and B still gets its flows."""
    lab = gateway(conf("max_sessions_per_host 60\n refuse_icmp yes", f"snat_ip {POOL[0]}"))
    burst(lab, A, range(45000, 45060))
    settle(lab, lambda s: reason(s, "XLATE_NEW") >= 60)
    err = C.udp_error(lab, "in40", S1, port=C.ECHO_PORT, src=A, sport=45100, timeout=3.0)
    assert (err["errno"], err["type"], err["code"], err["offender"]) == ("EHOSTUNREACH", 3, 1, "198.18.40.1"), err
    assert C.udp_echo(lab, "in40", S1, src=B, sport=45200)["peer"].startswith(POOL[0] + ":")
    st = settle(lab, lambda s: reason(s, "DROP_HOST_LIMIT") >= 1)
    assert (reason(st, "XLATE_NEW"), reason(st, "DROP_HOST_LIMIT")) == (61, 1)
    if lab.backend != "bpf":
        return
    # lan40 at `tx off`: A's datagram and SYN come with their L4 checksum still to fill in
    # (CHECKSUM_PARTIAL, in40's sockets leave it to the veth), and the driver fills it in as the
    # error leaves: the error must survive that (it used to arrive with a broken checksum)
    lab.run("gw", "ethtool", "-K", "lan40", "tx", "off")
    try:
        err = C.udp_error(lab, "in40", S1, port=C.ECHO_PORT, src=A, sport=45101, timeout=3.0)
        with pytest.raises(OSError) as refused:
            C.tcp_echo(lab, "in40", S1, src=A, sport=45102, timeout=3.0)
    finally:
        lab.run("gw", "ethtool", "-K", "lan40", "tx", "on")
    assert (err["errno"], err["type"], err["code"]) == ("EHOSTUNREACH", 3, 1), err
    assert refused.value.errno == errno.EHOSTUNREACH, refused.value


def test_the_session_request_finds_a_flows_own_session_on_both_backends(gateway, pressure_lab):
    """Op session (explain --live's lookup of the flow's own session, whatever a listing's cut)
    on the real tables: bpf one lookup in snat_ct, nft conntrack by the original tuple.  Each
    of A's 50 UDP flows (and an echo request) is found as the listing has it; a flow never
    sent, and the reply direction of one that was (a tuple conntrack also finds), are null; and
    explain --live judges a sent flow as its session's (XLATE_OUT at its address and port)."""
    lab = gateway(conf("port_range 6000-6999", f"snat_ip {POOL[0]}-{POOL[-1]}"))
    burst(lab, A, range(42000, 42050))
    settle(lab, lambda s: reason(s, "XLATE_NEW") >= 50)
    listed = {s["inside"]: s for s in sessions_of(lab, A)}
    assert len(listed) == 50
    ask = {"op": "session", "host": A, "remote": S1, "dport": 9, "proto": 17}
    for sport in (42000, 42031, 42049):
        got = call(lab.socket_path, {**ask, "sport": sport})["session"]
        want = listed[f"{A}:{sport}"]
        assert {k: got[k] for k in ("proto", "inside", "remote", "nat", "rule_id")} == {
            k: want[k] for k in ("proto", "inside", "remote", "nat", "rule_id")}, (got, want)
    assert call(lab.socket_path, {**ask, "sport": 42050})["session"] is None
    nat, nport = listed[f"{A}:42007"]["nat"].rsplit(":", 1)
    back = {"op": "session", "host": S1, "sport": 9, "remote": nat, "dport": int(nport), "proto": 17}
    assert call(lab.socket_path, back)["session"] is None  # the reply direction: no flow of its own
    echo = C.ping(lab, "in40", S1, src=A, ident=4242)
    assert echo["reply"], echo
    got = call(lab.socket_path, {**ask, "sport": 4242, "dport": 0, "proto": 1})["session"]
    assert got and got["proto"] == "icmp" and got["inside"] == f"{A}:4242", got
    with open(os.path.join(lab.workdir, "gateway.log")) as f:  # nft: conntrack answered, not the walk
        assert "looking the session up in the listing" not in f.read()
    from snatgw.lab.gateway import run, snatgw_argv

    cp = run(snatgw_argv("explain", "--socket", lab.socket_path, "--json", "--live", "--proto", "udp", "--src",
                         f"{A}:42007", "--dst", f"{S1}:9", "--oif", "eth1", "--gw", "198.19.2.1"), check=False)
    assert cp.returncode == 0, cp  # no rule is asked: the session translates it
    d = json.loads(cp.stdout)
    assert d["reason"] == "XLATE_OUT" and d["snat"] == {"addr": nat, "port": int(nport)}, d
    assert d["session"]["nat"] == f"{nat}:{nport}" and d["session"]["rule"], d
