"""BpfBackend.start/apply/stop end to end in a private netns (stand-in object, bpf-C's rule
compiler): rules installed, programs attached, a new_gw edit moves live sessions to the other
uplink by the kernel's route, keep_state hands sessions to the next start, nothing left."""

import contextlib
import ipaddress
import os
import socket
import uuid
from dataclasses import replace

import pytest

from snatgw import layout as L
from snatgw.config.schema import GatewayConfig, Settings
from snatgw.datapath.bpf import libbpf as B
from snatgw.datapath.bpf.backend import BpfBackend
from snatgw.datapath.bpf.loader import attached_prog_id, netns
from snatgw.rules import Pool, Rule, RuleSet

from test_backend import add_session
from test_loader import mini_obj, pin_dir, sh  # noqa: F401  (fixtures)

pytest.importorskip("snatgw.datapath.bpf.prog_maps", reason="bpf-C's rule compiler is not there yet")

NET = ipaddress.IPv4Network
IP = ipaddress.IPv4Address


@pytest.fixture
def gw():
    """netns '<tag>-gw' with lan40 (inside), eth1 and eth2 (uplinks, REF addresses), peers in '<tag>-pe'."""
    tag = f"sgt{os.getpid():x}{uuid.uuid4().hex[:4]}"
    name, peer = f"{tag}-gw", f"{tag}-pe"
    try:
        sh("ip", "netns", "add", name)
        sh("ip", "netns", "add", peer)
        for dev, addr in (("lan40", "198.18.40.1/24"), ("eth1", "198.19.2.2/24"), ("eth2", "198.19.3.2/24")):
            sh("ip", "-n", name, "link", "add", dev, "type", "veth", "peer", "name", dev + "p", "netns", peer)
            sh("ip", "-n", name, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", name, "link", "set", dev, "up")
            sh("ip", "-n", peer, "link", "set", dev + "p", "up")
        sh("ip", "-n", name, "route", "add", "default", "via", "198.19.2.1", "dev", "eth1")
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)
        sh("ip", "netns", "del", peer, check=False)


def config(pin_dir, new_gw=None):  # noqa: F811
    rules = RuleSet([
        Rule(src=NET("198.18.40.0/24"), pool=Pool(IP("198.19.2.71"), IP("198.19.2.73")), oif="eth1",
             gw=IP("198.19.2.1"), new_gw=new_gw),
        Rule(src=NET("198.18.0.0/16"), pool=Pool(IP("198.19.2.71"), IP("198.19.2.73"))),
    ])  # fmt: skip
    s = Settings(inside=("lan40",), outside=("eth1", "eth2"), pin_dir=pin_dir, max_sessions=64)
    return GatewayConfig(rules, s)


@contextlib.contextmanager
def started(gw, pin_dir, mini_obj):  # noqa: F811
    """A BpfBackend started on ``config(pin_dir)`` in ``gw``, stopped (nothing kept) after."""
    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            yield b
        finally:
            b.stop()


@pytest.mark.bpf
def test_start_apply_failover_and_restart_keep_sessions(gw, pin_dir, mini_obj):  # noqa: F811
    """start installs and attaches; new_gw edit moves the rule's sessions; keep_state survives."""
    with netns(gw):
        cfg = config(pin_dir)
        rid = list(cfg.rules)[0].rule_id
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            assert L.SNAT_CFG.unpack(b.maps.cfg.get(0))["nrules"] == 2
            assert attached_prog_id("lan40", B.BPF_TC_INGRESS) and attached_prog_id("eth2", B.BPF_TC_EGRESS)
            # interface roles for PASS_INTERNAL, and accept_local for PASS_TRANSLATED packets
            assert b.maps.iface_roles() == {open_ifindex("lan40"): L.IFACE_INSIDE,
                                            open_ifindex("eth1"): L.IFACE_OUTSIDE,
                                            open_ifindex("eth2"): L.IFACE_OUTSIDE,
                                            L.RECIRC_KEY: open_ifindex(L.RECIRC_DEV)}  # fmt: skip
            # the fragment holder's TAP, snat_recirc on its ingress
            assert attached_prog_id(L.RECIRC_DEV, B.BPF_TC_INGRESS)
            assert read_sysctl("lan40", "accept_local") == "1"
            assert read_sysctl("eth1", "accept_local") == "0"  # uplinks are left alone
            out_key, in_key = add_session(b.maps.ct, 1, rule_id=rid, out_seen=0, in_seen=0)
            # a refusal marker: an apply that changes nothing it was judged by keeps it (every
            # apply emptied it: one more port search per recently refused flow); a failover empties it
            refused = b.maps.maps[L.MAP_REFUSED]
            refused.put(bytes(L.CT_KEY.size), L.REFUSAL.pack(at=1, addr=0xC6130247, reason=int(L.Reason.DROP_HOST_LIMIT)))
            b.apply(config(pin_dir))
            assert refused.count() == 1 and len(b.refusals()) == 1
            b.apply(config(pin_dir, new_gw=IP("198.19.3.1")))  # failover to the second uplink
            assert refused.count() == 0 and len(b.refusals()) == 1  # (the log still counts it, once)
            e = L.CT_ENTRY.unpack(b.maps.ct.get(out_key))
            assert e["ifindex"] == int(open_ifindex("eth2")) and e["nexthop"] == int(IP("198.19.3.1"))
            assert e["flags"] & L.CT_F_NEW_GW
            marker = L.REFUSAL.pack(at=2, addr=0xC6130247, reason=int(L.Reason.DROP_HOST_LIMIT))
            refused.put(bytes(L.CT_KEY.size), marker)
        finally:
            b.stop(keep_state=True)
        assert attached_prog_id("lan40", B.BPF_TC_INGRESS) is not None  # still translating
        # a restart adopting the pins: with the config its predecessor ran, the marker stays (a
        # graceful restart does not search every refused flow again); with a setting a refusal
        # is judged by changed, it goes, as with a reload (it stayed: DROP_REFUSED_RECENTLY for
        # up to 2 s more); with snat_ifaces made anew (a predecessor's unknown), it goes too
        same = config(pin_dir, new_gw=IP("198.19.3.1"))
        wider = GatewayConfig(same.rules, replace(same.settings, port_min=same.settings.port_min - 1000))
        steps = [("the same config", same, True), ("a wider port range", wider, False), ("the same again", wider, True),
                 ("snat_ifaces made anew", wider, False)]  # fmt: skip
        for n, (what, conf, kept) in enumerate(steps):
            if what == "snat_ifaces made anew":
                os.unlink(os.path.join(pin_dir, L.MAP_IFACES))
            b2 = BpfBackend(cfg.settings, obj_path=mini_obj)
            b2.start(conf)
            try:
                refused = b2.maps.maps[L.MAP_REFUSED]
                assert b2.maps.ct.get(out_key) is not None and b2.maps.ct.get(in_key) is not None
                assert [s.rule_id for s in b2.sessions()] == [rid]
                assert (refused.count(), [m["at"] for m in b2.refusals()]) == (int(kept), [2]), what
                refused.put(bytes(L.CT_KEY.size), marker)
            finally:
                b2.stop(keep_state=n < len(steps) - 1)
    assert not os.path.exists(pin_dir)


def read_sysctl(dev, name):
    """net.ipv4.conf.<dev>.<name> of the current network namespace."""
    with open(f"/proc/sys/net/ipv4/conf/{dev}/{name}") as f:
        return f.read().strip()


def open_ifindex(name):
    import socket

    return socket.if_nametoindex(name)


@pytest.mark.bpf
def test_start_with_missing_interface_leaves_nothing(gw, pin_dir, mini_obj):  # noqa: F811
    """A config naming an absent inside device fails clearly; no pins or filters remain."""
    from snatgw.errors import BackendError

    with netns(gw):
        cfg = config(pin_dir)
        bad = GatewayConfig(cfg.rules, Settings(inside=("lan99",), outside=("eth1",), pin_dir=pin_dir,
                                                max_sessions=64))  # fmt: skip
        with pytest.raises(BackendError, match="lan99"):
            BpfBackend(bad.settings, obj_path=mini_obj).start(bad)
        assert attached_prog_id("eth1", B.BPF_TC_INGRESS) is None
    assert not os.path.exists(pin_dir)



@pytest.mark.bpf
def test_apply_moves_filters_when_interfaces_change_and_bad_config_changes_nothing(gw, pin_dir, mini_obj):  # noqa: F811
    """Dropping an uplink from `outside` detaches it; an invalid apply leaves rules as they were."""
    from dataclasses import replace

    from snatgw.errors import BackendError

    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            assert attached_prog_id("eth2", B.BPF_TC_INGRESS) is not None
            b.apply(GatewayConfig(cfg.rules, replace(cfg.settings, outside=("eth1",))))
            assert attached_prog_id("eth2", B.BPF_TC_INGRESS) is None
            assert b.maps.iface_roles() == {open_ifindex("lan40"): L.IFACE_INSIDE,
                                            open_ifindex("eth1"): L.IFACE_OUTSIDE,
                                            L.RECIRC_KEY: open_ifindex(L.RECIRC_DEV)}  # eth2's role gone
            assert attached_prog_id(L.RECIRC_DEV, B.BPF_TC_INGRESS) is not None  # still holding
            assert attached_prog_id("eth1", B.BPF_TC_EGRESS) is not None
            before = b.maps.current_rules()
            one = RuleSet([list(cfg.rules)[1]])
            with pytest.raises(BackendError, match="port range"):
                b.apply(GatewayConfig(one, replace(b.settings, port_min=9000, port_max=8000)))
            with pytest.raises(BackendError, match="max_sessions changed"):
                b.apply(GatewayConfig(one, replace(b.settings, max_sessions=128)))
            assert b.maps.current_rules() == before
        finally:
            b.stop()
    assert not os.path.exists(pin_dir)


@pytest.mark.bpf
def test_vanished_hooks_are_restored_by_check_hooks(gw, pin_dir, mini_obj):  # noqa: F811
    """`tc filter del` of one hook and `tc qdisc del ... clsact` of an uplink: check_hooks puts
    our programs back on every hook it lost and says which; with all in place it does nothing."""
    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            assert b.check_hooks() == []
            sh("tc", "filter", "del", "dev", "lan40", "ingress", "pref", str(0x534E))
            sh("tc", "qdisc", "del", "dev", "eth2", "clsact")
            assert attached_prog_id("lan40", B.BPF_TC_INGRESS) is None
            assert attached_prog_id("eth2", B.BPF_TC_EGRESS) is None
            restored = b.check_hooks()
            assert len(restored) == 3 and any("lan40 ingress" in r for r in restored)
            for dev, point in (("lan40", B.BPF_TC_INGRESS), ("eth2", B.BPF_TC_INGRESS), ("eth2", B.BPF_TC_EGRESS)):
                assert attached_prog_id(dev, point) is not None
            assert b.check_hooks() == []
        finally:
            b.stop()


@pytest.mark.bpf
def test_a_failed_start_leaves_the_running_datapath_attached(gw, pin_dir, mini_obj):  # noqa: F811
    """A daemon exits (keep_state), the next one fails to start (a config the datapath refuses):
    the programs and pins of the first stay as they were, still translating."""
    from dataclasses import replace

    from snatgw.errors import BackendError

    with netns(gw):
        cfg = config(pin_dir)
        a = BpfBackend(cfg.settings, obj_path=mini_obj)
        a.start(cfg)
        ids = {d: attached_prog_id(d, B.BPF_TC_INGRESS) for d in ("lan40", "eth1", "eth2")}
        a.stop(keep_state=True)
        bad = GatewayConfig(cfg.rules, replace(cfg.settings, port_min=9000, port_max=8000))
        with pytest.raises(BackendError, match="port range"):
            BpfBackend(bad.settings, obj_path=mini_obj).start(bad)
        assert {d: attached_prog_id(d, B.BPF_TC_INGRESS) for d in ids} == ids
        assert os.path.isdir(pin_dir)
        c = BpfBackend(cfg.settings, obj_path=mini_obj)
        c.start(cfg)
        c.stop()
    assert not os.path.exists(pin_dir)


def _pin_ids(pin_dir) -> dict[str, int]:
    out = {}
    for name in sorted(os.listdir(pin_dir)):
        fd = B.obj_get(os.path.join(pin_dir, name))
        try:
            out[name] = B.map_info(fd).id
        finally:
            os.close(fd)
    return out


@pytest.mark.bpf
def test_a_failed_start_puts_the_pins_back_as_it_found_them(gw, pin_dir, mini_obj):  # noqa: F811
    """The running datapath is an older version's: a config map in another layout and one map
    it never had.  The next start replaces the first and pins the second, then fails (a config
    the datapath refuses): the pin dir is as it was, each pin the same map (the one the
    attached programs use), nothing of the failed start left (it left its new config maps
    pinned, and the start after it adopted those)."""
    from dataclasses import replace

    from snatgw.errors import BackendError
    from test_loader import _pin_foreign

    with netns(gw):
        cfg = config(pin_dir)
        a = BpfBackend(cfg.settings, obj_path=mini_obj)
        a.start(cfg)
        a.stop(keep_state=True)
        _pin_foreign(os.path.join(pin_dir, L.MAP_CONFIG), "array", 4, L.SNAT_CFG.size + 8, 1)
        os.unlink(os.path.join(pin_dir, L.MAP_REFUSED))
        before = _pin_ids(pin_dir)
        ids = {d: attached_prog_id(d, B.BPF_TC_INGRESS) for d in ("lan40", "eth1", "eth2")}
        bad = GatewayConfig(cfg.rules, replace(cfg.settings, port_min=9000, port_max=8000))
        with pytest.raises(BackendError, match="port range"):
            BpfBackend(bad.settings, obj_path=mini_obj).start(bad)
        assert _pin_ids(pin_dir) == before
        assert {d: attached_prog_id(d, B.BPF_TC_INGRESS) for d in ids} == ids
        c = BpfBackend(cfg.settings, obj_path=mini_obj)
        c.start(cfg)
        assert L.MAP_REFUSED in os.listdir(pin_dir) and _pin_ids(pin_dir)[L.MAP_CONFIG] != before[L.MAP_CONFIG]
        c.stop()
    assert not os.path.exists(pin_dir)


def _iif_ambiguous(b) -> bool:
    return bool(L.SNAT_CFG.unpack(b.maps.cfg.get(0))["flags"] & L.CFG_F_IIF_AMBIGUOUS)


@pytest.mark.bpf
def test_inside_devices_sharing_ifindex_low_bits_turn_vouching_off(gw, pin_dir, mini_obj, caplog):  # noqa: F811
    """Two inside devices whose ifindexes share the low 16 bits (ct_entry.iif keeps only those)
    set CFG_F_IIF_AMBIGUOUS at start, with a warning naming them; when one is recreated with
    another ifindex, check_hooks clears the flag before it attaches again; an apply that
    recreates the clash sets it again."""
    with netns(gw):
        lan40 = socket.if_nametoindex("lan40")  # (sysfs shows the mount namespace's net, not ours)
        sh("ip", "link", "add", "lan41", "index", str(lan40 + 0x10000), "type", "veth", "peer", "name", "lan41p")
        cfg = config(pin_dir)
        s = Settings(inside=("lan40", "lan41"), outside=("eth1", "eth2"), pin_dir=pin_dir, max_sessions=64)
        cfg = GatewayConfig(cfg.rules, s)
        b = BpfBackend(s, obj_path=mini_obj)
        b.start(cfg)
        try:
            assert _iif_ambiguous(b)
            assert "lan41 (ifindex" in caplog.text and "full reverse-path check" in caplog.text
            b.apply(cfg)  # an apply keeps it
            assert _iif_ambiguous(b)
            sh("ip", "link", "del", "lan41")
            sh("ip", "link", "add", "lan41", "type", "veth", "peer", "name", "lan41p")
            b.check_hooks()
            assert not _iif_ambiguous(b)
            assert attached_prog_id("lan41", B.BPF_TC_INGRESS) is not None
            sh("ip", "link", "del", "lan41")
            sh("ip", "link", "add", "lan41", "index", str(lan40 + 0x20000), "type", "veth", "peer", "name", "lan41p")
            b.apply(cfg)
            assert _iif_ambiguous(b)
        finally:
            b.stop()


@pytest.mark.bpf
def test_a_recreated_inside_device_keeps_its_role(gw, pin_dir, mini_obj):  # noqa: F811
    """snat_ifaces names the devices' roles by ifindex (a new flow routed out of an inside device
    is internal, never translated).  An inside device recreated (another ifindex, same name) got
    its programs back from the hook check but no role until a reload: traffic routed between
    inside networks through it looked outbound.  The hook check writes the roles again."""
    with started(gw, pin_dir, mini_obj) as b:
        old = socket.if_nametoindex("lan40")
        assert b.maps.iface_roles()[old] == L.IFACE_INSIDE
        sh("ip", "link", "del", "lan40")
        sh("ip", "link", "add", "lan40", "type", "veth", "peer", "name", "lan40p")
        sh("ip", "addr", "add", "198.18.40.1/24", "dev", "lan40")
        sh("ip", "link", "set", "lan40", "up")
        new = socket.if_nametoindex("lan40")
        assert new != old
        assert any("lan40" in x for x in b.check_hooks())
        assert attached_prog_id("lan40", B.BPF_TC_INGRESS) is not None
        got = b.maps.iface_roles()
        assert got[new] == L.IFACE_INSIDE and old not in got
        assert got[socket.if_nametoindex("eth1")] == L.IFACE_OUTSIDE


@pytest.mark.bpf
def test_an_address_added_to_an_inside_device_is_guarded_after_the_next_check(gw, pin_dir, mini_obj):  # noqa: F811
    """snat_inside_addrs (the gateway's own inside addresses, which the egress guard never lets
    out of an uplink as a source) was written at start and reload only: an address added to an
    inside device later (by hand, DHCP, a VRRP VIP) was not in it until a reload.  The hook
    check (every ROUTE_BACK_RECHECK seconds) writes them as they are, and drops a removed one."""

    def inside_addrs(b):
        return {str(IP(k)) for k, _ in b.maps.inside_addrs.items()}

    with started(gw, pin_dir, mini_obj) as b:
        assert inside_addrs(b) == {"198.18.40.1"}
        sh("ip", "addr", "add", "198.18.41.1/24", "dev", "lan40")
        b._gw_check_at = float("-inf")  # (it looks every ROUTE_BACK_RECHECK seconds)
        b.check_hooks()
        assert inside_addrs(b) == {"198.18.40.1", "198.18.41.1"}
        sh("ip", "addr", "del", "198.18.41.1/24", "dev", "lan40")
        b._gw_check_at = float("-inf")
        b.check_hooks()
        assert inside_addrs(b) == {"198.18.40.1"}


@pytest.mark.bpf
def test_sessions_follow_devices_recreated_with_another_ifindex(gw, pin_dir, mini_obj):  # noqa: F811
    """A session keeps the ifindex of the device it leaves by and redirects there: an uplink
    or inside device recreated under its name (a VLAN or bond made again) black-holed every
    established session on it for as long as its packets kept it alive.  The hook check that
    attaches to the new device moves them: OUT entries' uplink and inside device (iif, low 16
    bits), IN entries' inside device, an endpoint-independent mapping's inside device (where the
    sessions it admits go); a session on another device, an IN entry's iif (a walk number
    there) and a mapping's OWNER entry are left as they are."""
    def pair(b, n, oif, iif):
        out_key = L.CT_KEY.pack(saddr=int(IP("198.18.40.10")) + n, daddr=int(IP("203.0.113.10")), sport=40000 + n,
                                dport=80, proto=L.IPPROTO_TCP, dir=L.CT_DIR_OUT)  # fmt: skip
        in_key = L.CT_KEY.pack(saddr=int(IP("203.0.113.10")), daddr=int(IP("198.19.2.71")), sport=80,
                               dport=5000 + n, proto=L.IPPROTO_TCP, dir=L.CT_DIR_IN)  # fmt: skip
        b.maps.ct.put(in_key, L.CT_ENTRY.pack(peer=out_key, ifindex=iif, iif=iif & 0xFFFF, last_seen=1))
        b.maps.ct.put(out_key, L.CT_ENTRY.pack(peer=in_key, ifindex=oif, iif=iif & 0xFFFF, mtu=1500, last_seen=1))
        return out_key, in_key

    def entry(b, k):
        return L.CT_ENTRY.unpack(b.maps.ct.get(k))

    def recreate(dev, addr):
        sh("ip", "link", "del", dev)
        sh("ip", "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        sh("ip", "addr", "add", addr, "dev", dev)
        sh("ip", "link", "set", dev, "up")

    with started(gw, pin_dir, mini_obj) as b:
        lan40, eth1, eth2 = (socket.if_nametoindex(d) for d in ("lan40", "eth1", "eth2"))
        o1, i1 = pair(b, 1, eth1, lan40)
        o2, i2 = pair(b, 2, eth2, lan40)
        # an endpoint-independent mapping: its ENDPOINT entry's iif is where the sessions it
        # admits are delivered; an OWNER entry's iif field is not a device
        eim = b.maps.maps[L.MAP_EIM]
        ek = L.EIM_KEY.pack(addr=int(IP("198.18.40.10")), port=40001, proto=L.IPPROTO_UDP, dir=L.EIM_DIR_ENDPOINT)
        ok = L.EIM_KEY.pack(addr=int(IP("198.19.2.71")), port=5001, proto=L.IPPROTO_UDP, dir=L.EIM_DIR_OWNER)
        eim.put(ek, L.EIM_ENTRY.pack(addr=int(IP("198.19.2.71")), port=5001, iif=lan40, last_seen=1))
        eim.put(ok, L.EIM_ENTRY.pack(addr=int(IP("198.18.40.10")), port=40001, iif=lan40, last_seen=1))
        recreate("eth1", "198.19.2.2/24")
        recreate("lan40", "198.18.40.1/24")
        eth1b, lan40b = socket.if_nametoindex("eth1"), socket.if_nametoindex("lan40")
        assert eth1b != eth1 and lan40b != lan40
        assert b.check_hooks()  # attached again
        assert (entry(b, o1)["ifindex"], entry(b, o1)["iif"]) == (eth1b, lan40b & 0xFFFF)
        assert (entry(b, o2)["ifindex"], entry(b, o2)["iif"]) == (eth2, lan40b & 0xFFFF)
        for k in (i1, i2):
            assert (entry(b, k)["ifindex"], entry(b, k)["iif"]) == (lan40b, lan40 & 0xFFFF)
        assert L.EIM_ENTRY.unpack(eim.get(ek))["iif"] == lan40b
        assert L.EIM_ENTRY.unpack(eim.get(ok))["iif"] == lan40


@pytest.mark.bpf
def test_a_device_renamed_away_loses_programs_and_role_and_keeps_its_sessions(gw, pin_dir, mini_obj):  # noqa: F811
    """`ip link set lan40 name lanold`: the config names lan40, so lanold is no longer inside
    (the nft backend, which matches names, stops treating it so at once).  The hook check
    kept our program and role on it until a restart, and when another device took the name
    lan40 it moved lanold's sessions there, away from the hosts behind lanold that the
    kernel still routes their replies to.  Now the hook check takes program and role off
    lanold, attaches to the new lan40, and leaves the sessions where they were."""
    with started(gw, pin_dir, mini_obj) as b:
        old = socket.if_nametoindex("lan40")
        out_key, in_key = add_session(b.maps.ct, 1)
        for k, field, v in ((in_key, "ifindex", old), (out_key, "iif", old & 0xFFFF)):  # one behind lan40
            e = dict(L.CT_ENTRY.unpack(b.maps.ct.get(k)), **{field: v})
            b.maps.ct.put(k, L.CT_ENTRY.pack(**e))
        sh("ip", "link", "set", "lan40", "down")
        sh("ip", "link", "set", "lan40", "name", "lanold")
        sh("ip", "link", "set", "lanold", "up")
        assert b.check_hooks() == []
        assert attached_prog_id("lanold", B.BPF_TC_INGRESS) is None
        assert old not in b.maps.iface_roles()
        sh("ip", "link", "add", "lan40", "type", "veth", "peer", "name", "lan40p")
        sh("ip", "link", "set", "lan40", "up")
        new = socket.if_nametoindex("lan40")
        assert any("lan40" in x for x in b.check_hooks())
        assert attached_prog_id("lan40", B.BPF_TC_INGRESS) is not None
        assert attached_prog_id("lanold", B.BPF_TC_INGRESS) is None
        assert b.maps.iface_roles()[new] == L.IFACE_INSIDE and old not in b.maps.iface_roles()
        assert L.CT_ENTRY.unpack(b.maps.ct.get(in_key))["ifindex"] == old
        assert L.CT_ENTRY.unpack(b.maps.ct.get(out_key))["iif"] == old & 0xFFFF


@pytest.mark.bpf
def test_a_failed_removal_from_a_device_renamed_away_is_logged_once_and_counted(gw, pin_dir, mini_obj, monkeypatch,  # noqa: F811
                                                                                 caplog):
    """Our programs cannot be taken off a device renamed away (a tc detach refused): the hook
    check tries again every tick, and said so every tick, for each hook (an uplink has two);
    now once per device and kind of failure until that changes (the removal succeeding, the
    device gone, an attach), each try counted in status."""
    import errno
    import logging

    def refuse(ifindex, point, handle, priority):
        raise B.LibbpfError(f"bpf_tc_detach ifindex {ifindex}", errno.EPERM)

    def said():
        return [r.getMessage() for r in caplog.records if "renamed from eth2" in r.getMessage()]

    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        real = B.tc_detach
        try:
            sh("ip", "link", "set", "eth2", "down")
            sh("ip", "link", "set", "eth2", "name", "ethold")
            sh("ip", "link", "set", "ethold", "up")
            monkeypatch.setattr(B, "tc_detach", refuse)
            caplog.set_level(logging.INFO, logger="snatgw")
            for _ in range(4):
                b.check_hooks()
            assert len(said()) == 1 and "cannot remove" in said()[0] and "EPERM" in said()[0], said()
            st = b.status_extra()["renamed_detach"]
            assert st["failed"] == 8 and list(st["failing"]) == ["ethold"]  # 4 ticks, 2 hooks
            assert attached_prog_id("ethold", B.BPF_TC_INGRESS) is not None
            monkeypatch.setattr(B, "tc_detach", real)  # the removal succeeds: said, and nothing fails now
            b.check_hooks()
            assert attached_prog_id("ethold", B.BPF_TC_INGRESS) is None
            assert attached_prog_id("ethold", B.BPF_TC_EGRESS) is None
            assert len(said()) == 3 and all("removed" in m for m in said()[1:])
            assert b.status_extra()["renamed_detach"] == {"failed": 8, "failing": {}}
        finally:
            monkeypatch.setattr(B, "tc_detach", real)
            b.stop()


@pytest.mark.bpf
@pytest.mark.nft
def test_stats_read_the_leak_guards_drops_without_an_nft_process(gw, pin_dir, mini_obj, monkeypatch):  # noqa: F811
    """The leak guard table's drops count in DROP_LEAK (netfilter's postrouting comes before
    the TC egress program), read from its named counter by netlink (datapath/nftnl.py): a
    stats call, which metrics scrapes and `adm --rate` make often, starts no `nft` process,
    and its figure is the one `nft list counters` gives, at once after each drop."""
    import json
    import subprocess

    from snatgw.datapath.bpf import guard

    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            real_run = subprocess.run

            def no_nft(argv, *a, **kw):
                assert "nft" not in [str(x) for x in argv], argv
                return real_run(argv, *a, **kw)

            # an inside source the gateway itself sends out of eth1: the guard drops it
            pkt = bytearray(20 + 8 + 4)
            pkt[0], pkt[8], pkt[9] = 0x45, 64, socket.IPPROTO_UDP
            pkt[12:16], pkt[16:20] = IP("198.18.40.50").packed, IP("203.0.113.10").packed
            pkt[20:28] = (5353).to_bytes(2, "big") + (53).to_bytes(2, "big") + (12).to_bytes(2, "big") + bytes(2)
            s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            base = b.stats().reasons.get("DROP_LEAK", 0)
            monkeypatch.setattr(subprocess, "run", no_nft)
            try:
                for n in range(1, 4):
                    with pytest.raises(PermissionError):  # a netfilter drop of a local packet: EPERM
                        s.sendto(bytes(pkt), ("203.0.113.10", 0))
                    assert b.stats().reasons.get("DROP_LEAK", 0) == base + n
                    assert b.counters().reasons.get("DROP_LEAK", 0) == base + n
            finally:
                monkeypatch.setattr(subprocess, "run", real_run)
                s.close()
            listed = json.loads(sh("nft", "-j", "list", "counters", "table", "ip", guard.TABLE).stdout)
            (c,) = [o["counter"] for o in listed["nftables"] if "counter" in o]
            assert (c["name"], c["packets"]) == (guard.COUNTER, guard.dropped()) and c["packets"] >= 3
            # a reload rewrites the table (flush): the counter, an object, keeps its figure
            b.apply(cfg)
            assert guard.dropped() == c["packets"]
            assert guard.present()  # by netlink as well: the hook check's question each tick
            sh("nft", "delete", "chain", "ip", guard.TABLE, "postrouting")
            assert not guard.present() and guard.dropped() == c["packets"]  # the counter is the table's
            guard.remove()  # no table: nothing dropped, no error
            assert guard.dropped() == 0 and not guard.present()
        finally:
            b.stop()


def _back_from_rpf(maps) -> bool:
    return bool(L.SNAT_CFG.unpack(maps.cfg.get(0))["flags"] & L.CFG_F_BACK_FROM_RPF)


@pytest.mark.bpf
def test_a_daemon_exiting_leaves_the_route_back_looked_up(gw, pin_dir, mini_obj):  # noqa: F811
    """CFG_F_BACK_FROM_RPF holds only while a daemon watches the policy rules.  A daemon exiting
    (keep_state) leaves the programs translating with nobody judging: an iif rule added before
    the next daemon starts must not meet the flag set, so the exit clears it (one FIB lookup
    more per new flow meanwhile) and the next start judges it again; so does a failed start
    that leaves an adopted datapath running."""
    from dataclasses import replace

    from snatgw.datapath.bpf.maps import DatapathMaps

    def pinned_flag() -> bool:
        m = DatapathMaps.open_pinned(pin_dir)
        try:
            return _back_from_rpf(m)
        finally:
            m.close()

    sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.conf.all.forwarding=1")
    sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.conf.lo.forwarding=1")
    with netns(gw):
        cfg = config(pin_dir)
        a = BpfBackend(cfg.settings, obj_path=mini_obj)
        a.start(cfg)
        assert a.route_back_blocker is None and _back_from_rpf(a.maps)
        a.stop(keep_state=True)
        assert not pinned_flag()  # nobody watches the rules now
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)  # adopts, judges again
        assert _back_from_rpf(b.maps)
        b.stop(keep_state=True)
        c = BpfBackend(cfg.settings, obj_path=mini_obj)
        c.start(cfg)
        assert _back_from_rpf(c.maps)
        # a start that fails after adopting leaves the datapath running: unwatched as well
        c.loader.stop(keep_state=True)  # (a daemon killed without its exit: the flag stays)
        c.loader = c.maps = None
        bad = GatewayConfig(cfg.rules, replace(cfg.settings, port_min=9000, port_max=8000))
        with pytest.raises(Exception, match="port range"):
            BpfBackend(bad.settings, obj_path=mini_obj).start(bad)
        assert not pinned_flag()
        d = BpfBackend(cfg.settings, obj_path=mini_obj)
        d.start(cfg)
        d.stop()


@pytest.mark.bpf
@pytest.mark.nft
def test_the_hook_check_answers_when_netlink_fails(gw, pin_dir, mini_obj, monkeypatch):  # noqa: F811
    """The guard's presence is asked by netlink each tick; when netlink fails (BackendError),
    `nft` answers instead, as for the nft backend's own table: the hook check neither raises
    (losing the programs it re-attached from its report) nor takes a present guard for gone."""
    from snatgw.datapath import nftnl
    from snatgw.datapath.bpf import guard
    from snatgw.errors import BackendError

    with netns(gw):
        cfg = config(pin_dir)
        b = BpfBackend(cfg.settings, obj_path=mini_obj)
        b.start(cfg)
        try:
            def broken(*a, **kw):
                raise BackendError("nf_tables netlink: chain ip snatgw_guard postrouting: a malformed answer")

            monkeypatch.setattr(nftnl, "chain_exists", broken)
            assert guard.present()
            assert b.check_hooks() == []
            sh("nft", "delete", "table", "ip", guard.TABLE)
            assert not guard.present()
            assert b.check_hooks() == [f"leak guard table ip {guard.TABLE}"]
        finally:
            b.stop()


def _gw_routing():
    """This namespace's new_gw policy routing of the bpf backend: {pref: (fwmark, table)} and
    {table: route text}, from `ip`."""
    import json
    import subprocess

    rules = {int(r["priority"]): (r.get("fwmark"), str(r.get("table"))) for r in json.loads(
        subprocess.run(["ip", "-j", "rule", "show"], capture_output=True, text=True, check=True).stdout)
        if L.GW_RT_BASE <= int(r["priority"]) < L.GW_RT_BASE + L.GW_SLOTS}  # fmt: skip
    routes = {}
    for rt in json.loads(subprocess.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True,
                                        text=True, check=True).stdout):  # fmt: skip
        t = str(rt.get("table", ""))
        if t.isdigit() and L.GW_RT_BASE <= int(t) < L.GW_RT_BASE + L.GW_SLOTS:
            routes[int(t)] = f"{rt['dst']} via {rt.get('gateway')} dev {rt.get('dev')}"
    return rules, routes


@pytest.mark.bpf
def test_new_gw_policy_routing_follows_reloads_and_goes_at_stop(gw, pin_dir, mini_obj, monkeypatch):  # noqa: F811
    """A new_gw rule's egress gets its mark (snat_gw_marks), an ip rule for it and a table whose
    default route leaves by that egress (what routes a packet the datapath hands to the kernel);
    the hook check puts them back when they vanish; a reload that changes new_gw moves them, one
    without new_gw removes them, and so do a stop and a start that fails after installing them.
    Nothing else in those ranges is touched."""
    M = L.GW_MARK_BASE
    with netns(gw):
        sh("ip", "rule", "add", "pref", str(L.GW_RT_BASE + 5), "fwmark", "7", "lookup", "main")  # not ours (no proto 201)
        b = BpfBackend(config(pin_dir).settings, obj_path=mini_obj)
        b.start(config(pin_dir, new_gw=IP("198.19.3.1")))
        try:
            eth1, eth2 = socket.if_nametoindex("eth1"), socket.if_nametoindex("eth2")
            assert b.maps.gw_marks_now() == {(eth2, int(IP("198.19.3.1"))): M}
            rules, routes = _gw_routing()
            assert rules[L.GW_RT_BASE] == (f"0x{M:x}", str(L.GW_RT_BASE))
            assert routes == {L.GW_RT_BASE: "default via 198.19.3.1 dev eth2"}
            # gone (`ip rule flush`; its device went down): the hook check puts them back
            sh("ip", "rule", "del", "pref", str(L.GW_RT_BASE))
            sh("ip", "route", "flush", "table", str(L.GW_RT_BASE))
            b._gw_check_at = float("-inf")  # (it looks every ROUTE_BACK_RECHECK seconds)
            assert any("new_gw policy routing" in x for x in b.check_hooks())
            assert _gw_routing()[1] == routes and _gw_routing()[0][L.GW_RT_BASE] == rules[L.GW_RT_BASE]
            assert not any("new_gw" in x for x in b.check_hooks())  # (not again within the period)
            b.apply(config(pin_dir, new_gw=IP("198.19.2.1")))  # the other uplink: a new number
            assert b.maps.gw_marks_now() == {(eth1, int(IP("198.19.2.1"))): M + 1}
            rules, routes = _gw_routing()
            assert L.GW_RT_BASE not in rules and rules[L.GW_RT_BASE + 1] == (f"0x{M + 1:x}", str(L.GW_RT_BASE + 1))
            assert routes == {L.GW_RT_BASE + 1: "default via 198.19.2.1 dev eth1"}
            b.apply(config(pin_dir))  # no new_gw: nothing of it left
            assert b.maps.gw_marks_now() == {} and _gw_routing() == ({L.GW_RT_BASE + 5: ("0x7", "main")}, {})
            b.apply(config(pin_dir, new_gw=IP("198.19.3.1")))
            assert len(_gw_routing()[0]) == 2
        finally:
            b.stop()
        assert _gw_routing() == ({L.GW_RT_BASE + 5: ("0x7", "main")}, {})
        # a fresh start that fails after installing its routing leaves none of it
        from snatgw.datapath.bpf import loader as loader_mod
        from snatgw.errors import BackendError

        def boom(*a, **k):
            raise BackendError("attach failed (test)")

        monkeypatch.setattr(loader_mod.Loader, "attach", boom)
        with pytest.raises(BackendError, match="attach failed"):
            BpfBackend(config(pin_dir).settings, obj_path=mini_obj).start(config(pin_dir, new_gw=IP("198.19.3.1")))
        assert _gw_routing() == ({L.GW_RT_BASE + 5: ("0x7", "main")}, {})


@pytest.mark.bpf
def test_new_gw_policy_routing_follows_its_egress_when_the_route_moves(gw, pin_dir, mini_obj, caplog):  # noqa: F811
    """Where the kernel reaches new_gw is looked at again by the hook check: a route that now
    leads it out of the other uplink, and an uplink recreated with a new ifindex (a PPP or VLAN
    device coming back), move its mark and policy routing to the new egress without a reload
    (a new session there found no mark: its packets handed to the kernel took the kernel's
    route).  Logged at info, not counted as a restored hook; nothing moves while nothing did."""
    import logging

    M = L.GW_MARK_BASE
    with netns(gw):
        b = BpfBackend(config(pin_dir).settings, obj_path=mini_obj)
        b.start(config(pin_dir, new_gw=IP("198.19.3.1")))
        try:
            eth1, eth2 = socket.if_nametoindex("eth1"), socket.if_nametoindex("eth2")
            assert b.maps.gw_marks_now() == {(eth2, int(IP("198.19.3.1"))): M}

            def check():
                b._gw_check_at = float("-inf")  # (it looks every ROUTE_BACK_RECHECK seconds)
                return b.check_hooks()

            caplog.set_level(logging.INFO, logger="snatgw")
            assert check() == [] and b.maps.gw_marks_now() == {(eth2, int(IP("198.19.3.1"))): M}
            assert "new_gw egresses moved" not in caplog.text
            # the route to new_gw now leads out of eth1, via its gateway
            sh("ip", "route", "add", "198.19.3.1/32", "via", "198.19.2.1", "dev", "eth1")
            assert check() == []  # not a restored hook
            assert b.maps.gw_marks_now() == {(eth1, int(IP("198.19.2.1"))): M + 1}
            rules, routes = _gw_routing()
            assert routes == {L.GW_RT_BASE + 1: "default via 198.19.2.1 dev eth1"}
            assert set(rules) == {L.GW_RT_BASE + 1}
            assert "new_gw egresses moved (via 198.19.3.1 dev eth2 -> via 198.19.2.1 dev eth1)" in caplog.text
            # back on-link on eth2, then eth2 recreated: another ifindex, the same name and address
            sh("ip", "route", "del", "198.19.3.1/32")
            check()
            assert list(b.maps.gw_marks_now()) == [(eth2, int(IP("198.19.3.1")))]
            peer = gw.replace("-gw", "-pe")
            sh("ip", "-n", gw, "link", "del", "eth2")
            sh("ip", "-n", gw, "link", "add", "eth2", "type", "veth", "peer", "name", "eth2p", "netns", peer)
            sh("ip", "-n", gw, "addr", "add", "198.19.3.2/24", "dev", "eth2")
            sh("ip", "-n", gw, "link", "set", "eth2", "up")
            sh("ip", "-n", peer, "link", "set", "eth2p", "up")
            eth2b = socket.if_nametoindex("eth2")
            assert eth2b != eth2
            check()
            marks = b.maps.gw_marks_now()
            assert list(marks) == [(eth2b, int(IP("198.19.3.1")))]
            assert _gw_routing()[1] == {marks[(eth2b, int(IP("198.19.3.1")))] - M + L.GW_RT_BASE:
                                        "default via 198.19.3.1 dev eth2"}  # fmt: skip
        finally:
            b.stop()
        assert _gw_routing() == ({}, {})


@pytest.mark.bpf
def test_the_new_gw_recheck_resolves_each_new_gw_once_per_pass(gw, pin_dir, mini_obj):  # noqa: F811
    """The hook check's look at where each new_gw is reached asks the kernel once per new_gw
    (an `ip route get` and an `ip link show` each): a pass that found it moved resolved every
    new_gw a second time to install the policy routing, which could also install another
    answer than the one it compared and logged."""
    from snatgw.datapath.bpf.backend import route_egress

    asked: list = []

    def resolver(addr):
        asked.append(addr)
        return route_egress(addr)

    with netns(gw):
        cfg = config(pin_dir, new_gw=IP("198.19.3.1"))
        b = BpfBackend(cfg.settings, obj_path=mini_obj, resolver=resolver)
        b.start(cfg)
        try:
            def check():
                asked.clear()
                b._gw_check_at = float("-inf")  # (it looks every ROUTE_BACK_RECHECK seconds)
                b.check_hooks()
                return [a for a in asked if a == IP("198.19.3.1")]

            assert check() == [IP("198.19.3.1")]  # nothing moved
            sh("ip", "route", "add", "198.19.3.1/32", "via", "198.19.2.1", "dev", "eth1")
            assert check() == [IP("198.19.3.1")]  # moved: installed from that one answer
            assert list(b.maps.gw_marks_now()) == [(socket.if_nametoindex("eth1"), int(IP("198.19.2.1")))]
        finally:
            b.stop()


@pytest.mark.bpf
def test_new_gw_routing_ip_refuses_is_left_out_with_a_warning(gw, pin_dir, mini_obj, monkeypatch, caplog):  # noqa: F811
    """`ip` refusing a new_gw egress's route leaves that egress unmarked (the kernel's route,
    as before) with a warning naming it; the start itself goes on."""
    from snatgw.datapath.bpf import gwroutes

    real = gwroutes._ip

    def refuse_routes(args, check=True):
        if args[:2] == ["route", "replace"]:
            raise gwroutes.BackendError("ip route replace: Nexthop device is not up (test)")
        return real(args, check)

    monkeypatch.setattr(gwroutes, "_ip", refuse_routes)
    with netns(gw):
        b = BpfBackend(config(pin_dir).settings, obj_path=mini_obj)
        b.start(config(pin_dir, new_gw=IP("198.19.3.1")))
        try:
            assert b.maps.gw_marks_now() == {} and _gw_routing() == ({}, {})
            assert "new_gw via 198.19.3.1 dev eth2: no policy routing" in caplog.text
        finally:
            b.stop()
