"""The PNG plots of report.html (test split only), drawn on matplotlib's Agg canvas through `Figure`, so no
global backend is set and nothing else in the process is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bra.audit.classes import tier_order
from bra.audit.config import TEST, ScoreConfig, ScoreResult
from bra.vocab import (
    BENIGN_TIER,
    CONTROL_TIERS,
    DUAL_USE_TIER,
    FRAMINGS,
    HAZARD_TIER,
    SURFACE_CLASSES,
    UNKNOWN,
)

_CONTROL_COLOURS = ("#66a61e", "#a6761d", "#e7298a", "#e6ab02", "#1f78b4")  # in CONTROL_TIERS order
TIER_COLOURS = {BENIGN_TIER: "#1b9e77", DUAL_USE_TIER: "#7570b3", HAZARD_TIER: "#d95f02",
                **dict(zip(CONTROL_TIERS, _CONTROL_COLOURS, strict=True))}
"""Colour of each tier's points (any other tier is grey)."""
PLOT_FILES = {"d_by_group": "d_by_tier_framing.png", "roc": "roc.png", "depth": "depth_scores.png",
              "reliability": "reliability.png"}
"""Plot -> its file name in the output folder (report.html links them by these relative names)."""


def _box_strip(ax: Any, groups: list[str], values: list[np.ndarray], colours: list[str],
               rng: np.random.Generator, title: str) -> None:
    """A box plot per group with the group's values jittered over it."""
    pos = np.arange(len(groups))
    ax.boxplot([v if len(v) else [np.nan] for v in values], positions=pos, widths=0.5, showfliers=False)
    for x, v, c in zip(pos, values, colours, strict=True):
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(v)), v, s=18, color=c, alpha=0.8, zorder=3)
    ax.set_xticks(pos, [f"{g}\n(n={len(v)})" for g, v in zip(groups, values, strict=True)], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("D = 1 - cos(f, Tᵀs)")


def render_plots(out: Path, r: ScoreResult, scores: pd.DataFrame, cfg: ScoreConfig) -> None:
    """Write the PNGs into ``out`` (test split only)."""
    test = scores[scores["split"] == TEST]
    tiers = list(tier_order(test["tier"].astype(str)))  # every tier, control tiers included
    rng = np.random.default_rng(cfg.seed)  # one jitter stream for both scatter plots, in this order
    _plot_d(test, tiers, rng, r.d_fit["threshold"]).savefig(out / PLOT_FILES["d_by_group"], dpi=110)
    _plot_roc([row for row in r.auroc if row["segment"] == cfg.probe_segment], r.classes.positive,
              r.classes.negative, cfg.probe_segment).savefig(out / PLOT_FILES["roc"], dpi=110)
    _plot_depth(test, tiers, rng, r.scale.t_deep, r.scale.t_shallow).savefig(out / PLOT_FILES["depth"],
                                                                             dpi=110)
    _plot_reliability(r.probe_calibration).savefig(out / PLOT_FILES["reliability"], dpi=110)


def _plot_d(test: pd.DataFrame, tiers: list[str], rng: np.random.Generator, d_threshold: float | None
            ) -> Figure:
    """D by tier and by framing, box plus jittered points, with the calibrated D threshold (if any)."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    _box_strip(ax1, tiers, [test.loc[test["tier"] == t, "D"].dropna().to_numpy() for t in tiers],
               [TIER_COLOURS.get(t, "grey") for t in tiers], rng, "D by tier (test split)")
    framings = [f for f in FRAMINGS if f in set(test["framing"])]
    _box_strip(ax2, framings, [test.loc[test["framing"] == f, "D"].dropna().to_numpy() for f in framings],
               ["#444444"] * len(framings), rng, "D by framing (test split)")
    if d_threshold is not None:
        ax1.axhline(d_threshold, ls="--", lw=0.8, color="red")
        ax2.axhline(d_threshold, ls="--", lw=0.8, color="red")
    return fig


def _plot_roc(auroc: list[dict[str, Any]], positive: tuple[str, ...], negative: tuple[str, ...],
              segment: str) -> Figure:
    """Every method's ROC curve on one input segment with its bootstrap band (``positive`` / ``negative``:
    the tier classes)."""
    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "--", "-.", ":"]
    for i, row in enumerate(auroc):
        roc = row.get("roc")
        if not roc:
            continue
        label = f"{row['method']}: {row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        # line styles cycle so that methods with identical curves stay visible
        line = ax.plot(roc["fpr"], roc["tpr"], lw=1.6, ls=styles[i % len(styles)], label=label)[0]
        ax.fill_between(roc["fpr"], roc["lo"], roc["hi"], color=line.get_color(), alpha=0.12, lw=0)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel(f"false positive rate ({' + '.join(negative)})")
    ax.set_ylabel(f"true positive rate ({' + '.join(positive)})")
    ax.set_title(f"ROC on the {segment} segment, test split (bands: 95% pointwise bootstrap)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", title="AUROC [95% CI]", title_fontsize=7)
    return fig


def _plot_depth(test: pd.DataFrame, tiers: list[str], rng: np.random.Generator, t_deep: float | None,
                t_shallow: float | None) -> Figure:
    """Depth score against surface label, one colour per tier, with the calibrated deep / shallow
    thresholds (the band between them is uncertain)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    labels = list(SURFACE_CLASSES) + [UNKNOWN]
    for tier in tiers:
        sub = test[test["tier"] == tier]
        x = np.array([labels.index(lab) if lab in labels else len(labels) - 1
                      for lab in sub["surface_label"]])
        ax.scatter(x + rng.uniform(-0.2, 0.2, len(x)), sub["depth_score"], s=22, alpha=0.8,
                   color=TIER_COLOURS.get(tier, "grey"), label=tier)
    if t_deep is not None:
        ax.axhline(t_deep, ls="--", lw=0.8, color="#1b9e77", label=f"t_deep {t_deep:.2f}")
    if t_shallow is not None:
        ax.axhline(t_shallow, ls="--", lw=0.8, color="red", label=f"t_shallow {t_shallow:.2f}")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("surface label")
    ax.set_ylabel("depth score (completion hazard evidence, calibrated)")
    ax.set_title("Surface label × depth score (test split)", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def _plot_reliability(cal: dict[str, Any]) -> Figure:
    """Reliability diagram of our probe on the test split: observed hazard rate per predicted-probability
    bin with its Wilson interval, against the diagonal."""
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    bins = cal.get("bins")
    if bins:
        keep = [i for i, n in enumerate(bins["n"]) if n]
        x = np.array([bins["mean_predicted"][i] for i in keep])
        y = np.array([bins["observed_rate"][i] for i in keep])
        lo = np.array([bins["observed_lo"][i] for i in keep])
        hi = np.array([bins["observed_hi"][i] for i in keep])
        ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", capsize=3)
        for xi, yi, i in zip(x, y, keep, strict=True):
            ax.annotate(str(bins["n"][i]), (xi, yi), fontsize=7, xytext=(4, 4), textcoords="offset points")
    brier = cal.get("brier")
    ax.set_title(f"Probe reliability, test split (Brier {brier:.3f})" if brier is not None
                 else f"Probe reliability: {cal.get('reason')}", fontsize=10)
    ax.set_xlabel("predicted P(hazard)")
    ax.set_ylabel("observed hazard share (95% Wilson)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    return fig
