"""Pure statistics over benchmark records: spread (median, min/max, quartiles), the gateway's
cost per packet against the drop baseline of the same round, and ratios between configs.

A record is a dict: scenario, config, round, status ("ok" | "n/a" | "error"), metric, value,
and for packet metrics cpu_ns (CPU time per packet, all CPUs).  Costs are paired per round
(config round r minus drop round r) because rounds are interleaved, in the hope that a slow
spell of the machine hits both sides of the subtraction.  On the project's VM it does not:
over turn 18's five runs (15 rounds a scenario) a configuration's paired cost spread as much
as its raw 1e9/pps (3a, snatgw-bpf: standard deviation 515 against 562 ns; forward's cost, the
same work every round, 323-2,659 ns in 3c): each 3-second run has its own luck.  So a ratio
of medians over three rounds moves by tens of percent between runs; ``isolated_interval``
says by how much, from the rounds of the run itself.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass

PACKET_METRICS = ("pps",)


@dataclass(frozen=True)
class Spread:
    n: int
    median: float
    min: float
    max: float
    q1: float
    q3: float

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: how far apart the rounds were."""
        return (self.max - self.min) / self.median if self.median else 0.0


def spread(values: list[float]) -> Spread | None:
    """Median, min, max and quartiles (inclusive method: defined for n >= 1)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Spread(len(vals), statistics.median(vals), vals[0], vals[-1], q1, q3)


def baseline_scenario(scenario: str) -> str:
    """Which scenario's drop run is the baseline: rule scaling uses the one-flow drop of its round."""
    return "rules-1" if scenario.startswith("rules-") else scenario


def cost_ns(pps: float | None, drop_pps: float | None) -> float | None:
    """Gateway cost per packet: 1e9/pps(config) - 1e9/pps(drop)."""
    if not pps or not drop_pps:
        return None
    return 1e9 / pps - 1e9 / drop_pps


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r.get("value") is not None]


def group(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        out.setdefault((r["scenario"], r["config"]), []).append(r)
    return out


def summarize(records: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (scenario, config): status, metric, spread of the value, and for packet metrics the
    spread of the per-round gateway cost and CPU cost (both minus the drop baseline)."""
    drops = {(r["scenario"], r["round"]): r for r in _ok(records) if r["config"] == "drop"}
    out = {}
    for (scen, cfg), recs in group(records).items():
        ok = _ok(recs)
        entry: dict = {"scenario": scen, "config": cfg, "rounds": len(recs), "ok": len(ok)}
        if not ok:
            bad = [r for r in recs if r.get("status") != "ok"]
            entry["status"] = bad[0].get("status", "n/a") if bad else "n/a"
            entry["reason"] = bad[0].get("reason", "no measurement") if bad else "no measurement"
            out[(scen, cfg)] = entry
            continue
        entry["status"] = "ok"
        entry["metric"] = ok[0].get("metric", "pps")
        entry["value"] = spread([r["value"] for r in ok])
        if entry["metric"] in PACKET_METRICS and cfg != "drop":
            costs, cpus = [], []
            for r in ok:
                d = drops.get((baseline_scenario(scen), r["round"]))
                if d:
                    costs.append(cost_ns(r["value"], d["value"]))
                    if r.get("cpu_ns") is not None and d.get("cpu_ns") is not None:
                        cpus.append(r["cpu_ns"] - d["cpu_ns"])
            entry["cost_ns"] = spread(costs)
            entry["cpu_cost_ns"] = spread(cpus)
        out[(scen, cfg)] = entry
    return out


def paired_isolated(records: list[dict], scenario: str, cfg: str, ref: str) -> list[tuple[int, float | None]]:
    """(round, cost(ref) / cost(cfg)) for every round in which both ran, each cost against its
    own round's drop run.  The configurations of a round run minutes apart, the rounds of a
    run many minutes apart: a round's ratio compares two measurements the machine's drifts
    touched alike, where the ratio of the medians may pair a quick round with a slow one.
    A round where either configuration cost nothing or less than its drop run (it outran the
    delivery it is measured against: the round measured noise) gives (round, None), never a
    ratio of zero or below."""
    return [(rnd, cb / ca if ca > 0 and cb > 0 else None) for rnd, ca, cb in round_costs(records, scenario, cfg, ref)]


def round_costs(records: list[dict], scenario: str, cfg: str, ref: str) -> list[tuple[int, float, float]]:
    """(round, cost(cfg), cost(ref)) for every round of ``scenario`` in which both ran, each
    against its round's drop run (baseline_scenario's, as summarize pairs them)."""
    ok = {(r["config"], r["round"]): r for r in _ok(records) if r["scenario"] == scenario}
    base = baseline_scenario(scenario)
    drops = {r["round"]: r for r in _ok(records) if r["scenario"] == base and r["config"] == "drop"}
    out = []
    for rnd in sorted({r for c, r in ok if c == cfg}):
        a, b, d = ok.get((cfg, rnd)), ok.get((ref, rnd)), drops.get(rnd)
        if not (a and b and d) or a.get("metric", "pps") not in PACKET_METRICS:
            continue
        ca, cb = cost_ns(a["value"], d["value"]), cost_ns(b["value"], d["value"])
        if ca is not None and cb is not None:
            out.append((rnd, ca, cb))
    return out


def median_of(summary: dict, scenario: str, config: str, field: str = "value") -> float | None:
    e = summary.get((scenario, config))
    if not e or e.get("status") != "ok" or not e.get(field):
        return None
    return e[field].median


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def speedup_e2e(summary: dict, scenario: str, cfg: str, ref: str) -> float | None:
    """End to end: value(cfg) / value(ref) (pps, conn/s, Gbit/s: higher is better)."""
    return ratio(median_of(summary, scenario, cfg), median_of(summary, scenario, ref))


def speedup_isolated(summary: dict, scenario: str, cfg: str, ref: str, field: str = "cost_ns") -> float | None:
    """Gateway isolated: cost(ref) / cost(cfg); > 1 means cfg is cheaper per packet.
    ``field`` "cpu_cost_ns" uses the pipeline's CPU time instead of 1e9/pps."""
    c, r = median_of(summary, scenario, cfg, field), median_of(summary, scenario, ref, field)
    if c is None or r is None or c <= 0:
        return None
    return r / c


def isolated_interval(records: list[dict], scenario: str, cfg: str, ref: str, level: float = 0.9,
                      resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """How far speedup_isolated's ratio of the medians could move with other rounds like these:
    the percentile bootstrap over rounds (each resampled round keeps its drop, cfg and ref
    runs together, as the estimator pairs them), ``level`` of the resamples' ratios inside
    (lo, hi).  None with fewer than three complete rounds: two rounds say nothing about their
    spread.  A fixed seed: the same records give the same interval (reports are compared)."""
    rounds = [(ca, cb) for _, ca, cb in round_costs(records, scenario, cfg, ref)]
    if len(rounds) < 3:
        return None
    rng = random.Random(seed)
    got = []
    for _ in range(resamples):
        pick = [rounds[rng.randrange(len(rounds))] for _ in rounds]
        c = statistics.median(x for x, _ in pick)
        r = statistics.median(y for _, y in pick)
        if c > 0 and r > 0:
            got.append(r / c)
    if len(got) < resamples // 2:  # most resamples measured noise (costs at or below zero)
        return None
    got.sort()
    tail = (1 - level) / 2
    return got[int(tail * (len(got) - 1))], got[int((1 - tail) * (len(got) - 1))]
