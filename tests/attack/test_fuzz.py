"""The issue-10 fuzz, both backends: hostile packets from inside (every protocol, ICMP type,
fragments, malformed headers, bogus ICMP errors, spoofed sources) with a leak watcher on both
uplinks, under `unmatched pass` and `unmatched drop`; and from outside (unsolicited packets to
inside and pool addresses, spoofed replies) counted on the inside hosts.  Sizes scale with
ATTACK_SCALE (make test: 700 + 350 packets per backend; make attack: 10x, the issue's 5,600)."""

import os
import random

import pytest

from snatgw.lab import clients as C
from snatgw.lab.demo import REF_RULES, config_text
from snatgw.lab.gateway import snatgw_json

from . import fuzz
from .conftest import FrameSender, scaled, settle

pytestmark = [pytest.mark.root, pytest.mark.attack, pytest.mark.lab]

SEED = int(os.environ.get("ATTACK_SEED", "10"))


def _fuzz_inside(agw, n: int, seed: int) -> tuple[list, int]:
    rng = random.Random(seed)
    lab = agw.lab
    tx = {node: FrameSender(lab, node, "eth0", "gw", "lan40" if node == "in40" else "lan50")
          for node in ("in40", "in50")}  # fmt: skip
    with agw.watch() as leaks:
        for i in range(n):
            node = "in40" if i % 3 else "in50"
            tx[node].send(fuzz.inside_packet(rng, node))
        settle(1.0)
    for t in tx.values():
        t.close()
    return leaks, sum(t.sent for t in tx.values())


@pytest.mark.parametrize("unmatched", ["pass", "drop"])
def test_fuzz_from_inside_leaks_no_private_source(agw, unmatched):
    """Every frame that leaves an uplink during the fuzz carries no inside address, neither as
    its source nor quoted in an ICMP error; traffic still flows afterwards."""
    text = config_text(REF_RULES).replace("unmatched pass", f"unmatched {unmatched}")
    agw.reload(text)
    try:
        n = scaled(700 if unmatched == "pass" else 350)
        leaks, sent = _fuzz_inside(agw, n, SEED + (unmatched == "drop"))
        reasons = agw.reasons()
    finally:
        agw.restore()
    print(f"{agw.backend} unmatched {unmatched}: {sent} sent, {agw.seen} frames seen on the uplinks, "
          f"{len(leaks)} leaks; reasons {sorted((k, v) for k, v in reasons.items() if v)}")
    assert sent >= n * 0.95
    assert agw.dropped == 0
    assert leaks == [], [str(f) for f in leaks[:10]]
    assert C.udp_echo(agw.lab, "in40", "203.0.113.10", src="198.18.40.10")["data"]


def test_fuzz_from_outside_reaches_no_inside_host(agw):
    """Unsolicited packets from both ISPs (to inside, pool and gateway addresses, transit, spoofed
    replies, malformed, fragments): none arrives at an inside host, and nothing with an inside
    address leaves an uplink meanwhile."""
    lab = agw.lab
    # no live session: a random "reply" that guessed a session's tuple would rightly get in
    # (as through any NAT); the inside fuzz before this test leaves thousands of them
    assert snatgw_json(lab, "flush", "--all") is not None
    got = {node: C.count_packets(lab, node, f"ip id {fuzz.MARK_ID}") for node in ("in40", "in50")}
    rng = random.Random(SEED + 7)
    n = scaled(350)
    tx = {isp: FrameSender(lab, isp, "up", "gw", dev) for isp, dev in (("isp1", "eth1"), ("isp2", "eth2"))}
    with agw.watch() as leaks:
        for i in range(n):
            tx["isp1" if i % 2 else "isp2"].send(fuzz.outside_packet(rng))
        settle(1.0)
    for t in tx.values():
        t.close()
    arrived = {node: read() for node, read in got.items()}
    print(f"{agw.backend}: {sum(t.sent for t in tx.values())} sent from outside, arrived inside {arrived}")
    assert arrived == {"in40": 0, "in50": 0}
    assert leaks == [], [str(f) for f in leaks[:10]]
