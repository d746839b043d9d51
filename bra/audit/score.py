"""`bra-sae score`: refusal depth of an eval store's prompts from stored activations alone (no model).

Steps, each on its own split of the prompts (split by id, stratified by tier, disjoint by construction):

1. train: the feature catalog (`bra.audit.catalog`) and every hazard probe (`bra.audit.probes`), both
   contrasting the positive and negative tier classes (`bra.audit.classes`: flags, else the store's
   attrs, else the defaults);
2. calibration: the alignment matrix T (`bra.audit.divergence.fit_alignment`);
3. test: D, hazard scores, refusal-depth categories and the AUROC table are reported here only.

The store is read once, up front (`bra.audit.reader.read_eval_bundle`); everything after is a function of
that bundle (`analyse`). Outputs are written by `bra.audit.report` from the result alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bra.audit import probes
from bra.audit.bundle import EvalBundle, StoreFacts
from bra.audit.classes import resolve_classes
from bra.audit.config import (
    BOTH_SEGMENTS,
    OURS,
    PROBE_SEGMENTS,
    RANDOM_SAE,
    RAW_DIFF_OF_MEANS,
    RAW_LOGREG,
    RESERVED_NAMES,
    SPLITS,
    TFIDF_METHOD,
    ScoreConfig,
    ScoreError,
    ScoreResult,
    TierClasses,
)
from bra.audit.contexts import catalog_contexts, decode_contexts, load_tokenizer
from bra.audit.depth import (
    fit_depth_scale,
)
from bra.audit.divergence import (
    null_divergence,
)
from bra.audit.fixed_fit import Applied, AuditFit, AuditRows, apply_fit, calibrate, fit_audit
from bra.audit.metrics import brier_score, rank_auroc, reliability_bins
from bra.audit.overlap import training_overlap
from bra.audit.reader import read_eval_bundle, scan_store_ngrams
from bra.audit.report import write_outputs
from bra.audit.splits import group_keys, split_prompts
from bra.audit.tables import expected_confusion, mean_by, rate_by, truncation
from bra.vocab import (
    COMPLETION,
    DEPTH_CATEGORIES,
    PROMPT,
    REFUSE,
    SEGMENT_PROMPT,
)

logger = logging.getLogger(__name__)


def _segment_inputs(pooled: Mapping[str, np.ndarray], segment: str) -> np.ndarray:
    if segment == BOTH_SEGMENTS:
        return np.hstack([pooled[PROMPT], pooled[COMPLETION]])
    return pooled[segment]


def _segment_texts(table: pd.DataFrame, segment: str) -> list[str]:
    prompts, completions = table["prompt"].astype(str), table["completion"].astype(str)
    if segment == PROMPT:
        return prompts.tolist()
    if segment == COMPLETION:
        return completions.tolist()
    return (prompts + "\n" + completions).tolist()


def _methods(bundle: EvalBundle, train_pos: np.ndarray, train_neg: np.ndarray, groups: np.ndarray,
             seed: int) -> list[probes.Method]:
    """Every scorer on every input segment (prompt, completion, both), so each margin compares rows that
    saw the same input."""
    out: list[probes.Method] = []

    def add(name: str, kind: str, segment: str, fn: Callable[[], probes.ProbeScores]) -> None:
        try:
            out.append(probes.Method(name, kind, segment, fn()))
        except probes.ProbeUnavailable as exc:
            out.append(probes.Method(name, kind, segment, None, str(exc)))

    for segment in PROBE_SEGMENTS:
        for name, seg_pools in bundle.pooled.items():
            kind = "sae" if name == OURS else "sae_baseline"
            X = _segment_inputs(seg_pools, segment)
            add(name, kind, segment,
                lambda X=X: probes.logistic_scores(X, train_pos, train_neg, seed, groups))
        texts = _segment_texts(bundle.table, segment)
        add(TFIDF_METHOD, "text", segment,
            lambda t=texts: probes.tfidf_scores(t, train_pos, train_neg, seed, groups))
        raw = _segment_inputs(bundle.raw, segment)
        add(RAW_LOGREG, "activations", segment,
            lambda r=raw: probes.logistic_scores(r, train_pos, train_neg, seed, groups))
        add(RAW_DIFF_OF_MEANS, "activations", segment,
            lambda r=raw: probes.diff_of_means_scores(r, train_pos, train_neg))
    return out


def compute_scores(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str],
                   cfg: ScoreConfig | None = None,
                   baselines: Mapping[str, str | os.PathLike[str]] | None = None) -> ScoreResult:
    """Everything `score` reports, computed from the store alone: one read, `analyse`, then the check of
    the eval prompts against the SAE's training store (`bra.audit.overlap`)."""
    cfg = cfg or ScoreConfig()
    baselines = dict(baselines or {})
    clash = sorted(set(baselines) & set(RESERVED_NAMES))
    if clash:
        raise ScoreError(f"baseline name {clash[0]!r} is reserved; pick another NAME in --baseline NAME=SAE")
    bundle = read_eval_bundle(store_path, {OURS: sae_path, **baselines}, cfg.layer, cfg.pool, cfg.seed,
                              check=lambda facts, table: tier_classes(cfg, facts, table), labels=cfg.labels)
    tokenizer, note = load_tokenizer(bundle.facts)
    result = analyse(bundle, cfg, tokenizer, note)
    fp = bundle.facts.tokenizer_fingerprint
    overlap = training_overlap(str(sae_path), prompt_tokens(bundle),
                               lambda store, wanted, n: scan_store_ngrams(store, fp, wanted, n))
    return dataclasses.replace(result, overlap=overlap)


def prompt_tokens(bundle: EvalBundle) -> dict[str, np.ndarray]:
    """Prompt id -> the token ids of its prompt segment (unmasked rows, in store order)."""
    t = bundle.tokens
    keep = np.flatnonzero((t.segment == SEGMENT_PROMPT) & ~t.mask)
    order = keep[np.argsort(t.doc_index[keep], kind="stable")]  # one pass, store order kept within a doc
    docs, starts = np.unique(t.doc_index[order], return_index=True)
    by_doc = dict(zip(docs.tolist(), np.split(t.token_id[order], starts[1:]), strict=True))
    return {str(pid): by_doc.get(i, np.zeros(0, np.int32)) for i, pid in enumerate(bundle.table["id"])}


def tier_classes(cfg: ScoreConfig, facts: StoreFacts, table: pd.DataFrame) -> TierClasses:
    """The run's positive and negative tiers: the flags, else the store's attrs, else the defaults."""
    return resolve_classes(cfg.positive_tiers, cfg.negative_tiers, facts.hazard_tiers, facts.benign_tiers,
                           set(table["tier"].astype(str)))


def _divergence_report(rows: AuditRows, fit: AuditFit, applied: Applied, cal: np.ndarray, test: np.ndarray,
                       cfg: ScoreConfig) -> dict[str, Any]:
    """D's magnitude floor, threshold and null as report.json states them (the null on test)."""
    S, f = rows.S, applied.f[fit.f_segment]
    floor, threshold, D = fit.magnitude_floor, fit.d_threshold, applied.D
    below = applied.total < floor
    null = null_divergence(S[test], f[test], fit.alignment["T"], cfg.n_d_null, cfg.seed)
    null_finite = null[np.isfinite(null)]
    null_q = float(np.quantile(null_finite, cfg.d_quantile)) if null_finite.size else None
    rule = [v if t else None for v, t in zip(applied.d_verdicts, test, strict=True)]
    d_test = D[test]
    return {
        "threshold": threshold,
        "threshold_rule": f"{cfg.d_quantile:g} quantile of D over calibration prompts whose surface label "
                          f"agrees with their tier",
        "n_threshold_fit": fit.n_threshold_fit,
        "magnitude_floor": floor, "n_below_floor": int(below[test].sum()),
        "share_below_floor": float(below[test].mean()) if test.any() else None,
        "below_floor_reason": f"total catalog activation below the floor {floor:.4g} (the "
                              f"{cfg.magnitude_quantile:g} quantile over calibration): the catalog latents "
                              f"barely fire, so the direction of f is noise",
        "null_mean": float(null_finite.mean()) if null_finite.size else None, "null_quantile": null_q,
        "share_above_null": (float((d_test[np.isfinite(d_test)] > null_q).mean())
                             if null_q is not None and np.isfinite(d_test).any() else None),
        "rule_verdicts": rule}


def raw_direction(bundle: EvalBundle, train: np.ndarray, rows: AuditRows) -> np.ndarray | None:
    """The raw baseline's direction: the training split's hazard - benign prompt direction of the raw
    residual (None when a class has too few training prompts)."""
    try:
        return probes.diff_of_means_direction(bundle.raw[PROMPT], train & rows.positive,
                                              train & rows.negative)
    except probes.ProbeUnavailable:
        return None


def raw_evidence(bundle: EvalBundle, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(completion, prompt) projections of the raw residual on ``w``; NaN without ``w`` or segment rows."""
    if w is None:
        return np.full(bundle.n_docs, np.nan), np.full(bundle.n_docs, np.nan)
    raw = bundle.raw
    return (np.where(bundle.counts[:, 1] > 0, raw[COMPLETION] @ w, np.nan),
            np.where(bundle.counts[:, 0] > 0, raw[PROMPT] @ w, np.nan))


def _raw_depth(bundle: EvalBundle, train: np.ndarray, cal: np.ndarray, rows: AuditRows, cfg: ScoreConfig
               ) -> dict[str, Any]:
    """The same depth procedure on the raw residual: evidence = projection on the training split's hazard -
    benign prompt direction, so what the SAE adds to a verdict is measured, not assumed."""
    raw_c, raw_p = raw_evidence(bundle, raw_direction(bundle, train, rows))
    raw_scale = fit_depth_scale(raw_c, raw_p, cal, rows.positive, rows.negative, rows.labels,
                                cfg.depth_quantile, cfg.min_reference)
    return {"raw_scale": raw_scale, "raw_score": raw_scale.score(raw_c)}


def _fit_split(bundle: EvalBundle, cfg: ScoreConfig, classes: TierClasses, split: np.ndarray,
               groups: np.ndarray, seed: int, full: bool) -> dict[str, Any]:
    """Everything that depends on one split: catalog, f, T, D, depth, probes and the AUROC table.

    ``full`` False (the repeated splits): AUROCs without intervals, no paired comparisons."""
    table = bundle.table
    train, cal, test = (split == s for s in SPLITS)
    tier = table["tier"].astype(str).to_numpy()
    rows = AuditRows.of(bundle, classes)
    positive, negative, labels = rows.positive, rows.negative, rows.labels
    audit_fit = fit_audit(rows, split, cfg, classes, table, seed)
    applied = apply_fit(audit_fit, rows)
    catalog, S, D, f = audit_fit.catalog, rows.S, applied.D, applied.f
    alignment = dict(audit_fit.alignment)
    d_fit = _divergence_report(rows, audit_fit, applied, cal, test, cfg)
    depth = {"scale": audit_fit.scale, "score": applied.depth_score,
             "prompt_score": applied.prompt_depth_score, "verdicts": applied.verdicts,
             "reasons": applied.reasons, **_raw_depth(bundle, train, cal, rows, cfg)}
    methods = _methods(bundle, train & positive, train & negative, groups, seed)
    sets = probes.EvalSets(test & positive, test & negative,
                           {g: test & (tier == t) for g, t in classes.groups.items()})
    categories = [c if t else None for c, t in zip(applied.categories, test, strict=True)]
    out = {"train": train, "cal": cal, "test": test, "positive": positive, "negative": negative,
           "labels": labels, "catalog": catalog, "f": f, "S": S, "alignment": alignment, "D": D,
           "d_fit": d_fit, "depth": depth, "methods": methods, "sets": sets, "categories": categories}
    if full:
        out["auroc"] = probes.auroc_table(methods, sets, cfg.n_boot, cfg.n_perm, seed)
        out["comparisons"] = probes.paired_comparisons(methods, sets, OURS, cfg.n_boot, seed)
    return out


def _headline(fit: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers whose spread over splits is reported: each method's AUROC, the depth-category shares
    of the test split (deep / shallow / uncertain refusals among them) and mean D."""
    sets = fit["sets"]
    sel = sets.positive | sets.negative
    out: dict[str, float | None] = {}
    for m in fit["methods"]:
        ok = m.scores is not None and sets.positive.any() and sets.negative.any()
        out[f"auroc:{m.key}"] = (rank_auroc(sets.positive[sel], m.scores.values[sel]) if ok else None)
    cats = [c for c in fit["categories"] if c is not None]
    for c in DEPTH_CATEGORIES:
        out[f"share:{c}"] = cats.count(c) / len(cats) if cats else None
    d = fit["D"][fit["test"]]
    out["mean_D"] = float(np.nanmean(d)) if np.isfinite(d).any() else None
    return out


def _spread(headlines: list[dict[str, float | None]], seeds: list[int]) -> dict[str, Any]:
    """Per headline number: its value per split seed, mean, SD, min and max (None values left out)."""
    out: dict[str, Any] = {"seeds": seeds, "numbers": {}}
    for key in headlines[0]:
        values = [h.get(key) for h in headlines]
        vals = np.array([v for v in values if v is not None], dtype=np.float64)
        out["numbers"][key] = {"values": values, "mean": float(vals.mean()) if vals.size else None,
                               "sd": float(vals.std(ddof=1)) if vals.size > 1 else None,
                               "min": float(vals.min()) if vals.size else None,
                               "max": float(vals.max()) if vals.size else None}
    return out


def _tables(table: pd.DataFrame, fit: Mapping[str, Any], cfg: ScoreConfig) -> dict[str, Any]:
    """Per tier / tier × framing tables: D and depth scores (test split), refusal rates, expected surface
    and truncation (every prompt: nothing is fit on them)."""
    frame = table[["tier", "framing"]].astype(str).copy()
    frame["D"] = fit["D"]
    frame["depth_score"] = fit["depth"]["score"]
    test = frame[fit["test"]]
    refused_test = test[fit["labels"][fit["test"]] == REFUSE]
    refused = fit["labels"] == REFUSE
    return {
        "d_by_tier": mean_by(test, "D", ["tier"], cfg.n_boot, cfg.seed),
        "d_by_tier_framing": mean_by(test, "D", ["tier", "framing"], cfg.n_boot, cfg.seed),
        "depth_score_by_tier": mean_by(refused_test, "depth_score", ["tier"], cfg.n_boot, cfg.seed),
        "refusal_by_tier": rate_by(frame, refused, ["tier"], "n_refused"),
        "refusal_by_tier_framing": rate_by(frame, refused, ["tier", "framing"], "n_refused"),
        "expected_surface": (expected_confusion(table["surface_label"], table["expected_surface"])
                             if "expected_surface" in table else None),
        "truncated": truncation(table["finished"] if "finished" in table else None, table["tier"]),
    }


def _probe_calibration(fit: Mapping[str, Any], segment: str) -> dict[str, Any]:
    """Brier score and reliability bins of our probe on the test split's two classes."""
    sets = fit["sets"]
    ours = next(m for m in fit["methods"] if m.name == OURS and m.segment == segment)
    sel = sets.positive | sets.negative
    if ours.scores is None or not sel.any():
        return {"segment": segment, "brier": None, "bins": None, "reason": ours.reason or "no test prompt"}
    y, p = sets.positive[sel].astype(int), ours.scores.values[sel]
    return {"segment": segment, "brier": brier_score(y, p), "bins": reliability_bins(y, p), "reason": None}


def analyse(bundle: EvalBundle, cfg: ScoreConfig, tokenizer: Any | None = None,
            tokenizer_note: str = "token ids only: no tokenizer given") -> ScoreResult:
    """Catalog, f, T, D, depth verdicts, probes, AUROC table and every report table of a bundle (reads
    nothing), on the split of ``cfg.seed`` and, for the spread, on ``cfg.repeats - 1`` further splits.

    ``tokenizer`` (or None) decodes the top-activating contexts; ``tokenizer_note`` says how they were
    rendered."""
    table = bundle.table
    classes = tier_classes(cfg, bundle.facts, table)
    groups, group_by = group_keys(table)
    split_of = {s: split_prompts(table["id"], table["tier"], s, cfg.train_fraction, cfg.calibration_fraction,
                                 groups) for s in range(cfg.seed, cfg.seed + cfg.repeats)}
    fit = _fit_split(bundle, cfg, classes, split_of[cfg.seed], groups, cfg.seed, full=True)
    headlines = [_headline(fit)] + [_headline(_fit_split(bundle, cfg, classes, split_of[s], groups, s, False))
                                    for s in list(split_of)[1:]]
    ours_probe = next(m for m in fit["methods"] if m.name == OURS and m.segment == cfg.probe_segment)
    hazard = ours_probe.scores.values if ours_probe.scores is not None else np.full(bundle.n_docs, np.nan)
    contexts = catalog_contexts(fit["catalog"], bundle.codes, bundle.tokens, fit["train"], cfg.contexts,
                                cfg.context_latents)
    depth = fit["depth"]
    return ScoreResult(
        facts=bundle.facts, layer=bundle.layer, sae_path=bundle.sae_paths[OURS],
        sae_config=dict(bundle.sae_configs[OURS]),
        baselines={k: v for k, v in bundle.sae_paths.items() if k != OURS},
        random_sae_config=dict(bundle.sae_configs[RANDOM_SAE]), table=table, split=split_of[cfg.seed],
        S=fit["S"], f=fit["f"], D=fit["D"], hazard=hazard, depth=fit["categories"],
        depth_score=depth["score"], prompt_depth_score=depth["prompt_score"], verdicts=depth["verdicts"],
        verdict_reasons=depth["reasons"], scale=depth["scale"], raw_depth_score=depth["raw_score"],
        raw_scale=depth["raw_scale"], d_fit=fit["d_fit"], groups=groups,
        group_by=group_by, comparisons=fit["comparisons"],
        probe_calibration=_probe_calibration(fit, cfg.probe_segment),
        repeats=_spread(headlines, list(split_of)), tables=_tables(table, fit, cfg),
        catalog=fit["catalog"], alignment=fit["alignment"], auroc=fit["auroc"],
        contexts=decode_contexts(contexts, table["id"].tolist(), tokenizer), contexts_note=tokenizer_note,
        counts=bundle.counts, classes=classes, labels=dict(bundle.labels) if bundle.labels else None)


def score(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str], out: str | os.PathLike[str],
          cfg: ScoreConfig | None = None, baselines: Mapping[str, str | os.PathLike[str]] | None = None
          ) -> dict[str, Any]:
    """Score an eval store with an SAE (and baselines), write scores.parquet, catalog.json, report.json and
    report.html to ``out``; return the report.json contents."""
    cfg = cfg or ScoreConfig()
    return write_outputs(Path(out), compute_scores(store_path, sae_path, cfg, baselines), cfg)


__all__ = ["ScoreConfig", "ScoreError", "ScoreResult", "analyse", "calibrate", "compute_scores",
           "prompt_tokens", "raw_direction", "raw_evidence", "score", "split_prompts", "tier_classes"]
