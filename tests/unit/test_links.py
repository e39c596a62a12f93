"""Link health and failover without I/O: the `link` config block (errors name file:line), which
rules a link owns and how they run on the backup, the LinkHealth state machine on an injected
clock (dead timer, carrier, rise, hold, flaps), and Service.set_link applying the move."""

from __future__ import annotations

from pathlib import Path

import pytest

from snatgw.config.links import failover, link_rules
from snatgw.config.parse import parse_text
from snatgw.daemon.linkstate import FAILED, RECOVERING, UP, LinkHealth
from snatgw.errors import ConfigError

LAB = (Path(__file__).resolve().parents[2] / "examples" / "lab.conf").read_text()
LINK = """
link isp1 {
    gw 198.19.2.1
    oif eth1
    probe 203.0.113.10 198.51.100.10
    interval 0.5  fall 3  rise 2  hold 10
    backup_gw 198.19.3.1
    backup_snat_ip 198.19.3.71-198.19.3.73
}
"""


def test_link_block_parses_with_defaults_and_values():
    """Every keyword lands in Link; omitted ones take the defaults; the block's line is kept."""
    cfg = parse_text(LAB + LINK + "link isp2 { gw 198.19.3.1 probe 203.0.113.10 backup_gw 198.19.2.1 }\n", "c.conf")
    a, b = cfg.links
    assert (a.name, str(a.gw), a.oif, [str(p) for p in a.probe], a.interval, a.fall, a.rise, a.hold) == (
        "isp1", "198.19.2.1", "eth1", ["203.0.113.10", "198.51.100.10"], 0.5, 3, 2, 10.0)
    assert str(a.backup_pool) == "198.19.3.71-198.19.3.73" and a.dead_after == 1.5 and a.where.startswith("c.conf:")
    assert (b.oif, b.source, b.interval, b.fall, b.rise, b.hold, b.backup_pool) == (None, None, 1.0, 3, 3, 30.0, None)


@pytest.mark.parametrize("block,where,msg", [
    ("link isp1 { gw 198.19.2.1 probe 203.0.113.10 }", 1, "link isp1: missing backup_gw (required)"),
    ("link isp1 {\n gw 198.19.2.1\n probe 203.0.113.10\n backup_gw 198.19.2.1\n}", 4,
     "backup_gw: is the link's own gw 198.19.2.1"),
    ("link isp1 {\n gw 198.19.2.1\n probe 203.0.113\n backup_gw 198.19.3.1\n}", 3, "probe: expected an IPv4 address"),
    ("link isp1 {\n gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1\n interval 0.01\n}", 3,
     "interval: expected seconds, a number from 0.05 to 60"),
    ("link isp1 {\n gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1\n fall 2.5\n}", 3,
     "fall: expected an integer from 1 to 100"),
    ("link isp1 {\n gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1\n backup_snat_ip 198.19.3.9-198.19.3.1\n}",
     3, "max ip smaller than min ip"),
    ("link isp1 {\n gw 198.19.2.1 probe 1.1.1.1 2.2.2.2 3.3.3.3 4.4.4.4 5.5.5.5 6.6.6.6 7.7.7.7 8.8.8.8 9.9.9.9\n}",
     2, "at most 8 probe targets"),
    ("link isp1 {\n gw 198.19.2.1 backup_gw 198.19.3.1\n probe 203.0.113.10 198.51.100.10 203.0.113.10\n}", 3,
     "probe: 203.0.113.10 is named twice"),
    ("link isp1 {\n gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1\n weight 3\n}", 3, "unknown link keyword"),
    ("link { gw 198.19.2.1 }", 1, "expected one name"),
    ("link isp1 { gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1 }\n"
     "link isp1 { gw 198.19.3.1 probe 203.0.113.10 backup_gw 198.19.2.1 }", 2, "a second link 'isp1'"),
    ("link a { gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1 }\n"
     "link b { gw 198.19.2.1 probe 203.0.113.10 backup_gw 198.19.3.1 }", 2, "198.19.2.1 is already link a's gw"),
])
def test_bad_link_blocks_are_refused_naming_file_line_and_field(block, where, msg):
    """Each mistake is a ConfigError at the right line of the link block."""
    base = LAB.count("\n")
    with pytest.raises(ConfigError) as e:
        parse_text(LAB + block + "\n", "c.conf")
    assert msg in str(e.value) and f"c.conf:{base + where}:" in str(e.value)


def test_a_link_owns_rules_by_next_hop_and_failover_moves_only_those():
    """isp1 owns the gw-198.19.2.1 rule and the new_gw-198.19.2.1 rule, not the eth2 rule; while it
    is down they get new_gw 198.19.3.1 and ISP2's pool, same identity, same priority."""
    cfg = parse_text(LAB + LINK, "c.conf")
    (lk,) = cfg.links
    owned = link_rules(lk, cfg.rules)
    assert [r.describe() for r in owned] == [
        "from 198.18.40.0/24 gw 198.19.2.1 oif eth1 snat_ip 198.19.2.71-198.19.2.73 algo sdh",
        "from 198.18.0.0/16 new_gw 198.19.2.1 snat_ip 198.19.2.71-198.19.2.73 algo sh"]
    moved = failover(cfg.rules, cfg.links, {"isp1"})
    assert [r.rule_id for r in moved] == [r.rule_id for r in cfg.rules]
    assert [str(r.new_gw) for r in moved] == ["None", "198.19.3.1", "198.19.3.1"]
    assert [str(r.pool) for r in moved][1:] == ["198.19.3.71-198.19.3.73"] * 2
    assert failover(cfg.rules, cfg.links, set()) is cfg.rules and failover(cfg.rules, cfg.links, {"isp9"}) == cfg.rules


def health(**kw) -> LinkHealth:
    return LinkHealth("isp1", kw.pop("interval", 1.0), kw.pop("fall", 3), kw.pop("rise", 2), kw.pop("hold", 10.0),
                      kw.pop("now", 0.0))


def test_dead_timer_fails_the_link_fall_intervals_after_the_last_reply():
    """Replies keep it up; with none for fall x interval it fails, not a moment before."""
    h = health()
    for t in range(5):
        assert h.sent(float(t)) is None
        assert h.reply(h.round, t + 0.01) is None
    assert h.sent(5.0) is None and h.check(7.0) is None  # last reply 4.01: dead at 7.01
    assert h.check(7.02) == FAILED and h.on_backup and "no probe reply for 3.01" in h.why


def test_carrier_loss_fails_at_once_and_recovery_needs_rise_rounds_then_hold():
    """No carrier: failed now.  Carrier back is not enough: rise answered rounds in a row make it
    recovering (still on the backup), and hold seconds later it is up."""
    h = health(rise=2, hold=10.0)
    assert h.set_carrier(False, 1.0) == FAILED
    assert h.set_carrier(True, 2.0) is None and h.state == FAILED
    h.sent(2.0)
    assert h.reply(h.round, 2.1) is None
    h.sent(3.0)
    assert h.reply(h.round, 3.1) == RECOVERING and h.on_backup
    for t in range(4, 14):
        assert h.sent(float(t)) is None
        assert h.reply(h.round, t + 0.05) is None  # still recovering: hold from 3.1
    assert h.check(13.09) is None and h.check(13.1) == UP and not h.on_backup


def test_a_missed_round_restarts_the_rise_count():
    """answered, missed, answered: still failed with rise 2."""
    h = health(rise=2)
    h.set_carrier(False, 0.0)
    h.set_carrier(True, 0.5)
    h.sent(1.0)
    h.reply(h.round, 1.1)
    h.sent(2.0)  # round 2: no reply
    h.sent(3.0)
    assert h.reply(h.round, 3.1) is None and h.state == FAILED
    h.sent(4.0)
    assert h.reply(h.round, 4.1) == RECOVERING


def test_a_flap_during_hold_fails_again_and_restarts_the_hold():
    """Recovering, then silence: failed again (the rules never went back)."""
    h = health(rise=1, hold=10.0)
    h.set_carrier(False, 0.0)
    h.set_carrier(True, 0.1)
    h.sent(1.0)
    assert h.reply(h.round, 1.1) == RECOVERING
    assert h.check(4.2) == FAILED and h.on_backup


def test_replies_to_unknown_or_duplicate_rounds_change_nothing():
    """A reply for a round not sent yet (forged) or twice for one round counts once."""
    h = health(rise=2)
    h.set_carrier(False, 0.0)
    h.set_carrier(True, 0.1)
    h.sent(1.0)
    assert h.reply(h.round + 5, 1.1) is None and h.reply(0, 1.1) is None and h.streak == 0
    h.reply(h.round, 1.2)
    assert h.reply(h.round, 1.3) is None and h.streak == 1


def test_service_set_link_applies_the_backup_rules_and_back(running):
    """set_link(isp1, True) applies the failover rules to the backend (rules op shows them, the
    edited rule's session goes); set_link(isp1, False) restores the file's rules."""
    cfg = parse_text(LAB + LINK, "c.conf")
    running.service.config = cfg
    running.syn()  # rule 2 (isp1), ISP1 address
    assert running.service.set_link("isp1", True, "test") is True
    r = running.req(op="rules")
    assert r["links_on_backup"] == ["isp1"]
    assert [x["new_gw"] for x in r["rules"]] == [None, "198.19.3.1", "198.19.3.1"]
    assert running.backend.config.rules == failover(cfg.rules, cfg.links, {"isp1"})
    assert running.req(op="sessions")["sessions"] == []
    assert running.service.set_link("isp1", True, "again") is False  # nothing new to apply
    assert running.service.set_link("isp1", False, "back") is True
    assert running.backend.config.rules == cfg.rules and running.req(op="rules")["links_on_backup"] == []
    assert any("link_failover" in line and "link=isp1" in line for line in running.log.lines)


def test_links_are_written_back_and_parse_to_the_same_links():
    """render_config writes every link block; parsing the text gives equal links (where aside)."""
    from dataclasses import replace

    from snatgw.config.parse import render_config

    cfg = parse_text(LAB + LINK + "link isp2 { gw 198.19.3.1 source 198.19.3.2 probe 203.0.113.10 "
                     "interval 2.5 backup_gw 198.19.2.1 }\n", "c.conf")
    again = parse_text(render_config(cfg), "r.conf")
    assert [replace(lk, where=None) for lk in again.links] == [replace(lk, where=None) for lk in cfg.links]
    assert again.rules == cfg.rules


def test_a_link_going_down_logs_warnings_and_coming_back_logs_info(running):
    """The level of each link event: failed and failover are warnings (counted as such by status
    and log_events_total{level}); recovering, up and restored are good news: info.  The
    LinkMonitor is driven through carrier loss, rise and hold on an injected clock, its moves
    applied by the Service as the daemon's worker does."""
    import io
    import json

    from snatgw.daemon.links import LinkMonitor
    from snatgw.daemon.log import Log

    cfg = parse_text(LAB + LINK.replace("hold 10", "hold 1"), "c.conf")
    running.service.config = cfg
    log = Log(json_lines=True, stream=io.StringIO())
    log.lines = []
    running.service.log = log
    now = [0.0]
    mon = LinkMonitor(cfg.links, lambda name, on_backup, why: running.service.set_link(name, on_backup, why), log,
                      clock=lambda: now[0])
    h = mon.health["isp1"]
    mon.on_carrier([("eth1", False)])  # failed: rules to the backup
    mon.on_carrier([("eth1", True)])
    for t in (1.0, 2.0):  # rise 2: recovering
        now[0] = t
        h.sent(t)
        mon._after("isp1", h.reply(h.round, t + 0.01))
    now[0] = 3.1
    mon._check("isp1")  # hold over: up, rules back
    levels = {r["event"]: r["level"] for r in map(json.loads, log.lines)
              if r["event"].startswith("link_") and r["event"] != "link_probe_unavailable"}  # no eth1 here
    assert levels == {"link_carrier": "info", "link_failed": "warning", "link_failover": "warning",
                      "link_recovering": "info", "link_up": "info", "link_restored": "info"}
