"""The static FIB that stands in for bpf_fib_lookup: REF answers, longest prefix, on-link,
local and unreachable."""

from ipaddress import IPv4Address as IP4

from snatgw.model import FibResult, StaticRouter


def test_ref_lookups():
    """REF: default via 198.19.2.1 on eth1, 198.51.100.0/24 via 198.19.3.1 on eth2, connected
    nets on-link (next hop = destination), SNAT and interface addresses local."""
    r = StaticRouter.ref()
    assert r.lookup(IP4("203.0.113.10")) == FibResult("forward", "eth1", IP4("198.19.2.1"), 1500)
    assert r.lookup(IP4("198.51.100.10")) == FibResult("forward", "eth2", IP4("198.19.3.1"), 1500)
    assert r.lookup(IP4("198.19.3.9")) == FibResult("forward", "eth2", IP4("198.19.3.9"), 1500)
    assert r.lookup(IP4("198.18.50.10")).oif == "lan50"
    for local in ("198.19.2.71", "198.19.3.73", "198.18.40.1", "198.19.2.2"):
        assert r.lookup(IP4(local)).kind == "local"


def test_longest_prefix_blackhole_and_mtu():
    """The longest prefix wins; blackhole routes and missing routes are unreachable; MTU per
    device."""
    r = StaticRouter([("10.0.0.0/8", "eth1", "192.0.2.1"), ("10.1.0.0/16", "eth2", "192.0.2.129"),
                      ("10.1.2.0/24", "blackhole", None)],
                     {"eth1": ["192.0.2.2/25"], "eth2": ["192.0.2.130/25"]}, mtu={"eth2": 9000})  # fmt: skip
    assert r.lookup(IP4("10.9.9.9")).oif == "eth1"
    assert r.lookup(IP4("10.1.9.9")) == FibResult("forward", "eth2", IP4("192.0.2.129"), 9000)
    assert r.lookup(IP4("10.1.2.3")).kind == "unreachable"
    assert r.lookup(IP4("203.0.113.1")).kind == "unreachable"
    assert r.dev_mtu("eth2") == 9000 and r.dev_mtu("eth1") == 1500
