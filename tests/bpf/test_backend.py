"""BpfBackend over real maps (stand-in object, private pin dir): GC removes expired sessions
as whole pairs and keeps live ones, orphans after a grace, flush by rule, new_gw moves live
sessions, rule writes touch only changed slots, read-only view of pins, counters."""

import ipaddress
import os
import struct

import pytest

from snatgw import layout as L
from snatgw.config.schema import Settings
from snatgw.datapath.bpf import libbpf as B
from snatgw.datapath.bpf.backend import ORPHAN_GRACE_NS, BpfBackend
from snatgw.datapath.bpf.loader import Loader
from snatgw.datapath.bpf.maps import DatapathMaps
from snatgw.errors import BackendError

from test_loader import mini_obj, pin_dir  # noqa: F401  (fixtures)

SEC = 10**9
BASE = 5000 * SEC  # a synthetic CLOCK_MONOTONIC "now" for expiry tests
RULE_A, RULE_B = 111, 222
SNAT = int(ipaddress.IPv4Address("198.19.2.71"))
REMOTE = int(ipaddress.IPv4Address("203.0.113.10"))


def add_session(ct, n, state=L.CtState.ESTABLISHED, out_seen=BASE, in_seen=BASE, rule_id=RULE_A,
                proto=L.IPPROTO_TCP, ifindex=2, nexthop=0xC6130201):  # fmt: skip
    """Insert a session pair the way the datapath does (IN first); returns (out_key, in_key)."""
    inside = int(ipaddress.IPv4Address("198.18.40.10")) + n
    out_key = L.CT_KEY.pack(saddr=inside, daddr=REMOTE, sport=40000 + n, dport=80, proto=proto,
                            dir=L.CT_DIR_OUT)  # fmt: skip
    in_key = L.CT_KEY.pack(saddr=REMOTE, daddr=SNAT, sport=80, dport=5000 + n, proto=proto,
                           dir=L.CT_DIR_IN)  # fmt: skip
    ct.put(in_key, L.CT_ENTRY.pack(peer=out_key, rw_addr=inside, rw_port=40000 + n, ifindex=3,
                                   rule_id=rule_id, last_seen=in_seen))  # fmt: skip
    ct.put(out_key, L.CT_ENTRY.pack(peer=in_key, rw_addr=SNAT, rw_port=5000 + n, state=int(state),
                                    ifindex=ifindex, nexthop=nexthop, rule_id=rule_id, mtu=1500,
                                    last_seen=out_seen))  # fmt: skip
    return out_key, in_key


class FakeRoutes:
    """resolver(addr) -> (ifindex, nexthop, mtu), recording the questions."""

    def __init__(self, table):
        self.table, self.asked = table, []

    def __call__(self, addr):
        self.asked.append(str(addr))
        idx, nh, mtu = self.table[str(addr)]
        return idx, ipaddress.IPv4Address(nh), mtu


@pytest.fixture
def backend(pin_dir, mini_obj):  # noqa: F811
    """A BpfBackend on loaded (not attached) maps: what start() builds, minus rules/attach."""
    routes = FakeRoutes({"198.19.3.1": (7, "198.19.3.1", 1400), "203.0.113.10": (2, "198.19.2.1", 1500)})
    b = BpfBackend(obj_path=mini_obj, resolver=routes)
    b.loader = Loader(pin_dir, 64, mini_obj)
    b.maps = b.loader.load()
    b.settings = Settings(pin_dir=pin_dir, max_sessions=64)
    b.routes = routes
    try:
        yield b
    finally:
        b.stop()
        assert not os.path.exists(pin_dir)


@pytest.mark.bpf
def test_gc_removes_expired_pairs_together_and_keeps_live_ones(backend):
    """Expiry uses max(last_seen of both directions) against the state's timeout."""
    ct = backend.maps.ct
    live = add_session(ct, 1, L.CtState.ESTABLISHED, BASE - 10 * SEC, BASE - 10 * SEC)
    syn = add_session(ct, 2, L.CtState.SYN_SENT, BASE - 241 * SEC, BASE - 241 * SEC)  # 240 s timeout
    udp = add_session(ct, 3, L.CtState.UDP, BASE - 400 * SEC, BASE - 1 * SEC, proto=L.IPPROTO_UDP)
    tw = add_session(ct, 4, L.CtState.TIME_WAIT, BASE - 121 * SEC, BASE - 122 * SEC)  # 120 s timeout
    edge = add_session(ct, 5, L.CtState.TIME_WAIT, BASE - 120 * SEC, BASE - 120 * SEC)  # exactly 120 s: stays
    assert backend.expire(now=BASE / SEC) == 2
    assert set(ct.keys()) == set(live + udp + edge)
    assert not set(syn + tw) & set(ct.keys())
    assert backend.expire(now=BASE / SEC) == 0


@pytest.mark.bpf
def test_gc_follows_configured_timeouts(backend):
    """A shorter udp timeout in Settings expires a UDP session the default would keep."""
    add_session(backend.maps.ct, 1, L.CtState.UDP, BASE - 60 * SEC, BASE - 60 * SEC, proto=L.IPPROTO_UDP)
    assert backend.expire(now=BASE / SEC) == 0
    backend.settings = backend.settings.with_timeouts(udp=30)
    assert backend.expire(now=BASE / SEC) == 1 and len(backend.maps.ct) == 0


@pytest.mark.bpf
def test_gc_removes_old_orphans_only_after_the_grace(backend):
    """An IN entry without its OUT (a half insert) goes only once idle longer than the grace
    (last_seen is set at creation)."""
    ct = backend.maps.ct
    out_key, in_key = add_session(ct, 1)
    ct.delete(out_key)
    seen = L.CT_ENTRY.unpack(ct.get(in_key))["last_seen"]
    backend.expire(now=(seen + ORPHAN_GRACE_NS // 2) / SEC)
    assert ct.get(in_key) is not None
    backend.expire(now=(seen + ORPHAN_GRACE_NS + SEC) / SEC)
    assert ct.get(in_key) is None


@pytest.mark.bpf
def test_sessions_report_both_tuples_state_idle_and_no_session_counters(backend):
    """A pair is one Session: inside, remote, nat, state name, idle from the newest direction;
    per-session packets/bytes are 0 (ct_entry keeps none; the rule counters count them)."""
    add_session(backend.maps.ct, 1, L.CtState.ESTABLISHED, out_seen=B_now() - 4 * SEC, in_seen=B_now() - 2 * SEC)
    (s,) = backend.sessions()
    assert (s.proto, s.inside, s.remote, s.nat) == ("tcp", "198.18.40.11:40001", "203.0.113.10:80",
                                                   "198.19.2.71:5001")  # fmt: skip
    assert s.state == "ESTABLISHED" and s.rule_id == RULE_A
    assert 2 <= s.idle < 30 and 7400 < s.expires <= 7438
    assert (s.packets_out, s.bytes_out, s.packets_in, s.bytes_in) == (None, None, None, None)  # none kept
    assert "packets_out" not in s.as_dict()  # so `conns --json` shows none, never a made-up 0
    assert backend.stats().sessions == 0  # put in by hand, not by the datapath: the next sweep counts it
    backend.expire(now=B_now() / SEC)
    assert backend.stats().sessions == 1


def B_now():
    from snatgw.datapath.bpf.maps import monotonic_ns

    return monotonic_ns()


@pytest.mark.bpf
def test_flush_by_rule_removes_only_that_rules_sessions(backend):
    """flush(rule_id) drops that rule's pairs; flush() drops the rest."""
    ct = backend.maps.ct
    a = add_session(ct, 1, rule_id=RULE_A)
    add_session(ct, 2, rule_id=RULE_B)
    add_session(ct, 3, rule_id=RULE_B)
    assert backend.flush(RULE_B) == 2
    assert set(ct.keys()) == set(a)
    assert backend.flush() == 1 and len(ct) == 0


@pytest.mark.bpf
def test_new_gw_moves_the_rules_live_sessions_and_back(backend):
    """Setting new_gw rewrites OUT entries of that rule only; removing it restores the route."""
    ct = backend.maps.ct
    a_out, a_in = add_session(ct, 1, rule_id=RULE_A)
    b_out, _ = add_session(ct, 2, rule_id=RULE_B)
    in_before, b_before = ct.get(a_in), ct.get(b_out)
    moved = backend.move_sessions({RULE_A: ipaddress.IPv4Address("198.19.3.1"), RULE_B: None})
    assert moved == 1
    e = L.CT_ENTRY.unpack(ct.get(a_out))
    assert (e["ifindex"], e["nexthop"], e["mtu"]) == (7, int(ipaddress.IPv4Address("198.19.3.1")), 1400)
    assert e["flags"] & L.CT_F_NEW_GW and e["rw_addr"] == SNAT and e["last_seen"] == BASE
    assert ct.get(a_in) == in_before and ct.get(b_out) == b_before
    assert backend.move_sessions({RULE_A: ipaddress.IPv4Address("198.19.3.1")}) == 0  # idempotent
    assert backend.move_sessions({RULE_A: None}) == 1
    e = L.CT_ENTRY.unpack(ct.get(a_out))
    assert (e["ifindex"], e["nexthop"], e["flags"] & L.CT_F_NEW_GW) == (2, 0xC6130201, 0)
    assert backend.routes.asked == ["198.19.3.1", "198.19.3.1", "203.0.113.10"]  # once per call


@pytest.mark.bpf
def test_removing_new_gw_reverts_sessions_the_datapath_made_without_the_flag(backend):
    """Sessions created under new_gw (no CT_F_NEW_GW from the datapath) go back to the route."""
    out, _ = add_session(backend.maps.ct, 1, rule_id=RULE_A, ifindex=7, nexthop=0xC6130301)
    gw = ipaddress.IPv4Address("198.19.3.1")
    assert backend.move_sessions({RULE_A: None}) == 0  # nothing says it had a new_gw
    assert backend.move_sessions({RULE_A: None}, {RULE_A: gw}) == 1
    e = L.CT_ENTRY.unpack(backend.maps.ct.get(out))
    assert (e["ifindex"], e["nexthop"]) == (2, 0xC6130201)


def _pool(text):
    from snatgw.rules import Pool

    return Pool.parse(text)


@pytest.mark.bpf
def test_sessions_whose_address_left_the_pool_are_removed_and_the_rest_kept(backend):
    """follow_rules with pools: a rule's session whose SNAT address is outside its new pool goes
    (both keys); sessions of rules whose pool still holds it, and of vanished rules, stay."""
    ct = backend.maps.ct
    a = add_session(ct, 1, rule_id=RULE_A)
    b = add_session(ct, 2, rule_id=RULE_B)
    c = add_session(ct, 3, rule_id=333)  # its rule is gone: keeps its mapping
    moved, removed = backend.follow_rules({RULE_A: None, RULE_B: None}, {},
                                          {RULE_A: _pool("198.19.3.71-198.19.3.73"),
                                           RULE_B: _pool("198.19.2.70-198.19.2.80")})
    assert (moved, removed) == (0, 1)
    assert set(ct.keys()) == set(b) | set(c)
    assert a[0] not in set(ct.keys())


@pytest.mark.bpf
def test_sessions_a_rule_change_removes_go_to_the_audit_log(backend):
    """With the daemon's audit log attached (audit_sink), each session follow_rules removes
    makes one end record (why rule_change) with its mapping; without it, none is made."""
    got = []
    backend.audit_sink = got.extend
    ct = backend.maps.ct
    add_session(ct, 1, rule_id=RULE_A)
    add_session(ct, 2, rule_id=RULE_B)
    assert backend.follow_rules({RULE_A: None, RULE_B: None}, {},
                                {RULE_A: _pool("198.19.3.71"), RULE_B: _pool("198.19.2.71")}) == (0, 1)
    [r] = got
    assert (r["event"], r["why"], r["proto"], r["state"], r["rule_id"]) == ("end", "rule_change", "tcp",
                                                                               "ESTABLISHED", RULE_A)
    assert (r["inside_addr"], r["inside_port"], r["nat_addr"], r["nat_port"], r["remote_addr"], r["remote_port"]) \
        == ("198.18.40.11", 40001, "198.19.2.71", 5001, "203.0.113.10", 80)
    backend.audit_sink = None
    assert backend.follow_rules({RULE_B: None}, {}, {RULE_B: _pool("198.19.3.71")}) == (0, 1)
    assert len(got) == 1


@pytest.mark.bpf
def test_a_move_to_a_link_that_does_not_hold_the_address_removes_the_session(backend):
    """new_gw to an uplink (ifindex 7) that does not hold the session's address (on ifindex 2):
    removed; when the address is on the new link, or on no outside link, it moves and stays."""
    ct = backend.maps.ct
    gw = ipaddress.IPv4Address("198.19.3.1")
    snat = ipaddress.IPv4Address(SNAT)
    for holders, stays in (({snat: {2}}, False), ({snat: {2, 7}}, True), ({}, True)):
        backend.owners = lambda devs, h=holders: (devs == ("eth1", "eth2") or pytest.fail(devs)) and h
        out, _ = add_session(ct, 1, rule_id=RULE_A)
        moved, removed = backend.follow_rules({RULE_A: gw}, {}, {RULE_A: _pool("198.19.2.71")}, ("eth1", "eth2"))
        assert (moved, removed) == ((1, 0) if stays else (0, 1))
        assert (ct.get(out) is not None) == stays
        backend.flush()


@pytest.mark.bpf
def test_flush_by_inside_address_and_by_snat_address(backend):
    """flush(inside=) drops that host's pairs, flush(nat=) those with that SNAT address."""
    ct = backend.maps.ct
    add_session(ct, 1)
    b = add_session(ct, 2)
    assert backend.flush(inside=ipaddress.IPv4Address("198.18.40.11")) == 1
    assert set(ct.keys()) == set(b)
    assert backend.flush(nat=ipaddress.IPv4Address("198.19.3.71")) == 0
    assert backend.flush(nat=ipaddress.IPv4Address(SNAT)) == 1 and len(ct) == 0


@pytest.mark.bpf
def test_rule_writes_touch_only_changed_slots(backend):
    """Unchanged reload writes nothing; growing, editing and shrinking write just what differs."""
    m = backend.maps

    def rules(*ids):
        return [L.SNAT_RULE.pack(rule_id=i, pool_min=1, pool_max=2) for i in ids]

    def cfg(n):
        return L.SNAT_CFG.pack(nrules=n, port_min=5000, port_max=65535, port_tries=64)

    assert m.write_rules(cfg(3), rules(1, 2, 3)) == 3
    assert m.write_rules(cfg(3), rules(1, 2, 3)) == 0
    assert m.write_rules(cfg(4), rules(1, 9, 3, 4)) == 2
    assert m.write_rules(cfg(2), rules(1, 9)) == 2  # two tail slots zeroed
    got_cfg, got = m.current_rules()
    assert got_cfg == cfg(2) and got == rules(1, 9)
    assert m.rules.get(2) == bytes(L.SNAT_RULE.size)
    with pytest.raises(BackendError, match="nrules=2"):
        m.write_rules(cfg(3), rules(1, 2))
    assert m.current_rules() == (cfg(2), rules(1, 9))  # bad input changed nothing


@pytest.mark.bpf
def test_rule_writes_and_reads_in_batches_cover_every_slot(backend):
    """Rules are read by batch lookups (4,096 slots a call) and written by batch updates (1,024 a
    call): a set larger than both lands slot for slot as one lookup per slot sees it, and so do
    the rule id -> slot index and the next reload's diff."""
    m = backend.maps
    n = 5000

    def rules(base):
        return [L.SNAT_RULE.pack(rule_id=base + i, pool_min=i, pool_max=i + 1) for i in range(n)]

    def cfg(k):
        return L.SNAT_CFG.pack(nrules=k, port_min=5000, port_max=65535, port_tries=64)

    first = rules(1)
    assert m.write_rules(cfg(n), first) == n
    assert [m.rules.get(i) for i in range(n)] == first  # one lookup per slot: each went in
    assert m.current_rules() == (cfg(n), first)
    assert {k: struct.unpack("<I", v)[0] for k, v in m.rule_slots.items()} == \
        {struct.pack("<I", 1 + i): i for i in range(n)}  # fmt: skip
    second = first[:4100] + rules(100_000)[4100:]  # the tail past the first read batch changes
    assert m.write_rules(cfg(n), second) == n - 4100
    assert [m.rules.get(i) for i in range(n)] == second
    assert m.write_rules(cfg(10), second[:10]) == n - 10  # the rest zeroed
    assert m.rules.get(4999) == bytes(L.SNAT_RULE.size) and m.current_rules() == (cfg(10), second[:10])


@pytest.mark.bpf
def test_from_nets_as_written_is_the_trie_as_read(backend):
    """from_nets_now answers from what this process last wrote (an LPM trie has no batch
    lookup): after each write it is exactly what a fresh reader of the trie finds."""
    m = backend.maps

    def net(a, plen, kind):
        return L.LPM_V4.pack(prefixlen=plen, addr=ipaddress.IPv4Address(a).packed), kind

    def read():
        return {k: struct.unpack("<I", v)[0] for k, v in m.from_nets.items()}

    for nets in ([net("198.18.0.0", 15, L.FROM_NET_RULE), net("198.19.1.0", 24, L.FROM_NET_POOL)],
                 [net("198.18.0.0", 15, L.FROM_NET_POOL), net("10.0.0.0", 8, L.FROM_NET_RULE)],
                 []):  # fmt: skip
        m.write_from_nets(dict(nets))
        assert m.from_nets_now() == read() == dict(nets)
        assert DatapathMaps(m.maps).from_nets_now() == read()  # a reader without the record


@pytest.mark.bpf
def test_stats_sum_reasons_over_cpus_and_zero_clears_them(backend):
    """Reasons counted by the program and rule counters show in stats; zero() clears both."""
    fd = backend.loader.obj.prog_fd("snat_outside")
    B.test_run(fd, bytes(60), repeat=4)
    backend.maps.rule_stats_map.put(RULE_A, L.RULE_STATS.pack(packets=5, bytes=500, sessions=1))
    st = backend.stats()
    assert st.reasons["PASS_NO_SESSION_IN"] == 4
    assert st.rules[RULE_A].packets == 5 * B.num_possible_cpus()
    backend.zero()
    st = backend.stats()
    assert st.reasons["PASS_NO_SESSION_IN"] == 0 and st.rules == {}


@pytest.mark.bpf
def test_read_pinned_view_reads_sessions_and_refuses_changes(backend, pin_dir):  # noqa: F811
    """Without a daemon, the pinned maps give sessions/stats read-only; closing keeps the pins."""
    add_session(backend.maps.ct, 1)
    backend.expire(now=BASE / SEC)  # counts it
    view = BpfBackend.read_pinned(pin_dir)
    try:
        assert [s.inside for s in view.sessions()] == ["198.18.40.11:40001"]
        assert view.stats().sessions == 1
        with pytest.raises(BackendError, match="read-only"):
            view.expire()
        with pytest.raises(BackendError, match="read-only"):
            view.flush()
    finally:
        view.stop()
    assert os.path.exists(os.path.join(pin_dir, L.MAP_CT))


def test_read_pinned_without_pins_says_what_is_missing(tmp_path):
    """An absent pin dir gives an error naming the path and the likely cause."""
    with pytest.raises(BackendError, match="no pinned map: is the snatgw datapath running"):
        BpfBackend.read_pinned(str(tmp_path / "none"))


@pytest.mark.bpf
def test_gc_without_explicit_now_rests_for_two_sweep_durations(backend, monkeypatch):
    """After a sweep of T seconds, expire() skips until 2*T later (GC stays under a third of a CPU)."""
    from snatgw.datapath.bpf import backend as mod

    assert mod.GC_DUTY == 3
    clock = iter([100.0, 101.0, 102.0, 103.5, 104.0]).__next__  # sweep 1 lasts 1 s
    monkeypatch.setattr(mod, "_clock", clock)
    add_session(backend.maps.ct, 1, L.CtState.SYN_SENT, out_seen=1, in_seen=1)  # long expired
    assert backend.expire() == 1  # t 100 -> 101: next sweep not before 103
    add_session(backend.maps.ct, 2, L.CtState.SYN_SENT, out_seen=1, in_seen=1)
    assert backend.expire() == 0 and len(backend.maps.ct) == 2  # t 102: resting
    assert backend.expire() == 1 and len(backend.maps.ct) == 0  # t 103.5: swept


@pytest.mark.bpf
def test_addr_stats_reads_live_sessions_and_refusals_per_snat_address(backend):
    """addr_stats() decodes snat_addr_stats (be32 address -> struct live_count) for the metrics."""
    m = backend.maps.maps[L.MAP_ADDR_STATS]
    m.put(ipaddress.IPv4Address("198.19.2.71").packed, L.LIVE_COUNT.pack(sessions=3, refusals=7))
    m.put(ipaddress.IPv4Address("198.19.2.72").packed, L.LIVE_COUNT.pack(sessions=0, refusals=1))
    assert backend.addr_stats() == {ipaddress.IPv4Address("198.19.2.71"): (3, 7),
                                    ipaddress.IPv4Address("198.19.2.72"): (0, 1)}


@pytest.mark.bpf
def test_per_host_sessions_say_whether_they_are_live_or_the_last_sweeps(backend, monkeypatch):
    """Without CFG_F_HOST_COUNT stats() marks the hosts' sessions as the last walk's, with its
    age; a rule set with a host limit sets the flag and recounts first (install_rules), so the
    sessions that were there count and the figures are live."""
    from snatgw.datapath.bpf import backend as mod

    t = [100.0]
    monkeypatch.setattr(mod, "_clock", lambda: t[0])
    for n in (1, 2):
        add_session(backend.maps.ct, n)
    p = backend.stats().pressure
    assert (p["hosts_counted"], p["hosts_age_seconds"], p["hosts_total"]) == ("sweep", None, 0)
    backend.expire(now=BASE / SEC)
    t[0] = 103.0
    p = backend.stats().pressure
    assert (p["hosts_counted"], p["hosts_age_seconds"], p["hosts_total"]) == ("sweep", 3.0, 2)
    add_session(backend.maps.ct, 3)  # made since: not in the figures until the next walk
    cfg = L.SNAT_CFG.pack(nrules=1, flags=L.CFG_F_HOST_COUNT, port_min=5000, port_max=65535, port_tries=64)
    mod.install_rules(backend.maps, cfg, [L.SNAT_RULE.pack(rule_id=RULE_A, pool_min=SNAT, pool_max=SNAT,
                                                           host_limit=5)], backend._recount_for_limit)  # fmt: skip
    assert backend.host_counting()
    p = backend.stats().pressure
    assert (p["hosts_counted"], p["hosts_total"]) == ("live", 3) and "hosts_age_seconds" not in p
    rc = backend.status_extra()["recounts"]  # the walk, for status (the sessions-cp bench reads it)
    assert (rc["count"], rc["last_live"], rc["last_visited"], rc["last_wait_seconds"]) == (1, 3, 6, 0.0)
    assert rc["last_seconds"] >= 0 and backend.status_extra()["walk_running_seconds"] is None
    off = L.SNAT_CFG.pack(nrules=1, port_min=5000, port_max=65535, port_tries=64)
    mod.install_rules(backend.maps, off, [L.SNAT_RULE.pack(rule_id=RULE_A, pool_min=SNAT, pool_max=SNAT)],
                      lambda: pytest.fail("no recount when the limit goes"))  # fmt: skip
    assert not backend.host_counting() and backend.status_extra()["recounts"]["count"] == 1
    assert backend.stats().pressure["hosts_counted"] == "sweep"


@pytest.mark.bpf
def test_sessions_carried_from_nft_get_the_route_back_as_the_datapath_writes_it(backend):
    """A session carried over from the nft datapath (a switch to bpf) is written as the datapath
    makes one: its IN entry holds the route back's next hop and MTU.  They were 0, so every
    reply was "over the MTU" (handed to the kernel, counted XLATE_IN_FRAG_NEEDED) and an inside
    ICMP error about it never judged its host on-link."""
    from snatgw.config.parse import parse_text
    from snatgw.datapath.backend import Session

    backend.routes.table["198.18.40.10"] = (3, "198.18.40.10", 1500)  # on-link, inside
    config = parse_text("snatgw {\n inside lan40\n outside eth1\n}\nvirtual_server fwmark 1 {\n"
                        " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")  # fmt: skip
    s = Session(proto="tcp", inside="198.18.40.10:40001", remote="203.0.113.10:80", nat="198.19.2.71:5001",
                state="ESTABLISHED", idle=0.0, expires=100.0)  # fmt: skip
    assert backend.insert_sessions([s], config) == 1
    entries = {L.CT_KEY.unpack(k)["dir"]: L.CT_ENTRY.unpack(v) for k, v in backend.maps.ct.items()}
    inn, out = entries[L.CT_DIR_IN], entries[L.CT_DIR_OUT]
    assert (inn["ifindex"], inn["nexthop"], inn["mtu"]) == (3, int(ipaddress.IPv4Address("198.18.40.10")), 1500)
    assert (out["ifindex"], out["nexthop"], out["mtu"]) == (2, int(ipaddress.IPv4Address("198.19.2.1")), 1500)
