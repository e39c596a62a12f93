"""PNG plots of a results dict (matplotlib, Agg): per scenario, one bar per configuration
(median, whiskers min–max) and, when measured, the rule-scaling line.  Returns the files written.
"""

from __future__ import annotations

from pathlib import Path

from . import stats as st
from .report import CONFIG_ORDER, ORDER, TITLES, UDP

COLORS = {"drop": "#999999", "forward": "#4c72b0", "nft-kernel": "#dd8452", "snatgw-nft": "#937860",
          "snatgw-bpf": "#55a868", "snatgw-bpf-audit": "#8fd19e",
          "snatgw-bpf-hostlimit": "#2e7d4f"}


def _bars(ax, summary: dict, scenario: str, field: str = "value") -> bool:
    names, med, lo, hi = [], [], [], []
    for c in CONFIG_ORDER:
        e = summary.get((scenario, c))
        s = e.get(field) if e and e.get("status") == "ok" else None
        if s is None:
            continue
        scale = 1e6 if e["metric"] == "pps" and field == "value" else 1.0
        names.append(c)
        med.append(s.median / scale)
        lo.append((s.median - s.min) / scale)
        hi.append((s.max - s.median) / scale)
    if not names:
        return False
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color=[COLORS.get(n, "#777") for n in names])
    metric = summary[(scenario, names[0])]["metric"]
    ax.set_title(TITLES.get(scenario, scenario), fontsize=10)
    ax.set_ylabel("Mpps" if metric == "pps" and field == "value" else ("gateway ns/pkt" if field == "cost_ns" else metric))
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    for i, v in enumerate(med):
        ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=7)
    return True


def plot(results: dict, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = st.summarize(results.get("records", []))
    written: list[Path] = []
    panels = [(s, "value") for s in ORDER if any(k[0] == s for k in summary)]
    panels += [(s, "cost_ns") for s in UDP if any(k[0] == s and summary[k].get("cost_ns") for k in summary)]
    if panels:
        cols = 3
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
        for ax, (s, f) in zip(axes.flat, panels):
            if not _bars(ax, summary, s, f):
                ax.set_visible(False)
            elif f == "cost_ns":
                ax.set_title(f"{TITLES[s]}: gateway cost", fontsize=10)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"snatgw bench {results.get('timestamp', '')} (median, whiskers min–max)", fontsize=11)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(Path(path))
    counts = sorted({int(s.split("-")[1]) for s, _ in summary if s.startswith("rules-")})
    if counts:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for c in CONFIG_ORDER[2:]:
            pts = [(n, summary.get((f"rules-{n}", c))) for n in counts]
            pts = [(n, e["value"]) for n, e in pts if e and e.get("status") == "ok"]
            if pts:
                ax.errorbar([n for n, _ in pts], [s.median / 1e6 for _, s in pts],
                            yerr=[[(s.median - s.min) / 1e6 for _, s in pts], [(s.max - s.median) / 1e6 for _, s in pts]],
                            marker="o", capsize=3, label=c, color=COLORS.get(c))
        ax.set_xscale("log")
        ax.set_xlabel("rules (matching rule last in priority)")
        ax.set_ylabel("Mpps, one established flow")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
        ax.set_title("5. rule-count scaling", fontsize=10)
        fig.tight_layout()
        rp = Path(path).with_name(Path(path).stem + "-rules.png")
        fig.savefig(rp, dpi=110)
        plt.close(fig)
        written.append(rp)
    return written
