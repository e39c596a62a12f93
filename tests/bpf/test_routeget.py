"""datapath/routeget.py against `ip route get` in a namespace of its own: the bpf backend's
resolver (route_egress) asks rtnetlink now, not two `ip` processes a route, and must answer
as they did: the device, the next hop (the destination on-link), the device's MTU, and an
error worded the same for what has no unicast route."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading

import pytest

from snatgw.datapath.bpf.backend import route_egress
from snatgw.datapath.routeget import route_get
from snatgw.errors import BackendError
from snatgw.lab.netns import in_netns

pytestmark = pytest.mark.root

NS = f"snrg{os.getpid() % 100000}"


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def ns():
    sh("ip", "netns", "add", NS)
    try:
        ip = ("ip", "-n", NS)
        sh(*ip, "link", "add", "up0", "mtu", "1400", "type", "veth", "peer", "name", "x0")
        sh(*ip, "link", "add", "up1", "type", "veth", "peer", "name", "x1")
        for dev in ("up0", "x0", "up1", "x1"):
            sh(*ip, "link", "set", dev, "up")
        sh(*ip, "link", "set", "lo", "up")
        sh(*ip, "addr", "add", "198.18.5.2/24", "dev", "up0")
        sh(*ip, "addr", "add", "198.18.6.2/24", "dev", "up1")
        sh(*ip, "route", "add", "default", "via", "198.18.5.1")
        sh(*ip, "route", "add", "203.0.113.0/24", "via", "198.18.6.1", "mtu", "1300")
        sh(*ip, "route", "add", "blackhole", "192.0.2.0/24")
        sh(*ip, "route", "add", "unreachable", "198.51.100.0/24")
        # an inside device, its hosts forwarded: 198.18.7.10 by a policy rule out up1, the
        # others by a multipath default route's hash of both addresses
        sh(*ip, "link", "add", "in0", "type", "veth", "peer", "name", "xi")
        for dev in ("in0", "xi"):
            sh(*ip, "link", "set", dev, "up")
        sh(*ip, "addr", "add", "198.18.7.2/24", "dev", "in0")
        sh("ip", "netns", "exec", NS, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh(*ip, "rule", "add", "pref", "100", "from", "198.18.7.10", "lookup", "77")
        sh(*ip, "route", "add", "table", "77", "default", "via", "198.18.6.1")
        sh(*ip, "route", "add", "198.19.0.0/16", "nexthop", "via", "198.18.5.1", "nexthop", "via", "198.18.6.1")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def in_ns(fn, *args):
    """fn(*args) on a thread in the namespace (the caller never leaves its own)."""
    out: list = []

    def run() -> None:
        try:
            with in_netns(NS):
                out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed back
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def by_ip(addr: str):
    """What `ip -j route get` and `ip -j link show` answer, as route_egress read them."""
    r = json.loads(sh("ip", "-n", NS, "-j", "route", "get", addr))[0]
    link = json.loads(sh("ip", "-n", NS, "-j", "link", "show", "dev", r["dev"]))[0]
    return int(link["ifindex"]), ipaddress.IPv4Address(r.get("gateway") or addr), int(link["mtu"])


@pytest.mark.parametrize("addr", ["198.19.1.1", "203.0.113.10", "198.18.5.77", "198.18.6.1"])
def test_a_unicast_route_is_answered_as_ip_route_get_does(ns, addr):
    got = in_ns(route_get, ipaddress.IPv4Address(addr))
    assert got == by_ip(addr)
    assert in_ns(route_egress, ipaddress.IPv4Address(addr)) == got


@pytest.mark.parametrize("addr,words", [("192.0.2.9", "no route to 192.0.2.9: "),
                                        ("198.51.100.9", "no route to 198.51.100.9: "),
                                        ("198.18.5.2", "route to 198.18.5.2 is local (no device)")])
def test_what_has_no_unicast_route_is_an_error(ns, addr, words):
    got = in_ns(route_get, ipaddress.IPv4Address(addr))
    assert isinstance(got, BackendError) and str(got).startswith(words), got


def by_ip_from(addr: str, src: str, iif: str):
    """What `ip -j route get ADDR from SRC iif DEV` answers (a forwarded packet's route)."""
    r = json.loads(sh("ip", "-n", NS, "-j", "route", "get", addr, "from", src, "iif", iif))[0]
    link = json.loads(sh("ip", "-n", NS, "-j", "link", "show", "dev", r["dev"]))[0]
    return int(link["ifindex"]), ipaddress.IPv4Address(r.get("gateway") or addr), int(link["mtu"])


def test_a_forwarded_hosts_route_is_asked_with_its_source_and_input_device(ns):
    """The datapath routes a new flow as forwarded from the inside host (bpf_fib_lookup from it,
    on its inside device): a policy rule on the source and a multipath route's hash give another
    uplink than the gateway's own route to the remote; with src and iif the answer is `ip route
    get ... from ... iif ...`'s, and for the rule's host it is up1 where the gateway's own is up0."""
    in0, up0, up1 = (int(json.loads(sh("ip", "-n", NS, "-j", "link", "show", "dev", d))[0]["ifindex"])
                     for d in ("in0", "up0", "up1"))
    host, remote = ipaddress.IPv4Address("198.18.7.10"), ipaddress.IPv4Address("198.18.200.1")
    assert in_ns(route_get, remote)[0] == up0
    want = (up1, ipaddress.IPv4Address("198.18.6.1"), 1500)
    assert in_ns(route_get, remote, host, in0) == by_ip_from(str(remote), str(host), "in0") == want
    assert in_ns(route_egress, remote, host, in0) == want
    remote, seen = ipaddress.IPv4Address("198.19.1.1"), set()
    for h in range(20, 60):  # the multipath route: the hash of (host, remote) picks the uplink
        src = ipaddress.IPv4Address(f"198.18.7.{h}")
        got = in_ns(route_get, remote, src, in0)
        assert got == by_ip_from(str(remote), str(src), "in0"), src
        seen.add(got[0])
    assert seen == {up0, up1}


def test_a_device_gone_between_the_route_and_its_mtu_is_no_route(ns, monkeypatch):
    """The route names a device that is deleted before its MTU is asked: an error (route_egress
    by `ip` failed there too: if_nametoindex of the name), not its stale ifindex with a default
    MTU, which would make a session whose packets go nowhere."""
    import snatgw.datapath.routeget as rg

    sh("ip", "-n", NS, "link", "add", "gone0", "type", "veth", "peer", "name", "gone1")
    try:
        sh("ip", "-n", NS, "link", "set", "gone1", "up")
        sh("ip", "-n", NS, "link", "set", "gone0", "up")
        sh("ip", "-n", NS, "route", "add", "198.18.9.0/24", "dev", "gone0")
        real = rg.link_request

        def gone_first(ifindex, seq=2):
            subprocess.run(["ip", "-n", NS, "link", "del", "gone0"], check=True)
            return real(ifindex, seq)

        monkeypatch.setattr(rg, "link_request", gone_first)
        got = in_ns(route_get, ipaddress.IPv4Address("198.18.9.9"))
        assert isinstance(got, BackendError) and str(got).startswith("no route to 198.18.9.9: "), got
    finally:
        subprocess.run(["ip", "-n", NS, "link", "del", "gone0"], capture_output=True)
