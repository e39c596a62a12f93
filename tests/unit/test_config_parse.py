"""The keepalived-style config grammar: every keyword, layouts, comments, skipped keepalived
blocks, and each error with its file:line and field."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from snatgw.config.parse import parse_file, parse_text
from snatgw.config.schema import Settings
from snatgw.errors import ConfigError, RuleError
from snatgw.layout import Algo, CtState

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def only_rule(text: str):
    cfg = parse_text(text, "t.conf")
    assert len(cfg.rules) == 1
    return next(iter(cfg.rules))


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_text(text, "t.conf", [])
    return ei.value


# --------------------------------------------------------------------------- rules


def test_every_rule_keyword_one_per_line():
    """Each snat_rule keyword sets its field when written one per line, as the seed does."""
    r = only_rule(
        "virtual_server fwmark 1 {\nsnat_rule {\nfrom 198.18.40.0/24\nto 203.0.113.0/24\n"
        "gw 198.19.2.1\noif eth1\nnew_gw 198.19.3.1\nsnat_ip 198.19.2.71-198.19.2.73\nalgo random\n}\n}\n"
    )
    assert r.src == IPv4Network("198.18.40.0/24")
    assert r.dst == IPv4Network("203.0.113.0/24")
    assert r.gw == IPv4Address("198.19.2.1")
    assert r.oif == "eth1"
    assert r.new_gw == IPv4Address("198.19.3.1")
    assert (str(r.pool.first), str(r.pool.last)) == ("198.19.2.71", "198.19.2.73")
    assert r.algo == Algo.RANDOM
    assert r.where == "t.conf:2"


def test_several_keywords_on_one_line_and_braces_on_one_line():
    """A whole rule on one line parses the same as one keyword per line."""
    one = only_rule("virtual_server fwmark 1 { snat_rule { from 198.18.40.0/24 gw 198.19.2.1 oif eth1 "
                    "snat_ip 198.19.2.71-198.19.2.73 algo sh } }")
    many = only_rule("virtual_server fwmark 1 {\n snat_rule {\n  from 198.18.40.0/24\n  gw 198.19.2.1\n"
                     "  oif eth1\n  snat_ip 198.19.2.71-198.19.2.73\n  algo sh\n }\n}\n")
    assert one == many


def test_brace_on_next_line_and_glued_braces():
    """`{` may open on the next line, and braces glued to words still count."""
    r = only_rule("virtual_server fwmark 1\n{\n  snat_rule\n  {\n from 198.18.0.0/16 snat_ip 198.19.2.71}\n}")
    assert r.src == IPv4Network("198.18.0.0/16")


def test_defaults_to_any_destination_no_route_conditions_sdh():
    """Without to/gw/oif/new_gw/algo a rule matches any destination and route, with sdh."""
    r = only_rule("virtual_server fwmark 1 { snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 } }")
    assert r.dst == IPv4Network("0.0.0.0/0")
    assert (r.gw, r.oif, r.new_gw) == (None, None, None)
    assert r.algo == Algo.SDH
    assert r.pool.size == 1


def test_comments_hash_and_bang_and_blank_lines():
    """`#` and `!` comment to end of line, also after values; blank lines are ignored."""
    r = only_rule(
        "! keepalived comment\n\n# another\nvirtual_server fwmark 1 { # the SNAT service\n\n"
        "  snat_rule {\n    from 198.18.40.0/24   # inside\n    snat_ip 198.19.2.71 ! one address\n"
        "    ! algo random\n  }\n}\n"
    )
    assert r.algo == Algo.SDH and r.src == IPv4Network("198.18.40.0/24")


def test_semicolons_separate_like_line_ends():
    """`from ..; snat_ip ..;` (the design page's shorthand) parses."""
    r = only_rule("virtual_server fwmark 1 { snat_rule { from 198.18.40.0/24; snat_ip 198.19.2.71; } }")
    assert r.src == IPv4Network("198.18.40.0/24")


def test_rules_keep_definition_lines_and_priority_order():
    """Rules are listed most specific first, each remembering its defining line."""
    cfg = parse_text(
        "virtual_server fwmark 1 {\n"
        "  snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n"
        "  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.72 }\n"
        "  snat_rule { from 198.18.40.0/24 oif eth1 gw 198.19.2.1 snat_ip 198.19.2.73 }\n"
        "}\n",
        "p.conf",
    )
    assert [r.where for r in cfg.rules] == ["p.conf:4", "p.conf:3", "p.conf:2"]
    assert [r.where for r in cfg.rules.defined] == ["p.conf:2", "p.conf:3", "p.conf:4"]


# --------------------------------------------------------------------------- keepalived blocks


def test_other_keepalived_blocks_are_skipped_with_warnings():
    """global_defs, vrrp_instance, other virtual_servers and real_server are skipped, each warned."""
    warnings: list[str] = []
    cfg = parse_text(
        "global_defs {\n  router_id LVS_1\n  notification_email { a@b }\n}\n"
        "vrrp_instance VI_1 {\n  state MASTER\n  virtual_ipaddress {\n    198.18.40.1\n  }\n}\n"
        "virtual_server 198.18.40.5 80 {\n  real_server 198.18.40.6 80 { weight 1 }\n}\n"
        "virtual_server fwmark 2 { lb_kind NAT }\n"
        "virtual_server fwmark 1 {\n  delay_loop 6\n  lb_kind FULLNAT\n"
        "  real_server 198.18.40.7 0 {\n    weight 1\n  }\n"
        "  snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n}\n",
        "k.conf",
        warnings,
    )
    assert len(cfg.rules) == 1
    text = "\n".join(warnings)
    for where, what in [("k.conf:1", "global_defs"), ("k.conf:5", "vrrp_instance VI_1"),
                        ("k.conf:11", "virtual_server 198.18.40.5 80"), ("k.conf:14", "virtual_server fwmark 2"),
                        ("k.conf:16", "delay_loop"), ("k.conf:18", "real_server")]:  # fmt: skip
        assert f"{where}: skipped" in text and what in text


def test_a_full_keepalived_conf_is_read(tmp_path):
    """A keepalived.conf with VRRP, LVS services, health checks and the SNAT service parses."""
    f = tmp_path / "keepalived.conf"
    f.write_text(
        "! Configuration File for keepalived\n"
        "global_defs {\n   notification_email {\n     ops@example.com\n   }\n   router_id LVS_SNAT\n}\n"
        "local_address_group laddr_g1 {\n   198.19.2.80-90\n}\n"
        "vrrp_sync_group G1 {\n  group {\n    VI_1\n  }\n}\n"
        "vrrp_script chk { script \"/bin/true\" interval 2 }\n"
        "vrrp_instance VI_1 {\n    state MASTER\n    interface eth1\n    virtual_router_id 51\n"
        "    track_interface {\n        eth1\n        eth2\n    }\n    virtual_ipaddress {\n"
        "        198.19.2.71/24 dev eth1\n    }\n}\n"
        "virtual_server 198.19.2.70 80\n{\n    delay_loop 6\n    lb_algo rr\n    lb_kind FULLNAT\n"
        "    laddr_group_name laddr_g1\n    real_server 198.18.40.20 80 {\n        weight 1\n"
        "        TCP_CHECK {\n            connect_timeout 3\n        }\n    }\n}\n"
        "virtual_server fwmark 1 {\n    lb_kind FULLNAT\n    lvs_sched snat_sched\n    protocol TCP\n"
        "    snat_rule {\n        from 198.18.40.0/24\n        gw 198.19.2.1\n        oif eth1\n"
        "        snat_ip 198.19.2.71-198.19.2.73\n    }\n}\n",
        encoding="utf-8",
    )
    warnings: list[str] = []
    cfg = parse_file(f, warnings)
    assert [r.describe() for r in cfg.rules] == [
        "from 198.18.40.0/24 gw 198.19.2.1 oif eth1 snat_ip 198.19.2.71-198.19.2.73 algo sdh"]
    assert len(warnings) == 9 and all(": skipped" in w for w in warnings)


def test_config_without_snat_service_has_no_rules():
    """A keepalived.conf with no fwmark 1 service parses to zero rules and default settings."""
    cfg = parse_text("global_defs { router_id x }\n", "k.conf", [])
    assert len(cfg.rules) == 0 and cfg.settings == Settings()


# --------------------------------------------------------------------------- settings


def test_every_settings_keyword():
    """Each snatgw keyword sets its Settings field."""
    cfg = parse_text(
        "snatgw {\n  inside lan40 lan50\n  outside eth1 eth2\n  port_range 10000-20000\n  port_tries 64\n"
        "  max_sessions 1000\n  unmatched drop\n  backend nft\n  timeout tcp_established 600\n"
        "  timeout udp 30\n  timeout icmp 10\n  gc_interval 0.5\n  control_socket /run/x.sock\n"
        "  pin_dir /sys/fs/bpf/x\n}\n",
        "s.conf",
    )
    s = cfg.settings
    assert s.inside == ("lan40", "lan50") and s.outside == ("eth1", "eth2")
    assert (s.port_min, s.port_max, s.port_tries, s.max_sessions) == (10000, 20000, 64, 1000)
    assert s.unmatched_drop and s.backend == "nft"
    assert s.timeout(CtState.ESTABLISHED) == 600 and s.timeout(CtState.UDP) == 30 and s.timeout(CtState.ICMP) == 10
    assert s.timeout(CtState.SYN_RECV) == 240  # untouched default
    assert s.gc_interval == 0.5 and s.control_socket == "/run/x.sock" and s.pin_dir == "/sys/fs/bpf/x"


def test_settings_several_on_a_line():
    """Settings keywords may share a line; interface lists end at the next keyword."""
    s = parse_text("snatgw { inside lan40 outside eth1 eth2 port_tries 5 timeout udp 9 backend nft }").settings
    assert s.inside == ("lan40",) and s.outside == ("eth1", "eth2")
    assert s.port_tries == 5 and s.timeout(CtState.UDP) == 9 and s.backend == "nft"


def test_single_port_range_and_unmatched_pass():
    """`port_range N` is a one-port range; `unmatched pass` is the default behaviour."""
    s = parse_text("snatgw {\nport_range 6000\nunmatched pass\n}").settings
    assert (s.port_min, s.port_max, s.unmatched_drop) == (6000, 6000, False)


def test_inbound_drop_by_default_and_routed_on_request():
    """`inbound routed` lets uplink packets without a session be routed; `inbound drop` (the
    default) keeps them out (edge invariant 2)."""
    assert parse_text("snatgw {\ninbound routed\n}").settings.inbound_routed is True
    assert parse_text("snatgw {\ninbound drop\n}").settings.inbound_routed is False
    assert parse_text("snatgw {\n}").settings.inbound_routed is False


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text, where, field, words",
    [
        ("virtual_server fwmark 1 {\n snat_rule {\n  snat_ip 198.19.2.71\n }\n}", "t.conf:2", "snat_rule", "missing from"),
        ("virtual_server fwmark 1 {\n snat_rule {\n  from 198.18.0.0/16\n }\n}", "t.conf:2", "snat_rule", "missing snat_ip"),
        ("virtual_server fwmark 1 {\n snat_rule {\n  from 198.18.0.0/16\n  snat_ip 198.19.2.71\n"
         "  sorce 1.2.3.4\n }\n}", "t.conf:5", "sorce", "expected one of from, to, gw, oif, new_gw, snat_ip, algo"),
        ("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.1/24 snat_ip 198.19.2.71 }\n}", "t.conf:2", "from",
         "did you mean 198.18.40.0/24"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\nto 203.0.113.0/33\nsnat_ip 198.19.2.71 } }",
         "t.conf:3", "to", "prefix length"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\ngw 198.19.2\nsnat_ip 198.19.2.71 } }",
         "t.conf:3", "gw", "IPv4 address"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\noif eth1234567890123\nsnat_ip 198.19.2.71 } }",
         "t.conf:3", "oif", "1..15"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\nnew_gw x\nsnat_ip 198.19.2.71 } }",
         "t.conf:3", "new_gw", "IPv4 address"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\nsnat_ip 198.19.2.73-198.19.2.71 } }",
         "t.conf:3", "snat_ip", "max ip smaller than min ip"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\nsnat_ip 198.19.2.71\nalgo rr } }",
         "t.conf:4", "algo", "should be one of [sh, sdh, random]"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom 198.18.0.0/16\nfrom 198.18.0.0/24\nsnat_ip 198.19.2.71 } }",
         "t.conf:3", "from", "given twice"),
        ("virtual_server fwmark 1 { snat_rule {\nfrom\n198.18.0.0/16\nsnat_ip 198.19.2.71 } }",
         "t.conf:2", "from", "expected a value on the same line"),
        ("virtual_server fwmark 1 { snat_rule {\nsnat_ip 198.19.2.71 - 198.19.2.73\nfrom 198.18.0.0/16 } }",
         "t.conf:2", "snat_ip", "one value"),
        ("virtual_server fwmark 1 {\n snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n sat_rule { }\n}",
         "t.conf:3", "sat_rule", "expected snat_rule"),
        ("snatgw {\n  insde lan40\n}", "t.conf:2", "insde", "expected one of inside, outside, port_range"),
        ("snatgw {\n  port_range 70000\n}", "t.conf:2", "port_range", "1..65535"),
        ("snatgw {\n  port_range 9000-8000\n}", "t.conf:2", "port_range", "MIN <= MAX"),
        ("snatgw {\n  port_tries 0\n}", "t.conf:2", "port_tries", "integer 1..1024"),
        ("snatgw {\n  port_tries 1025\n}", "t.conf:2", "port_tries", "integer 1..1024"),
        ("snatgw {\n  on_exhausted evict\n}", "t.conf:2", "on_exhausted", "one of spill, drop"),
        ("snatgw {\n  max_sessions_per_host -1\n}", "t.conf:2", "max_sessions_per_host", "integer 0..4294967295"),
        ("virtual_server fwmark 1 {\n snat_rule {\n  from 10.0.0.0/8 snat_ip 198.19.2.71\n"
         "  on_exhausted maybe\n }\n}", "t.conf:4", "on_exhausted", "expected spill or drop"),
        ("virtual_server fwmark 1 {\n snat_rule {\n  from 10.0.0.0/8 snat_ip 198.19.2.71\n"
         "  max_sessions_per_host lots\n }\n}", "t.conf:4", "max_sessions_per_host", "0..4294967295"),
        ("snatgw {\n  max_sessions many\n}", "t.conf:2", "max_sessions", "integer"),
        ("snatgw {\n  unmatched reject\n}", "t.conf:2", "unmatched", "pass, drop"),
        ("snatgw {\n  inbound allow\n}", "t.conf:2", "inbound", "drop, routed"),
        ("snatgw {\n  backend ipvs\n}", "t.conf:2", "backend", "bpf, nft"),
        ("snatgw {\n  timeout tcp_estab 60\n}", "t.conf:2", "timeout",
         "unknown state 'tcp_estab'; expected one of tcp_none, tcp_established"),
        ("snatgw {\n  timeout tcp_est 60\n}", "t.conf:2", "timeout", "did you mean 'tcp_established'?"),
        ("snatgw {\n  timeout udp -1\n}", "t.conf:2", "timeout udp", "expected seconds, an integer 1..2147483648"),
        ("snatgw {\n  timeout tcp_established abc\n}", "t.conf:2", "timeout tcp_established",
         "expected seconds, an integer 1..2147483648, got 'abc'"),
        ("snatgw {\n  timeout udp\n}", "t.conf:2", "timeout", "a name and seconds"),
        ("snatgw {\n  gc_interval 0\n}", "t.conf:2", "gc_interval", "> 0"),
        ("snatgw {\n  control_socket run/x.sock\n}", "t.conf:2", "control_socket", "absolute path"),
        ("snatgw {\n  pin_dir\n}", "t.conf:2", "pin_dir", "a value"),
        ("snatgw {\n  inside\n}", "t.conf:2", "inside", "one or more interface names"),
        ("snatgw {\n  outside eth1 eth1\n}", "t.conf:2", "outside", "listed twice"),
        ("snatgw {\n  inside lan40 eth1\n  outside eth1\n}", "t.conf:3", "outside", "both inside (line 2)"),
        ("snatgw {\n  backend nft\n  backend bpf\n}", "t.conf:3", "backend", "given twice (first at line 2)"),
        ("snatgw { }\nsnatgw { }", "t.conf:2", "snatgw", "first is at t.conf:1"),
        ("virtual_server fwmark 1 { }\n\nvirtual_server fwmark 1 { }", "t.conf:3", "virtual_server",
         "first is at t.conf:1"),
        ("snatgw inside lan40 {\n}", "t.conf:1", "snatgw", "expected '{'"),
        ("# settings\nsnatg {\n backend nft\n}", "t.conf:2", "snatg", "expected snatgw or virtual_server fwmark 1"),
        ("virtual_server fwmark 1\nsnat_rule { }", "t.conf:1", "virtual_server", "expected '{'"),
    ],
)  # fmt: skip
def test_each_error_names_file_line_and_field(text, where, field, words):
    """Every config error is 'file:line: field: message' for the offending line and field."""
    e = err(text)
    assert (e.where, e.field) == (where, field), str(e)
    assert words in e.message, str(e)
    assert str(e).startswith(f"{where}: {field}: ")


@pytest.mark.parametrize(
    "text, line, field",
    [
        ("virtual_server fwmark 1 {\n  snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n", 1, "virtual_server"),
        ("virtual_server fwmark 1 {\n  snat_rule {\n from 198.18.0.0/16 snat_ip 198.19.2.71\n"
         "  snat_rule { from 198.18.0.0/24 snat_ip 198.19.2.71 }\n}\n", 2, "snat_rule"),
        ("snatgw {\n  backend nft\n\n", 1, "snatgw"),
        ("global_defs {\n  router_id x\n  notification_email {\n", 3, "notification_email"),
    ],
)  # fmt: skip
def test_unclosed_block_names_the_line_that_opened_it(text, line, field):
    """An unclosed block is reported at the line of its opening keyword."""
    e = err(text)
    assert (e.where, e.field) == (f"t.conf:{line}", field), str(e)
    assert "missing '}'" in e.message


def test_stray_closing_brace_is_an_error():
    """A `}` with no open block names its own line."""
    e = err("virtual_server fwmark 1 { }\n}\n")
    assert e.where == "t.conf:2" and "no block open" in e.message


def test_duplicate_rule_names_both_lines():
    """Two rules with the same from/to/gw/oif are refused, naming both definitions."""
    e = err("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 oif eth1 snat_ip 198.19.2.71 }\n"
            " snat_rule { from 198.18.40.0/24 oif eth1 snat_ip 198.19.3.71 algo sh }\n}\n")  # fmt: skip
    assert e.where == "t.conf:3" and "t.conf:2" in e.message and "duplicate" in e.message


def test_unreadable_file_is_a_config_error(tmp_path):
    """A missing file is a ConfigError naming the path."""
    with pytest.raises(ConfigError) as ei:
        parse_file(tmp_path / "nope.conf")
    assert "nope.conf" in str(ei.value)


# --------------------------------------------------------------------------- the seed and examples


def test_seed_example_is_refused_naming_rules_2_and_4():
    """The seed's example verbatim is refused: its 4th rule repeats the 2nd's from/gw/oif."""
    with pytest.raises(ConfigError) as ei:
        parse_file(EXAMPLES / "seed.conf")
    e = ei.value
    lines = (EXAMPLES / "seed.conf").read_text(encoding="utf-8").splitlines()
    rule_lines = [i for i, line in enumerate(lines, 1) if line.strip().startswith("snat_rule")]
    assert len(rule_lines) == 4
    assert e.where.endswith(f"seed.conf:{rule_lines[3]}")
    assert f"seed.conf:{rule_lines[1]}" in e.message


def test_seed_example_without_rule_4_passes():
    """The seed's example minus the failover rule is valid, with the seed's three rules."""
    cfg = parse_file(EXAMPLES / "seed-fixed.conf")
    assert [r.describe() for r in cfg.rules] == [
        "from 192.168.40.0/24 gw 1.1.3.1 oif eth2 snat_ip 1.1.3.71-1.1.3.73 algo random",
        "from 192.168.40.0/24 gw 1.1.2.1 oif eth1 snat_ip 1.1.2.71-1.1.2.73 algo sdh",
        "from 192.168.0.0/16 new_gw 1.1.2.1 snat_ip 1.1.2.71-1.1.2.73 algo sh",
    ]


def test_lab_and_failover_examples_differ_only_in_rule_2():
    """The failover config replaces rule 2 (same identity) with a new_gw to ISP 2."""
    lab, fo = parse_file(EXAMPLES / "lab.conf"), parse_file(EXAMPLES / "lab-failover.conf")
    assert [r.identity for r in lab.rules] == [r.identity for r in fo.rules]
    changed = [(a, b) for a, b in zip(lab.rules, fo.rules) if a != b]
    assert len(changed) == 1
    old, new = changed[0]
    assert old.oif == "eth1" and new.new_gw == IPv4Address("198.19.3.1") and str(new.pool.first) == "198.19.3.71"
    assert lab.settings == fo.settings and lab.settings.inside == ("lan40", "lan50")


def test_gw_and_new_gw_of_0_0_0_0_mean_unset_as_in_the_original():
    """`gw 0.0.0.0` is the original's "all ISPs" and `new_gw 0.0.0.0` "no override" (ipvsadm -S
    writes them so): such a rule is the same rule as one without them, hence a duplicate."""
    from snatgw.config.parse import parse_text
    from snatgw.errors import RuleError

    cfg = parse_text("virtual_server fwmark 1 {\n snat_rule { from 10.0.0.0/24 gw 0.0.0.0 new_gw 0.0.0.0 snat_ip 192.0.2.1 }\n}\n")
    (rule,) = cfg.rules
    assert rule.gw is None and rule.new_gw is None
    with pytest.raises(RuleError, match="duplicate"):
        parse_text("virtual_server fwmark 1 {\n snat_rule { from 10.0.0.0/24 snat_ip 192.0.2.1 }\n"
                   " snat_rule { from 10.0.0.0/24 to 0.0.0.0/0 gw 0.0.0.0 snat_ip 192.0.2.2 }\n}\n")


def test_a_net_parsed_again_is_the_same_and_a_bad_one_is_refused_every_time():
    """parse_net keeps its answers by text (a reload parses the same `from` nets again), never
    a refusal: the second parse of a bad net names its own file:line, and the kept answers stay
    bounded."""
    from snatgw import rules as R

    a = parse_text("virtual_server fwmark 1 {\n snat_rule { from 198.18.7.0/24 snat_ip 198.19.1.1 }\n}\n")
    b = parse_text("virtual_server fwmark 1 {\n\n snat_rule { from 198.18.7.0/24 snat_ip 198.19.1.2 }\n}\n")
    assert a.rules.rules[0].src == b.rules.rules[0].src == IPv4Network("198.18.7.0/24")
    for n in (2, 3):
        text = "virtual_server fwmark 1 {\n" + "\n" * n + " snat_rule { from 198.18.7.1/24 snat_ip 198.19.1.1 }\n}\n"
        with pytest.raises(ConfigError, match=f"<string>:{n + 2}.*host bits set"):
            parse_text(text)
    for n in (2, 3):  # pools are kept the same way
        text = "virtual_server fwmark 1 {\n" + "\n" * n + " snat_rule { from 198.18.7.0/24 snat_ip 198.19.1.9-198.19.1.1 }\n}\n"
        with pytest.raises(ConfigError, match=f"<string>:{n + 2}.*max ip smaller"):
            parse_text(text)
    assert R.Pool.parse("198.19.1.1-198.19.1.3") == R.Pool(IPv4Address("198.19.1.1"), IPv4Address("198.19.1.3"))
    for i in range(R._KEPT_MAX + 10):
        R.parse_net(str(IPv4Address(0xC6120000 + i)), "from")
        R.Pool.parse(str(IPv4Address(0xC6120000 + i)))
    assert len(R._NETS) <= R._KEPT_MAX and len(R._POOLS) <= R._KEPT_MAX


def test_rule_ids_stay_those_of_the_identity_text_as_str_writes_it():
    """A rule's id (crc32 of its identity text) names its running sessions across upgrades: the
    text built by inet_ntoa is the one str() of the addresses wrote, byte for byte, and the ids
    of these rules are the ones earlier versions gave them."""
    import zlib

    cfg = parse_text("virtual_server fwmark 1 {\n"
                     " snat_rule { from 198.18.0.0/15 snat_ip 198.19.1.1 }\n"
                     " snat_rule { from 10.1.2.3 to 0.0.0.0/1 gw 192.0.2.254 oif eth1 snat_ip 198.19.1.1 }\n"
                     " snat_rule { from 0.0.0.0/0 oif up0 snat_ip 198.19.1.1 }\n}\n")  # fmt: skip
    for r in cfg.rules:
        old = f"from {r.src} to {r.dst} gw {r.gw or '-'} oif {r.oif or '-'}"
        assert r.identity_text() == old and r.rule_id == (zlib.crc32(old.encode()) or 1)
    assert [r.identity_text() for r in cfg.rules.defined] == [
        "from 198.18.0.0/15 to 0.0.0.0/0 gw - oif -",
        "from 10.1.2.3/32 to 0.0.0.0/1 gw 192.0.2.254 oif eth1",
        "from 0.0.0.0/0 to 0.0.0.0/0 gw - oif up0"]
    with pytest.raises(ConfigError, match="duplicate rule"):
        parse_text("virtual_server fwmark 1 {\n snat_rule { from 10.1.2.3/32 gw 192.0.2.254 snat_ip 198.19.1.1 }\n"
                   " snat_rule { from 10.1.2.3 gw 192.0.2.254 snat_ip 198.19.1.2 }\n}\n")  # fmt: skip


def test_texts_kept_by_parse_net_and_pool_parse_are_short_whatever_the_input():
    """The answers kept by text hold short texts only: an adm command over the control socket
    may carry a `from` or snat_ip padded to megabytes (spaces, a prefix length's leading
    zeros), which parse; kept, each would pin its text in the daemon until 32,768 others came."""
    from snatgw import rules as R

    R._NETS.clear()
    R._POOLS.clear()
    for i in range(20):
        pad = " " * (100_000 + i)
        assert R.parse_net(pad + "198.18.0.0/" + "0" * 4000 + "15", "from") == IPv4Network("198.18.0.0/15")
        assert R.Pool.parse(pad + "198.19.1.1-198.19.1.3" + pad) == R.Pool(IPv4Address("198.19.1.1"),
                                                                            IPv4Address("198.19.1.3"))
    kept = sum(map(len, R._NETS)) + sum(map(len, R._POOLS))
    assert kept <= 64 * (len(R._NETS) + len(R._POOLS))  # was 20 texts of 100 kB each, kept


def test_a_prefix_length_of_thousands_of_digits_is_a_clear_error_or_its_value():
    """A prefix length is read without int()'s 4,300-digit limit (a ValueError, answered as an
    "internal error"): leading zeros are ignored as before, anything else over 32 is refused."""
    from snatgw.rules import parse_net

    assert parse_net("198.18.0.0/" + "0" * 5000 + "15", "from") == IPv4Network("198.18.0.0/15")
    with pytest.raises(RuleError, match="prefix length must be 0..32"):
        parse_net("198.18.0.0/" + "1" * 5000, "from")


def test_parsing_leaves_the_garbage_collector_as_it_found_it():
    """parse_text pauses cyclic collection while it parses (a reload's 150,000 tuples set off
    full collections of the daemon's heap); on success and on a refusal it is back as it was."""
    import gc

    good = "virtual_server fwmark 1 {\n snat_rule { from 198.18.7.0/24 snat_ip 198.19.1.1 }\n}\n"
    assert gc.isenabled()
    parse_text(good)
    assert gc.isenabled()
    with pytest.raises(ConfigError):
        parse_text(good.replace("snat_ip", "snat_ipp"))
    assert gc.isenabled()
    gc.disable()
    try:
        parse_text(good)
        assert not gc.isenabled()  # one that was off stays off
    finally:
        gc.enable()


@pytest.mark.parametrize("layout", ["one line", "own lines"])
@pytest.mark.parametrize("word, value", [("port_tries", "16"), ("refuse_icmp", "yes"), ("max_sessions", "9")])
def test_a_snatgw_setting_in_a_snat_rule_is_named_as_such(layout, word, value):
    """`snat_rule { from A snat_ip B port_tries 16 }`: the error names port_tries, the word that
    has no place there, and says it is a snatgw { } setting, on one line as on its own; on one
    line it used to blame snat_ip ("snat_ip: expected one value, got also 'port_tries'")."""
    sep = " " if layout == "one line" else "\n  "
    e = err("virtual_server fwmark 1 {\n  snat_rule {" + sep + "from 198.18.40.0/24" + sep
            + "snat_ip 198.19.2.71" + sep + f"{word} {value}" + sep + "}\n}\n")
    assert e.field == word
    assert e.where == ("t.conf:2" if layout == "one line" else "t.conf:5")
    assert "unknown snat_rule keyword" in e.message
    assert f"({word} is a setting of the snatgw {{ }} block, for every rule, not of one rule)" in e.message


@pytest.mark.parametrize("head", ["virtual_server fwmark 2", "virtual_server fwmark 0x1", "virtual_server 192.0.2.1 80"])
def test_a_snat_rule_in_another_virtual_server_is_an_error(head):
    """Rules in a virtual_server that is not `fwmark 1` (a typo, `fwmark 0x1`): refused at the
    rule's line, naming the block; before, the block was skipped with a warning and its rules
    with it (alone: the error said only "no snat_rule", naming no line)."""
    e = err(f"{head} {{\n  snat_rule {{ from 198.18.40.0/24 snat_ip 198.19.2.71 }}\n}}\n"
            "virtual_server fwmark 1 {\n  snat_rule { from 198.18.50.0/24 snat_ip 198.19.2.72 }\n}\n")
    assert (e.where, e.field) == ("t.conf:2", "snat_rule")
    assert f"in '{head}' (line 1): only `virtual_server fwmark 1` holds the SNAT rules" in e.message
    w: list[str] = []  # keepalived's own virtual servers, without snat_rule, are still skipped
    cfg = parse_text(f"{head} {{\n  lb_algo rr\n}}\nvirtual_server fwmark 1 {{\n"
                     "  snat_rule { from 198.18.50.0/24 snat_ip 198.19.2.72 }\n}\n", "t.conf", w)
    assert len(cfg.rules) == 1 and w == [f"t.conf:1: skipped keepalived block '{head}' (not the SNAT service)"]
