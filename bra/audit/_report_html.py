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

from bra.audit.config import ScoreConfig, ScoreResult
from bra.audit.plots import PLOT_FILES
from bra.vocab import (
    BENIGN_TIER,
    DUAL_USE_TIER,
    FEATURE_CATEGORIES,
    HAZARD_TIER,
    HAZARDOUS_COMPLIANCE,
    SHALLOW_REFUSAL,
    TIERS,
)

TEMPLATE = "report.html.j2"
"""The page template, shipped in bra/audit/templates (package data)."""
MISSING = "–"
"""Shown for a value that is None or not finite."""
FLAGGED = (SHALLOW_REFUSAL, HAZARDOUS_COMPLIANCE)
"""Depth categories listed one prompt per row."""
AUROC_HEADER = ["method", "kind", "AUROC [95% CI]", "perm. p", "margin over TF-IDF", "mean score hazard",
                "mean score benign", "mean score dual-use", "n haz/ben/dual", "note"]
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


def _auroc_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for r in report["auroc"]:
        ci = MISSING if r["auroc"] is None else f"{r['auroc']:.3f} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
        counts = f"{r['n_positive']}/{r['n_negative']}/{r['n_dual_use']}"
        rows.append([str(r["method"]), str(r["kind"]), ci, fmt(r["p_value"], 4), fmt(r["margin_over_tfidf"]),
                     fmt(r.get("mean_score_hazard")), fmt(r.get("mean_score_benign")),
                     fmt(r.get("mean_score_dual_use")), counts, str(r["reason"] or "")])
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
    view = {
        "report": report, "s": report["settings"], "cfg": cfg, "plots": PLOT_FILES, "tiers": list(TIERS),
        "hazard_tier": HAZARD_TIER, "benign_tier": BENIGN_TIER, "dual_use_tier": DUAL_USE_TIER,
        "split_rows": [[k] + [str(v.get(t, 0)) for t in TIERS]
                       for k, v in report["counts"]["by_split_and_tier"].items()],
        "auroc_header": AUROC_HEADER, "auroc_rows": _auroc_rows(report),
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
