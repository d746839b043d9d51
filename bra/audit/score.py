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

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bra.audit import probes
from bra.audit.bundle import EvalBundle, StoreFacts
from bra.audit.catalog import build_catalog, contrasts, feature_profile
from bra.audit.classes import resolve_classes
from bra.audit.config import (
    BOTH_SEGMENTS,
    CALIBRATION,
    OURS,
    RANDOM_SAE,
    RAW_DIFF_OF_MEANS,
    RAW_LOGREG,
    RESERVED_NAMES,
    SPLITS,
    TEST,
    TRAIN,
    ScoreConfig,
    ScoreError,
    ScoreResult,
    TierClasses,
)
from bra.audit.contexts import catalog_contexts, decode_contexts, load_tokenizer
from bra.audit.divergence import divergence, fit_alignment, refusal_depth_category
from bra.audit.reader import read_eval_bundle
from bra.audit.report import write_outputs
from bra.vocab import COMPLETION, POOLED_SEGMENTS, PROMPT, SURFACE_CLASSES

logger = logging.getLogger(__name__)


def split_prompts(ids: pd.Series, tiers: pd.Series, seed: int, train_fraction: float,
                  calibration_fraction: float) -> np.ndarray:
    """[n] split name per prompt: train / calibration / test.

    Within each tier, prompts are ordered by sha256(seed:id) and cut at the rounded fractions (each split
    gets at least one prompt of a tier with >= 3 prompts). Membership depends only on (seed, the tier's
    ids); each prompt gets exactly one name, so the splits are disjoint by construction.
    """
    out = np.full(len(ids), "", dtype=object)
    keys = np.array([hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in ids])
    for tier in sorted(set(tiers)):
        idx = np.flatnonzero(tiers.to_numpy() == tier)
        idx = idx[np.argsort(keys[idx], kind="stable")]
        n = len(idx)
        n_train = int(round(n * train_fraction))
        n_cal = int(round(n * calibration_fraction))
        if n >= 3:
            n_train = min(max(n_train, 1), n - 2)
            n_cal = min(max(n_cal, 1), n - n_train - 1)
        out[idx[:n_train]] = TRAIN
        out[idx[n_train:n_train + n_cal]] = CALIBRATION
        out[idx[n_train + n_cal:]] = TEST
    members = [set(ids[out == s]) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(members) for b in members[i + 1:]), "splits overlap"
    assert sum(map(len, members)) == len(set(ids)) == len(ids), "a prompt is in no split"
    return out


def calibrate(S: np.ndarray, F: np.ndarray, labels: np.ndarray, cal: np.ndarray,
              ridge: float) -> dict[str, Any]:
    """T from the calibration prompts with a known surface label. A class is present when some calibration
    prompt carries it as its label; T is fit on the present classes only (the mass a soft distribution puts
    on an absent class is ignored) and the absent classes are reported."""
    known = cal & np.isin(labels, SURFACE_CLASSES)
    present = [c for c in SURFACE_CLASSES if (labels[known] == c).any()]
    absent = [c for c in SURFACE_CLASSES if c not in present]
    if not known.any():
        raise ScoreError(f"calibration split has nothing to fit: no prompt with a known surface label "
                         f"({int(cal.sum())} calibration prompts, all unknown); classes lacking samples: "
                         f"{', '.join(absent)}")
    T = fit_alignment(S[known], F[known], ridge=ridge, present_classes=present)
    return {"T": T, "present_classes": present, "absent_classes": absent, "n_fit": int(known.sum()),
            "n_unknown": int((cal & ~known).sum())}


def _probe_features(pooled: Mapping[str, np.ndarray], segment: str) -> np.ndarray:
    if segment == BOTH_SEGMENTS:
        return np.hstack([pooled[PROMPT], pooled[COMPLETION]])
    return pooled[segment]


def _methods(bundle: EvalBundle, train_pos: np.ndarray, train_neg: np.ndarray,
             cfg: ScoreConfig) -> dict[str, tuple[str, Any, Any]]:
    """{method: (kind, scores or None, reason)} for the AUROC table."""
    out: dict[str, tuple[str, Any, Any]] = {}

    def add(name: str, kind: str, fn: Callable[[], Any]) -> None:
        try:
            out[name] = (kind, np.asarray(fn(), dtype=np.float64), None)
        except probes.ProbeUnavailable as exc:
            out[name] = (kind, None, str(exc))

    for name, seg_pools in bundle.pooled.items():
        kind = "sae" if name == OURS else "sae_baseline"
        add(name, kind, lambda p=seg_pools: probes.logistic_scores(_probe_features(p, cfg.probe_segment),
                                                                   train_pos, train_neg, cfg.seed))
    prompts = bundle.table["prompt"].astype(str).tolist()
    add(probes.TFIDF_METHOD, "text", lambda: probes.tfidf_scores(prompts, train_pos, train_neg, cfg.seed))
    raw = _probe_features(bundle.raw, cfg.probe_segment)
    add(RAW_LOGREG, "activations", lambda: probes.logistic_scores(raw, train_pos, train_neg, cfg.seed))
    add(RAW_DIFF_OF_MEANS, "activations", lambda: probes.diff_of_means_scores(raw, train_pos, train_neg))
    return out


def compute_scores(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str],
                   cfg: ScoreConfig | None = None,
                   baselines: Mapping[str, str | os.PathLike[str]] | None = None) -> ScoreResult:
    """Everything `score` reports, computed from the store alone: one read, then `analyse`."""
    cfg = cfg or ScoreConfig()
    baselines = dict(baselines or {})
    clash = sorted(set(baselines) & set(RESERVED_NAMES))
    if clash:
        raise ScoreError(f"baseline name {clash[0]!r} is reserved; pick another NAME in --baseline NAME=SAE")
    bundle = read_eval_bundle(store_path, {OURS: sae_path, **baselines}, cfg.layer, cfg.pool, cfg.seed,
                              check=lambda facts, table: tier_classes(cfg, facts, table), labels=cfg.labels)
    tokenizer, note = load_tokenizer(bundle.facts)
    return analyse(bundle, cfg, tokenizer, note)


def tier_classes(cfg: ScoreConfig, facts: StoreFacts, table: pd.DataFrame) -> TierClasses:
    """The run's positive and negative tiers: the flags, else the store's attrs, else the defaults."""
    return resolve_classes(cfg.positive_tiers, cfg.negative_tiers, facts.hazard_tiers, facts.benign_tiers,
                           set(table["tier"].astype(str)))


def analyse(bundle: EvalBundle, cfg: ScoreConfig, tokenizer: Any | None = None,
            tokenizer_note: str = "token ids only: no tokenizer given") -> ScoreResult:
    """Catalog, f, T, D, probes, AUROC table and depth categories of a bundle (reads nothing).

    ``tokenizer`` (or None) decodes the top-activating contexts; ``tokenizer_note`` says how they were
    rendered."""
    table, n = bundle.table, bundle.n_docs
    classes = tier_classes(cfg, bundle.facts, table)
    split = split_prompts(table["id"], table["tier"], cfg.seed, cfg.train_fraction, cfg.calibration_fraction)
    train, cal, test = (split == s for s in SPLITS)
    catalog = build_catalog(bundle.pooled[OURS], table, train, cfg.top_n, cfg.min_effect,
                            contrasts(classes.positive, classes.negative))
    f = {seg: feature_profile(bundle.pooled[OURS][seg], catalog) for seg in POOLED_SEGMENTS}

    labels = table["surface_label"].astype(str).to_numpy()
    S = np.array([list(p) for p in table["surface_probs"]], dtype=np.float64).reshape(n, len(SURFACE_CLASSES))
    alignment = calibrate(S, f[cfg.f_segment], labels, cal, cfg.ridge)
    D = divergence(S, f[cfg.f_segment], alignment["T"])

    tier = table["tier"].astype(str).to_numpy()
    positive, negative = np.isin(tier, classes.positive), np.isin(tier, classes.negative)
    methods = _methods(bundle, train & positive, train & negative, cfg)
    sets = probes.EvalSets(test & positive, test & negative,
                           {g: test & (tier == t) for g, t in classes.groups.items()})
    rows = probes.auroc_table(methods, sets, cfg.n_boot, cfg.n_perm, cfg.seed)
    hazard = methods[OURS][1] if methods[OURS][1] is not None else np.full(n, np.nan)
    depth = [refusal_depth_category(lab, d, h, cfg.thresholds) if t else None
             for lab, d, h, t in zip(labels, D, hazard, test, strict=True)]
    contexts = catalog_contexts(catalog, bundle.codes, bundle.tokens, train, cfg.contexts,
                                cfg.context_latents)
    return ScoreResult(
        facts=bundle.facts, layer=bundle.layer, sae_path=bundle.sae_paths[OURS],
        sae_config=dict(bundle.sae_configs[OURS]),
        baselines={k: v for k, v in bundle.sae_paths.items() if k != OURS},
        random_sae_config=dict(bundle.sae_configs[RANDOM_SAE]), table=table, split=split, S=S, f=f, D=D,
        hazard=hazard, depth=depth, catalog=catalog, alignment=alignment, auroc=rows,
        contexts=decode_contexts(contexts, table["id"].tolist(), tokenizer), contexts_note=tokenizer_note,
        counts=bundle.counts, classes=classes, labels=dict(bundle.labels) if bundle.labels else None)


def score(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str], out: str | os.PathLike[str],
          cfg: ScoreConfig | None = None, baselines: Mapping[str, str | os.PathLike[str]] | None = None
          ) -> dict[str, Any]:
    """Score an eval store with an SAE (and baselines), write scores.parquet, catalog.json, report.json and
    report.html to ``out``; return the report.json contents."""
    cfg = cfg or ScoreConfig()
    return write_outputs(Path(out), compute_scores(store_path, sae_path, cfg, baselines), cfg)


__all__ = ["ScoreConfig", "ScoreError", "ScoreResult", "analyse", "calibrate", "compute_scores", "score",
           "split_prompts", "tier_classes"]
