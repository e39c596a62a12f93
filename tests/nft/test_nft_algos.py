"""What `sdh`, `sh` and `random` really do on the nft backend (issue 12 item 6), measured with UDP
from one inside host to 16 destinations through a pool of 8 addresses (docs/nftables.md, "How
faithful each algorithm is", says the same in words):

- sdh (`snat to A-B`): a flow whose (source, source port, protocol) has no live conntrack entry
  gets the address nf_nat hashes from (source, destination): fresh source ports spread over the
  pool by destination.  A flow whose (source, source port) has a live entry reuses that entry's
  address AND port, toward any destination (nf_nat's find_appropriate_src): one socket keeps one
  public endpoint (endpoint-independent mapping), unlike the bpf backend's sdh.
- sh (`persistent`): one address per source, whatever the port or destination.
- random (jhash map): the address comes from (source, destination, source port) for every new
  flow, live entries or not: one socket gets several addresses toward several destinations
  (address-dependent mapping).
- all three keep the source port when it is in the port range and free."""

from __future__ import annotations

import socket

import pytest

from snatgw.lab.netns import ns_socket

from tests.nft.conftest import cfg

pytestmark = [pytest.mark.nft, pytest.mark.root]

DESTS = [f"203.0.113.{i}" for i in range(20, 36)]  # routed via ISP 1, like 203.0.113.10
POOL = "198.19.2.71-198.19.2.78"
SRC = "198.18.40.10"
PORT = 9400


def conf(algo: str) -> str:
    return ("snatgw {\n inside lan40 lan50\n outside eth1 eth2\n}\nvirtual_server fwmark 1 {\n"
            f" snat_rule {{ from 198.18.0.0/16 oif eth1 snat_ip {POOL} algo {algo} }}\n}}\n")


@pytest.fixture(scope="module")
def servers(lab):
    """A UDP socket on each destination address in <P>-net (each answers from its own address)."""
    lab.add_snat_addresses(cfg(conf("sdh")))
    socks = {}
    try:
        for d in DESTS:
            lab.ip("net", "addr", "add", f"{d}/32", "dev", "lo")
            s = ns_socket(lab.ns("net"), socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((d, PORT))
            s.settimeout(3)
            socks[d] = s
        yield socks
    finally:
        for s in socks.values():
            s.close()


def _from_one_socket(lab, servers, sport: int, dests) -> list[tuple[str, int]]:
    """One inside socket (SRC:sport) sends to each destination; the (address, port) each saw."""
    with ns_socket(lab.ns("in40"), socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind((SRC, sport))
        out = []
        for d in dests:
            c.sendto(b"x", (d, PORT))
            out.append(servers[d].recvfrom(10)[1])
    return out


def _fresh_ports(lab, servers, first: int, dests) -> list[tuple[str, int]]:
    """A new socket (a new source port) per destination."""
    return [_from_one_socket(lab, servers, first + i, [d])[0] for i, d in enumerate(dests)]


def test_sdh_spreads_fresh_ports_by_destination_but_a_live_source_port_keeps_its_mapping(lab, backend, servers):
    with backend(conf("sdh")) as b:
        fresh = _fresh_ports(lab, servers, 42000, DESTS)
        again = _fresh_ports(lab, servers, 43000, DESTS)
        b.flush()
        one = _from_one_socket(lab, servers, 41000, DESTS)
    assert len({a for a, _ in fresh}) > 1  # spread by destination ...
    assert [a for a, _ in again] == [a for a, _ in fresh]  # ... the same address per (src, dst)
    assert [p for _, p in fresh] == list(range(42000, 42016))  # source ports kept
    assert len(set(one)) == 1 and one[0][1] == 41000  # one socket: one address and port for all 16


def test_sh_gives_one_address_per_source(lab, backend, servers):
    with backend(conf("sh")):
        fresh = _fresh_ports(lab, servers, 44000, DESTS)
        one = _from_one_socket(lab, servers, 44100, DESTS)
    assert len({a for a, _ in fresh + one}) == 1
    assert [p for _, p in fresh] == list(range(44000, 44016)) and {p for _, p in one} == {44100}


def test_random_gives_one_socket_several_addresses_by_destination(lab, backend, servers):
    with backend(conf("random")) as b:
        one = _from_one_socket(lab, servers, 45000, DESTS)
        b.flush()
        two = _from_one_socket(lab, servers, 45000, DESTS)
        other = _fresh_ports(lab, servers, 45100, [DESTS[0]] * 16)
    assert len({a for a, _ in one}) > 1  # address-dependent mapping, even for a live source port
    assert two == one  # deterministic: (src, dst, sport) -> the same address
    assert {p for _, p in one} == {45000}
    assert len({a for a, _ in other}) > 1  # source ports toward one destination spread too
