"""Pure parts of the benchmark: spread, per-round cost pairing, ratios, trafgen configs,
counter and /proc/stat parsing, generated rule sets, flow-pattern sizing."""

import json
from collections import Counter
from ipaddress import IPv4Address

import pytest

from snatgw.bench import gateways, scenarios, stats, traffic
from snatgw.bench.runner import rotated
from snatgw.config.parse import parse_text
from snatgw.rules import Route


def rec(scenario, config, rnd, value, cpu_ns=None, status="ok", metric="pps"):
    return {"scenario": scenario, "config": config, "round": rnd, "status": status, "metric": metric,
            "value": value, "cpu_ns": cpu_ns}


def test_spread_gives_median_min_max_and_quartiles():
    """Spread of 1..5 is median 3, min 1, max 5, quartiles 2 and 4."""
    s = stats.spread([5, 1, 3, 2, 4])
    assert (s.n, s.median, s.min, s.max, s.q1, s.q3) == (5, 3, 1, 5, 2, 4)


def test_spread_of_nothing_is_none_and_of_one_value_is_flat():
    """No values give no spread; one value is its own median and quartiles."""
    assert stats.spread([]) is None
    s = stats.spread([7.0])
    assert (s.median, s.q1, s.q3, s.rel_spread) == (7.0, 7.0, 7.0, 0.0)


def test_cost_is_inverse_pps_minus_drop_baseline():
    """1 Mpps against a 2 Mpps drop baseline costs 500 ns per packet."""
    assert stats.cost_ns(1e6, 2e6) == pytest.approx(500.0)
    assert stats.cost_ns(None, 2e6) is None and stats.cost_ns(1e6, 0) is None


def test_costs_are_paired_with_the_drop_run_of_the_same_round():
    """Each round's cost uses that round's drop figure, not a pooled one."""
    recs = [rec("udp-1flow", "drop", 0, 2e6, 500), rec("udp-1flow", "drop", 1, 1e6, 1000),
            rec("udp-1flow", "forward", 0, 1e6, 1000), rec("udp-1flow", "forward", 1, 0.5e6, 2000)]
    e = stats.summarize(recs)[("udp-1flow", "forward")]
    assert e["cost_ns"].min == pytest.approx(500) and e["cost_ns"].max == pytest.approx(1000)
    assert e["cpu_cost_ns"].median == pytest.approx(750)


def test_rule_scaling_costs_use_the_one_rule_drop_baseline():
    """rules-N records are costed against the drop run recorded as rules-1."""
    recs = [rec("rules-1", "drop", 0, 2e6), rec("rules-10000", "snatgw-bpf", 0, 1e6)]
    assert stats.summarize(recs)[("rules-10000", "snatgw-bpf")]["cost_ns"].median == pytest.approx(500)


def test_unavailable_config_keeps_its_reason():
    """A configuration with no successful round reports its status and reason."""
    recs = [rec("udp-1flow", "snatgw-bpf", 0, None, status="n/a") | {"reason": "no backend"}]
    e = stats.summarize(recs)[("udp-1flow", "snatgw-bpf")]
    assert (e["status"], e["reason"]) == ("n/a", "no backend")


def test_isolated_speedup_is_the_ratio_of_costs():
    """bpf costing 250 ns where nft costs 500 ns is a 2x isolated speedup; e2e is the pps ratio."""
    recs = [rec("s", "drop", 0, 2e6), rec("s", "nft-kernel", 0, 1e6), rec("s", "snatgw-bpf", 0, 1e9 / 750)]
    summ = stats.summarize(recs)
    assert stats.speedup_isolated(summ, "s", "snatgw-bpf", "nft-kernel") == pytest.approx(2.0)
    assert stats.speedup_e2e(summ, "s", "snatgw-bpf", "nft-kernel") == pytest.approx(1000 / 750)
    assert stats.speedup_e2e(summ, "s", "snatgw-nft", "nft-kernel") is None


def test_trafgen_conf_sends_64_byte_udp_to_the_gateway_mac():
    """The packet is eth + ipv4 + udp + 18 zero bytes (60 + FCS) to the given MAC."""
    c = traffic.trafgen_conf("02:00:00:00:00:01", "one")
    assert "eth(da=02:00:00:00:00:01)" in c and "udp(sp=40000, dp=9)" in c and "fill(0x00, 18)" in c
    assert 14 + 20 + 8 + 18 == 60


def test_trafgen_conf_lockstep_pattern_counts_hosts_and_ports():
    """seq_hosts/seq_ports count the address's low 16 bits and the port together."""
    c = traffic.trafgen_conf("02:00:00:00:00:01", seq_hosts=11, seq_ports=4096)
    assert "sa[2:2]=dinc(32768, 32778)" in c and "sp=dinc(1024, 5119)" in c


def test_nft_counters_are_read_in_rule_order():
    """Counters of `nft -j list table` come back one per rule, in order."""
    text = json.dumps({"nftables": [{"metainfo": {}}, {"rule": {"expr": [{"counter": {"packets": 5, "bytes": 1}}]}},
                                    {"rule": {"expr": [{"match": {}}, {"counter": {"packets": 7, "bytes": 2}}]}}]})
    assert traffic.parse_nft_counters(text) == [5, 7]


def test_proc_stat_delta_gives_seconds_per_cpu():
    """100 ticks of softirq on cpu0 is one second of softirq and of busy time; 50 ticks of
    steal on cpu1 half a second of steal, counted busy (the CPU was not idle for the guest)."""
    a = traffic.parse_proc_stat("cpu 1 2 3 4\ncpu0 10 0 20 100 0 0 5 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n")
    b = traffic.parse_proc_stat("cpu 1 2 3 4\ncpu0 10 0 20 200 0 0 105 0 0 0\ncpu1 0 0 0 0 0 0 0 50 0 0\n")
    d = traffic.cpu_delta(a, b)
    assert d["cpu0"]["softirq"] == 1.0 and d["cpu0"]["busy"] == 1.0 and d["cpu0"]["steal"] == 0.0
    assert d["cpu1"]["steal"] == 0.5 and d["cpu1"]["busy"] == 0.5


@pytest.mark.parametrize("n", [1, 2, 100])
def test_generated_config_parses_with_the_matching_rule_last(n):
    """The bench config is valid snatgw config; only its last-priority rule matches the traffic."""
    cfg = parse_text(gateways.snatgw_config_text(n, max_sessions=4096, pin_dir="/sys/fs/bpf/snatgw-x",
                                                 socket="/tmp/x.sock", backend="bpf"))
    rules = cfg.rules.rules
    assert len(rules) == n and cfg.settings.max_sessions == 4096
    route = Route("up0", IPv4Address("198.19.1.2"))
    for src in ("198.18.1.2", "198.18.200.7"):
        assert cfg.rules.match(IPv4Address(src), IPv4Address("198.19.1.2"), route) is rules[-1]
    assert [r for r in rules[:-1] if r.match(IPv4Address("198.18.1.2"), IPv4Address("198.19.1.2"), route) is None] == []


def test_reload_config_changes_only_the_filler_rules():
    """A reload variant changes the non-matching rules' pool and leaves the matching rule alone."""
    a = parse_text(gateways.snatgw_config_text(3, max_sessions=4096, pin_dir="/p", socket="/s", backend="bpf"))
    b = parse_text(gateways.snatgw_config_text(3, max_sessions=4096, pin_dir="/p", socket="/s", backend="bpf",
                                               filler_pool_last="198.19.1.105"))
    assert a.rules.rules[-1] == b.rules.rules[-1] and a.rules.rules[0] != b.rules.rules[0]


def test_nft_kernel_text_has_the_same_rules_in_the_same_order():
    """The hand-written kernel nftables SNAT has one snat rule per bench rule, matching rule last."""
    text = gateways.nft_kernel_text(3)
    lines = [ln.strip() for ln in text.splitlines() if "snat ip to" in ln]
    assert len(lines) == 3 and lines[-1].startswith("ip saddr 198.18.0.0/15")
    assert "type nat hook postrouting priority srcnat" in text


def test_filler_sources_never_overlap_the_generators_networks():
    """Filler rule sources are hosts in 198.19.128.0/17; more than 32768 is refused."""
    assert gateways.filler_src(0) == "198.19.128.0/32" and gateways.filler_src(32767) == "198.19.255.255/32"
    with pytest.raises(ValueError):
        gateways.filler_src(32768)


def test_fill_pattern_period_fits_the_table():
    """Lockstep hosts x 4096 ports is at most the target and its host count is an odd prime."""
    for n in (50_000, 1_000_000, 13_000):
        h = scenarios.seq_hosts_for(n)
        assert h * 4096 <= n and h % 2 == 1 and all(h % d for d in range(3, h))


def test_session_memory_separates_table_maps_from_fixed_ones():
    """Maps at least as large as the table scale per session; the rest is fixed overhead."""
    maps = [{"max_entries": 200, "bytes_memlock": 20000}, {"max_entries": 16, "bytes_memlock": 1000}]
    m = scenarios.session_memory(maps, 100)
    assert m["bytes_per_session"] == 200 and m["fixed_map_bytes"] == 1000
    assert m["mib_per_1m_sessions"] == pytest.approx((200e6 + 1000) / 2**20)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_rounds_start_with_each_config_and_vary_what_came_before(n):
    """Every round runs each configuration once; over n rounds (2n when n is odd) each starts
    a round equally often and each follows every other one equally often (a Williams design):
    no configuration's measurement always comes after the same one's teardown."""
    items = tuple("abcdef"[:n])
    rounds = n if n % 2 == 0 else 2 * n
    rows = [rotated(items, r) for r in range(rounds)]
    assert all(sorted(row) == list(items) for row in rows)
    assert Counter(row[0] for row in rows) == {c: rounds // n for c in items}
    pairs = Counter((a, b) for row in rows for a, b in zip(row, row[1:]))
    assert set(pairs) == {(a, b) for a in items for b in items if a != b}
    assert len(set(pairs.values())) == 1
    # the four packet configurations over the default three rounds: snatgw-bpf comes after
    # three different ones (a plain rotation put it after nft-kernel every time)
    four = ("drop", "forward", "nft-kernel", "snatgw-bpf")
    before = {row[row.index("snatgw-bpf") - 1] if row.index("snatgw-bpf") else None
              for row in (rotated(four, r) for r in range(3))}
    assert len(before) == 3


def test_cpu_per_packet_uses_the_pipeline_tasks_time():
    """2 CPU seconds of trafgen/ksoftirqd over 1M packets is 2000 ns per packet; none without a count."""
    w = traffic.Window(packets=1_000_000, seconds=1.0, cpu={}, task_cpu_s=2.0)
    assert w.cpu_ns_per_packet() == pytest.approx(2000.0) and w.pps == 1e6
    assert traffic.Window(0, 1.0, {}, task_cpu_s=2.0).cpu_ns_per_packet() is None


def test_task_ticks_read_utime_and_stime_past_a_name_with_spaces():
    """utime + stime are fields 14 and 15 of /proc/<pid>/stat, counted after the ')' of the name."""
    line = "42 (tra fgen) R 1 42 42 0 -1 4194560 10 0 0 0 7 93 0 0 20 0 1 0 100 1000 10"
    assert traffic.pid_ticks(line) == 100


def test_spread_new_flow_scenario_randomises_the_server_port():
    """3a' differs from 3a only in the destination port: random, so flows spread over endpoints."""
    from snatgw.bench import scenarios, traffic

    pattern, conf = scenarios.UDP_SCENARIOS["udp-newflows-spread"]
    assert (pattern, scenarios.UDP_SCENARIOS["udp-newflows"][0]) == ("new", "new")
    text = traffic.trafgen_conf("02:00:00:00:00:01", pattern, **conf)
    assert "dp=drnd(1024, 65535)" in text
    assert "dp=9" in traffic.trafgen_conf("02:00:00:00:00:01", pattern)


def test_port_pressure_counts_only_its_own_searches():
    """3c records the allocator's counters over its own run: the daemon's totals since start
    (3a and 3a' of the round searched before it) less those read before the blast; a counter
    missing on either side (an unreachable daemon, an older datapath) is None, not 0."""
    before = {"spill_memo_hits": 0, "spill_memos_written": 0, "port_searches": 40_000, "port_search_tries": 40_100,
              "tries_per_search": 1.0}  # fmt: skip
    after = {"spill_memo_hits": 4_900, "spill_memos_written": 10, "port_searches": 102_010,
             "port_search_tries": 210_627, "tries_per_search": 2.06,
             "last_interval": {"seconds": 2.0, "searches_per_sec": 1.0, "tries_per_sec": 3.0, "tries_per_search": 3.0}}
    assert scenarios.allocator_delta(before, after) == {
        "spill_memo_hits": 4_900, "spill_memos_written": 10, "port_searches": 62_010, "port_search_tries": 170_527}
    assert scenarios.allocator_delta(None, after)["port_searches"] is None
    assert scenarios.allocator_delta(before, None) == {}


def test_paired_ratios_pair_each_round_with_its_own_drop_and_reference():
    """Round 0 quick for both, round 1 slow for both: each round's ratio is 2.0 (cost 500 against
    250, then 1000 against 500), where the ratio of the medians pairs one round with the other;
    a round missing the reference or the drop run gives no pair."""
    recs = [rec("s", "drop", 0, 1e9 / 100), rec("s", "nft-kernel", 0, 1e9 / 600), rec("s", "snatgw-bpf", 0, 1e9 / 350),
            rec("s", "drop", 1, 1e9 / 100), rec("s", "nft-kernel", 1, 1e9 / 1100), rec("s", "snatgw-bpf", 1, 1e9 / 600),
            rec("s", "drop", 2, 1e9 / 100), rec("s", "snatgw-bpf", 2, 1e9 / 300),
            rec("s", "nft-kernel", 3, 1e9 / 300), rec("s", "snatgw-bpf", 3, 1e9 / 300),
            rec("s", "drop", 4, 1e9 / 100), rec("s", "nft-kernel", 4, None, status="error"), rec("s", "snatgw-bpf", 4, 1e9 / 300)]
    pairs = stats.paired_isolated(recs, "s", "snatgw-bpf", "nft-kernel")
    assert [r for r, _ in pairs] == [0, 1]
    assert [x for _, x in pairs] == [pytest.approx(2.0), pytest.approx(2.0)]
    assert stats.paired_isolated(recs, "other", "snatgw-bpf", "nft-kernel") == []


def test_a_round_whose_reference_outran_its_drop_run_gives_no_ratio():
    """nft-kernel at 1,000 pps above the drop run's 100 (a cost below zero: that round measured
    noise) and, in another round, snatgw-bpf likewise: n/a (None) for the round, never a ratio
    of zero or below that would pull the median down."""
    recs = [rec("s", "drop", 0, 1e9 / 100), rec("s", "nft-kernel", 0, 1e9 / 90), rec("s", "snatgw-bpf", 0, 1e9 / 350),
            rec("s", "drop", 1, 1e9 / 100), rec("s", "nft-kernel", 1, 1e9 / 600), rec("s", "snatgw-bpf", 1, 1e9 / 100),
            rec("s", "drop", 2, 1e9 / 100), rec("s", "nft-kernel", 2, 1e9 / 600), rec("s", "snatgw-bpf", 2, 1e9 / 350)]
    pairs = stats.paired_isolated(recs, "s", "snatgw-bpf", "nft-kernel")
    assert pairs == [(0, None), (1, None), (2, pytest.approx(2.0))]
