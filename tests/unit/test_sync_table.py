"""datapath/bpf/synctable.judge without a datapath: what a record must fit, and its cost with a
large rule set (it runs for every record the peer sends, its refresh walk included)."""

from __future__ import annotations

import socket
import time

from snatgw.config.parse import parse_text
from snatgw.daemon import synccodec as C
from snatgw.datapath.bpf import synctable as T
from snatgw.layout import IPPROTO_ICMP, IPPROTO_UDP, CtState

N = 10_000


def _config():
    rules = "".join(f"  snat_rule {{ from 10.{i // 256}.{i % 256}.0/24  snat_ip 198.19.{i // 250}.{i % 250 + 1} }}\n"
                    for i in range(N))  # fmt: skip
    return parse_text("snatgw {\n    inside lan0\n    outside wan0\n    port_range 5000-65535\n    backend bpf\n}\n"
                      "virtual_server fwmark 1 {\n" + rules + "}\n")  # fmt: skip


def test_judge_with_10000_rules_is_one_look_up_a_record_not_a_scan_of_every_pool():
    """The hairpin check (the remote one of our pool addresses) was a scan of every rule's pool,
    5 ms a record with 10,000 rules: a peer's walk of 10,000 sessions a minute of the worker.
    Each record is judged the same, in microseconds now."""
    cfg = _config()
    rules = {r.rule_id: r for r in cfg.rules}
    pools = {r.rule_id: r.pool for r in cfg.rules}
    rule = next(r for r in cfg.rules if str(r.src) == "10.0.7.0/24")

    def rec(remote: str, nport: int = 6000):
        return C.Record(C.OP_UPDATE, IPPROTO_UDP, int(CtState.UDP), 0, socket.inet_aton("10.0.7.9"), 40000,
                        socket.inet_aton(remote), 53, socket.inet_aton(str(rule.pool.first)), nport, rule.rule_id, 0)

    assert T.judge(rec("203.0.113.10"), rules, pools, cfg.settings) is not None
    for hairpin in ("198.19.0.1", "198.19.39.250", "198.19.20.7"):  # first, last, between: pool addresses
        assert T.judge(rec(hairpin), rules, pools, cfg.settings) is None, hairpin
    assert T.judge(rec("198.19.40.1"), rules, pools, cfg.settings) is not None  # past the last pool
    assert T.judge(rec("203.0.113.10", nport=80), rules, pools, cfg.settings) is None  # not in port_range
    t = time.perf_counter()
    for i in range(300):
        assert T.judge(rec(f"203.0.113.{i % 250 + 1}"), rules, pools, cfg.settings) is not None
    took = time.perf_counter() - t
    assert took < 0.3, f"{took:.2f} s for 300 records"


def test_judge_rejects_what_is_not_carried():
    """ICMP queries are not carried (docs/operations.md): the peer never sends them, and a record
    of one (a key holder's, another version's) is rejected like any record no rule allows."""
    cfg = _config()
    rules = {r.rule_id: r for r in cfg.rules}
    pools = {r.rule_id: r.pool for r in cfg.rules}
    rule = next(iter(cfg.rules))
    base = C.Record(C.OP_UPDATE, IPPROTO_UDP, int(CtState.UDP), 0, socket.inet_aton("10.0.0.9"), 40000,
                    socket.inet_aton("203.0.113.10"), 53, socket.inet_aton(str(rule.pool.first)), 6000, rule.rule_id, 0)
    assert T.judge(base, rules, pools, cfg.settings) is not None
    icmp = base._replace(proto=IPPROTO_ICMP, state=int(CtState.ICMP))
    assert T.judge(icmp, rules, pools, cfg.settings) is None
