"""`snatgw bench`: the benchmark suite (snatgw.bench.runner) in namespaces of its own; writes
bench/results/<UTC timestamp>.{json,md,png} and latest.{md,png}.  Needs root."""

from __future__ import annotations

import argparse
import os
import shutil

from ...bench.gateways import CONFIGS
from ...bench.scenarios import ALL_SCENARIOS, TITLES
from ...errors import SnatgwError

HELP = "run the benchmark suite (own namespaces; results in bench/results/)"
DESCRIPTION = """\
Measure the gateway configurations drop (baseline), forward, nft-kernel, snatgw-nft and
snatgw-bpf over the scenarios below, in namespaces the suite creates and always removes.
Rounds interleave the configurations; results are medians with [min-max] spread.
Gateway cost ns/pkt = 1e9/pps(config) - 1e9/pps(drop).  See bench/README.md.

Scenarios:
""" + "\n".join(f"  {k:<14} {v}" for k, v in TITLES.items())


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="1 s rounds, 50k-session fill, 1 and 10000 rules (about 3 min)")
    p.add_argument("--scenario", action="append", choices=ALL_SCENARIOS, metavar="NAME",
                   help="run only this scenario (repeatable); default all")
    p.add_argument("--config", action="append", choices=CONFIGS, metavar="NAME",
                   help="run only this configuration (repeatable); default all")
    p.add_argument("--rounds", type=int, help="rounds per measurement (default 3)")
    p.add_argument("--duration", type=float, help="seconds per round (default 3, --quick 1)")
    p.add_argument("--max-sessions", type=int, metavar="N",
                   help="snatgw's session table size in the packet scenarios (default 1048576, --quick 262144)")
    p.add_argument("--out", default="bench/results", help="results directory (default bench/results)")
    p.add_argument("--pool", nargs="+", metavar="RESULTS.json",
                   help="measure nothing: pool the rounds of these results files (runs of the same code on "
                        "one machine) and judge issue 11's new-flow targets over them (text; with --json, JSON)")
    p.add_argument("-j", "--json", action="store_true", help="with --pool: print one JSON object")
    p.add_argument("--rps", metavar="CPUS",
                   help="receive packet steering on the gateway's in0 and up0 for every configuration: all or "
                        "a CPU list (0-3,6); default off")


def rps_mask(value: str | None) -> str | None:
    """``--rps``: None (off), or the mask of ``all`` or a CPU list of online CPUs, as the
    daemon's `rps_cpus` takes them; SnatgwError saying what is wrong."""
    from ...config.parse import parse_rps_cpus
    from ...daemon import rps

    if value is None or value == "off":
        return None
    try:
        setting = parse_rps_cpus(value)
    except ValueError as e:
        raise SnatgwError(f"--rps: {e}") from None
    cpus, _ = rps.wanted_cpus(setting, rps.online_cpus())
    return rps.format_mask(cpus, rps.possible_cpus())


def pool(paths: list[str], as_json: bool) -> int:
    """`bench --pool`: issue 11's targets over the rounds of several results files."""
    import json

    from ...bench.report import pool_records, pooled_targets

    runs = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                runs.append((path, json.load(f)))
        except OSError as e:
            raise SnatgwError(f"--pool: {path}: {e.strerror}") from None
        except ValueError as e:
            raise SnatgwError(f"--pool: {path}: not JSON: {e}") from None
    try:
        rows = pooled_targets(pool_records(runs))
    except ValueError as e:
        raise SnatgwError(f"--pool: {e}") from None
    if not rows:
        raise SnatgwError("--pool: no round of these files has both nft-kernel and snatgw-bpf in 3a, 3a' or 3c "
                          "(run `snatgw bench --scenario udp-newflows ... --config drop --config nft-kernel "
                          "--config snatgw-bpf`)")
    if as_json:
        print(json.dumps({"files": paths, "targets": rows}, indent=2))
        return 0
    print(f"issue 11's new-flow targets over the pooled rounds of {len(paths)} run(s), gateway-isolated "
          "nft-kernel / snatgw-bpf:")
    for r in rows:
        iv = "—" if r["interval"] is None else f"[{r['interval'][0]:.2f}-{r['interval'][1]:.2f}]"
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"  {r['title']:<40} >= {r['target']:g}x: {ratio} {iv} over {r['rounds']} rounds; "
              f"nft-kernel {r['nft_kernel_ns']:,} / snatgw-bpf {r['snatgw_bpf_ns']:,} ns: {r['verdict']}")
    return 0


def run(args) -> int:
    from ...bench.runner import Params, Suite, write_results

    if args.pool:
        return pool(args.pool, args.json)
    if args.json:
        raise SnatgwError("--json goes with --pool (a run writes its JSON to --out)")
    if os.geteuid() != 0:
        raise SnatgwError("bench needs root: it creates network namespaces and loads nftables/BPF")
    for tool in ("ip", "nft", "trafgen", "iperf3", "taskset", "nsenter"):
        if shutil.which(tool) is None:
            raise SnatgwError(f"bench needs `{tool}` (scripts/setup.sh installs it)")
    if args.rounds is not None and not 1 <= args.rounds <= 20:
        raise SnatgwError(f"--rounds: expected 1..20, got {args.rounds}")
    if args.duration is not None and not 0.2 <= args.duration <= 30:
        raise SnatgwError(f"--duration: expected 0.2..30 seconds, got {args.duration}")
    if args.max_sessions is not None and not 1024 <= args.max_sessions <= 1 << 24:
        raise SnatgwError(f"--max-sessions: expected 1024..16777216, got {args.max_sessions}")
    params = Params.make(args.quick, rounds=args.rounds, duration=args.duration, out_dir=args.out,
                         max_sessions=args.max_sessions, rps=rps_mask(args.rps),
                         scenarios=tuple(args.scenario) if args.scenario else None,
                         configs=tuple(c for c in CONFIGS if c in args.config) if args.config else None)
    results = Suite(params, echo=lambda s: print(s, flush=True)).run()
    paths = write_results(results, params.out_dir)
    print(f"results: {paths['json']}  report: {paths['md']}")
    return 0
