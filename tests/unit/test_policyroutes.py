"""datapath/policyroutes.py: what of the kernel's ip rules and routes a backend takes for its
own, and what its removal touches (a recording `ip` runner answering as `ip -j` does)."""

import json
import subprocess

from snatgw.datapath.policyroutes import PolicyRange

BPF = PolicyRange(30000, 1000, 201)
NFT = PolicyRange(31000, 1000, 201)

RULES = [
    {"priority": 0, "src": "all", "table": "local"},
    {"priority": 30002, "src": "all", "fwmark": "0x53470002/0xffffffff", "table": "30002", "protocol": "201"},
    {"priority": 30003, "src": "all", "table": "30003"},  # an operator's rule at one of our prefs
    {"priority": 31000, "src": "all", "fwmark": "0x53470000", "table": "31000", "protocol": "201"},
    {"priority": 32766, "src": "all", "table": "main"},
]
ROUTES = [
    {"dst": "default", "gateway": "198.19.2.1", "dev": "eth1", "table": "30002", "protocol": "201"},
    {"dst": "198.19.9.0/24", "dev": "eth2", "table": "30007", "protocol": "201"},  # ours, not a default
    {"dst": "default", "gateway": "198.19.3.1", "dev": "eth2", "table": "31000", "protocol": "201"},
    {"dst": "default", "gateway": "198.19.4.1", "dev": "eth3", "table": "29999", "protocol": "201"},  # out of range
]


class Ip:
    """`ip` as the backends run it: answers `-j` listings, records every other argv."""

    def __init__(self, rules=RULES, routes=ROUTES, rc=0):
        self.rules, self.routes, self.rc, self.calls = rules, routes, rc, []

    def __call__(self, argv, check=True):
        if argv[:1] == ["-j"]:
            out = self.rules if "rule" in argv else self.routes
            return subprocess.CompletedProcess(["ip", *argv], self.rc, json.dumps(out) if self.rc == 0 else "", "")
        self.calls.append(argv)
        return subprocess.CompletedProcess(["ip", *argv], 0, "", "")


def test_a_rule_is_ours_only_in_our_range_and_with_our_proto():
    assert set(BPF.rules(Ip())) == {30002}  # not 30003 (no proto 201), not the nft backend's 31000
    assert set(NFT.rules(Ip())) == {31000}


def test_tables_list_every_table_of_ours_with_its_default_route():
    assert BPF.tables(Ip()) == {30002: ("198.19.2.1", "eth1"), 30007: None}
    assert NFT.tables(Ip()) == {31000: ("198.19.3.1", "eth2")}


def test_remove_deletes_by_pref_and_proto_and_flushes_only_our_routes():
    ip = Ip()
    gone = BPF.remove(ip)
    assert ip.calls == [["rule", "del", "pref", "30002", "proto", "201"],
                        ["route", "flush", "table", "30002", "proto", "201"],
                        ["route", "flush", "table", "30007", "proto", "201"]]  # fmt: skip
    assert gone == ["ip rules pref 30002", "routes proto 201 in tables 30002,30007"]


def test_remove_keeps_what_it_is_told_to():
    ip = Ip()
    assert BPF.remove(ip, keep={30002}) == ["routes proto 201 in tables 30007"]
    assert ip.calls == [["route", "flush", "table", "30007", "proto", "201"]]


def test_an_ip_that_fails_to_list_gives_nothing_and_removes_nothing():
    ip = Ip(rc=1)
    assert BPF.rules(ip) == {} and BPF.tables(ip) == {}
    assert BPF.remove(ip) == [] and ip.calls == []


def test_a_missing_ip_is_named_with_its_package(monkeypatch, tmp_path):
    """No `ip` on PATH (a minimal host, a unit with a trimmed PATH): the bpf backend's start
    says which program is missing and what installs it, as for clang and nft, not the bare
    "ip -j -4 rule show: [Errno 2] No such file or directory: 'ip'"."""
    import pytest

    from snatgw.datapath.bpf import gwroutes
    from snatgw.errors import BackendError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendError, match=r"^ip not found: .* needs iproute2; install it \(scripts/setup.sh\)"):
        gwroutes.our_rules()
