"""The NAT behaviour options (issue 12): `mapping`, `filtering`, `port_preserve` in the config
(parse, errors with file:line: field, round trip, the nft backend's refusal and warnings) and
the port sequence of `port_preserve yes`."""

from ipaddress import IPv4Address

import pytest

from snatgw.cli.commands.check import config_warnings
from snatgw.config.parse import parse_text, render_config
from snatgw.errors import BackendError, ConfigError
from snatgw.rules import port_candidates, port_seed

HEAD = "snatgw {\n  inside lan40\n  outside eth1\n%s}\nvirtual_server fwmark 1 {\n"


def conf(rule: str, settings: str = "", more: str = "") -> str:
    return HEAD % settings + f"  snat_rule {{ {rule} }}\n{more}}}\n"


EIM = "from 198.18.40.0/24 snat_ip 198.19.2.71 algo sh mapping endpoint-independent"


def test_options_parse_and_round_trip():
    cfg = parse_text(conf(EIM + " filtering address-dependent port_preserve yes", "  port_preserve yes\n"), "t.conf")
    r = cfg.rules.defined[0]
    assert (r.eim, r.filter_mode, r.port_preserve, cfg.settings.port_preserve) == (True, "address-dependent", True, True)
    again = parse_text(render_config(cfg), "t2.conf")
    assert again.rules == cfg.rules and again.settings == cfg.settings
    assert "mapping endpoint-independent" in render_config(cfg)
    plain = parse_text(conf("from 198.18.40.0/24 snat_ip 198.19.2.71"), "t.conf").rules.defined[0]
    assert (plain.eim, plain.filter_mode, plain.port_preserve) == (False, "address-port-dependent", None)


@pytest.mark.parametrize("rule, settings, want", [
    ("from 198.18.40.0/24 snat_ip 198.19.2.71 algo sdh mapping endpoint-independent", "",
     "t.conf:6: mapping: expected algo sh with mapping endpoint-independent"),
    ("from 198.18.40.0/24 snat_ip 198.19.2.71 mapping endpoint-independent", "",
     "t.conf:6: mapping: expected algo sh"),  # the default algo is sdh
    ("from 198.18.40.0/24 snat_ip 198.19.2.71 algo sh filtering endpoint-independent", "",
     "t.conf:6: filtering: filtering endpoint-independent expects mapping endpoint-independent"),
    (EIM.replace("endpoint-independent", "endpoint-indep"), "",
     "t.conf:6: mapping: expected endpoint-dependent or endpoint-independent, got 'endpoint-indep'"),
    (EIM + " filtering open", "", "t.conf:6: filtering: expected address-port-dependent or address-dependent or"),
    (EIM + " port_preserve maybe", "", "t.conf:6: port_preserve: expected yes or no, got 'maybe'"),
    ("from 198.18.40.0/24 snat_ip 198.19.2.71", "  port_preserve 1\n", "t.conf:4: port_preserve: expected"),
    (EIM + " filtering endpoint-independent", "  backend nft\n",
     "t.conf:7: filtering: expected address-port-dependent with backend nft, got endpoint-independent"),
    (EIM + " filtering address-dependent", "  backend nft\n",
     "t.conf:7: filtering: expected address-port-dependent with backend nft, got address-dependent"),
])  # fmt: skip
def test_bad_options_are_refused_with_file_line_field(rule, settings, want):
    with pytest.raises(ConfigError) as e:
        parse_text(conf(rule, settings), "t.conf")
    assert str(e.value).startswith(want), str(e.value)


def test_nft_backend_refuses_filtering_it_cannot_honour():
    """The nft renderer refuses too (a backend forced on the command line, an adm change)."""
    from snatgw.datapath.nft.render import assign_slots

    cfg = parse_text(conf(EIM + " filtering endpoint-independent"), "t.conf")
    with pytest.raises(BackendError, match="filtering: expected address-port-dependent with backend nft"):
        assign_slots(cfg.rules)
    assign_slots(parse_text(conf(EIM), "t.conf").rules)  # plain EIM: what netfilter does anyway


def test_check_warns_about_nft_eim_and_shared_pools():
    shared = "  snat_rule { from 198.18.50.0/24 snat_ip 198.19.2.70-198.19.2.72 }\n"
    w = config_warnings(parse_text(conf(EIM, "  backend nft\n", shared), "t.conf"))
    assert any("t.conf:7: mapping: with backend nft, endpoint-independent is what netfilter" in x for x in w)
    assert any("t.conf:7: snat_ip: 198.19.2.71 shares addresses with the endpoint-dependent rule at t.conf:8" in x
               for x in w)  # fmt: skip
    own = "  snat_rule { from 198.18.50.0/24 snat_ip 198.19.2.72 }\n"
    assert config_warnings(parse_text(conf(EIM, "", own), "t.conf")) == []


def test_port_preserve_tries_the_port_itself_first_then_the_usual_sequence():
    seed = port_seed(IPv4Address("198.18.40.10"), IPv4Address("203.0.113.10"), 40000, 80, 6)
    usual = list(port_candidates(40000, 5000, 65535, 128, seed))
    kept = list(port_candidates(40000, 5000, 65535, 128, seed, preserve=True))
    assert kept[0] == 40000 and kept[1:] == [p for p in usual[:127]]  # 40000 is not among them here
    assert len(set(kept)) == len(kept) == 128
    # outside the range: exactly the usual sequence (the original's first candidate first)
    assert list(port_candidates(1024, 5000, 65535, 8, seed, preserve=True)) == list(
        port_candidates(1024, 5000, 65535, 8, seed))
    # a small range, every port once: the preserved port is not tried twice
    for sport in range(100, 116):
        full = list(port_candidates(sport, 100, 115, 16, seed, preserve=True))
        assert full[0] == sport and sorted(full) == list(range(100, 116))


def test_adm_edit_keeps_the_options_ipvsadm_cannot_say():
    """`snatgw adm -k` (ipvsadm's edit) has no words for mapping, filtering, port_preserve: an
    edit keeps the rule's own; an edit that contradicts them (algo sdh) is refused, nothing
    changed."""
    import shlex

    from snatgw.config.adm import AdmRefused, AdmTable, parse_args

    rule = parse_text(conf(EIM + " filtering endpoint-independent port_preserve yes"), "t.conf").rules.defined[0]
    t = AdmTable(True, (rule,))
    t2 = t.apply(parse_args(shlex.split("-k -f 1 -F 198.18.40.0/24 -U 198.19.2.72 -O sh")))
    (r,) = t2.rules
    assert (str(r.pool), r.mapping, r.filtering, r.port_preserve) == (
        "198.19.2.72-198.19.2.72", "endpoint-independent", "endpoint-independent", True)
    with pytest.raises(AdmRefused, match="mapping: expected algo sh"):
        t.apply(parse_args(shlex.split("-k -f 1 -F 198.18.40.0/24 -U 198.19.2.72 -O sdh")))
