"""snat_addresses manage's plan (daemon/addresses.plan, a pure function): how many pool
addresses it will manage is counted once per address, not once per rule."""

from __future__ import annotations

import ipaddress

import pytest

from snatgw.config.parse import parse_text
from snatgw.daemon.addresses import MAX_MANAGED, plan
from snatgw.errors import SnatgwError


def config(pools: list[str]):
    rules = "".join(f"  snat_rule {{ from 198.18.{40 + i}.0/24 snat_ip {p} }}\n" for i, p in enumerate(pools))
    return parse_text("snatgw {\n inside lan40\n outside eth1\n snat_addresses manage\n}\n"
                      "virtual_server fwmark 1 {\n" + rules + "}\n", "t.conf", [])


def test_a_pool_shared_by_rules_counts_its_addresses_once():
    """Two rules of one ISP with its pool of 2,100 addresses: 2,100 to manage (it was refused as
    'more than 4096 pool addresses', the pool counted per rule)."""
    big = "198.19.0.1-198.19.8.52"  # 2,100 addresses
    have = {"eth1": [ipaddress.IPv4Interface("198.19.0.254/20")]}
    want = plan(config([big, big, "198.19.2.71"]), have)
    assert len(want) == 2100 and set(want.values()) == {"eth1"}
    with pytest.raises(SnatgwError, match=f"more than {MAX_MANAGED}"):
        plan(config([big, "198.20.0.1-198.20.8.52"]), have)  # two pools: 4,200 addresses


def test_overlapping_pools_count_the_addresses_they_share_once():
    """A rule whose pool is part of another's (an ISP's whole range and a slice of it for one
    network) adds no address to count: 2,100 + a 2,000-address slice of them is 2,100, not
    4,100; a pool beyond MAX_MANAGED on its own is refused before its addresses are walked."""
    have = {"eth1": [ipaddress.IPv4Interface("198.19.0.254/20")]}
    want = plan(config(["198.19.0.1-198.19.8.52", "198.19.0.10-198.19.7.217"]), have)
    assert len(want) == 2100
    with pytest.raises(SnatgwError, match=f"more than {MAX_MANAGED}"):
        plan(config(["198.19.0.1-198.19.31.255"]), have)  # 8,191 addresses


def test_a_failed_start_takes_back_the_addresses_it_added_and_only_those(monkeypatch):
    """`snat_addresses manage`: the start adds the pool addresses, then the datapath fails to
    start (a device vanished): the addresses it added are removed again (they stayed on the
    uplink, answering ARP for a gateway that never ran); one that was there before stays."""
    import io

    from snatgw.daemon import addresses as AD
    from snatgw.daemon.log import Log
    from snatgw.daemon.service import Service
    from snatgw.datapath.fake import FakeBackend
    from snatgw.errors import BackendError

    calls: list[tuple] = []
    have = {"eth1": [ipaddress.IPv4Interface("198.19.2.2/24"), ipaddress.IPv4Interface("198.19.2.71/32")]}
    monkeypatch.setattr(AD, "current", lambda ifaces: have)
    monkeypatch.setattr(AD, "_ip", lambda *a: calls.append(a) or "")

    class Failing(FakeBackend):
        def start(self, config):
            raise BackendError("interface 'eth1' does not exist")

    cfg = config(["198.19.2.71-198.19.2.73"])
    svc = Service(cfg, Failing(cfg.settings), Log(stream=io.StringIO()))
    with pytest.raises(BackendError, match="does not exist"):
        svc.start()
    added = {c[2] for c in calls if c[:2] == ("addr", "add")}
    assert added == {"198.19.2.72/32", "198.19.2.73/32"}
    assert {c[2] for c in calls if c[:2] == ("addr", "del")} == added and not svc.addresses.added
