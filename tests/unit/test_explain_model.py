"""`snatgw explain` through the reference model: the seed's rules behave as the seed describes
(mapped onto the lab addresses), verdicts, SNAT address and port, next hop, exit codes."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from snatgw.cli.commands import explain as ex
from snatgw.cli.main import main
from snatgw.layout import Algo
from snatgw.rules import Pool, port_candidates, select_addr

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LAB, FAILOVER = str(EXAMPLES / "lab.conf"), str(EXAMPLES / "lab-failover.conf")
ISP1 = Pool(IPv4Address("198.19.2.71"), IPv4Address("198.19.2.73"))
ISP2 = Pool(IPv4Address("198.19.3.71"), IPv4Address("198.19.3.73"))


def explain(capsys, conf, src, dst, *extra, oif="eth1", gw="198.19.2.1"):
    argv = ["explain", conf, "--src", src, "--dst", dst, *extra, "--json"]
    if "--route-from-kernel" not in extra:
        argv += ["--oif", oif, "--gw", gw]
    rc = main(argv)
    return rc, json.loads(capsys.readouterr().out)


def test_inside_40_via_isp1_leaves_from_isp1_pool_with_sdh(capsys):
    """198.18.40.0/24 routed via 198.19.2.1 on eth1 leaves from 198.19.2.71-73 chosen by sdh."""
    for host in ("198.18.40.10", "198.18.40.11", "198.18.40.12"):
        rc, d = explain(capsys, LAB, f"{host}:40000", "203.0.113.10:80")
        assert rc == 0 and d["matched"] and (d["verdict"], d["reason"]) == ("REDIRECT", "XLATE_NEW")
        assert d["rule"]["algo"] == "sdh" and d["rule"]["snat_ip"] == "198.19.2.71-198.19.2.73"
        want = select_addr(ISP1, Algo.SDH, IPv4Address(host), IPv4Address("203.0.113.10"), 40000)
        port = next(iter(port_candidates(40000, 5000, 65535, 1)))
        assert d["snat"] == {"addr": str(want), "port": port}
        assert d["translated"] == {"src": f"{want}:{port}", "dst": "203.0.113.10:80", "ttl": 63}
        assert (d["next_hop"], d["oif"]) == ("198.19.2.1", "eth1")


def test_inside_40_via_isp2_uses_isp2_pool_with_random(capsys):
    """The same sources routed via 198.19.3.1 on eth2 take the random rule and ISP 2's pool."""
    rc, d = explain(capsys, LAB, "198.18.40.10:40000", "198.51.100.10:443", oif="eth2", gw="198.19.3.1")
    want = select_addr(ISP2, Algo.RANDOM, IPv4Address("198.18.40.10"), IPv4Address("198.51.100.10"), 40000)
    assert rc == 0 and d["rule"]["algo"] == "random" and d["snat"]["addr"] == str(want)
    assert (d["next_hop"], d["oif"]) == ("198.19.3.1", "eth2")


def test_other_inside_16_goes_to_new_gw_with_sh(capsys):
    """Other 198.18.0.0/16 sources take the catch-all rule: next hop new_gw 198.19.2.1, sh pool."""
    rc, d = explain(capsys, LAB, "198.18.50.10:1024", "198.51.100.10:80", oif="eth2", gw="198.19.3.1")
    assert rc == 0 and d["rule"]["new_gw"] == "198.19.2.1" and d["rule"]["algo"] == "sh"
    assert d["next_hop"] == "198.19.2.1"
    assert d["snat"]["addr"] == str(select_addr(ISP1, Algo.SH, IPv4Address("198.18.50.10"), None, 0))
    assert d["snat"]["port"] == 5005  # the spec's vector: sport 1024 tries 5005 first
    assert any("assumed on-link via eth2" in n for n in d["notes"])
    rc, d = explain(capsys, LAB, "198.18.50.10:1024", "198.51.100.10:80", "--new-gw-oif", "eth1", oif="eth2",
                    gw="198.19.3.1")  # fmt: skip
    assert (d["next_hop"], d["oif"]) == ("198.19.2.1", "eth1") and "on-link via eth1" in d["notes"][0]


def test_sh_gives_one_address_per_source_whatever_the_destination(capsys):
    """algo sh keeps an inside host on one SNAT address for every destination."""
    addrs = set()
    for dst in ("203.0.113.10:80", "203.0.113.99:53", "198.51.100.10:443"):
        addrs.add(explain(capsys, LAB, "198.18.50.11:40000", dst)[1]["snat"]["addr"])
    assert len(addrs) == 1


def test_failover_config_sends_isp1_traffic_to_isp2(capsys):
    """With the failover config, traffic routed to 198.19.2.1 leaves via new_gw 198.19.3.1 from ISP 2's pool."""
    rc, d = explain(capsys, FAILOVER, "198.18.40.10:40000", "203.0.113.10:80")
    assert rc == 0 and d["rule"]["where"].endswith("lab-failover.conf:16")
    assert d["next_hop"] == "198.19.3.1" and IPv4Address(d["snat"]["addr"]) in ISP2


@pytest.mark.parametrize(
    "proto, src, dst",
    [("udp", "198.18.40.10:5353", "203.0.113.10:53"), ("icmp", "198.18.40.10:7", "203.0.113.10")],
)
def test_udp_and_echo_are_translated(capsys, proto, src, dst):
    """UDP datagrams and echo requests start sessions too (echo: the identifier is the port)."""
    rc, d = explain(capsys, LAB, src, dst, "--proto", proto)
    assert rc == 0 and d["reason"] == "XLATE_NEW" and d["translated"]["src"] == f"{d['snat']['addr']}:{d['snat']['port']}"


def test_tcp_non_syn_without_session_is_dropped(capsys):
    """A bare ACK matching a rule has no session: dropped (no_session), still reported as matched."""
    rc, d = explain(capsys, LAB, "198.18.40.10:40000", "203.0.113.10:80", "--flags", "A")
    assert rc == 0 and (d["verdict"], d["reason"]) == ("DROP", "DROP_NO_SESSION") and d["translated"] is None


def test_ttl_1_is_left_to_the_kernel(capsys):
    """A packet with TTL 1 is passed untranslated so the kernel answers time-exceeded."""
    rc, d = explain(capsys, LAB, "198.18.40.10:40000", "203.0.113.10:80", "--ttl", "1")
    assert (d["verdict"], d["reason"], d["translated"]) == ("PASS", "PASS_TTL", None)


def test_unmatched_flow_passes_or_drops_per_setting(tmp_path, capsys):
    """No rule: routed unchanged (PASS_NO_RULE), or dropped under `unmatched drop`; exit 1 both ways."""
    rc, d = explain(capsys, LAB, "192.0.2.50:40000", "203.0.113.10:80")
    assert rc == 1 and (d["verdict"], d["reason"]) == ("PASS", "PASS_NO_RULE")
    f = tmp_path / "drop.conf"
    f.write_text("snatgw { unmatched drop }\nvirtual_server fwmark 1 { snat_rule { from 198.18.40.0/24 "
                 "snat_ip 198.19.2.71 } }\n")  # fmt: skip
    rc, d = explain(capsys, str(f), "192.0.2.50:40000", "203.0.113.10:80")
    assert rc == 1 and (d["verdict"], d["reason"]) == ("DROP", "DROP_UNMATCHED")


def test_route_from_kernel_uses_the_fib_answer(monkeypatch, capsys):
    """--route-from-kernel takes oif and next hop from `ip route get`, also for new_gw."""
    fib = {"203.0.113.10": ("eth2", "198.19.3.1"), "198.19.2.1": ("eth1", None),
           "198.18.50.10": ("lan50", None), "198.18.40.10": ("lan40", None)}  # the sources' way back

    def fake(dst, src, iif):
        dev, gw = fib[str(dst)]
        return {"dst": str(dst), "dev": dev, **({"gateway": gw} if gw else {})}, "ip -j route get"

    monkeypatch.setattr(ex, "ip_route_get", fake)
    rc, d = explain(capsys, LAB, "198.18.50.10:40000", "203.0.113.10:80", "--route-from-kernel")
    assert rc == 0 and d["route"] == {"kind": "forward", "oif": "eth2", "gw": "198.19.3.1"}
    assert (d["next_hop"], d["oif"]) == ("198.19.2.1", "eth1")  # new_gw resolved by the FIB, on-link on eth1
    rc, d = explain(capsys, LAB, "198.18.40.10:40000", "203.0.113.10:80", "--route-from-kernel")
    assert d["rule"]["algo"] == "random" and d["candidates"][0]["match"] is True
    assert d["notes"] == []


def test_route_from_kernel_notes_a_refused_source_once(monkeypatch, capsys):
    """When the FIB refuses the non-local source, the lookup is repeated without it, noted once."""
    def fake(dst, src, iif):
        if str(dst).startswith("198.18.40."):  # the way back to the source (reverse path)
            return {"dst": str(dst), "dev": "lan40"}, f"ip -j route get {dst}"
        if src is not None:
            return None, f"ip -j route get {dst} from {src}: Network is unreachable"
        return {"dst": str(dst), "dev": "eth1", "gateway": "198.19.2.1"}, f"ip -j route get {dst}"

    monkeypatch.setattr(ex, "ip_route_get", fake)
    rc, d = explain(capsys, LAB, "198.18.40.10:40000", "203.0.113.10:80", "--route-from-kernel")
    assert rc == 0 and d["rule"]["algo"] == "sdh"
    assert len(d["notes"]) == 1 and "routing by source not applied" in d["notes"][0]


def test_text_output_shows_rules_verdict_snat_and_packet(capsys):
    """The text report has the per-rule results, verdict, SNAT address/port, next hop and packet out."""
    rc = main(["explain", LAB, "--src", "198.18.40.10:40000", "--dst", "203.0.113.10:80", "--oif", "eth1",
               "--gw", "198.19.2.1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    for words in ("MATCH", "rule wants oif eth2", "verdict:   REDIRECT (XLATE_NEW)", "SNAT:", "next hop:  198.19.2.1 dev eth1",
                  "-> 203.0.113.10:80 ttl 63"):  # fmt: skip
        assert words in out
