"""Per-packet cost of the datapath programs alone, by BPF_PROG_TEST_RUN with repeat, in a
private REF namespace: established flow, new flow, reply, ICMP error, no-rule pass, and the
egress program on an ordinary packet (every translated packet crosses it), and a new flow
over a table of half a million sessions (cold hash buckets, as in the live path).

Uses the SNAT_BENCH build, whose bench_* wrappers put the packet back after each round (a
repeated test-run reuses one skb) and, for new flows, set a fresh source port every round;
the wrapper's own cost (bench_noop) is subtracted.  ``python -m snatgw.bench.progbench``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw, raw

from ..config.schema import Settings
from ..layout import CFG_F_BACK_FROM_RPF as FLAG_BACK
from ..layout import MAP_SPILL_MEMO, PORT_TRIES, PORT_TRIES_MAX, Reason
from ..datapath.bpf.testrun import ProgHarness, RefNet
from ..rules import Rule, RuleSet

A, R1 = "198.18.40.10", "203.0.113.10"
PAD = b"p" * 60  # bench packets must cover the wrappers' saved 96 bytes
RULES = [  # the REF rules (plan.md)
    {"from": "198.18.40.0/24", "gw": "198.19.3.1", "oif": "eth2", "snat_ip": "198.19.3.71-198.19.3.73",
     "algo": "random"},
    {"from": "198.18.40.0/24", "gw": "198.19.2.1", "oif": "eth1", "snat_ip": "198.19.2.71-198.19.2.73",
     "algo": "sdh"},
    {"from": "198.18.0.0/16", "new_gw": "198.19.2.1", "snat_ip": "198.19.2.71-198.19.2.73", "algo": "sh"},
]  # fmt: skip
COLD_SESSIONS = 480_000  # sessions in the table of the cold new-flow case
TARGETS = {"established (udp out)": 150, "established (tcp out)": 150, "new flow (udp)": 1500}


def _median_ns(h: ProgHarness, prog: str, pkt: bytes, dev: str, repeat: int, rounds: int) -> float:
    # the least disturbed round: other work on a shared 2-CPU machine only ever adds time
    return min(h.bench(prog, pkt, dev, repeat) for _ in range(rounds))


def measure(repeat: int = 30_000, rounds: int = 15, new_flows: int = 20_000,
            many_rules: bool = False, cold_sessions: int = COLD_SESSIONS) -> list[tuple[str, float, int | None]]:  # fmt: skip
    """[(case, ns per packet, target or None)]; ``cold_sessions`` 0: no cold-table case."""
    rs = RuleSet([Rule.from_dict(d) for d in RULES])
    settings = Settings(port_tries=64)
    out = []
    with RefNet() as net:
        with ProgHarness(net, defines={"SNAT_BENCH": 1}, test=False, max_sessions=2 * new_flows + 16) as h:
            h.apply(rs, settings, h.host_flags())
            udp_out = raw(IP(src=A, dst=R1) / UDP(sport=40000, dport=53) / PAD)
            tcp_out = raw(IP(src=A, dst=R1) / TCP(sport=40001, dport=80, flags="A") / PAD)
            # sessions to run against
            r = h.run("inside", udp_out, "lan40")
            h.run("inside", raw(IP(src=A, dst=R1) / TCP(sport=40001, dport=80, flags="S")), "lan40")
            snat = IP(r.packet)
            reply = raw(IP(src=R1, dst=snat.src) / UDP(sport=53, dport=snat[UDP].sport) / PAD)
            quoted = raw(IP(src=snat.src, dst=R1, ttl=63) / UDP(sport=snat[UDP].sport, dport=53) / PAD)
            err = raw(IP(src="192.0.2.2", dst=snat.src) / ICMP(type=3, code=3) / Raw(quoted))
            no_rule = raw(IP(src="192.0.2.50", dst=R1) / UDP(sport=1, dport=53) / PAD)
            base = _median_ns(h, "bench_noop", udp_out, "lan40", repeat, rounds)
            cases = [
                ("established (udp out)", "bench_inside", udp_out, "lan40", repeat),
                ("established (tcp out)", "bench_inside", tcp_out, "lan40", repeat),
                ("reply (udp in)", "bench_outside", reply, "eth1", repeat),
                ("icmp error in", "bench_outside", err, "eth1", repeat),
                ("no rule (fib + 3 rules)", "bench_inside", no_rule, "lan40", repeat),
                ("egress, translated (leak guard)", "bench_egress", r.packet, "eth1", repeat),
                ("egress, leak dropped", "bench_egress", udp_out, "eth1", repeat),
            ]  # fmt: skip
            for name, prog, pkt, dev, n in cases:
                out.append((name, _median_ns(h, prog, pkt, dev, n, rounds) - base, TARGETS.get(name)))
            new = raw(IP(src=A, dst=R1) / UDP(sport=10000, dport=53) / PAD)
            # one long run: each round inserts a fresh session (new_flows of them in all)
            ns = h.bench("bench_new", new, "lan40", new_flows) - base
            out.append(("new flow (udp)", ns, TARGETS["new flow (udp)"]))
            out.append(("(wrapper, subtracted)", base, None))
        # (bench_new's source ports: at most 12 x 4,000 flows, under 55,536)
        out += _route_back(net, rounds=min(6, max(2, rounds // 2)), flows=min(new_flows, 4000))
        est = next(ns for name, ns, _ in out if name == "established (udp out)")
        out += _pressure(net, repeat, rounds, new_flows, est)
        if cold_sessions:
            out.append(_new_flow_cold(net, cold_sessions, min(new_flows, 20_000), max(1, rounds // 3)))
        if many_rules:
            out.append(_new_flow_many_rules(net, repeat=min(new_flows, 2000), rounds=rounds))
    return out


def _route_back(net: RefNet, rounds: int, flows: int = 4000) -> list[tuple[str, float, None]]:
    """A new flow with its route back reused from the reverse-path check (CFG_F_BACK_FROM_RPF,
    as the daemon runs without iif policy rules) and looked up (as with them): one FIB lookup
    apart.  Alternating runs on one loaded object, each a fresh inside host's ``flows`` new
    flows; the least disturbed run of each (as _median_ns)."""
    rs = RuleSet([Rule.from_dict(d) for d in RULES])
    got: dict[int, list[float]] = {0: [], FLAG_BACK: []}
    with ProgHarness(net, defines={"SNAT_BENCH": 1}, test=False, max_sessions=2 * rounds * flows + 16) as h:
        base = None
        for i in range(2 * rounds):
            flag = FLAG_BACK if i % 2 else 0
            h.apply(rs, Settings(port_tries=64), flag)
            pkt = raw(IP(src=f"198.18.40.{100 + i}", dst=R1) / UDP(sport=1, dport=53) / PAD)
            if base is None:
                base = _median_ns(h, "bench_noop", pkt, "lan40", flows, 3)
            got[flag].append(h.bench("bench_new", pkt, "lan40", flows) - base)
    return [("new flow, route back reused", min(got[FLAG_BACK]), None),
            ("new flow, route back looked up", min(got[0]), None)]


def _pressure(net: RefNet, repeat: int, rounds: int, new_flows: int, est: float) -> list[tuple[str, float, int | None]]:
    """Under port pressure (one SNAT address, ``on_exhausted drop``): a packet of a flow refused
    moments ago (the refusal marker: target 2x an established packet), and a new flow whose
    whole search fails, for port_tries 128 (the default) and 1024 (the most), so the cost of
    one try can be read off."""
    rs = RuleSet([Rule.from_dict({"from": "198.18.40.0/24", "snat_ip": "198.19.2.71"})])
    out: list[tuple[str, float, int | None]] = []
    for tries in (PORT_TRIES, PORT_TRIES_MAX):
        with ProgHarness(net, defines={"SNAT_BENCH": 1}, test=False,
                         max_sessions=tries + new_flows + 16) as h:  # fmt: skip
            # exactly `tries` ports, all taken toward R1:53: every search tries them all
            h.apply(rs, Settings(port_min=20000, port_max=20000 + tries - 1, port_tries=tries, on_exhausted="drop"),
                    h.host_flags())
            for sport in range(1, tries + 1):
                h.run("inside", raw(IP(src="198.18.40.20", dst=R1) / UDP(sport=sport, dport=53) / PAD), "lan40")
            refused = raw(IP(src=A, dst=R1) / UDP(sport=40000, dport=53) / PAD)
            base = _median_ns(h, "bench_noop", refused, "lan40", repeat, rounds)
            if tries == PORT_TRIES:
                h.run("inside", refused, "lan40")  # refused once: marked
                before = h.reasons().get(Reason.DROP_REFUSED_RECENTLY, 0)
                ns = _median_ns(h, "bench_inside", refused, "lan40", repeat, rounds) - base
                met = h.reasons().get(Reason.DROP_REFUSED_RECENTLY, 0) - before
                if met != repeat * rounds:  # else the figure is not the marker's (it expired: a search)
                    raise RuntimeError(f"refused flow (marker): {met} of {repeat * rounds} runs met the marker")
                out.append(("refused flow (marker)", ns, round(2 * est)))
            n = max(1, min(new_flows, 5000))
            new = raw(IP(src=A, dst=R1) / UDP(sport=10000, dport=53) / PAD)
            # the whole search: the spill memo it leaves is removed before each flow (one run
            # per test run, the median of them)
            memo = h.maps[MAP_SPILL_MEMO]
            full = []
            for _ in range(max(1, min(n, 400))):
                for k in memo.keys():
                    memo.delete(k)
                full.append(h.bench("bench_new", new, "lan40", 1))
            out.append((f"new flow refused, {tries} tries", statistics.median(full) - base, None))
            if tries == PORT_TRIES:  # then, with the memo young, one try: what 3c's spilled flows pay
                ns = h.bench("bench_new", new, "lan40", n) - base
                out.append((f"new flow refused, {tries} tries, spill memo young", ns, None))
    return out


def _new_flow_cold(net: RefNet, sessions: int, new_flows: int, rounds: int) -> tuple[str, float, None]:
    """A new flow over a table that already holds ``sessions`` sessions (a 2M-entry map, as
    `snatgw bench` configures for its new-flow scenarios): the hash buckets and entries it
    touches are no longer in the cache, as in the live path.  The table is filled by test runs
    from other hosts (up to 60,000 flows each, each host to its own server port), then new
    flows come from fresh hosts; the least disturbed of ``rounds``."""
    per_host = min(sessions, 60_000)
    hosts = max(1, -(-sessions // per_host))
    best = None
    with ProgHarness(net, defines={"SNAT_BENCH": 1}, test=False, max_sessions=1 << 20) as h:
        h.apply(RuleSet([Rule.from_dict(d) for d in RULES]), Settings(port_tries=64), h.host_flags())
        for i in range(hosts):  # bench_new: a fresh source port every run
            pkt = raw(IP(src=f"198.18.40.{100 + i}", dst=f"203.0.113.{20 + i}") / UDP(sport=1, dport=53 + i) / PAD)
            h.bench("bench_new", pkt, "lan40", min(per_host, sessions - i * per_host))
        for r in range(rounds):
            pkt = raw(IP(src=f"198.18.40.{10 + r}", dst=R1) / UDP(sport=1, dport=1000 + r) / PAD)
            base = _median_ns(h, "bench_noop", pkt, "lan40", new_flows, 3)
            ns = h.bench("bench_new", pkt, "lan40", new_flows) - base
            best = ns if best is None else min(best, ns)
    return (f"new flow (udp), {sessions // 1000}k sessions", best, None)


def _new_flow_many_rules(net: RefNet, repeat: int, rounds: int) -> tuple[str, float, None]:
    """A new flow that only the last of 16384 rules matches (the rule scan's worst case)."""
    filler = [Rule.from_dict({"from": f"10.{i // 256}.{i % 256}.0/24", "snat_ip": "198.19.2.71"})
              for i in range(16383)]  # fmt: skip
    rs = RuleSet(filler + [Rule.from_dict({"from": "198.18.0.0/15", "snat_ip": "198.19.2.73"})])
    best = None
    for _ in range(max(1, rounds // 5)):
        with ProgHarness(net, defines={"SNAT_BENCH": 1}, test=False, max_sessions=repeat + 16) as h:
            h.apply(rs, Settings(port_tries=64), h.host_flags())
            new = raw(IP(src=A, dst=R1) / UDP(sport=10000, dport=53) / PAD)
            ns = h.bench("bench_new", new, "lan40", repeat) - h.bench("bench_noop", new, "lan40", repeat)
            best = ns if best is None else min(best, ns)
    return ("new flow, 16k rules", best, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m snatgw.bench.progbench", description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=30_000, help="runs per measurement (default 30000)")
    ap.add_argument("--rounds", type=int, default=15, help="measurements per case; the minimum is shown")
    ap.add_argument("--new-flows", type=int, default=20_000, help="sessions created by the new-flow run")
    ap.add_argument("--many-rules", action="store_true", help="also: a new flow scanning 16384 rules")
    ap.add_argument("--cold-sessions", type=int, default=COLD_SESSIONS,
                    help=f"sessions already in the table of the cold new-flow case (default {COLD_SESSIONS}; 0: skip)")
    a = ap.parse_args(argv)
    rows = measure(a.repeat, a.rounds, a.new_flows, a.many_rules, a.cold_sessions)
    print(f"{'case':<26} {'ns/pkt':>8} {'target':>8}")
    for name, ns, target in rows:
        mark = "" if target is None else ("  ok" if ns <= target else "  OVER")
        print(f"{name:<26} {ns:>8.0f} {target if target else '':>8}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
