"""The real datapath under BpfBackend with real packets: client -> gw -> isp in three private
namespaces.  The ISP has no route back to 198.18.0.0/15, so a reply arrives only if the gateway
translated; the session then shows in sessions() and stats(), and GC removes it when due."""

import os
import subprocess
import uuid

import pytest

from snatgw.config.schema import GatewayConfig, Settings
from snatgw.datapath.bpf.backend import BpfBackend
from snatgw.datapath.bpf.loader import netns
from snatgw.rules import Pool, Rule, RuleSet
from ipaddress import IPv4Address as IP, IPv4Network as NET

from test_loader import datapath_obj, pin_dir, sh  # noqa: F401  (fixtures)

pytest.importorskip("snatgw.datapath.bpf.prog_maps", reason="bpf-C's rule compiler is not there yet")


@pytest.fixture
def lab():
    """Namespaces <tag>-cl (198.18.40.10), <tag>-gw (REF lan40/eth1), <tag>-isp (198.19.2.1,
    203.0.113.10 on lo, no route to 198.18.0.0/15)."""
    tag = f"sgt{os.getpid():x}{uuid.uuid4().hex[:4]}"
    cl, gw, isp = f"{tag}-cl", f"{tag}-gw", f"{tag}-isp"
    try:
        for n in (cl, gw, isp):
            sh("ip", "netns", "add", n)
            sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "-n", gw, "link", "add", "lan40", "type", "veth", "peer", "name", "eth0", "netns", cl)
        sh("ip", "-n", gw, "link", "add", "eth1", "type", "veth", "peer", "name", "up", "netns", isp)
        sh("ip", "-n", gw, "addr", "add", "198.18.40.1/24", "dev", "lan40")
        sh("ip", "-n", gw, "addr", "add", "198.19.2.2/24", "dev", "eth1")
        for a in ("198.19.2.71", "198.19.2.72", "198.19.2.73"):
            sh("ip", "-n", gw, "addr", "add", f"{a}/32", "dev", "eth1")
        sh("ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "-n", cl, "addr", "add", "198.18.40.10/24", "dev", "eth0")
        sh("ip", "-n", isp, "addr", "add", "198.19.2.1/24", "dev", "up")
        sh("ip", "-n", isp, "addr", "add", "203.0.113.10/32", "dev", "lo")
        for n, dev in ((gw, "lan40"), (gw, "eth1"), (cl, "eth0"), (isp, "up")):
            sh("ip", "-n", n, "link", "set", "dev", dev, "up")
        sh("ip", "-n", cl, "route", "add", "default", "via", "198.18.40.1")
        sh("ip", "-n", gw, "route", "add", "default", "via", "198.19.2.1", "dev", "eth1")
        yield {"cl": cl, "gw": gw, "isp": isp}
    finally:
        for n in (cl, gw, isp):
            sh("ip", "netns", "del", n, check=False)


def ping(ns, dst, count=3, wait=2):
    return subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait),
                           dst], capture_output=True, text=True, timeout=30)  # fmt: skip


@pytest.mark.bpf
@pytest.mark.lab
def test_ping_is_translated_and_its_session_listed_counted_and_expired(lab, pin_dir, datapath_obj):  # noqa: F811
    """Without snatgw the ping fails (no route back); with it, replies return and GC clears it."""
    # a reply over these veths takes well under a millisecond: 0.5 s is ample to see it come
    assert ping(lab["cl"], "203.0.113.10", 1, wait=0.5).returncode != 0, "the ISP must not reach 198.18/15"
    rule = Rule(src=NET("198.18.40.0/24"), pool=Pool(IP("198.19.2.71"), IP("198.19.2.73")), oif="eth1")
    s = Settings(inside=("lan40",), outside=("eth1",), pin_dir=pin_dir, max_sessions=1024)
    with netns(lab["gw"]):
        b = BpfBackend(s, obj_path=datapath_obj)
        b.start(GatewayConfig(RuleSet([rule]), s))
        try:
            r = ping(lab["cl"], "203.0.113.10")
            assert r.returncode == 0, r.stdout + r.stderr
            (sess,) = b.sessions()
            assert sess.proto == "icmp" and sess.inside.startswith("198.18.40.10:")
            assert sess.nat.split(":")[0] in ("198.19.2.71", "198.19.2.72", "198.19.2.73")
            assert sess.rule_id == rule.rule_id and sess.packets_out is sess.packets_in is None  # by design
            st = b.stats()
            assert st.rules[rule.rule_id].packets == 6  # 3 requests + 3 replies, counted per rule
            assert st.reasons["XLATE_NEW"] == 1 and st.reasons["XLATE_IN"] == 3
            assert st.rules[rule.rule_id].sessions == st.rules[rule.rule_id].live == 1
            assert b.expire() == 0  # fresh: kept
            assert b.expire(now=b_now() + 121) == 1 and b.sessions() == []  # ICMP timeout 120 s
            st = b.stats()  # made: still 1 (ipvsadm's Conns); live (the metric's gauge): none
            assert st.rules[rule.rule_id].sessions == 1 and st.rules[rule.rule_id].live == 0
        finally:
            b.stop()
    assert not os.path.exists(pin_dir)


def b_now():
    import time

    return time.clock_gettime(time.CLOCK_MONOTONIC)
