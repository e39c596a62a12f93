"""`snatgw check`: exit codes, the rule table in priority order, settings, warnings, JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from snatgw.cli.main import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str, name: str = "c.conf") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_valid_config_exits_0_and_lists_rules_in_priority_order(capsys):
    """check prints the rules most specific first with where each was defined, and exits 0."""
    rc = main(["check", str(EXAMPLES / "lab.conf")])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "198.18" in line]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[-1].rsplit(":", 1)[1] for r in rows] == ["16", "17", "19"]
    header = next(line for line in out.splitlines() if line.strip().startswith("#"))
    assert header.split() == ["#", "from", "to", "gw", "oif", "new_gw", "snat_ip", "algo", "defined", "at"]
    assert "lan40 lan50" in out and "tcp_established  7440" in out


def test_priority_order_differs_from_definition_order(tmp_path, capsys):
    """A /24 rule defined after a /16 rule is listed first."""
    f = write(tmp_path, "virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n"
                        " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.72 }\n}\n")  # fmt: skip
    assert main(["check", "--json", f]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [(r["priority"], r["from"], r["where"].rsplit(":", 1)[1]) for r in d["rules"]] == [
        (1, "198.18.40.0/24", "3"), (2, "198.18.0.0/16", "2")]  # fmt: skip


def test_seed_example_exits_2_naming_both_rules(capsys):
    """The seed's example verbatim is refused with exit 2; stderr names rule 4's and rule 2's lines."""
    rc = main(["check", str(EXAMPLES / "seed.conf")])
    cap = capsys.readouterr()
    assert rc == 2 and cap.out == ""
    assert "seed.conf:33: snat_rule: duplicate rule" in cap.err and "seed.conf:15" in cap.err


def test_seed_without_rule_4_passes(capsys):
    """The seed's example minus its 4th rule is valid."""
    assert main(["check", str(EXAMPLES / "seed-fixed.conf")]) == 0
    assert "valid, 3 rules" in capsys.readouterr().out


def test_invalid_config_with_json_prints_error_object_and_exits_2(tmp_path, capsys):
    """--json on an invalid config prints {"valid": false, ...} and still exits 2 with stderr."""
    f = write(tmp_path, "virtual_server fwmark 1 {\n snat_rule {\n  from 198.18.0.0/16\n  algo rr\n"
                        "  snat_ip 198.19.2.71\n }\n}\n")  # fmt: skip
    rc = main(["check", "--json", f])
    cap = capsys.readouterr()
    d = json.loads(cap.out)
    assert rc == 2 and d["valid"] is False and d["field"] == "algo" and d["where"].endswith("c.conf:4")
    assert "c.conf:4: algo: unknown ip select algo" in cap.err


def test_missing_file_exits_2(tmp_path, capsys):
    """A config that cannot be read is an error (exit 2)."""
    assert main(["check", str(tmp_path / "none.conf")]) == 2
    assert "none.conf" in capsys.readouterr().err


def test_rules_beaten_only_on_some_packets_are_not_warned(tmp_path, capsys):
    """Overlapping rules that each win for some packets give no "never match" warning."""
    f = write(tmp_path, "virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n"
                        " snat_rule { from 198.18.0.0/16 oif eth1 gw 198.19.2.1 snat_ip 198.19.2.72 }\n"
                        " snat_rule { from 198.18.0.0/16 oif eth1 snat_ip 198.19.2.73 }\n"
                        " snat_rule { from 198.18.40.0/24 to 203.0.113.0/24 snat_ip 198.19.2.73 }\n}\n")  # fmt: skip
    assert main(["check", "--json", f]) == 0
    assert [w for w in json.loads(capsys.readouterr().out)["warnings"] if "interfaces" not in w] == []


def test_shadowed_rules_are_warned_naming_both_lines(monkeypatch, tmp_path, capsys):
    """Every (rule, [earlier rule]) of RuleSet.shadowed() becomes a warning naming both lines."""
    from snatgw.rules import RuleSet

    monkeypatch.setattr(RuleSet, "shadowed", lambda self: [(self.rules[1], [self.rules[0]])])
    f = write(tmp_path, "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n"
                        " snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.72 }\n}\n")  # fmt: skip
    assert main(["check", f]) == 0
    out = capsys.readouterr().out
    assert "c.conf:3: snat_rule can never match" in out and "rule at " in out and "c.conf:2" in out


def test_rule_covered_by_several_earlier_rules_is_warned(tmp_path, capsys):
    """A /23 rule whose two /24 halves have earlier rules (no route conditions) can never match."""
    f = write(tmp_path, "virtual_server fwmark 1 {\n"
                        " snat_rule { from 198.18.40.0/23 oif eth1 snat_ip 198.19.2.71 }\n"
                        " snat_rule { from 198.18.41.0/24 snat_ip 198.19.2.72 }\n"
                        " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.73 }\n"
                        " snat_rule { from 198.18.40.0/22 snat_ip 198.19.2.73 }\n}\n")  # fmt: skip
    assert main(["check", "--json", f]) == 0
    w = [x for x in json.loads(capsys.readouterr().out)["warnings"] if "interfaces" not in x]
    assert len(w) == 1, w
    assert w[0].startswith(f"{f}:2: snat_rule can never match") and f"{f}:3" in w[0] and f"{f}:4" in w[0]


def test_oif_outside_the_uplinks_is_warned(tmp_path, capsys):
    """A rule whose oif is not an `outside` interface is valid but warned."""
    f = write(tmp_path, "snatgw { outside eth1 eth2 }\nvirtual_server fwmark 1 {\n"
                        " snat_rule { from 198.18.40.0/24 oif eth3 snat_ip 198.19.2.71 }\n}\n")  # fmt: skip
    assert main(["check", f]) == 0
    assert "c.conf:3: oif: eth3 is not among the outside interfaces" in capsys.readouterr().out


def test_missing_interfaces_are_warned(tmp_path, capsys):
    """A config without inside/outside interfaces is valid but warned (run needs them), at the
    snatgw block's line; without a block, the file is named."""
    f = write(tmp_path, "\nsnatgw { inside lan40 }\nvirtual_server fwmark 1 {\n"
                        " snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")  # fmt: skip
    assert main(["check", f]) == 0
    assert f"{f}:2: no outside interfaces in a snatgw {{ }} block" in capsys.readouterr().out
    f = write(tmp_path, "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    assert main(["check", f]) == 0
    assert f"{f}: no inside or outside interfaces in a snatgw {{ }} block" in capsys.readouterr().out


def test_skipped_keepalived_blocks_are_listed_as_warnings(tmp_path, capsys):
    """Blocks of a real keepalived.conf are reported as skipped, not errors."""
    f = write(tmp_path, "global_defs {\n router_id gw1\n}\nvirtual_server fwmark 1 {\n lb_kind FULLNAT\n"
                        " snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n}\n")  # fmt: skip
    assert main(["check", "--json", f]) == 0
    w = json.loads(capsys.readouterr().out)["warnings"]
    assert any("c.conf:1: skipped keepalived block 'global_defs'" in x for x in w)
    assert any("c.conf:5: skipped 'lb_kind'" in x for x in w)


def test_timeouts_below_an_rfc_floor_are_warned_with_the_rfc(tmp_path, capsys):
    """A timeout below an RFC's floor is valid but warned, naming file:line, the RFC and what it
    asks; at or above the floor (and a state with no floor, tcp_close) nothing is said."""
    f = write(tmp_path, "snatgw {\n inside lan40\n outside eth1\n timeout tcp_close_wait 7\n"
                        " timeout tcp_established 90\n timeout udp 30\n timeout icmp 59\n"
                        " timeout tcp_time_wait 7\n timeout tcp_syn_sent 240\n timeout tcp_close 1\n}\n"
                        "virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n}\n")
    assert main(["check", "--json", f]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    assert warnings == [
        f"{f}:4: timeout tcp_close_wait: 7 s is below 240 s, the floor of RFC 5382 REQ-5 (a transitory "
        "TCP connection idle-timeout of at least 4 minutes)",
        f"{f}:5: timeout tcp_established: 90 s is below 7440 s, the floor of RFC 5382 REQ-5 (an "
        "established TCP connection idle-timeout of at least 2 h 4 min)",
        f"{f}:6: timeout udp: 30 s is below 120 s, the floor of RFC 4787 REQ-5 (a UDP mapping timer of "
        "at least 2 minutes)",
        f"{f}:7: timeout icmp: 59 s is below 60 s, the floor of RFC 5508 REQ-1 (an ICMP query session "
        "timer of at least 60 s)",
        f"{f}:8: timeout tcp_time_wait: 7 s is below 120 s, the floor of RFC 6888 REQ-8 (an external "
        "port not reused until 120 s after its session)",
    ]


def test_default_timeouts_are_the_rfc_floored_table(capsys):
    """The defaults: ESTABLISHED 7440, transitory 240, TIME_WAIT 120, CLOSE 10, UDP 300, ICMP 60;
    none is below a floor, so the example config has no timeout warning."""
    assert main(["check", "--json", str(EXAMPLES / "lab.conf")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["settings"]["timeout"] == {
        "tcp_none": 10, "tcp_established": 7440, "tcp_syn_sent": 240, "tcp_syn_recv": 240,
        "tcp_fin_wait": 240, "tcp_time_wait": 120, "tcp_close": 10, "tcp_close_wait": 240,
        "tcp_last_ack": 240, "tcp_listen": 240, "tcp_synack": 240, "udp": 300, "icmp": 60}
    assert not any("timeout" in w for w in d["warnings"])


def test_pools_no_reply_can_reach_and_too_many_rules_for_bpf_are_warned(tmp_path, capsys, monkeypatch):
    """A pool of 0.0.0.0, 127.0.0.1, 224.0.0.1 or 255.255.255.255 (a typo) was valid without a
    word, and so was a config with more rules than the bpf datapath holds (16,384), which `run`
    then refused; both are warnings now (the config stays valid: another backend may take it)."""
    from snatgw.cli.commands import check

    rules = "".join(f"  snat_rule {{ from 198.18.{40 + i}.0/24 snat_ip {a} }}\n"
                    for i, a in enumerate(["0.0.0.0", "127.0.0.1", "224.0.0.1-224.0.0.2", "255.255.255.255",
                                           "198.19.2.71"]))
    f = write(tmp_path, "virtual_server fwmark 1 {\n" + rules + "}\n")
    monkeypatch.setattr(check, "MAX_RULES", 4)
    assert main(["check", f, "-j"]) == 0
    w = json.loads(capsys.readouterr().out)["warnings"]
    pools = [x for x in w if "no reply comes back" in x]
    assert [x.split(":")[1] for x in pools] == ["2", "3", "4", "5"]
    assert "loopback addresses (127.0.0.0/8)" in pools[1] and "multicast" in pools[2]
    assert any("5 rules: the bpf backend holds at most 4" in x for x in w)


def test_a_pool_holding_a_next_hop_or_an_inside_address_is_warned(tmp_path, capsys):
    """`snat_ip 198.19.2.1` beside `gw 198.19.2.1` (the router's address for the pool's .100:
    the gateway would take it) and a pool inside a rule's `from` (that inside host cannot send:
    DROP_SPOOFED) were valid without a word; a link's backup pool and backup_gw too. The lab's
    pools, and a catch-all `from 0.0.0.0/0`, say nothing."""
    f = write(tmp_path, "snatgw {\n inside lan40\n outside eth1 eth2\n}\nvirtual_server fwmark 1 {\n"
              "  snat_rule { from 198.18.40.0/24 gw 198.19.2.1 oif eth1 snat_ip 198.19.2.1 }\n"
              "  snat_rule { from 198.18.0.0/16 new_gw 198.19.3.1 snat_ip 198.18.99.5-198.18.99.6 }\n"
              "  snat_rule { from 0.0.0.0/0 snat_ip 198.19.2.71 }\n}\n"
              "link isp2 {\n gw 198.19.3.1\n probe 203.0.113.10\n backup_gw 198.19.2.9\n"
              " backup_snat_ip 198.19.2.8-198.19.2.9\n}\n")
    assert main(["check", f, "-j"]) == 0
    w = json.loads(capsys.readouterr().out)["warnings"]
    hop = [x for x in w if "a next hop" in x]
    inside = [x for x in w if "has addresses of from" in x]
    assert hop[0] == (f"{f}:6: snat_ip: 198.19.2.1 holds 198.19.2.1, a next hop ({f}:6): the gateway would take "
                      "its router's address and answer ARP for it; every flow through it breaks")
    assert hop[1].startswith(f"link isp2 ({f}:10): backup_snat_ip: 198.19.2.8-198.19.2.9 holds 198.19.2.9")
    assert len(hop) == 2
    assert inside == [f"{f}:7: snat_ip: 198.18.99.5-198.18.99.6 has addresses of from 198.18.0.0/16 ({f}:7): an "
                      "inside network's address as a public one: the inside host that has it cannot send (its "
                      "every packet is dropped as DROP_SPOOFED, a pool address coming from inside)"]
    assert main(["check", str(EXAMPLES / "lab.conf"), "-j"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []


def test_use_vmac_with_backend_nft_is_warned_of(tmp_path):
    """A combined keepalived file whose vrrp_instance says `use_vmac`, run with backend nft
    (which does not handle it: docs/operations.md): check warns, naming the instance's line (the
    daemon logs the same warnings, Service.config_warnings); with bpf, nothing. Before, nothing
    said it: every flow left untranslated, dropped by the leak guard."""
    from dataclasses import replace

    from snatgw.cli.commands.check import config_warnings
    from snatgw.config.parse import parse_text

    root = Path(__file__).resolve().parents[2]
    text = (root / "examples" / "keepalived.conf").read_text()
    assert "use_vmac" not in text and "interface lan40" in text
    text = text.replace("interface lan40", "interface lan40\n    use_vmac", 1)
    line = text.splitlines().index("    use_vmac")  # the instance's line is the one before (1-based)
    head = next(i for i in range(line, 0, -1) if text.splitlines()[i - 1].startswith("vrrp_instance"))
    cfg = parse_text(text, "ka.conf", [])
    said = [w for w in config_warnings(replace(cfg, settings=replace(cfg.settings, backend="nft")))
            if "use_vmac" in w]
    assert said and said[0].startswith(f"ka.conf:{head}: vrrp_instance: use_vmac is not handled by backend nft")
    assert not [w for w in config_warnings(replace(cfg, settings=replace(cfg.settings, backend="bpf")))
                if "use_vmac" in w]


def test_a_config_others_can_write_is_warned(tmp_path, capsys):
    """The daemon (root) runs what the file says, audit_log paths included: a file writable by
    group or others, owned by another user, or in a directory others may write is valid but
    warned of (it passed silently); mode 0644 owned by root in a 0755 directory is not."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    f = write(d, "snatgw { inside lan40 outside eth1 }\nvirtual_server fwmark 1 {\n"
                 " snat_rule { from 198.18.40.0/24 oif eth1 snat_ip 198.19.2.71 }\n}\n")  # fmt: skip
    os.chmod(f, 0o644)
    assert main(["check", f]) == 0
    assert "warnings:\n  none" in capsys.readouterr().out
    os.chmod(f, 0o666)
    assert main(["check", f]) == 0
    assert f"{f}: is writable by group and others (mode 0666): " in capsys.readouterr().out
    os.chmod(f, 0o644)
    os.chown(f, 65534, -1)
    assert main(["check", f]) == 0
    assert f"{f}: is owned by uid 65534, not by uid 0 (the daemon's user)" in capsys.readouterr().out
    os.chown(f, 0, -1)
    d.chmod(0o777)
    assert main(["check", f]) == 0
    assert f"{f}: its directory {d} is writable by group and others (mode 0777)" in capsys.readouterr().out
    d.chmod(0o1777)  # sticky (/tmp): others cannot replace root's file
    assert main(["check", f]) == 0
    assert "warnings:\n  none" in capsys.readouterr().out


def test_a_pool_wider_than_an_inside_net_is_warned_and_many_rules_stay_cheap(tmp_path):
    """The inside net may start inside the pool (a pool of 10.0.0.0/8's addresses, from
    10.1.2.0/24), and 20,000 /32 sources under one pool are asked in one bisection each."""
    from snatgw.cli.commands.check import pool_overlap_warnings
    from snatgw.config.parse import parse_text

    cfg = parse_text("virtual_server fwmark 1 {\n snat_rule { from 10.1.2.0/24 snat_ip 10.0.0.0-10.255.255.255 }\n}\n",
                     "w.conf", [])
    (w,) = pool_overlap_warnings(cfg)
    assert w.startswith("w.conf:2: snat_ip: 10.0.0.0-10.255.255.255 has addresses of from 10.1.2.0/24 (w.conf:2)")
    rules = "".join(f" snat_rule {{ from 10.{i >> 8}.{i & 255}.7 snat_ip 192.0.2.{i % 200 + 1} }}\n"
                    for i in range(20000))
    cfg = parse_text("virtual_server fwmark 1 {\n" + rules + "}\n", "m.conf", [])
    assert pool_overlap_warnings(cfg) == []


def test_a_one_port_range_is_warned_of(tmp_path, capsys):
    """`port_range 5000` (read as "from 5000") is the range 5000-5000: valid, and now said."""
    f = write(tmp_path, "snatgw {\n inside lan40\n outside eth1\n port_range 5000\n}\n"
              "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    assert main(["check", f, "-j"]) == 0
    w = json.loads(capsys.readouterr().out)["warnings"]
    assert [x for x in w if "port_range" in x] == [
        f"{f}:4: port_range: 5000 is one port: a SNAT address then has one port for each remote address and "
        "port, so a second flow toward the same server needs another address of the pool or is refused (write "
        "MIN-MAX for a range, e.g. 5000-65535)"]


def test_a_bpf_table_larger_than_the_machine_is_warned_of(tmp_path, capsys):
    """`max_sessions 2000000000` (a typo's extra zeros) passed check in silence; with bpf its
    maps are preallocated at start. Measured against this machine's MemTotal; nft allocates
    as sessions come, so it is not warned."""
    from snatgw.cli.commands.check import mem_total, table_memory_warnings
    from snatgw.config.parse import parse_text

    text = ("snatgw {{\n inside lan40\n outside eth1\n max_sessions {n}\n backend {b}\n}}\n"
            "virtual_server fwmark 1 {{\n snat_rule {{ from 198.18.40.0/24 snat_ip 198.19.2.71 }}\n}}\n")
    big = parse_text(text.format(n=60_000_000, b="bpf"), "m.conf", [])
    (w,) = table_memory_warnings(big, total=24 << 30)
    assert w.startswith("m.conf:4: max_sessions: 60,000,000 sessions take about 17.8 GiB of kernel memory")
    assert "over half of this machine's 24.0 GiB" in w
    assert "more than this machine's 8.0 GiB" in table_memory_warnings(big, total=8 << 30)[0]
    (w,) = table_memory_warnings(parse_text(text.format(n=2_000_000_000, b="bpf"), "m.conf", []), total=1 << 40)
    assert w.startswith("m.conf:4: max_sessions: 2,000,000,000 sessions: the bpf backend holds at most 67,108,864")
    assert table_memory_warnings(parse_text(text.format(n=262144, b="bpf"), "m.conf", []), total=24 << 30) == []
    assert table_memory_warnings(parse_text(text.format(n=2_000_000_000, b="nft"), "m.conf", []), total=1 << 30) == []
    assert mem_total() and mem_total(str(tmp_path / "none")) is None
    f = write(tmp_path, text.format(n=2_000_000_000, b="bpf"))
    assert main(["check", f, "-j"]) == 0
    assert any("max_sessions: 2,000,000,000 sessions: the bpf backend" in x
               for x in json.loads(capsys.readouterr().out)["warnings"])
