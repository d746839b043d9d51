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
from bra.vocab import FEATURE_CATEGORIES, HAZARDOUS_COMPLIANCE, SHALLOW_REFUSAL, UNCERTAIN_REFUSAL

TEMPLATE = "report.html.j2"
"""The page template, shipped in bra/audit/templates (package data)."""
MISSING = "–"
"""Shown for a value that is None or not finite."""
FLAGGED = (SHALLOW_REFUSAL, UNCERTAIN_REFUSAL, HAZARDOUS_COMPLIANCE)
"""Depth categories listed one prompt per row."""
FLAGGED_HEADER = ["id", "tier", "framing", "surface", "depth score", "prompt depth score", "D", "category",
                  "why", "completion (excerpt)"]


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
    return ["method", "input", "kind", "AUROC [95% bootstrap CI]", "DeLong CI", "perm. p", "C (CV)",
            "margin over TF-IDF (same input)", "mean score hazard",
            "mean score benign", *(f"mean score {g}" for g in shown), "n " + "/".join(["haz", "ben", *short]),
            "note"]


def _auroc_rows(report: dict[str, Any], groups: list[str]) -> list[list[str]]:
    rows = []
    for r in report["auroc"]:
        ci = MISSING if r["auroc"] is None else f"{r['auroc']:.3f} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
        counts = "/".join(str(r[k]) for k in ["n_positive", "n_negative", *(f"n_{g}" for g in groups)])
        delong = MISSING if r["auroc"] is None else f"[{fmt(r['delong_low'])}, {fmt(r['delong_high'])}]"
        rows.append([str(r["method"]), str(r["segment"]), str(r["kind"]), ci, delong, fmt(r["p_value"], 4),
                     fmt(r.get("probe_C"), 2), fmt(r["margin_over_tfidf"]),
                     fmt(r.get("mean_score_hazard")), fmt(r.get("mean_score_benign")),
                     *(fmt(r.get(f"mean_score_{g}")) for g in groups), counts, str(r["reason"] or "")])
    return rows


def _flagged_rows(scores: pd.DataFrame) -> list[list[str]]:
    flagged = scores[scores["depth_category"].isin(FLAGGED)]
    return [[str(x.id), str(x.tier), str(x.framing), str(x.surface_label), fmt(x.depth_score),
             fmt(x.prompt_depth_score), fmt(x.D), str(x.depth_category), str(x.verdict_reason or ""),
             str(x.completion_excerpt)] for x in flagged.itertuples()]


def _ci(row: dict[str, Any], key: str = "mean") -> str:
    """``value [lo, hi]`` of a table cell."""
    if row.get(key) is None:
        return MISSING
    return f"{fmt(row[key])} [{fmt(row.get('ci_low'))}, {fmt(row.get('ci_high'))}]"


def _tables_view(report: dict[str, Any]) -> dict[str, Any]:
    """Display rows of the depth, D, label, repeat and overlap tables."""
    t, depth, div = report["tables"], report["depth"], report["divergence"]
    sc = depth["scale"]
    scale_line = (f"0 = {fmt(sc['low'], 4)} (median of {sc['n_low']} benign answers), "
                  f"1 = {fmt(sc['high'], 4)} (median of {sc['n_high']}, reference {sc['reference']}); "
                  f"deep ≤ {fmt(sc['t_deep'])}, shallow ≥ {fmt(sc['t_shallow'])} (quantile {sc['quantile']})")
    d_line = (f"D threshold {fmt(div['threshold'])} ({div['threshold_rule']}, {div['n_threshold_fit']} "
              f"prompts); magnitude floor {fmt(div['magnitude_floor'], 4)}: {div['n_below_floor']} test "
              f"prompts below it; null (permuted s): mean {fmt(div['null_mean'])}, quantile "
              f"{fmt(div['null_quantile'])}; share of test D above the null quantile "
              f"{fmt(div['share_above_null'])}; D-rule verdicts of refusals {div['rule_verdicts']}")
    comparisons = [[str(c["segment"]), str(c["versus"]), str(c["kind"]),
                    f"{fmt(c['diff'])} [{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]", fmt(c["p_value"], 4),
                    fmt(c["p_holm"], 4)] for c in report["comparisons"]]
    repeats = [[k, fmt(v["values"][0]), fmt(v["mean"]), fmt(v["sd"]), fmt(v["min"]), fmt(v["max"])]
               for k, v in report["repeats"]["numbers"].items()]
    ex, trunc = t["expected_surface"], t["truncated"]
    ov = report.get("overlap") or {}
    overlapping = ov.get("overlapping", [])
    if ov.get("checked"):
        overlap_line = (f"checked {ov.get('n_prompts')} prompts for shared {ov.get('n')}-grams with the "
                        f"SAE's training store {ov.get('store')}: {len(overlapping)} overlap")
    else:
        overlap_line = f"not checked: {ov.get('reason', 'no overlap check ran')}"
    if trunc["known"]:
        truncated_line = (f"{trunc['n_truncated']} of {trunc['n']} completions were cut off by "
                          f"max_new_tokens (by tier: {trunc['by_tier']})")
    else:
        truncated_line = "truncation unknown: the store records no finished flag"
    return {
        "scale_line": scale_line, "d_line": d_line, "comparison_rows": comparisons, "repeat_rows": repeats,
        "brier": fmt(report["probe_calibration"]["brier"]),
        "verdict_rows": [[k, str(v)] for k, v in depth["verdicts"].items()],
        "uncertain_rows": [[k, str(v)] for k, v in depth["uncertain_reasons"].items()],
        "depth_score_rows": [[r["tier"], str(r["n"]), str(r["n_defined"]), _ci(r)]
                             for r in t["depth_score_by_tier"]],
        "d_rows": [[r["tier"], r["framing"], str(r["n"]), str(r["n_defined"]), _ci(r)]
                   for r in t["d_by_tier_framing"]],
        "refusal_rows": [[r["tier"], r["framing"], str(r["n"]), str(r["n_refused"]), _ci(r, "rate")]
                         for r in t["refusal_by_tier_framing"]],
        "expected": ex,
        "expected_rows": ([] if ex is None else
                          [[row, *map(str, n)] for row, n in zip(ex["rows"], ex["counts"], strict=True)]),
        "truncated_line": truncated_line, "overlap_line": overlap_line,
        "overlap_rows": [[o["id"], str(o["shared_ngrams"]), str(o["ngrams"])] for o in overlapping],
    }


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
        for j, d, d_cal in zip(entry.latents, entry.effect_sizes, entry.effect_sizes_estimate, strict=True):
            ctxs = r.contexts.get(cat, {}).get(str(j))
            if ctxs is not None:
                rows.append({"category": cat, "reason": None, "latent": str(j),
                             "d": f"{d:.2f} / {fmt(d_cal, 2)}",
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
        "auroc_header": auroc_header(groups), "auroc_rows": _auroc_rows(report, groups),
        "depth_rows": [[k, str(v)] for k, v in report["depth_categories"].items()],
        "flagged_header": FLAGGED_HEADER, "flagged_rows": _flagged_rows(scores),
        "alignment": a, "absent_classes": ", ".join(a["absent_classes"]) or "none",
        "alignment_header": ["surface \\ feature"] + list(a["columns"]),
        "alignment_rows": [[s] + [fmt(v) for v in row] for s, row in zip(a["rows"], a["T"], strict=True)],
        "catalog_rows": [[c, str(e["n_latents"]), str(e["n_tested"]), fmt(e["expected_false_share"]),
                          e["contrast"] or MISSING, e["reason"] or ""] for c, e in report["catalog"].items()],
        "feature_rows": _feature_rows(r), **_tables_view(report),
    }
    return _environment().get_template(TEMPLATE).render(view)
