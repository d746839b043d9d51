"""comparison.md, comparison.json and comparison.png of `bra-sae compare`, from a `Comparison` alone.

Pure: each function turns the comparison into a string, a JSON-ready dict or a matplotlib `Figure` (drawn
on the Agg canvas, as `bra.audit.plots` does, so no global backend is set); `bra.audit.compare` writes
them. A method a run lacks is absent (``absent`` in the markdown, no key in the JSON), never a zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from bra.audit._compare_types import AurocRow, Comparison, MeanCI, Proportion, RunSummary
from bra.audit.config import OURS
from bra.vocab import DEPTH_CATEGORIES

MISSING = "–"
"""Shown for a value that is undefined (no prompts, fewer than 2 values for an interval)."""
ABSENT = "absent"
"""Shown for an AUROC method a run's report does not have."""
DEFINITIONS = {
    "refusal_rate": "share of the tier's prompts (all splits) whose surface label is refuse; 95% Wilson "
                    "score interval",
    "auroc": "hazard-adjacent vs benign on the test split, as report.json has it: 95% stratified bootstrap "
             "CI, one-sided permutation p-value",
    "depth": "share of the categorised test prompts; 95% Wilson score interval",
    "d_mean": "mean of D = 1 - cos(f, Tᵀs) over the tier's test prompts where D is defined; 95% Student-t "
              "interval",
}
"""What each table holds and which interval its numbers carry (comparison.json and .md say the same)."""
RUNS_HEADER = ["run", "model", "SAE", "layer", "eval store", "prompts", "test prompts", "report"]


# ------------------------------------------------------------------------------------------------ JSON


def _interval(interval: tuple[float, float] | None) -> dict[str, float | None]:
    return {"ci_low": interval[0] if interval else None, "ci_high": interval[1] if interval else None}


def _proportion(p: Proportion) -> dict[str, Any]:
    return {"k": p.k, "n": p.n, "share": p.share, **_interval(p.interval)}


def _mean(m: MeanCI) -> dict[str, Any]:
    return {"n": m.n, "mean": m.mean, **_interval(m.interval)}


def _auroc(r: AurocRow) -> dict[str, Any]:
    return {"kind": r.kind, "auroc": r.auroc, "ci_low": r.ci_low, "ci_high": r.ci_high, "p_value": r.p_value,
            "reason": r.reason}


def _run_json(run: RunSummary) -> dict[str, Any]:
    f = run.facts
    return {"label": run.label, "report_dir": f.path, "model_id": f.model_id, "sae": f.sae, "layer": f.layer,
            "store": f.store, "variant": f.variant, "n_prompts": f.n_prompts, "n_test": f.n_test,
            "refusal_rate_by_tier": {t: _proportion(p) for t, p in run.refusal_by_tier.items()},
            "auroc": {m: _auroc(r) for m, r in run.auroc.items()},
            "depth_categories": {c: _proportion(p) for c, p in run.depth.items()},
            "d_mean_by_tier": {t: _mean(m) for t, m in run.d_by_tier.items()}}


def comparison_json(c: Comparison) -> dict[str, Any]:
    """comparison.json's contents (no timestamps: the same reports give the same file)."""
    return {"n_runs": len(c.runs), "tiers": list(c.tiers), "methods": list(c.methods),
            "depth_categories": list(_depth_rows(c)), "definitions": DEFINITIONS,
            "runs": [_run_json(r) for r in c.runs]}


# -------------------------------------------------------------------------------------------- markdown


def _num(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


def _ci(interval: tuple[float, float] | None) -> str:
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"[{MISSING}]"


def _cell(text: object) -> str:
    """A markdown table cell: pipes escaped and newlines flattened, so a label cannot break the table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _prop_cell(p: Proportion | None) -> str:
    if p is None:
        return MISSING
    return f"{_num(p.share)} {_ci(p.interval)} ({p.k}/{p.n})"


def _auroc_cell(r: AurocRow | None) -> str:
    if r is None:
        return ABSENT
    if r.auroc is None:
        return f"n/a ({r.reason or 'not scored'})"
    return f"{r.auroc:.3f} [{_num(r.ci_low)}, {_num(r.ci_high)}], p={_num(r.p_value)}"


def _mean_cell(m: MeanCI | None) -> str:
    if m is None or m.mean is None:
        return MISSING
    return f"{m.mean:.3f} {_ci(m.interval)} (n={m.n})"


def _depth_rows(c: Comparison) -> list[str]:
    """Depth categories of any run: the standard ones first."""
    extra = sorted({k for r in c.runs for k in r.depth} - set(DEPTH_CATEGORIES))
    return list(DEPTH_CATEGORIES) + extra


def _section(title: str, note: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return ["", f"## {title}", "", note[:1].upper() + note[1:], "", *_table(header, rows)]


def comparison_markdown(c: Comparison) -> str:
    """comparison.md: runs, refusal rate by tier, AUROC, depth verdicts and D mean, each with its interval."""
    labels = [r.label for r in c.runs]
    runs = [[r.label, r.facts.model_id or MISSING, r.facts.sae,
             MISSING if r.facts.layer is None else str(r.facts.layer), r.facts.store or MISSING,
             str(r.facts.n_prompts), str(r.facts.n_test), r.facts.path] for r in c.runs]
    lines = [f"# Refusal-depth comparison ({len(c.runs)} run{'s' if len(c.runs) != 1 else ''})", "",
             "Cells read `value [95% interval] (count)`; `–` is undefined, `absent` a method that the run's "
             "report does not have."]
    lines += _section("Runs", "One score report folder each (`bra-sae score`).",
                      RUNS_HEADER, runs)
    lines += _section("Refusal rate by tier", f"{DEFINITIONS['refusal_rate']}.", ["run", *c.tiers],
                      [[r.label, *(_prop_cell(r.refusal_by_tier.get(t)) for t in c.tiers)] for r in c.runs])
    lines += _section("Hazard AUROC", f"{DEFINITIONS['auroc']}; `{OURS}` is the audited SAE.",
                      ["method", *labels], [[m, *(_auroc_cell(r.auroc.get(m)) for r in c.runs)]
                                            for m in c.methods])
    lines += _section("Refusal-depth verdicts (test split)", f"{DEFINITIONS['depth']}.",
                      ["category", *labels], [[d, *(_prop_cell(r.depth.get(d)) for r in c.runs)]
                                              for d in _depth_rows(c)])
    lines += _section("D mean by tier (test split)", f"{DEFINITIONS['d_mean']}.", ["run", *c.tiers],
                      [[r.label, *(_mean_cell(r.d_by_tier.get(t)) for t in c.tiers)] for r in c.runs])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plot


def _yerr(values: list[float | None], intervals: list[tuple[float, float] | None]) -> np.ndarray:
    """[2, n] error-bar lengths below and above each value (0 where there is no interval)."""
    lo = [v - i[0] if v is not None and i else 0.0 for v, i in zip(values, intervals, strict=True)]
    hi = [i[1] - v if v is not None and i else 0.0 for v, i in zip(values, intervals, strict=True)]
    return np.clip(np.array([lo, hi], dtype=np.float64), 0.0, None)


def _colour(i: int) -> str:
    """Run i's colour, the same in both panels (matplotlib's default cycle)."""
    return f"C{i % 10}"


def _plot_refusal(ax: Any, c: Comparison) -> None:
    """Grouped bars: one group per tier, one bar per run, with Wilson error bars."""
    x = np.arange(len(c.tiers))
    width = 0.8 / max(len(c.runs), 1)
    for i, run in enumerate(c.runs):
        props = [run.refusal_by_tier.get(t) for t in c.tiers]
        values = [p.share if p else None for p in props]
        ax.bar(x - 0.4 + width * (i + 0.5), [v if v is not None else np.nan for v in values], width,
               yerr=_yerr(values, [p.interval if p else None for p in props]), capsize=3, label=run.label,
               color=_colour(i))
    ax.set_xticks(x, c.tiers, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("refusal rate")
    ax.set_title("Refusal rate by tier (all splits; bars: 95% Wilson)", fontsize=10)
    ax.legend(fontsize=7)


def _plot_auroc(ax: Any, c: Comparison) -> None:
    """Our SAE's AUROC per run with its bootstrap CI; a run without one says n/a."""
    for i, run in enumerate(c.runs):
        row = run.auroc.get(OURS)
        if row is None or row.auroc is None:
            ax.text(i, 0.5, "n/a", ha="center", va="center", fontsize=8, color="grey")
            continue
        interval = (row.ci_low, row.ci_high) if row.ci_low is not None and row.ci_high is not None else None
        ax.errorbar([i], [row.auroc], yerr=_yerr([row.auroc], [interval]), fmt="o", capsize=4,
                    color=_colour(i))
    ax.axhline(0.5, ls=":", color="grey")
    ax.set_xticks(range(len(c.runs)), [r.label for r in c.runs], fontsize=7, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(c.runs) - 0.5)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(f"AUROC ({OURS}), test split")
    ax.set_title(f"AUROC of {OURS!r} (95% bootstrap CI)", fontsize=10)


def render_comparison_plot(c: Comparison) -> Figure:
    """comparison.png: refusal rate by tier per run, and our SAE's AUROC per run, each with its interval."""
    fig = Figure(figsize=(11 + 0.4 * len(c.runs), 4.5), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[2, 1])
    _plot_refusal(ax1, c)
    _plot_auroc(ax2, c)
    return fig
