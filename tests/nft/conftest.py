"""Fixtures for the nft backend's root tests: one multi-ISP lab (snatgw.lab, prefix sg<hex>)
per module, SNAT addresses on the gateway, echo servers in <P>-net, and a backend acting in
<P>-gw that every test stops in a finally (the lab itself is removed even when tests fail)."""

from __future__ import annotations

import contextlib

import pytest

from snatgw.config.parse import parse_text

REF = """\
snatgw {
    inside lan40 lan50
    outside eth1 eth2
    port_range 5000-65535
}
virtual_server fwmark 1 {
  snat_rule { from 198.18.40.0/24  gw 198.19.3.1  oif eth2  snat_ip 198.19.3.71-198.19.3.73  algo random }
  snat_rule { from 198.18.40.0/24  gw 198.19.2.1  oif eth1  snat_ip 198.19.2.71-198.19.2.73  algo sdh }
  snat_rule { from 198.18.0.0/16   new_gw 198.19.2.1        snat_ip 198.19.2.71-198.19.2.73  algo sh }
}
"""
FAILOVER = REF.replace(
    "gw 198.19.2.1  oif eth1  snat_ip 198.19.2.71-198.19.2.73  algo sdh",
    "gw 198.19.2.1  oif eth1  new_gw 198.19.3.1  snat_ip 198.19.3.71-198.19.3.73  algo sdh",
)


def cfg(text: str):
    return parse_text(text, "nft-test.conf")


@pytest.fixture(scope="module")
def lab():
    from snatgw.lab.topology import Lab

    lab = Lab.up(name=f"nfttest{id(object()) % 100000}")
    try:
        lab.add_snat_addresses(cfg(REF))
        lab.add_snat_addresses(cfg(FAILOVER))
        lab.servers = lab.start_servers()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def backend(lab):
    from snatgw.datapath.nft.backend import NftBackend

    made = []

    @contextlib.contextmanager
    def start(text: str = REF):
        c = cfg(text)
        b = NftBackend(c.settings, netns=lab.ns("gw"))
        made.append(b)
        b.start(c)
        yield b

    try:
        yield start
    finally:
        for b in made:
            b.stop()
