"""`snatgw explain` parts that need no model: packet building, argument checks, the two
routers, and the per-rule MATCH/why-not listing."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from snatgw.cli.commands import explain as ex
from snatgw.cli.main import main
from snatgw.layout import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
A = IPv4Address


def scapy_checksums_ok(raw: bytes) -> bool:
    """scapy recomputes every checksum from scratch; equal bytes mean ours were right."""
    p = IP(raw)
    del p.chksum
    layer = p.payload
    del layer.chksum
    return bytes(p.__class__(bytes(p))) == raw


@pytest.mark.parametrize("proto, layer", [(IPPROTO_TCP, TCP), (IPPROTO_UDP, UDP), (IPPROTO_ICMP, ICMP)])
def test_built_packets_have_valid_checksums_and_fields(proto, layer):
    """build_packet makes a well-formed IPv4 packet that scapy reads back field for field."""
    raw = ex.build_packet(proto, A("198.18.40.10"), 40000, A("203.0.113.10"), 0 if proto == IPPROTO_ICMP else 80,
                          ttl=17)  # fmt: skip
    p = IP(raw)
    assert p.src == "198.18.40.10" and p.dst == "203.0.113.10" and p.ttl == 17 and p.flags == "DF"
    assert p.haslayer(layer)
    if proto == IPPROTO_TCP:
        assert (p[TCP].sport, p[TCP].dport, str(p[TCP].flags)) == (40000, 80, "S")
    elif proto == IPPROTO_UDP:
        assert (p[UDP].sport, p[UDP].dport) == (40000, 80)
    else:
        assert (p[ICMP].type, p[ICMP].id) == (8, 40000)
    assert scapy_checksums_ok(raw)


def test_summarize_reads_back_what_was_built():
    """summarize gives addresses, ports, TTL and TCP flags of a built packet."""
    raw = ex.build_packet(IPPROTO_TCP, A("198.18.40.10"), 1024, A("198.51.100.10"), 443, flags=0x12, ttl=3)
    s = ex.summarize(raw)
    assert (s.src, s.sport, s.dst, s.dport, s.ttl, ex.flags_text(s.flags)) == (
        A("198.18.40.10"), 1024, A("198.51.100.10"), 443, 3, "SA")  # fmt: skip


@pytest.mark.parametrize(
    "text, required, expect",
    [("198.18.40.10:40000", True, (A("198.18.40.10"), 40000)), ("198.18.40.10", False, (A("198.18.40.10"), 0)),
     ("198.18.40.10:7", False, (A("198.18.40.10"), 7))],
)  # fmt: skip
def test_endpoints_parse(text, required, expect):
    """IP:PORT parses; the port may be left out for icmp."""
    assert ex.parse_endpoint(text, "--src", required) == expect


@pytest.mark.parametrize("text", ["198.18.40.10", "198.18.40.10:70000", "198.18.40.10:x", "198.18.40:80", "::1:80",
                                  "198.18.40.10:\u00b2", "198.18.40.10:\u0661\u0662"])
def test_bad_endpoints_are_refused(text):
    """A missing or out-of-range port or a bad address is an error naming the option; a port in
    non-ASCII digits too ('²' was a traceback, '١٢' port 12)."""
    with pytest.raises(Exception) as ei:
        ex.parse_endpoint(text, "--src", True)
    assert "--src" in str(ei.value)


def test_flags_letters_and_unknown_letter():
    """--flags takes letters of FSRPAUEC in any order; others are refused."""
    assert ex.parse_flags("SA") == 0x12 and ex.parse_flags("fa") == 0x11
    with pytest.raises(ex.BadInput):
        ex.parse_flags("SX")


def test_given_router_answers_route_for_destination_and_on_link_otherwise():
    """The --oif/--gw router answers the destination's route; new_gw is assumed on-link, noted."""
    r = ex.GivenRouter(A("203.0.113.10"), "eth1", A("198.19.2.1"))
    f = r.lookup(A("203.0.113.10"), A("198.18.40.10"))
    assert (f.kind, f.oif, f.gw) == ("forward", "eth1", A("198.19.2.1"))
    g = r.lookup(A("198.19.3.1"))
    assert (g.kind, g.oif, g.gw) == ("forward", "eth1", A("198.19.3.1"))
    assert len(r.notes) == 1 and "on-link via eth1" in r.notes[0]


def test_kernel_router_reads_ip_route_get(monkeypatch):
    """`ip -j route get` answers become forward/local/unreachable results; a failed lookup by
    source is retried without it and noted."""
    answers = {
        "203.0.113.10": {"dst": "203.0.113.10", "gateway": "198.19.2.1", "dev": "eth1", "flags": []},
        "198.19.2.1": {"dst": "198.19.2.1", "dev": "eth1", "flags": []},
        "127.0.0.1": {"type": "local", "dst": "127.0.0.1", "dev": "lo"},
        "192.0.2.99": {"type": "unreachable", "dst": "192.0.2.99"},
    }
    calls = []

    def fake(dst, src, iif):
        calls.append((str(dst), src, iif))
        if src is not None:
            return None, f"ip -j route get {dst} from {src}: Network is unreachable"
        return answers.get(str(dst)), f"ip -j route get {dst}"

    monkeypatch.setattr(ex, "ip_route_get", fake)
    r = ex.KernelRouter()
    f = r.lookup(A("203.0.113.10"), A("198.18.40.10"))
    assert (f.kind, f.oif, f.gw) == ("forward", "eth1", A("198.19.2.1"))
    assert calls == [("203.0.113.10", A("198.18.40.10"), None), ("203.0.113.10", None, None)]
    assert "routing by source not applied" in r.notes[0]
    on_link = r.lookup(A("198.19.2.1"))
    assert (on_link.oif, on_link.gw) == ("eth1", A("198.19.2.1"))
    assert r.lookup(A("127.0.0.1")).kind == "local"
    assert r.lookup(A("192.0.2.99")).kind == "unreachable"


def test_kernel_router_on_this_host_gives_a_result():
    """Asking this host's FIB (read only) for a documentation address returns some result."""
    f = ex.KernelRouter().lookup(A("203.0.113.10"), A("198.18.40.10"))
    assert f.kind in ("forward", "local", "unreachable")


def run_json(capsys, *argv) -> tuple[int, dict]:
    rc = main(["explain", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_candidates_list_every_rule_in_priority_order_with_why(capsys):
    """Each rule appears once, in priority order: the winner says MATCH, the others say why not."""
    rc, d = run_json(capsys, str(EXAMPLES / "lab.conf"), "--src", "198.18.40.10:40000", "--dst",
                     "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1")  # fmt: skip
    assert rc == 0 and d["matched"] is True
    c = d["candidates"]
    assert [x["priority"] for x in c] == [1, 2, 3]
    assert [x["match"] for x in c] == [False, True, False]
    assert "rule wants oif eth2" in c[0]["why"] and c[1]["why"] == "MATCH" and "comes first" in c[2]["why"]
    assert d["rule"]["where"].endswith("lab.conf:17")


def test_no_rule_matches_exits_1(capsys):
    """A source outside every rule's from exits 1 with matched false and rule null."""
    rc, d = run_json(capsys, str(EXAMPLES / "lab.conf"), "--src", "192.0.2.50:40000", "--dst",
                     "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1")  # fmt: skip
    assert rc == 1 and d["matched"] is False and d["rule"] is None and d["translated"] is None
    assert all("not in from" in x["why"] for x in d["candidates"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80"], "--oif IFACE --gw IP"),
        (["--src", "198.18.40.10", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1"], "IP:PORT"),
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2"], "--gw"),
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--route-from-kernel", "--oif", "eth1"], "one or"),
        (["--proto", "icmp", "--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw",
          "198.19.2.1"], "no destination port"),
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1",
          "--ttl", "300"], "--ttl"),
        # a device the inside program is not on: it translated as if it were (REDIRECT, exit 0)
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1",
          "--iif", "eth1"], "--iif 'eth1': not an inside interface (lan40 lan50)"),
        (["--src", "198.18.40.10:1", "--dst", "203.0.113.10:80", "--oif", "eth1", "--gw", "198.19.2.1",
          "--iif", "lan41"], "--iif 'lan41': not an inside interface"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_message(capsys, argv, words):
    """Bad options exit 2 with a message naming the option."""
    rc = main(["explain", str(EXAMPLES / "lab.conf"), *argv])
    assert rc == 2 and words in capsys.readouterr().err


def test_invalid_config_exits_2(capsys):
    """explain refuses an invalid config like check does."""
    rc = main(["explain", str(EXAMPLES / "seed.conf"), "--src", "192.168.40.10:1", "--dst", "203.0.113.10:53",
               "--oif", "eth1", "--gw", "198.19.2.1"])  # fmt: skip
    assert rc == 2 and "duplicate rule" in capsys.readouterr().err


def test_a_verdict_taken_before_the_rules_says_so(capsys):
    """A packet routed out of an inside device (PASS_INTERNAL): rule 3 says MATCH in the listing
    while the verdict takes no rule; a note says the verdict came first and why (before, nothing
    told the two apart: `matched` false beside a candidate with `match` true)."""
    rc, d = run_json(capsys, str(EXAMPLES / "lab.conf"), "--offline", "--src", "198.18.40.10:40000", "--dst",
                     "198.18.50.10:80", "--oif", "lan50", "--gw", "198.18.50.10")  # fmt: skip
    assert rc == 1 and d["matched"] is False and d["reason"] == "PASS_INTERNAL"
    assert [x["priority"] for x in d["candidates"] if x["match"]] == [3]
    assert [n for n in d["notes"] if n.startswith("PASS_INTERNAL: decided before the rules are asked: the route "
                                                  "leaves by an inside device")]


def test_route_from_kernel_without_the_inside_device_says_the_routes_are_not_the_gateways(capsys, tmp_path):
    """`--route-from-kernel` where the config's inside device does not exist (explain run on the
    host, not in the gateway's namespace): the source is not routed back there (DROP_SPOOFED),
    and the first note says the routes are this host's."""
    conf = tmp_path / "c.conf"
    conf.write_text((EXAMPLES / "lab.conf").read_text().replace("inside lan40 lan50", "inside sgnodev0"))
    rc, d = run_json(capsys, str(conf), "--offline", "--src", "198.18.40.10:40000", "--dst", "203.0.113.10:80",
                     "--route-from-kernel")
    assert d["reason"] == "DROP_SPOOFED" and rc == 1
    assert d["notes"][0].startswith("sgnodev0 is no device of this network namespace: the routes are this host's")
