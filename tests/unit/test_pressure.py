"""Port pressure made visible (issue 11 item 5), against the in-process daemon on the model
(FakeBackend): `stats` (text and --json) and `adm -L --stats` show the table's fill, sessions
and refusals per SNAT address and the busiest inside hosts; refusals are logged once per
(inside host, SNAT address) per interval, not per packet."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest
from scapy.all import IP, UDP

from snatgw.cli.commands import adm as admcli
from snatgw.cli.main import main as cli
from snatgw.daemon.service import REFUSAL_LOG_INTERVAL

ONE_PORT = "port_range 5000-65535"


@pytest.fixture
def pressed(tmpdir_short):
    """A daemon whose SNAT port range is one port (6000): every address is full after one
    flow toward a remote endpoint."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "one-port.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000"))
    r = Running(tmpdir_short, conf=conf)
    try:
        yield r
    finally:
        r.close()


def send(r, src: str, sport: int, dst: str = "203.0.113.10", dport: int = 53):
    return r.backend.process(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport)), "inside", "lan40")


def run_cli(argv: list[str]) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli(argv) == 0
    return buf.getvalue()


def test_stats_show_sessions_and_refusals_per_address_and_host(pressed):
    """Four flows of one host to one server through a 3-address sdh pool with one port: three
    spill over the addresses, the fourth is refused; stats say so per address and host."""
    got = [send(pressed, "198.18.40.10", sp).reason.name for sp in (1, 2, 3, 4, 4)]
    assert got == ["XLATE_NEW"] * 3 + ["DROP_PORT_EXHAUSTED", "DROP_REFUSED_RECENTLY"]
    p = json.loads(run_cli(["stats", "--json", "--socket", pressed.sock]))["pressure"]
    assert p["table"] == {"sessions": 3, "max_sessions": 262144, "fill": round(3 / 262144, 4)}
    assert p["addresses"] == [
        {"addr": "198.19.2.71", "sessions": 1, "refusals": 0},
        {"addr": "198.19.2.72", "sessions": 1, "refusals": 1},  # the sdh choice: refused there
        {"addr": "198.19.2.73", "sessions": 1, "refusals": 0},
    ]
    # no rule has a host limit: the hosts' sessions are the last sweep's (none yet), refusals count
    assert p["hosts"] == [{"host": "198.18.40.10", "sessions": 0, "refusals": 1}] and p["hosts_total"] == 1
    assert p["hosts_counted"] == "sweep" and p["hosts_age_seconds"] is None
    pressed.service.gc()  # the expiry sweep recounts
    pressed.clock.t += 4
    p = json.loads(run_cli(["stats", "--json", "--socket", pressed.sock]))["pressure"]
    assert p["hosts"] == [{"host": "198.18.40.10", "sessions": 3, "refusals": 1}] and p["hosts_age_seconds"] == 4.0
    text = run_cli(["stats", "--socket", pressed.sock])
    assert "session table: 3 of 262144" in text
    assert any(line.split() == ["198.19.2.72", "1", "1"] for line in text.splitlines())
    assert any(line.split() == ["198.18.40.10", "3", "1"] for line in text.splitlines())
    assert "(inside hosts' sessions as of the last sweep, 4.0 s ago: no rule has max_sessions_per_host" in text
    out = io.StringIO()
    assert admcli.main(["-L", "--stats", "--socket", pressed.sock], stdout=out) == 0
    assert "SNAT address" in out.getvalue() and "198.19.2.72" in out.getvalue()
    assert "as of the last sweep, 4.0 s ago" in out.getvalue()


def test_with_a_host_limit_the_hosts_sessions_are_counted_live(tmpdir_short):
    """A host limit has the datapath count each host's sessions as they are made: stats show
    them at once, marked live (no age), and a reload that drops the limit turns that off."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "limit.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000\n  max_sessions_per_host 2"))
    r = Running(tmpdir_short, conf=conf)
    try:
        got = [send(r, "198.18.40.10", sp).reason.name for sp in (1, 2, 3)]
        assert got == ["XLATE_NEW", "XLATE_NEW", "DROP_HOST_LIMIT"]
        p = json.loads(run_cli(["stats", "--json", "--socket", r.sock]))["pressure"]
        assert p["hosts"] == [{"host": "198.18.40.10", "sessions": 2, "refusals": 1}]
        assert p["hosts_counted"] == "live" and "hosts_age_seconds" not in p
        assert "as of the last sweep" not in run_cli(["stats", "--socket", r.sock])
    finally:
        r.close()


def test_a_reload_that_raises_the_limit_lets_a_refused_flow_in_and_its_refusal_is_logged(tmpdir_short):
    """A flow refused by the host limit, then a reload raising it: the flow's next packet is
    judged by the new limit (its refusal marker went with the old rules; it used to be dropped
    as DROP_REFUSED_RECENTLY for 2 s more), and the refusal the reload forgot is still logged."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "limit.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000\n  max_sessions_per_host 2"))
    r = Running(tmpdir_short, conf=conf)
    try:
        r.service.gc()  # the first refusal look: the interval starts
        got = [send(r, "198.18.40.10", sp).reason.name for sp in (1, 2, 3, 3)]
        assert got == ["XLATE_NEW", "XLATE_NEW", "DROP_HOST_LIMIT", "DROP_REFUSED_RECENTLY"]
        r.conf.write_text(r.conf.read_text().replace("max_sessions_per_host 2", "max_sessions_per_host 5"))
        assert r.req(op="reload")["ok"]
        assert send(r, "198.18.40.10", 3).reason.name == "XLATE_NEW"
        r.clock.t += REFUSAL_LOG_INTERVAL
        r.service.gc()
        (line,) = refused_lines(r)
        assert "host=198.18.40.10" in line and "flows=1 " in line and "reason=DROP_HOST_LIMIT" in line
    finally:
        r.close()


def test_hosts_are_listed_busiest_first_and_cut_to_the_top(pressed):
    """Twelve hosts: stats list the ten with the most sessions, busiest first, and the total."""
    for i in range(12):
        for sp in range(i % 3 + 1):
            send(pressed, f"198.18.40.{20 + i}", 100 + sp, dport=1000 + i * 10 + sp)
    pressed.service.gc()  # no host limit: the sweep's recount counts the hosts
    p = pressed.req(op="stats")["stats"]["pressure"]
    assert p["hosts_total"] == 12 and len(p["hosts"]) == 10
    assert [h["sessions"] for h in p["hosts"]] == sorted((h["sessions"] for h in p["hosts"]), reverse=True)
    assert p["hosts"][0]["sessions"] == 3


def refused_lines(r) -> list[str]:
    return [line for line in r.log.lines if "event=refused" in line]


def test_refusals_are_logged_once_per_host_and_address_per_interval(pressed):
    """A host whose flows are refused many times is one log line per interval (with how many
    flows), not a line per packet; nothing new, nothing logged; new refusals, a new line."""
    send(pressed, "198.18.40.10", 1)
    send(pressed, "198.18.40.10", 2)
    send(pressed, "198.18.40.10", 3)
    for sp in range(4, 40):  # 36 refused flows, each twice
        send(pressed, "198.18.40.10", sp)
        send(pressed, "198.18.40.10", sp)
    send(pressed, "198.18.40.11", 99, dport=54)  # another host, another server: fine
    pressed.service.gc()
    lines = refused_lines(pressed)
    assert len(lines) == 1
    assert "host=198.18.40.10" in lines[0] and "snat_addr=198.19.2.72" in lines[0] and "flows=36" in lines[0]
    for sp in range(40, 45):
        send(pressed, "198.18.40.10", sp)
    pressed.clock.t += 1
    pressed.service.gc()
    assert len(refused_lines(pressed)) == 1  # within the interval: nothing more yet
    pressed.clock.t += REFUSAL_LOG_INTERVAL
    pressed.service.gc()
    assert len(refused_lines(pressed)) == 2 and "flows=5" in refused_lines(pressed)[-1]
    pressed.clock.t += REFUSAL_LOG_INTERVAL
    pressed.service.gc()
    assert len(refused_lines(pressed)) == 2  # no new refusals: no line
    for sp in range(45, 48):  # refused within the interval the daemon stops in: logged at stop
        send(pressed, "198.18.40.10", sp)
    pressed.clock.t += 1
    pressed.service.stop()
    assert len(refused_lines(pressed)) == 3 and "flows=3" in refused_lines(pressed)[-1]


def test_the_summary_line_counts_the_flows_of_the_pairs_it_stands_for(pressed):
    """More (host, address) pairs than REFUSAL_LOG_LINES in an interval: the lines past the cap
    are one summary line, which says how many flows those pairs had refused, so that the lines
    of the interval add up to every flow refused in it (the summary said only how many pairs,
    and the log undercounted the refusals it suppressed)."""
    from snatgw.daemon.service import REFUSAL_LOG_LINES

    for sp in (1, 2, 3):  # the three addresses' one port toward 203.0.113.10:53
        send(pressed, "198.18.40.10", sp)
    n = REFUSAL_LOG_LINES + 7
    for h in range(n):  # each host: two refused flows
        send(pressed, f"198.18.40.{100 + h}", 1000)
        send(pressed, f"198.18.40.{100 + h}", 1001)
    pressed.service.gc()
    lines = [line for line in pressed.log.lines if "event=refused " in line]
    more = [line for line in pressed.log.lines if "event=refused_more" in line]
    flows = sum(int(line.split("flows=")[1].split()[0]) for line in lines + more)
    assert len(more) == 1 and len(lines) == REFUSAL_LOG_LINES, more
    pairs = {line.split("host=")[1].split()[0] for line in lines}
    assert "pairs=7" in more[0] and "flows=14" in more[0] and len(pairs) == REFUSAL_LOG_LINES
    assert flows == 2 * n


def test_a_pair_refused_for_two_reasons_names_both_with_their_counts(tmpdir_short):
    """One host, one address, two refusals in an interval: a port search that found the pool
    full, then the host's limit. The line names both reasons with their flows; it gave the
    first marker's reason for all (flows=2 reason=DROP_PORT_EXHAUSTED)."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "mixed.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000\n  max_sessions_per_host 4"))
    r = Running(tmpdir_short, conf=conf)
    try:
        got = [send(r, "198.18.40.10", sp).reason.name for sp in (1, 2, 3, 4)]
        got.append(send(r, "198.18.40.10", 5, dst="203.0.113.11").reason.name)
        got.append(send(r, "198.18.40.10", 6).reason.name)
        assert got[3:] == ["DROP_PORT_EXHAUSTED", "XLATE_NEW", "DROP_HOST_LIMIT"]
        r.service.gc()
        (line,) = refused_lines(r)
        assert "flows=2 reason=DROP_HOST_LIMIT,DROP_PORT_EXHAUSTED " in line, line
        assert "reasons=DROP_HOST_LIMIT:1,DROP_PORT_EXHAUSTED:1" in line, line
    finally:
        r.close()


def test_explain_says_which_address_and_why_and_reads_the_live_table(pressed, tmpdir_short):
    """explain names the sdh choice and the spill order; with --live it judges the search
    against the running sessions: the chosen address is full, the flow would spill to .73."""
    conf = str(tmpdir_short / "one-port.conf")
    args = ["explain", conf, "--proto", "udp", "--src", "198.18.40.10:2", "--dst", "203.0.113.10:53",
            "--oif", "eth1", "--gw", "198.19.2.1", "--json"]  # fmt: skip
    d = json.loads(run_cli(args))
    assert d["address"]["chosen"] == "198.19.2.72" and d["address"]["order"] == [
        "198.19.2.72", "198.19.2.73", "198.19.2.71"]
    assert d["snat"] == {"addr": "198.19.2.72", "port": 6000} and d["live_sessions"] is None
    send(pressed, "198.18.40.10", 1)  # takes .72:6000 toward 203.0.113.10:53
    d = json.loads(run_cli(args + ["--live", "--socket", pressed.sock]))
    assert d["snat"] == {"addr": "198.19.2.73", "port": 6000} and d["live_sessions"] == 1
    send(pressed, "198.18.40.10", 3)
    send(pressed, "198.18.40.10", 4)
    d = json.loads(run_cli(args + ["--live", "--socket", pressed.sock]))
    assert d["reason"] == "DROP_PORT_EXHAUSTED" and d["live_sessions"] == 3
    text = run_cli(args[:-1] + ["--live", "--socket", pressed.sock])
    assert "judged against the live table: its 3 sessions toward 203.0.113.10 or from the source" in text


def test_spill_memo_counters_in_stats_and_metrics(tmpdir_short):
    """Two SNAT ports: A's third flow to R1:53 finds the sdh address full (a spill memo) and
    spills; the fourth, moments later, tries only that address's first candidate there (a memo
    hit).  stats (json, text) and the metrics say so; `zero` clears them."""
    from prometheus_client.parser import text_string_to_metric_families
    from test_daemon import LAB, Running

    from snatgw.daemon.metrics import scrape

    conf = tmpdir_short / "two-ports.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000-6001"))
    r = Running(tmpdir_short, conf=conf)
    try:
        pkt = [bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=sp, dport=53)) for sp in (1, 2, 3, 4)]
        got = [r.backend.process(p, "inside", "lan40", now=100.0).nat[0].exploded for p in pkt]  # one instant
        assert got == ["198.19.2.72"] * 2 + ["198.19.2.73"] * 2
        p = json.loads(run_cli(["stats", "--json", "--socket", r.sock]))["pressure"]
        # searches 4, tries 1 + 2 (first candidate taken) + 3 (.72 full, .73) + 3 (memo: .72's first, .73's two)
        assert p["allocator"] == {"spill_memo_hits": 1, "spill_memos_written": 1, "port_searches": 4,
                                  "port_search_tries": 9, "tries_per_search": 2.25}  # fmt: skip
        text = run_cli(["stats", "--socket", r.sock])
        assert "spill memo: 1 address searches cut short" in text and "1 full searches found no free port" in text
        assert "port search: 4 searches tried 9 candidates, 2.25 per search since start\n" in text
        out = io.StringIO()
        assert admcli.main(["-L", "--stats", "--socket", r.sock], stdout=out) == 0
        assert "port search: 4 searches tried 9 candidates, 2.25 per search since start" in out.getvalue()
        fam = {f.name: f for f in text_string_to_metric_families(scrape(r.service).decode())}
        assert fam["snatgw_spill_memo_hits"].samples[0].value == 1
        assert fam["snatgw_spill_memos_written"].samples[0].value == 1
        assert fam["snatgw_port_searches"].samples[0].value == 4
        assert fam["snatgw_port_search_tries"].samples[0].value == 9
        r.req(op="zero")
        assert r.req(op="stats")["stats"]["pressure"]["allocator"] == {
            "spill_memo_hits": 0, "spill_memos_written": 0, "port_searches": 0, "port_search_tries": 0,
            "tries_per_search": None}  # fmt: skip
        assert "port search: 0 searches tried 0 candidates, - per search since start" in run_cli(
            ["stats", "--socket", r.sock])
    finally:
        r.close()


def test_port_search_length_over_the_last_rate_interval(tmpdir_short):
    """The daemon's rate samples (one per RATE_INTERVAL, taken by the GC tick) give the searches
    a second and their mean tries over the last interval: `stats` (json: last_interval; text)
    and the `rate` op show them; before two samples exist, the mean since start only."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "two-ports.conf"
    conf.write_text(LAB.read_text().replace(ONE_PORT, "port_range 6000-6001"))
    r = Running(tmpdir_short, conf=conf)
    try:
        pkt = [bytes(IP(src="198.18.40.10", dst="203.0.113.10") / UDP(sport=sp, dport=53)) for sp in (1, 2, 3, 4)]
        r.backend.process(pkt[0], "inside", "lan40")  # 1 search, 1 try (the clock stands still)
        r.service.gc(now=1000.0)
        assert "last_interval" not in r.req(op="stats")["stats"]["pressure"]["allocator"]
        assert "over the last" not in run_cli(["stats", "--socket", r.sock])
        for p in pkt[1:]:  # 3 searches, 2 + 3 + 3 tries: longer, the address full
            r.backend.process(p, "inside", "lan40")
        r.service.gc(now=1002.0)
        a = json.loads(run_cli(["stats", "--json", "--socket", r.sock]))["pressure"]["allocator"]
        assert a["tries_per_search"] == 2.25  # since start: 9 / 4
        assert a["last_interval"] == {"seconds": 2.0, "searches_per_sec": 1.5, "tries_per_sec": 4.0,
                                      "tries_per_search": 2.67}  # fmt: skip
        assert r.req(op="rate")["rate"]["allocator"]["tries_per_search"] == 2.67
        text = run_cli(["stats", "--socket", r.sock])
        assert "2.25 per search since start; 2.67 over the last 2 s (1.5 searches/s)" in text
        r.service.gc(now=1004.0)  # no search since: no mean over the interval, 0 a second
        a = r.req(op="stats")["stats"]["pressure"]["allocator"]["last_interval"]
        assert a == {"seconds": 2.0, "searches_per_sec": 0.0, "tries_per_sec": 0.0, "tries_per_search": None}
        assert "2.25 per search since start; - over the last 2 s (0.0 searches/s)" in run_cli(
            ["stats", "--socket", r.sock])
    finally:
        r.close()


def test_pins_older_than_the_search_counters_show_none_rather_than_zero():
    """`stats --pin-dir` over a pinned snat_alloc_cnt of the older layout (two counters, the
    spill memo's): the search counters are absent, so no `port search` line and no metric,
    never a made-up 0."""
    from snatgw import layout as L
    from snatgw.cli.commands.stats import render_pressure
    from snatgw.datapath.backend import pressure_summary
    from snatgw.datapath.bpf.maps import DatapathMaps, map_specs

    class OldCounters:
        max_entries = 2

        def sum_percpu(self, k):
            assert k < 2, "read past the map"
            return 7

    maps = {name: object() for name in map_specs()} | {L.MAP_ALLOC_CNT: OldCounters()}
    alloc = DatapathMaps(maps).alloc_counts()
    assert alloc == {"spill_memo_hits": 7, "spill_memos_written": 7}
    text = "\n".join(render_pressure(pressure_summary({}, {}, 0, 10, allocator=alloc)))
    assert "spill memo: 7" in text and "port search" not in text


NFT_CONF = """snatgw {
  inside lan40
  outside eth1
  backend nft
%s}
virtual_server fwmark 1 {
  snat_rule { from 198.18.40.0/24 snat_ip 198.19.2.71-198.19.2.73 %s}
}
"""


def test_check_says_which_pressure_settings_the_nft_backend_ignores():
    """backend nft: an asked-for spill (global or the rule's) and a port_tries of one's own are
    warned about (the kernel's nf_nat does neither); refuse_icmp yes is built there (the
    refuse_host chain) and not warned about; the defaults, drop, and the same settings on the
    bpf backend give no warning."""
    from snatgw.cli.commands.check import config_warnings
    from snatgw.config.parse import parse_text

    limited = "  on_exhausted spill\n  refuse_icmp yes\n  port_tries 16\n  max_sessions_per_host 10\n"
    w = config_warnings(parse_text(NFT_CONF % (limited, "on_exhausted spill "), "n.conf"))
    assert [x.split(" is ignored")[0] for x in w] == [
        "n.conf:5: on_exhausted: spill", "n.conf:11: on_exhausted: spill", "n.conf:7: port_tries: 16"]
    assert config_warnings(parse_text(NFT_CONF % ("  on_exhausted drop\n  port_tries 128\n", ""), "n.conf")) == []
    bpf = NFT_CONF.replace("backend nft", "backend bpf")
    assert config_warnings(parse_text(bpf % (limited, "on_exhausted spill "), "b.conf")) == []


def test_check_warns_of_pressure_settings_that_do_nothing_or_unpair_sh():
    """refuse_icmp yes with no host limit in any rule (it answers only the limit's refusals), a
    host limit above max_sessions (the table is full first), and an `algo sh` rule that spills
    (its own setting or the block's: sh's one address per host given up) are warned about at
    their lines; sh with drop (the default, or the rule's own over the block's spill), a limit
    at most max_sessions and a one-address sh pool are not."""
    from snatgw.cli.commands.check import config_warnings
    from snatgw.config.parse import parse_text

    bpf = NFT_CONF.replace("backend nft", "backend bpf")

    def warned(settings: str, rule: str = "") -> list[str]:
        return [" ".join(w.split()[:2]) for w in config_warnings(parse_text(bpf % (settings, rule), "b.conf"))]

    assert warned("  refuse_icmp yes\n") == ["b.conf:5: refuse_icmp:"]
    assert warned("  refuse_icmp yes\n  max_sessions_per_host 5\n", "max_sessions_per_host 0 ") == [
        "b.conf:5: refuse_icmp:"]
    assert warned("  refuse_icmp yes\n", "max_sessions_per_host 5 ") == []
    assert warned("  max_sessions 100\n  max_sessions_per_host 101\n") == ["b.conf:6: max_sessions_per_host:"]
    assert warned("  max_sessions 100\n", "max_sessions_per_host 200 ") == ["b.conf:8: max_sessions_per_host:"]
    assert warned("  max_sessions 100\n  max_sessions_per_host 100\n") == []
    assert warned("", "algo sh on_exhausted spill ") == ["b.conf:7: algo"]
    assert warned("  on_exhausted spill\n", "algo sh ") == ["b.conf:8: algo"]
    assert "snatgw { } block (b.conf:5)" in config_warnings(parse_text(bpf % ("  on_exhausted spill\n", "algo sh "),
                                                                        "b.conf"))[0]  # fmt: skip
    assert warned("  on_exhausted spill\n", "algo sh on_exhausted drop ") == []
    assert warned("", "algo sh ") == []
    one = (bpf % ("", "algo sh on_exhausted spill ")).replace("198.19.2.71-198.19.2.73", "198.19.2.71")
    assert config_warnings(parse_text(one, "b.conf")) == []


EXPLAIN = ["--proto", "udp", "--src", "198.18.40.10:40000", "--dst", "203.0.113.10:53", "--oif", "eth1",
           "--gw", "198.19.2.1", "-j"]


def test_explain_says_the_kernel_picks_with_backend_nft(tmpdir_short, running):
    """explain answers as the bpf datapath; for a config with backend nft, and with --live
    against a daemon running the nft backend, it says that nf_nat picks instead; also without
    --live when the daemon running the (bpf) file runs it with the nft backend (`run --backend
    nft`, as the lab does): the note used to be missing there, the bpf answer standing alone."""
    from snatgw.cli.commands.explain import NFT_NOTE

    nft = tmpdir_short / "n.conf"
    nft.write_text(NFT_CONF % ("", ""))
    assert NFT_NOTE in json.loads(run_cli(["explain", str(nft), *EXPLAIN]))["notes"]
    bpf = tmpdir_short / "b.conf"
    bpf.write_text((NFT_CONF % ("", "")).replace("backend nft", "backend bpf"))
    assert NFT_NOTE not in json.loads(run_cli(["explain", str(bpf), *EXPLAIN]))["notes"]
    live = ["explain", "--live", "--socket", running.sock, *EXPLAIN]
    assert NFT_NOTE not in json.loads(run_cli(live))["notes"]  # the fake backend: the model's own
    running.backend.name = "nft"  # what `status` reports of the daemon's backend
    assert NFT_NOTE in json.loads(run_cli(live))["notes"]
    implicit = json.loads(run_cli(["explain", str(running.conf), "--socket", running.sock, *EXPLAIN]))["notes"]
    assert implicit[0].startswith("judged against the running gateway's table") and NFT_NOTE in implicit


def test_unlisted_pressure_says_why_and_exports_no_host_count():
    """No lists taken (nft above its listing limit): the text says why, the summary has no
    hosts_total (so no snatgw_hosts 0 gauge) and hosts_counted None."""
    from snatgw.cli.commands.stats import render_pressure
    from snatgw.datapath.backend import pressure_summary

    p = pressure_summary({"198.18.40.10": (3, 0)}, {}, 30000, 100000, unlisted="30000 sessions: because")
    assert p["hosts"] == [] and p["addresses"] == [] and "hosts_total" not in p and p["hosts_counted"] is None
    text = "\n".join(render_pressure(p))
    assert "(no lists per SNAT address and inside host: 30000 sessions: because)" in text
    assert "session table: 30000 of 100000 (30.0% full)" in text



def test_refusals_the_datapath_cannot_attribute_are_shown_unknown_not_zero():
    """nft: the kernel does not say whose flow it refused, so the per-address and per-host
    refusals are null in the json and '-' in the text, with a line saying why and where they
    are counted (they were 0 beside DROP_PORT_EXHAUSTED and DROP_HOST_LIMIT counts of them)."""
    from snatgw.cli.commands.stats import REFUSALS_UNKNOWN, render_pressure
    from snatgw.datapath.backend import pressure_summary

    p = pressure_summary({"198.18.40.10": (3, 0), "198.18.40.11": (5, 0)}, {"198.19.2.71": (8, 0)}, 8, 100,
                         refusals_known=False)  # fmt: skip
    assert p["refusals_known"] is False
    assert p["addresses"] == [{"addr": "198.19.2.71", "sessions": 8, "refusals": None}]
    assert [h["host"] for h in p["hosts"]] == ["198.18.40.11", "198.18.40.10"]
    lines = render_pressure(p)
    assert ["198.19.2.71", "8", "-"] in [line.split() for line in lines[2].splitlines()]
    assert REFUSALS_UNKNOWN in lines
    known = pressure_summary({"198.18.40.10": (3, 1)}, {"198.19.2.71": (3, 1)}, 3, 100)
    assert known["refusals_known"] is True and REFUSALS_UNKNOWN not in render_pressure(known)
    # the key is in every answer, bpf's and nft's, listed or not: a json consumer reads it
    # without a default, and an nft answer above the listing bound still says its refusals
    # would be unknown (it was absent there, and from every bpf answer)
    unlisted = pressure_summary({}, {}, 9000, 10000, unlisted="too many", refusals_known=False)
    assert unlisted["refusals_known"] is False
    assert pressure_summary({}, {}, 9000, 10000, unlisted="too many")["refusals_known"] is True


def test_a_reload_that_changes_nothing_keeps_the_refusal_markers_and_memos(tmpdir_short):
    """A reload of the same rules and settings (a comment added, a timeout changed: nothing a
    refusal was judged by) keeps the refusal markers and spill memos: the refused flow's next
    packet meets its marker, not a port search again (every reload emptied them, so failover
    flapping during a flood searched again for each recently refused flow); a reload that
    widens the port range still empties them, and the flow is made."""
    from test_daemon import LAB, Running

    conf = tmpdir_short / "two-ports.conf"
    text = LAB.read_text().replace(ONE_PORT, "port_range 6000-6001")
    conf.write_text(text)
    r = Running(tmpdir_short, conf=conf)
    try:
        got = [send(r, "198.18.40.10", sp).reason.name for sp in range(1, 8)]
        assert got == ["XLATE_NEW"] * 6 + ["DROP_PORT_EXHAUSTED"]  # two ports on each of 3 addresses
        memos = r.backend.spill_memos()
        assert memos and len(r.backend.refusals()) == 1
        r.conf.write_text("# nothing a refusal was judged by\n" + text.replace("snatgw {", "snatgw {\n  timeout udp 45", 1))
        assert r.req(op="reload")["ok"]
        assert send(r, "198.18.40.10", 7).reason.name == "DROP_REFUSED_RECENTLY"
        assert [m["addr"] for m in r.backend.spill_memos()] == [m["addr"] for m in memos]
        r.conf.write_text(text.replace("port_range 6000-6001", "port_range 6000-6002"))
        assert r.req(op="reload")["ok"]
        assert r.backend.spill_memos() == [] and send(r, "198.18.40.10", 7).reason.name == "XLATE_NEW"
    finally:
        r.close()


#: the devices' ifindexes the two comparisons are handed (the backend: if_nametoindex; the
#: model: its router's)
IFX = {"lan40": 2, "lan50": 3, "eth1": 4, "eth2": 5}


def _judged_pair(rules, s, ifx=IFX):
    """(the model's judged_under, the bpf backend's from the bytes it would write)."""
    from snatgw.config.schema import judged_under
    from snatgw.datapath.bpf import prog_maps

    _cfg, slots = prog_maps.compile_rules(rules, s, ifx.get)
    return judged_under(rules, s, ifx.get), prog_maps.judged_under(slots, s, ifx.get)


def test_the_model_and_the_bpf_backend_keep_the_markers_for_the_same_applies():
    """Differential over the applies that matter: the model (schema.judged_under) and the bpf
    backend (prog_maps.judged_under over the compiled slots) keep the refusal markers and spill
    memos for the same ones, and empty them for the same ones: each input the allocator or the
    host limit reads (rules as compiled, their pools, on_exhausted, port_tries, the port range,
    max_sessions_per_host, the devices' roles) and a link's failover (its rules' egress and
    pool); refuse_icmp, the timeouts and audit_log are read by no judgement.  A device
    recreated under its name (another ifindex: a rule's oif, an inside device) empties them in
    both: the backend's slot holds the oif's ifindex, and the model compared names only, so it
    kept them where the backend forgot (the choice: such a device lost its routes; forgetting
    costs one more search, a wrong marker refuses a flow for up to 2 s).  The model's Engine
    does so through its router's ifindexes."""
    from dataclasses import replace

    from snatgw.config.links import failover
    from snatgw.config.parse import parse_text
    from snatgw.model import Engine, StaticRouter
    from snatgw.layout import Reason
    from snatgw.model.engine import Refusal
    from test_links import LAB, LINK

    cfg = parse_text(LAB + LINK, "c.conf")
    rules, s = cfg.rules, cfg.settings
    same_rules_moved = parse_text("# a comment moves every line\n" + LAB + LINK, "d.conf").rules
    r0 = rules.rules[0]
    per_rule_limit = type(rules)([replace(r, max_sessions_per_host=0) for r in rules])
    keeps = {
        "nothing": (rules, s),
        "rules' lines moved": (same_rules_moved, s),
        "refuse_icmp": (rules, replace(s, refuse_icmp=not s.refuse_icmp)),
        "a timeout": (rules, s.with_timeouts(udp=45)),
        "audit_log": (rules, replace(s, audit_log="/tmp/x.log")),
        "the global limit 0 given per rule": (per_rule_limit, s),
        "a device none names recreated": (rules, s, {**IFX, "eth3": 9}),
    }
    empties = {
        "the host limit": (rules, replace(s, max_sessions_per_host=10)),
        "on_exhausted": (rules, replace(s, on_exhausted="drop")),
        "port_tries": (rules, replace(s, port_tries=s.port_tries + 1)),
        "the port range": (rules, replace(s, port_min=s.port_min + 1)),
        "a pool": (type(rules)([replace(r0, pool=type(r0.pool)(r0.pool.first, r0.pool.first)), *rules.rules[1:]]), s),
        "the rules' order": (type(rules)(list(rules.rules)[::-1]), s),
        "the inside devices": (rules, replace(s, inside=s.inside[:1])),
        "link isp1 failed over": (failover(rules, cfg.links, {"isp1"}), s),
        "a rule's oif recreated (another ifindex)": (rules, s, {**IFX, "eth1": 9}),
        "an inside device recreated": (rules, s, {**IFX, "lan50": 9}),
    }
    model, bpf = _judged_pair(rules, s)
    for name, (rs, st, *ifx) in {**keeps, **empties}.items():
        m, b = _judged_pair(rs, st, *ifx)
        assert (m == model, b == bpf) == ((True, True) if name in keeps else (False, False)), name
    # the model's apply: its router's ifindexes, a device recreated there empties its markers
    router = StaticRouter.ref()
    e = Engine(rules, s, router)
    e.refused["a flow"] = Refusal(1.0, r0.pool.first, Reason.DROP_PORT_EXHAUSTED)
    e.apply(rules, s)
    assert list(e.refused) == ["a flow"]
    router.recreate("eth1")
    e.apply(rules, s)
    assert e.refused == {}
