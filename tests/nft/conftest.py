"""Fixtures for the nft backend's root tests: one multi-ISP lab (snatgw.lab, prefix sg<hex>)
per module, SNAT addresses on the gateway, echo servers in <P>-net, and a backend acting in
<P>-gw that every test stops in a finally (the lab itself is removed even when tests fail)."""

from __future__ import annotations

import contextlib

import pytest

from cases.corpus import FAILOVER_CONFIG_FULL, REF_CONFIG_FULL

from snatgw.config.parse import parse_text

REF, FAILOVER = REF_CONFIG_FULL, FAILOVER_CONFIG_FULL  # the shared REF topology's config


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
