"""nft render (no root): golden rule sets for the REF config, and the properties the backend
relies on - priority order, algo mapping, new_gw steering, stable marks, one transaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cases.corpus import FAILOVER_CONFIG_FULL, REF_CONFIG_FULL

from snatgw.config.parse import parse_text
from snatgw.config.schema import Settings
from snatgw.datapath.nft import render as R
from snatgw.errors import BackendError
from snatgw.layout import REFUSE_ICMP_PER_SEC, Algo
from snatgw.rules import Pool, Rule, RuleSet, parse_net

GOLDEN = Path(__file__).resolve().parents[1] / "nft" / "golden"
REGEN = os.environ.get("SNATGW_REGEN_GOLDEN") == "1"

REF, FAILOVER = REF_CONFIG_FULL, FAILOVER_CONFIG_FULL  # the shared REF topology's config


def _plan(text: str, **kw) -> R.Plan:
    cfg = parse_text(text, "ref.conf")
    return R.plan(cfg.rules, cfg.settings, **kw)


def _rule(src, pool, **kw) -> Rule:
    return Rule(src=parse_net(src, "from"), pool=Pool.parse(pool), **kw)


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; if on purpose: SNATGW_REGEN_GOLDEN=1 pytest {__file__}"


def test_ref_config_renders_the_golden_rule_set():
    """The REF config renders byte for byte as tests/nft/golden/ref.nft."""
    _golden("ref.nft", R.to_text(_plan(REF)))


def test_failover_config_renders_the_golden_rule_set_and_routing():
    """The failover variant renders as golden/failover.nft plus its policy routing."""
    p = _plan(FAILOVER)
    _golden("failover.nft", R.to_text(p) + "# routing\n" + R.routing_text(p))


def test_classify_chain_lists_rules_in_priority_order():
    """Exact matching tries the rules in RuleSet priority order, not definition order."""
    cfg = parse_text(
        "virtual_server fwmark 1 {\n"
        " snat_rule { from 198.18.0.0/16 snat_ip 198.19.2.71 }\n"
        " snat_rule { from 198.18.40.0/24 to 203.0.113.0/24 snat_ip 198.19.2.72 }\n"
        " snat_rule { from 198.18.40.0/24 oif eth1 snat_ip 198.19.2.73 }\n}\n"
    )
    p = R.plan(cfg.rules, cfg.settings)
    order = [r.text.split(" ct mark set")[0] for r in p.rules if r.chain == "classify"]
    assert order == [
        "ip saddr 198.18.40.0/24 ip daddr 203.0.113.0/24",
        'ip saddr 198.18.40.0/24 oifname "eth1"',
        "ip saddr 198.18.0.0/16",
    ]


@pytest.mark.parametrize(
    "algo,expect,absent",
    [
        (Algo.SDH, "snat ip to 198.19.2.71-198.19.2.73:5000-65535 comment", "persistent"),
        (Algo.SH, "snat ip to 198.19.2.71-198.19.2.73:5000-65535 persistent", "jhash"),
        (Algo.RANDOM, "jhash ip saddr . ip daddr . th sport mod 3 seed 0x0 map { 0 : 198.19.2.71 . 5000-65535",
         "persistent"),
    ],
)
def test_algo_maps_to_the_nearest_kernel_selection(algo, expect, absent):
    """sdh -> nf_nat default (hash src,dst), sh -> persistent (hash src), random -> jhash map."""
    p = R.plan(RuleSet([_rule("198.18.40.0/24", "198.19.2.71-198.19.2.73", algo=algo)]), Settings())
    nat = "\n".join(r.text for r in p.rules if r.chain == "nat_out")
    assert expect in nat
    assert absent not in nat


def test_single_address_pool_is_a_plain_snat_with_ports():
    """A one-address pool needs no hash and no persistent flag."""
    p = R.plan(RuleSet([_rule("198.18.40.0/24", "198.19.2.71", algo=Algo.SH)]), Settings(port_min=6000))
    nat = [r.text for r in p.rules if r.chain == "nat_out"]
    assert nat[0].split(" comment")[0].endswith('snat ip to 198.19.2.71:6000-65535')
    assert "persistent" not in nat[1]


def test_new_gw_rule_is_steered_before_routing_not_classified_after():
    """A new_gw rule marks in prerouting (meta + ct mark) and is absent from classify."""
    p = _plan(REF)
    steer = [r.text for r in p.rules if r.chain == "steer"]
    classify = [r.text for r in p.rules if r.chain == "classify"]
    assert any("ip saddr 198.18.0.0/16 fib daddr type unicast meta mark set" in t and "ct mark set" in t
               for t in steer)
    assert not any("198.18.0.0/16" in t for t in classify)
    (route,) = p.routes
    assert route.table == route.mark - R.MARK_TAG + R.RT_BASE
    cmds = route.commands()
    assert cmds[0][:5] == ["route", "replace", "default", "via", "198.19.2.1"]
    assert cmds[1][-2:] == ["proto", str(R.RT_PROTO)] and "fwmark" in cmds[1]


def test_steering_predicts_oif_with_fib_and_gw_with_its_device():
    """Before routing, oif is `fib daddr oifname`; a gw-only rule uses the device given for it."""
    cfg = parse_text("virtual_server fwmark 1 {\n"
                     " snat_rule { from 198.18.40.0/24 gw 198.19.2.1 new_gw 198.19.3.1 snat_ip 198.19.3.71 }\n}\n")
    with_dev = R.plan(cfg.rules, cfg.settings, {cfg.rules.rules[0].gw: "eth1"})
    without = R.plan(cfg.rules, cfg.settings)
    assert any('fib daddr oifname "eth1" fib daddr type unicast meta mark set' in r.text for r in with_dev.rules)
    assert not any("fib daddr oifname" in r.text for r in without.rules)
    assert any("ignores gw" in n for n in without.notes)


def test_marks_of_unchanged_rules_survive_adding_a_rule():
    """A rule keeps its slot (so its sessions' ct mark) when other rules come and go."""
    a = _rule("198.18.40.0/24", "198.19.2.71")
    b = _rule("198.18.50.0/24", "198.19.2.72")
    c = _rule("198.18.60.0/24", "198.19.2.73")
    s1 = R.assign_slots(RuleSet([a, b]))
    s2 = R.assign_slots(RuleSet([c, a, b]))
    assert s1[a.identity] == s2[a.identity] and s1[b.identity] == s2[b.identity]
    assert len(set(s2.values())) == 3


def test_more_rules_than_slots_is_refused():
    """The backend has 1000 mark/table slots; more rules is a clear error, not a collision."""
    rules = RuleSet(_rule(f"198.18.{i // 250}.{i % 250}/32", "198.19.2.71") for i in range(R.SLOTS + 1))
    with pytest.raises(BackendError, match="at most 1000 rules"):
        R.assign_slots(rules)


def test_json_is_one_transaction_flushing_the_table_first():
    """add table, flush table, then definitions; stale counters deleted in the same batch."""
    p = _plan(REF)
    cmds = R.to_json(p, stale_counters=("rule_deadbeef", "no_session"))["nftables"]
    assert cmds[0] == {"add": {"table": {"family": "ip", "name": "snatgw"}}}
    assert cmds[1] == {"flush": {"table": {"family": "ip", "name": "snatgw"}}}
    deletes = [c["delete"]["counter"]["name"] for c in cmds if "delete" in c]
    assert deletes == ["rule_deadbeef"]
    assert all(c["add"]["rule"]["table"] == "snatgw" for c in cmds if "add" in c and "rule" in c["add"])


def test_unmatched_drop_and_inside_interfaces_are_rendered():
    """`unmatched drop` adds a counted drop; inside interfaces restrict matching by iifname."""
    cfg = parse_text("snatgw {\n inside lan40\n unmatched drop\n}\n"
                     "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    p = R.plan(cfg.rules, cfg.settings)
    fwd = [r.text for r in p.rules if r.chain == "forward"]
    assert any('iifname "lan40" counter name "unmatched" drop' in t for t in fwd)
    assert not any("unmatched" in r.text for r in _plan(REF).rules)


def test_text_and_json_carry_the_same_statements():
    """Each rule's text and JSON come from one builder: same count, same chains."""
    p = _plan(FAILOVER)
    js = [c["add"]["rule"] for c in R.to_json(p)["nftables"] if "add" in c and "rule" in c["add"]]
    assert [j["chain"] for j in js] == [r.chain for r in p.rules]
    assert [len(j["expr"]) for j in js] == [len(r.pieces) for r in p.rules]


TCP_DEFAULT = "tcp_7440_240_240_240_240_240_120_10"


def test_settings_timeouts_become_ct_timeout_objects_named_by_value():
    """Every TCP state conntrack shares a name with, and UDP, are ct timeout objects set on new
    flows, from the settings (defaults: the spec's RFC-floored table); the name carries the
    values, so a reload that changes one makes a new object and deletes the old one."""
    p = _plan(REF)
    assert [t[0] for t in p.timeouts] == [TCP_DEFAULT, "udp_300"]
    assert p.timeouts[0][2] == {"established": 7440, "syn_sent": 240, "syn_recv": 240, "fin_wait": 240,
                                "close_wait": 240, "last_ack": 240, "time_wait": 120, "close": 10}
    assert any(f'ct timeout set "{TCP_DEFAULT}"' in r.text for r in p.rules if r.chain == "steer")
    assert "close_wait: 240" in R.timeouts_text(p)
    cfg = parse_text(REF.replace("outside eth1 eth2", "outside eth1 eth2\n    timeout tcp_close_wait 600"))
    q = R.plan(cfg.rules, cfg.settings)
    assert q.timeouts[0][0] == "tcp_7440_240_240_240_600_240_120_10"
    assert q.timeouts[0][2]["close_wait"] == 600
    cmds = R.to_json(q, stale_timeouts=(TCP_DEFAULT, "udp_300"), with_timeouts=False)["nftables"]
    assert [c["delete"]["ct timeout"]["name"] for c in cmds if "delete" in c] == [TCP_DEFAULT]
    assert not any("add" in c and "ct timeout" in c["add"] for c in cmds)


def test_conntrack_text_gre_timeout_token_does_not_overwrite_the_timeout():
    """`timeout=30, stream_timeout=180` on a GRE line (issue 10's crash) leaves timeout an int."""
    from snatgw.datapath.nft.backend import parse_conntrack

    line = ("ipv4     2 gre      47 29 timeout=30, stream_timeout=180 src=198.18.40.10 dst=203.0.113.10 "
            "srckey=0x0 dstkey=0x0 src=203.0.113.10 dst=198.19.2.71 srckey=0x0 dstkey=0x0 mark=1397161985 "
            "zone=0 use=2")
    (d,) = parse_conntrack(line)
    assert (d["proto"], d["timeout"], d["mark"], d["rdst"]) == ("gre", 29, 1397161985, "198.19.2.71")


def test_edge_guards_follow_the_settings():
    """The leak guard, the inbound drop and the anti-spoofing rules exist with inside/outside
    devices; `inbound routed` removes the inbound drop; sources in a `from` net leave only as an address of the uplink they leave by."""
    text = R.to_text(_plan(REF))
    assert 'counter name "inbound" drop' in text and 'fib saddr . iif oif missing counter name "spoofed" drop' in text
    assert ('oifname { "eth1", "eth2" } ip saddr 198.18.0.0/16 fib saddr . oif type != local counter name "leak" drop'
            in text)
    routed = _plan(REF.replace("outside eth1 eth2", "outside eth1 eth2\n    inbound routed"))
    assert '"inbound" drop' not in R.to_text(routed)
    bare = R.to_text(_plan("virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n"))
    assert not any(f'counter name "{c}"' in bare for c in ("inbound", "spoofed", "leak"))


def test_the_leak_guard_table_drops_from_sources_leaving_uplinks_not_as_their_own_address():
    """datapath/bpf/guard.py: one stateless rule over the rules' `from` nets and the uplinks;
    without nets (allow_empty) the table stays, empty."""
    from snatgw.datapath.bpf.guard import guard_text

    text = guard_text(["198.18.50.0/24", "198.18.40.0/24", "198.18.40.0/24"], ("eth2", "eth1"))
    assert "add table ip snatgw_guard" in text and "flush table ip snatgw_guard" in text
    (rule,) = [line for line in text.splitlines() if line.startswith("add rule")]
    assert "oifname { eth1, eth2 } ip saddr { 198.18.40.0/24, 198.18.50.0/24 }" in rule
    assert "fib saddr . oif type != local counter name \"leak\" drop" in rule
    assert "add counter ip snatgw_guard leak" in text  # named: stats read it by netlink, no process
    assert not [line for line in guard_text([], ("eth1",)).splitlines() if line.startswith("add rule")]
    # the bpf backend's: the pool prefixes its egress program passes at once are let by first
    (rule,) = [line for line in guard_text(["0.0.0.0/0"], ("eth1",), ["198.19.2.80/31", "198.19.2.83/32",
                                                                       "198.19.2.81/32"]).splitlines()
               if line.startswith("add rule")]  # fmt: skip
    assert "ip saddr { 0.0.0.0/0 } ip saddr != { 198.19.2.80/31, 198.19.2.83/32 } fib saddr . oif type != local" in rule


def test_inside_device_ids_are_stable_distinct_and_kept_out_of_every_rule_match():
    """Edge invariant 3 on nft: each inside device gets a distinct id 1..63 in ct mark bits
    10-15 (from its name, not its place in the list), clear of the rule slots' bits; a new flow
    from inside gets it once, an inside ICMP error related to a connection with another id is
    dropped (counted no_session), and every reader of the rule's mark masks the id out."""
    ids = R.device_ids(["lan50", "lan40"])
    assert ids == R.device_ids(["lan40", "lan50", "lan40"])  # order and repeats do not matter
    assert ids["lan40"] == R.device_ids(["lan40"])["lan40"]  # nor do the other devices
    many = R.device_ids([f"d{i}" for i in range(70)])
    assert len(many) == 63 and sorted(many.values()) == list(range(1, 64))
    assert R.SLOTS - 1 <= R.RULE_MASK & 0xFFFF and not R.RULE_MASK & R.DEV_MASK
    for dev_id in many.values():
        m = R.mark_of(R.SLOTS - 1) | dev_id << 10
        assert R.rule_mark(m) == R.mark_of(R.SLOTS - 1) and m & R.MARK_MASK == R.MARK_TAG
    text = R.to_text(_plan(REF))
    assert "\tct mark 0x" not in text and " meta mark set ct mark comment" not in text
    assert text.count("ct mark and 0xffff03ff == 0x") == 6  # nat_out: two per rule
    for dev, i in ids.items():
        assert f'iifname "{dev}" ct mark set ct mark or 0x{i << 10:08x} return' in text
        assert f'iifname "{dev}" ct mark and 0x0000fc00 == 0x{i << 10:08x} return' in text
    assert 'counter name "no_session" drop comment "about a connection of another inside device"' in text
    bare = R.to_text(_plan(REF.replace("inside lan40 lan50", "")))  # no inside devices: no ids
    assert "jump mark_dev" not in bare and "jump err_dev" not in bare and "ct mark set ct mark or" not in bare


def test_refuse_icmp_answers_a_host_over_its_limit_with_host_unreachable_rate_limited():
    """max_sessions_per_host with refuse_icmp yes: the host-limit rule counts and jumps to
    refuse_host, which rejects with ICMP host unreachable at most REFUSE_ICMP_PER_SEC a second
    and drops beyond that; without refuse_icmp the host-limit rule drops and refuse_host is
    empty.  Text and JSON say the same."""
    conf = ("snatgw {\n inside lan40\n max_sessions_per_host 60\n%s}\n"
            "virtual_server fwmark 1 {\n snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71 }\n}\n")
    on, off = (R.plan(c.rules, c.settings) for c in (parse_text(conf % " refuse_icmp yes\n"), parse_text(conf % "")))
    def stmts(r):
        return " ".join(x[0] for x in r.pieces)

    limit = [stmts(r) for r in on.rules if "host_limit" in r.text]
    assert len(limit) == 1 and limit[0].endswith('counter name "host_limit" jump refuse_host'), limit
    assert [stmts(r) for r in on.rules if r.chain == "refuse_host"] == [
        f"limit rate {REFUSE_ICMP_PER_SEC}/second reject with icmp type host-unreachable", "drop"]
    js = [c["add"]["rule"] for c in R.to_json(on)["nftables"] if "add" in c and "rule" in c["add"]]
    assert [j["expr"] for j in js if j["chain"] == "refuse_host"] == [
        [{"limit": {"rate": REFUSE_ICMP_PER_SEC, "per": "second"}}, {"reject": {"type": "icmp", "expr": "host-unreachable"}}],
        [{"drop": None}]]  # fmt: skip
    assert [stmts(r) for r in off.rules if "host_limit" in r.text][0].endswith('counter name "host_limit" drop')
    assert not [r for r in off.rules if r.chain == "refuse_host"]


def test_the_warning_of_changed_host_limits_names_ten_rules_and_counts_the_rest(caplog):
    """A reload that changes max_sessions_per_host for 10,000 rules: the nft backend's warning
    (limits_counted_afresh: the log line and the reload's answer) names the first 10 rules and
    says how many more, as the daemon's other warnings do; on main it named all 10,000 in one
    line (~280 kB).  Up to 10 changed rules are all named, with no "more"."""
    import logging
    from dataclasses import replace

    from snatgw.datapath.nft.backend import limits_counted_afresh

    rules = [f"  snat_rule {{ from 10.{i >> 8}.{i & 255}.0/24  oif eth1  snat_ip 198.19.2.71 }}"
             for i in range(10_000)]  # fmt: skip
    text = "snatgw {\n  outside eth1\n  max_sessions_per_host 20\n}\nvirtual_server fwmark 1 {\n%s\n}\n"
    old = parse_text(text % "\n".join(rules), "big.conf")
    new = replace(old, settings=replace(old.settings, max_sessions_per_host=30))
    with caplog.at_level(logging.WARNING, logger="snatgw.nft"):
        (w,) = limits_counted_afresh(old, new)
    assert len(w) < 2000, len(w)
    assert w.startswith("max_sessions_per_host changed (big.conf:6: 20 -> 30; big.conf:7: 20 -> 30; ")
    assert "big.conf:15: 20 -> 30; ... and 9990 more): the kernel counts" in w and "big.conf:16:" not in w
    assert w in caplog.text and len(caplog.text) < 2000
    few = replace(old, rules=RuleSet(list(old.rules.defined)[:10]))
    (w,) = limits_counted_afresh(few, replace(few, settings=new.settings))
    assert "big.conf:15: 20 -> 30): the kernel counts" in w and "more" not in w
