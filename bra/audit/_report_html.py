"""report.html: `templates/report.html.j2` rendered by jinja2 with autoescape, from report.json's contents,
the scores table and the `ScoreResult` (nothing is read from the store).

This module only turns values into display strings (numbers to fixed digits, missing values to "–"); the
template owns the markup, and autoescape escapes every string it is given, so a prompt id, completion
excerpt, decoded token or store path holding ``<``, ``&`` or quotes shows as text.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jinja2
import pandas as pd

from bra.audit.classes import DUAL_USE_GROUP, tier_order
from bra.audit.config import ScoreConfig, ScoreResult
from bra.audit.plots import PLOT_FILES
from bra.vocab import FEATURE_CATEGORIES, HAZARDOUS_COMPLIANCE, SHALLOW_REFUSAL

TEMPLATE = "report.html.j2"
"""The page template, shipped in bra/audit/templates (package data)."""
MISSING = "–"
"""Shown for a value that is None or not finite."""
FLAGGED = (SHALLOW_REFUSAL, HAZARDOUS_COMPLIANCE)
"""Depth categories listed one prompt per row."""
FLAGGED_HEADER = ["id", "tier", "framing", "surface", "D", "hazard", "category", "completion (excerpt)"]


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """The template environment (built on first use): autoescape on for every template and string."""
    return jinja2.Environment(loader=jinja2.PackageLoader("bra.audit", "templates"),
                              autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              undefined=jinja2.StrictUndefined)


def fmt(x: Any, digits: int = 3) -> str:
    """A number with ``digits`` decimals, "–" for None or a non-finite float, anything else as str."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def auroc_header(groups: list[str]) -> list[str]:
    """The AUROC table's header with a mean-score column per group reported apart (``dual_use``: dual-use)."""
    shown = ["dual-use" if g == DUAL_USE_GROUP else g for g in groups]
    short = ["dual" if g == DUAL_USE_GROUP else g for g in groups]
    return ["method", "kind", "AUROC [95% CI]", "perm. p", "margin over TF-IDF", "mean score hazard",
            "mean score benign", *(f"mean score {g}" for g in shown), "n " + "/".join(["haz", "ben", *short]),
            "note"]


def _auroc_rows(report: dict[str, Any], groups: list[str]) -> list[list[str]]:
    rows = []
    for r in report["auroc"]:
        ci = MISSING if r["auroc"] is None else f"{r['auroc']:.3f} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
        counts = "/".join(str(r[k]) for k in ["n_positive", "n_negative", *(f"n_{g}" for g in groups)])
        rows.append([str(r["method"]), str(r["kind"]), ci, fmt(r["p_value"], 4), fmt(r["margin_over_tfidf"]),
                     fmt(r.get("mean_score_hazard")), fmt(r.get("mean_score_benign")),
                     *(fmt(r.get(f"mean_score_{g}")) for g in groups), counts, str(r["reason"] or "")])
    return rows


def _flagged_rows(scores: pd.DataFrame) -> list[list[str]]:
    flagged = scores[scores["depth_category"].isin(FLAGGED)]
    return [[str(x.id), str(x.tier), str(x.framing), str(x.surface_label), fmt(x.D), fmt(x.hazard_score),
             str(x.depth_category), str(x.completion_excerpt)] for x in flagged.itertuples()]


def _context_view(c: dict[str, Any]) -> dict[str, Any]:
    """One decoded context: ``text`` [before, token, after] when decoded, else its token ids."""
    return {"text": [str(t) for t in c["text"]] if "text" in c else None,
            "token_ids": [str(i) for i in c["token_ids"]], "center": c["center"], "id": str(c["id"]),
            "segment": str(c["segment"]), "activation": f"{c['activation']:.3g}"}


def _feature_rows(r: ScoreResult) -> list[dict[str, Any]]:
    """Rows of the top-features table: an empty category as one row with its reason, else one row per
    catalog latent that has contexts."""
    rows: list[dict[str, Any]] = []
    for cat in FEATURE_CATEGORIES:
        entry = r.catalog[cat]
        if not entry.latents:
            rows.append({"category": cat, "reason": str(entry.reason)})
            continue
        for j, d in zip(entry.latents, entry.effect_sizes, strict=True):
            ctxs = r.contexts.get(cat, {}).get(str(j))
            if ctxs is not None:
                rows.append({"category": cat, "reason": None, "latent": str(j), "d": f"{d:.2f}",
                             "contexts": [_context_view(c) for c in ctxs]})
    return rows


def render_html(report: dict[str, Any], scores: pd.DataFrame, r: ScoreResult, cfg: ScoreConfig) -> str:
    """The static report page (PNGs referenced by relative path)."""
    a = report["alignment"]
    classes = report["settings"]["classes"]
    groups = list(classes["groups"])
    by_split = report["counts"]["by_split_and_tier"]
    tiers = list(tier_order(t for v in by_split.values() for t in v))  # every tier, control tiers included
    view = {
        "report": report, "s": report["settings"], "cfg": cfg, "plots": PLOT_FILES, "tiers": tiers,
        "classes": classes, "group_tiers": ", ".join(classes["groups"].values()) or "none",
        "redacted_tiers": ", ".join(classes["redacted"]) or "none",
        "split_rows": [[k] + [str(v.get(t, 0)) for t in tiers] for k, v in by_split.items()],
        "d_rows": [[str(d["tier"]), str(d["count"]), fmt(d["mean"]), fmt(d["median"])]
                   for d in report["divergence_by_tier"]],
        "auroc_header": auroc_header(groups), "auroc_rows": _auroc_rows(report, groups),
        "depth_rows": [[k, str(v)] for k, v in report["depth_categories"].items()],
        "flagged_header": FLAGGED_HEADER, "flagged_rows": _flagged_rows(scores),
        "alignment": a, "absent_classes": ", ".join(a["absent_classes"]) or "none",
        "alignment_header": ["surface \\ feature"] + list(a["columns"]),
        "alignment_rows": [[s] + [fmt(v) for v in row] for s, row in zip(a["rows"], a["T"], strict=True)],
        "catalog_rows": [[c, str(e["n_latents"]), e["contrast"] or MISSING, e["reason"] or ""]
                         for c, e in report["catalog"].items()],
        "feature_rows": _feature_rows(r),
    }
    return _environment().get_template(TEMPLATE).render(view)
