"""The benchmark report (pure rendering): tables, ratios, targets met / not met / n/a."""

from snatgw.bench import report, stats


def rec(scenario, config, rnd, value, metric="pps", **kw):
    return {"scenario": scenario, "config": config, "round": rnd, "status": "ok", "metric": metric,
            "value": value} | kw


def results(bpf=1e9 / 400, nft=1e9 / 1000, fwd=1e9 / 380, extra=()):
    recs = []
    for r in range(3):
        for s in ("udp-1flow", "udp-10kflows", "udp-newflows"):
            recs += [rec(s, "drop", r, 1e9 / 300), rec(s, "forward", r, fwd), rec(s, "nft-kernel", r, nft),
                     rec(s, "snatgw-bpf", r, bpf)]
    return {"timestamp": "T", "machine": {"nproc": 2}, "params": {"rounds": 3}, "records": recs + list(extra)}


def verdicts(res):
    return {name: v for name, _, v in report.targets(stats.summarize(res["records"]), res)}


def test_targets_met_when_bpf_is_far_cheaper():
    """bpf at 100 ns vs nft 700 ns of gateway cost meets the isolated and end-to-end targets."""
    v = verdicts(results())
    assert v["snatgw-bpf ≥ 1.8× nft-kernel, gateway isolated (scenarios 1–3)"] == "met"
    assert v["snatgw-bpf ≥ 1.3× nft-kernel, end to end (scenarios 1–3)"] == "met"
    assert v["snatgw-bpf ≥ 0.95× forward (scenarios 1–2, end to end)"] == "met"


def test_targets_not_met_when_bpf_is_slower_than_forward():
    """bpf below 0.95x of forward's pps is reported as not met."""
    v = verdicts(results(bpf=1e9 / 900, fwd=1e9 / 400))
    assert v["snatgw-bpf ≥ 0.95× forward (scenarios 1–2, end to end)"] == "not met"
    assert v["snatgw-bpf ≥ 1.8× nft-kernel, gateway isolated (scenarios 1–3)"] == "not met"


def test_targets_without_measurements_are_na():
    """Rule scaling, memory and reload targets with nothing measured are n/a, not met or failed."""
    v = verdicts(results())
    assert v["≤ 10% slowdown 1 → 10k rules"] == "n/a"
    assert v["1M sessions ≤ 256 MiB (snatgw-bpf map memory)"] == "n/a"
    assert v["reload of 10k rules < 1 s, zero sessions lost (snatgw-bpf)"] == "n/a"


def test_rule_scaling_target_compares_largest_to_smallest_rule_count():
    """A 20% drop from 1 to 10000 rules is not met; the report shows the rule table."""
    extra = [rec("rules-1", "drop", 0, 2e6), rec("rules-1", "snatgw-bpf", 0, 1e6), rec("rules-10000", "snatgw-bpf", 0, 0.8e6)]
    res = results(extra=extra)
    assert verdicts(res)["≤ 10% slowdown 1 → 10000 rules (snatgw-bpf pps)"] == "not met"
    assert "## 5. Rule-count scaling" in report.render(res)


def test_memory_and_reload_targets_judge_the_recorded_figures():
    """300 MiB per 1M sessions is not met; reloads under 1 s with nothing lost are met."""
    res = results()
    res["sessions"] = {"target_sessions": 10, "by_config": {"snatgw-bpf": {"status": "ok", "mib_per_1m_sessions": 300.0}}}
    res["control"] = {"rules": 10000, "by_config": {"snatgw-bpf": {"status": "ok", "reloads": [
        {"seconds": 0.4, "lost": 0, "sessions_before": 5, "sessions_after": 5}]}}}
    v = verdicts(res)
    assert v["1M sessions ≤ 256 MiB (snatgw-bpf map memory)"] == "not met"
    assert v["reload of 10,000 rules < 1 s, zero sessions lost (snatgw-bpf)"] == "met"
    res["control"]["by_config"]["snatgw-bpf"]["reloads"][0]["lost"] = 2
    assert verdicts(res)["reload of 10,000 rules < 1 s, zero sessions lost (snatgw-bpf)"] == "not met"


def test_report_shows_unavailable_configs_as_na_with_reason():
    """A configuration that could not run is printed as n/a with its reason, never a figure."""
    res = results()
    res["records"].append({"scenario": "udp-1flow", "config": "snatgw-nft", "round": 0, "status": "n/a",
                           "reason": "backend missing", "value": None})
    res["unavailable"] = {"snatgw-nft": "backend missing"}
    md = report.render(res)
    assert "| 1 one UDP flow | snatgw-nft | n/a (backend missing) |" in md
    assert "- **snatgw-nft**: n/a (backend missing)" in md


def test_report_puts_pps_cost_and_ratios_side_by_side():
    """The packet table has median [min–max] pps and gateway ns/pkt; the ratio table bpf/nft and bpf/forward."""
    md = report.render(results())
    assert "| 1 one UDP flow | snatgw-bpf | 2.500 M [2.500 M–2.500 M] | pps | 100 [100–100] |" in md
    assert "| 1 one UDP flow | 2.50× | 7.00× | — | 0.95× | 0.80× |" in md


def test_plot_writes_pngs(tmp_path):
    """The plot module writes the scenario bars and, with rule scaling, the scaling line."""
    from snatgw.bench import plot

    extra = [rec("rules-1", "snatgw-bpf", 0, 1e6), rec("rules-100", "snatgw-bpf", 0, 0.9e6)]
    files = plot.plot(results(extra=extra), tmp_path / "r.png")
    assert [f.name for f in files] == ["r.png", "r-rules.png"] and all(f.stat().st_size > 1000 for f in files)


def test_port_pressure_table_shows_sessions_refusals_and_program_cost():
    """3c: one row per config and round with offered/delivered pps, sessions, refusals, and
    (bpf) the mean candidates tried per port search."""
    extra = [rec("udp-portpressure", "drop", 0, 150_000.0),
             rec("udp-portpressure", "nft-kernel", 0, 50_000.0, delivered_pps=48_000.0, sessions=60_000,
                 refused_flows=9),
             rec("udp-portpressure", "snatgw-bpf", 0, 60_000.0, delivered_pps=58_000.0, sessions=62_000,
                 refused_flows=0, refused_marker_packets=3, spill_memo_hits=4_900, port_searches=62_010,
                 port_search_tries=170_527, prog_ns_per_run=812.4)]  # fmt: skip
    md = report.render(results(extra=extra))
    assert "### 3c. Port pressure" in md
    assert "| snatgw-bpf | 0 | 60.0 k | 58.0 k | 62000 | 0 | 3 | 4900 | 2.75 (62010) | 812 |" in md
    assert "| nft-kernel | 0 | 50.0 k | 48.0 k | 60000 | 9 | — | — | — | — |" in md
    assert "3c port pressure" in md  # and in the packet table, with a cost against drop


def test_hostlimit_table_sets_the_per_host_counts_cost_beside_snatgw_bpf():
    """snatgw-bpf-hostlimit (a host limit never reached) beside snatgw-bpf: both medians and
    the difference, per scenario; nothing when it did not run."""
    assert "per-host count's cost" not in report.render(results())
    extra = [rec("udp-newflows", "snatgw-bpf-hostlimit", r, 1e9 / 824) for r in range(3)]
    md = report.render(results(extra=extra))
    assert "### The per-host count's cost" in md
    assert "| 3a new UDP flows | 100 | 524 | +424 ns | — | — | — |" in md
