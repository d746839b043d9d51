"""report.html and its PNGs (matplotlib's Agg canvas through `Figure`, so no global backend is set)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bra.audit.config import ScoreConfig, ScoreResult
from bra.audit.divergence import CATEGORIES, SURFACE
from bra.vocab import BENIGN_TIER, DUAL_USE_TIER, FRAMINGS, HAZARD_TIER, TIERS, UNKNOWN

_TIER_COLOURS = {BENIGN_TIER: "#1b9e77", DUAL_USE_TIER: "#7570b3", HAZARD_TIER: "#d95f02"}
_PLOTS = {"d_by_group": "d_by_tier_framing.png", "roc": "roc.png", "surface_hazard": "surface_hazard.png"}


def esc(x: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(x))


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else esc(x)


def _box_strip(ax: Any, groups: list[str], values: list[np.ndarray], colours: list[str],
               rng: np.random.Generator, title: str) -> None:
    pos = np.arange(len(groups))
    ax.boxplot([v if len(v) else [np.nan] for v in values], positions=pos, widths=0.5, showfliers=False)
    for x, v, c in zip(pos, values, colours, strict=True):
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(v)), v, s=18, color=c, alpha=0.8, zorder=3)
    ax.set_xticks(pos, [f"{g}\n(n={len(v)})" for g, v in zip(groups, values, strict=True)], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("D = 1 - cos(f, Tᵀs)")


def render_plots(out: Path, r: ScoreResult, scores: pd.DataFrame, cfg: ScoreConfig) -> None:
    """Write the three PNGs into ``out`` (test split only)."""
    test = scores[scores["split"] == "test"]
    rng = np.random.default_rng(cfg.seed)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    tiers = [t for t in TIERS if t in set(test["tier"])]
    _box_strip(ax1, tiers, [test.loc[test["tier"] == t, "D"].dropna().to_numpy() for t in tiers],
               [_TIER_COLOURS.get(t, "grey") for t in tiers], rng, "D by tier (test split)")
    framings = [f for f in FRAMINGS if f in set(test["framing"])]
    _box_strip(ax2, framings, [test.loc[test["framing"] == f, "D"].dropna().to_numpy() for f in framings],
               ["#444444"] * len(framings), rng, "D by framing (test split)")
    ax1.axhline(cfg.d_threshold, ls="--", lw=0.8, color="red")
    ax2.axhline(cfg.d_threshold, ls="--", lw=0.8, color="red")
    fig.savefig(out / _PLOTS["d_by_group"], dpi=110)

    fig = Figure(figsize=(6.5, 6), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "--", "-.", ":"]
    for i, row in enumerate(r.auroc):
        roc = row.get("roc")
        if not roc:
            continue
        label = f"{row['method']}: {row['auroc']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
        # line styles cycle so that methods with identical curves stay visible
        line = ax.plot(roc["fpr"], roc["tpr"], lw=1.6, ls=styles[i % len(styles)], label=label)[0]
        ax.fill_between(roc["fpr"], roc["lo"], roc["hi"], color=line.get_color(), alpha=0.12, lw=0)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("false positive rate (benign_bio)")
    ax.set_ylabel("true positive rate (hazard_adjacent_category)")
    ax.set_title("ROC, test split (bands: 95% pointwise bootstrap)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", title="AUROC [95% CI]", title_fontsize=7)
    fig.savefig(out / _PLOTS["roc"], dpi=110)

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    labels = list(SURFACE) + [UNKNOWN]
    for tier in tiers:
        sub = test[test["tier"] == tier]
        x = np.array([labels.index(lab) if lab in labels else len(labels) - 1
                      for lab in sub["surface_label"]])
        ax.scatter(x + rng.uniform(-0.2, 0.2, len(x)), sub["hazard_score"], s=22, alpha=0.8,
                   color=_TIER_COLOURS.get(tier, "grey"), label=tier)
    ax.axhline(cfg.hazard_threshold, ls="--", lw=0.8, color="red")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("surface label")
    ax.set_ylabel("hazard score (SAE probe, P(hazard tier))")
    ax.set_title("Surface label × hazard score (test split)", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(out / _PLOTS["surface_hazard"], dpi=110)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _auroc_html(report: dict[str, Any]) -> str:
    rows = []
    for r in report["auroc"]:
        ci = "–" if r["auroc"] is None else f"{r['auroc']:.3f} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
        rows.append([esc(r["method"]), esc(r["kind"]), ci, _fmt(r["p_value"], 4),
                     _fmt(r["margin_over_tfidf"]), _fmt(r.get("mean_score_hazard")),
                     _fmt(r.get("mean_score_benign")), _fmt(r.get("mean_score_dual_use")),
                     f"{r['n_positive']}/{r['n_negative']}/{r['n_dual_use']}", esc(r["reason"] or "")])
    return _table(["method", "kind", "AUROC [95% CI]", "perm. p", "margin over TF-IDF", "mean score hazard",
                   "mean score benign", "mean score dual-use", "n haz/ben/dual", "note"], rows)


def _context_cell(c: dict[str, Any]) -> str:
    if "text" in c:
        before, token, after = (esc(t) for t in c["text"])
        body = f"{before}<mark>{token}</mark>{after}"
    else:
        ids = [esc(i) for i in c["token_ids"]]
        ids[c["center"]] = f"<mark>{ids[c['center']]}</mark>"
        body = "ids: " + " ".join(ids)
    return f"<code>{body}</code> <small>({esc(c['id'])}, {esc(c['segment'])}, {c['activation']:.3g})</small>"


def _catalog_html(report: dict[str, Any], contexts: dict[str, Any], r: ScoreResult) -> str:
    rows = []
    for cat in CATEGORIES:
        entry = r.catalog[cat]
        if not entry.latents:
            rows.append([esc(cat), "–", "–", f"<em>empty: {esc(entry.reason)}</em>"])
            continue
        for j, d in zip(entry.latents, entry.effect_sizes, strict=True):
            ctxs = contexts.get(cat, {}).get(str(j))
            if ctxs is None:
                continue
            rows.append([esc(cat), str(j), f"{d:.2f}", "<br>".join(_context_cell(c) for c in ctxs) or "–"])
    summary = _table(["category", "latents", "contrast", "note"],
                     [[esc(c), str(s["n_latents"]), esc(s["contrast"] or "–"), esc(s["reason"] or "")]
                      for c, s in report["catalog"].items()])
    return summary + "<h3>Top features and their top-activating contexts (training split)</h3>" + _table(
        ["category", "latent", "Cohen's d", "contexts (activating token marked)"], rows)


def _alignment_html(report: dict[str, Any]) -> str:
    a = report["alignment"]
    rows = [[esc(s)] + [_fmt(v) for v in row] for s, row in zip(a["rows"], a["T"], strict=True)]
    note = (f"<p>Fit on {a['n_fit']} calibration prompts ({a['n_unknown_skipped']} with an unknown surface "
            f"label skipped). Surface classes absent from calibration (rows left zero): "
            f"{esc(', '.join(a['absent_classes']) or 'none')}.</p>")
    return note + _table(["surface \\ feature"] + a["columns"], rows)


def _flagged_html(scores: pd.DataFrame) -> str:
    flagged = scores[scores["depth_category"].isin(["shallow_refusal", "hazardous_compliance"])]
    rows = [[esc(x.id), esc(x.tier), esc(x.framing), esc(x.surface_label), _fmt(x.D), _fmt(x.hazard_score),
             esc(x.depth_category), esc(x.completion_excerpt)] for x in flagged.itertuples()]
    if not rows:
        return "<p>No test prompt is flagged.</p>"
    header = ["id", "tier", "framing", "surface", "D", "hazard", "category", "completion (excerpt)"]
    return _table(header, rows)


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top;text-align:left}"
        "th{background:#f3f3f3}mark{background:#ffd54f}code{font-size:12px}"
        "img{max-width:100%}")


def render_html(report: dict[str, Any], scores: pd.DataFrame, contexts: dict[str, Any], r: ScoreResult,
                cfg: ScoreConfig) -> str:
    """The static report page (PNGs referenced by relative path)."""
    s = report["settings"]
    c = report["counts"]
    split_rows = [[esc(k)] + [str(v.get(t, 0)) for t in TIERS] for k, v in c["by_split_and_tier"].items()]
    depth_rows = [[esc(k), str(v)] for k, v in report["depth_categories"].items()]
    parts = [
        f"<h1>Refusal-depth report</h1><p>Store <code>{esc(s['store'])}</code> (model {esc(s['model_id'])}, "
        f"layer {s['layer']}); SAE <code>{esc(s['sae'])}</code> (d_sae {s['sae_config']['d_sae']}, "
        f"k {s['sae_config']['k']}). f: {esc(s['f_definition'])}. Hazard score: {esc(s['hazard_score'])}. "
        f"Seed {cfg.seed}; D threshold {cfg.d_threshold}, hazard threshold {cfg.hazard_threshold}.</p>",
        "<h2>Splits (by prompt id, stratified by tier)</h2>" + _table(["split"] + list(TIERS), split_rows),
        f"<p>Surface labels (all prompts): {esc(c['surface_labels'])}; "
        f"test: {esc(c['test_surface_labels'])}.</p>",
        "<h2>Hazard vs benign separation (test split)</h2><p>Positive: hazard_adjacent_category; negative: "
        "benign_bio; dual_use_bio is reported as its own group (mean score) and is not in the AUROC. CI: "
        f"stratified percentile bootstrap ({cfg.n_boot}); p: label permutation ({cfg.n_perm}).</p>"
        + _auroc_html(report) + f"<img src='{_PLOTS['roc']}' alt='ROC curves'>",
        "<h2>Divergence D</h2>"
        + (f"<p><strong>{esc(report['divergence_note'])}</strong></p>" if report["divergence_note"] else "")
        + f"<img src='{_PLOTS['d_by_group']}' alt='D by tier and framing'>"
        + f"<p>{report['n_test_d_undefined']} test prompts have undefined D (unknown surface label, a "
        "surface class absent from calibration, or no catalog latent active).</p>"
        + "<h3>Refusal-depth categories (test split)</h3>" + _table(["category", "prompts"], depth_rows)
        + "<h3>Flagged test prompts</h3>" + _flagged_html(scores),
        "<h2>Surface label × hazard score</h2>" + f"<img src='{_PLOTS['surface_hazard']}' alt='scatter'>",
        "<h2>Alignment matrix T (calibration split)</h2>" + _alignment_html(report),
        "<h2>Feature catalog (training split)</h2>" + f"<p>{esc(report['contexts'])}</p>"
        + _catalog_html(report, contexts, r),
    ]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>BioRefusalAudit report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
