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
