"""`bra-sae score`: refusal depth of an eval store's prompts from stored activations alone (no model).

Steps, each on its own split of the prompts (split by id, stratified by tier, disjoint by construction):

1. train: the feature catalog (`bra.audit.catalog`) and every hazard probe (`bra.audit.probes`);
2. calibration: the alignment matrix T (`bra.audit.divergence.fit_alignment`);
3. test: D, hazard scores, refusal-depth categories and the AUROC table are reported here only.

The store is read once; SAE codes are pooled per prompt and segment. Outputs are written by
`bra.audit.report`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bra.audit import catalog as cat
from bra.audit import probes
from bra.audit.config import (
    OURS,
    RANDOM_SAE,
    RESERVED_NAMES,
    SPLITS,
    ScoreConfig,
    ScoreError,
    ScoreResult,
)
from bra.audit.divergence import (
    SURFACE,
    divergence,
    fit_alignment,
    refusal_depth_category,
)
from bra.audit.report import write_outputs
from bra.cache import schema
from bra.cache.store import Store, open_store
from bra.sae.model import TopKSAE
from bra.sae.workflows import load_checked
from bra.vocab import DUAL_USE_TIER

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
        out[idx[:n_train]] = "train"
        out[idx[n_train:n_train + n_cal]] = "calibration"
        out[idx[n_train + n_cal:]] = "test"
    members = [set(ids[out == s]) for s in SPLITS]
    assert all(not (a & b) for i, a in enumerate(members) for b in members[i + 1:]), "splits overlap"
    assert sum(map(len, members)) == len(set(ids)) == len(ids), "a prompt is in no split"
    return out


def open_eval_store(path: str | os.PathLike[str]) -> tuple[Store, pd.DataFrame, cat.TokenColumns]:
    """The store, its prompts table (row i = doc i) and per-token columns; refuses a non-eval store."""
    store = open_store(path)
    table_path = store.location.child(schema.PROMPTS_TABLE)
    if store.attrs.get(schema.ATTR_KIND) != "eval" or not store.location.has_file(schema.PROMPTS_TABLE):
        raise ScoreError(f"{store.path}: not an eval store: build it from an eval manifest (it has no "
                         f"{schema.PROMPTS_TABLE} with completions)")
    table = store.read_table(schema.PROMPTS_TABLE)
    table = table.sort_values("doc_index", kind="stable").reset_index(drop=True)
    need = ("id", "tier", "framing", "prompt", "completion", "doc_index", "surface_label", "surface_probs")
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ScoreError(f"{table_path} lacks column {missing[0]!r}: rebuild the eval store")
    if table["doc_index"].tolist() != list(range(len(store.docs()))):
        raise ScoreError(f"{table_path} does not have one row per document of the store: rebuild it")
    tokens = cat.TokenColumns.read(store)
    if not (tokens.segment == schema.SEGMENT_COMPLETION).any():
        raise ScoreError(f"{store.path}: not an eval store: build it from an eval manifest (it has no "
                         f"completion tokens)")
    return store, table, tokens


def random_sae(like: TopKSAE, store: Store, layer: int, seed: int) -> TopKSAE:
    """A random TopK SAE of the same size (TopK-paper init, `TopKSAE.init_random`). Its input scale is
    sqrt(d_model / mean squared norm) of the store's own statistics, as training would set it, so the
    same k latents are chosen whatever the activation scale; b_dec is the store mean (decode only)."""
    stats = store.stats(layer)
    msn = float(stats.get("mean_sq_norm") or 0.0)
    scale = math.sqrt(like.cfg.d_model / msn) if msn > 0 else 1.0
    cfg = dataclasses.replace(like.cfg, input_scale=scale, dtype="float32", store_fingerprint="")
    mean = torch.tensor(stats["mean"], dtype=torch.float32) if "mean" in stats else None
    return TopKSAE.init_random(cfg, seed, data_mean=mean).eval()


def _calibrate(S: np.ndarray, F: np.ndarray, labels: np.ndarray, cal: np.ndarray,
               ridge: float) -> dict[str, Any]:
    """T from the calibration prompts with a known surface label. A class is present when some calibration
    prompt carries it as its label; T is fit on the present classes only (the mass a soft distribution puts
    on an absent class is ignored) and the absent classes are reported."""
    known = cal & np.isin(labels, SURFACE)
    present = [c for c in SURFACE if (labels[known] == c).any()]
    absent = [c for c in SURFACE if c not in present]
    if not known.any():
        raise ScoreError(f"calibration split has nothing to fit: no prompt with a known surface label "
                         f"({int(cal.sum())} calibration prompts, all unknown); classes lacking samples: "
                         f"{', '.join(absent)}")
    T = fit_alignment(S[known], F[known], ridge=ridge, present_classes=present)
    return {"T": T, "present_classes": present, "absent_classes": absent, "n_fit": int(known.sum()),
            "n_unknown": int((cal & ~known).sum())}


def _probe_features(pooled: Mapping[str, np.ndarray], segment: str) -> np.ndarray:
    if segment == "both":
        return np.hstack([pooled["prompt"], pooled["completion"]])
    return pooled[segment]


def _methods(table: pd.DataFrame, pools: cat.StorePools, pooled: Mapping[str, Mapping[str, np.ndarray]],
             train_pos: np.ndarray, train_neg: np.ndarray,
             cfg: ScoreConfig) -> dict[str, tuple[str, Any, Any]]:
    """{method: (kind, scores or None, reason)} for the AUROC table."""
    out: dict[str, tuple[str, Any, Any]] = {}

    def add(name: str, kind: str, fn: Any) -> None:
        try:
            out[name] = (kind, np.asarray(fn(), dtype=np.float64), None)
        except probes.ProbeUnavailable as exc:
            out[name] = (kind, None, str(exc))

    for name, seg_pools in pooled.items():
        kind = "sae" if name == OURS else "sae_baseline"
        add(name, kind, lambda p=seg_pools: probes.logistic_scores(_probe_features(p, cfg.probe_segment),
                                                                   train_pos, train_neg, cfg.seed))
    add(probes.TFIDF_METHOD, "text",
        lambda: probes.tfidf_scores(table["prompt"].astype(str).tolist(), train_pos, train_neg, cfg.seed))
    raw = _probe_features(pools.raw, cfg.probe_segment)
    add("raw_logreg", "activations", lambda: probes.logistic_scores(raw, train_pos, train_neg, cfg.seed))
    add("raw_diff_of_means", "activations", lambda: probes.diff_of_means_scores(raw, train_pos, train_neg))
    return out



def compute_scores(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str],
                   cfg: ScoreConfig | None = None,
                   baselines: Mapping[str, str | os.PathLike[str]] | None = None) -> ScoreResult:
    """Everything `score` reports, computed from the store alone."""
    cfg = cfg or ScoreConfig()
    baselines = dict(baselines or {})
    clash = sorted(set(baselines) & set(RESERVED_NAMES))
    if clash:
        raise ScoreError(f"baseline name {clash[0]!r} is reserved; pick another NAME in --baseline NAME=SAE")
    store, table, tokens = open_eval_store(store_path)
    sae, layer = load_checked(sae_path, store, cfg.layer, "SAE")
    saes: dict[str, TopKSAE] = {OURS: sae}
    for name, path in baselines.items():
        saes[name] = load_checked(path, store, layer, f"baseline {name}")[0]
    saes[RANDOM_SAE] = random_sae(sae, store, layer, cfg.seed)
    n = len(table)
    split = split_prompts(table["id"], table["tier"], cfg.seed, cfg.train_fraction, cfg.calibration_fraction)
    train, cal, test = (split == s for s in SPLITS)

    pools = cat.read_pools(store, layer, saes, tokens, n, cfg.pool)
    pooled = {name: cat.pool_codes(codes, tokens, n, cfg.pool) for name, codes in pools.codes.items()}
    catalog = cat.build_catalog(pooled[OURS], table, train, cfg.top_n, cfg.min_effect)
    f = {seg: cat.feature_profile(pooled[OURS][seg], catalog) for seg in cat.SEGMENTS}

    labels = table["surface_label"].astype(str).to_numpy()
    S = np.array([list(p) for p in table["surface_probs"]], dtype=np.float64).reshape(n, len(SURFACE))
    alignment = _calibrate(S, f[cfg.f_segment], labels, cal, cfg.ridge)
    D = divergence(S, f[cfg.f_segment], alignment["T"])

    tier = table["tier"].to_numpy()
    train_pos, train_neg = train & (tier == cat.HAZARD_TIER), train & (tier == cat.BENIGN_TIER)
    methods = _methods(table, pools, pooled, train_pos, train_neg, cfg)
    sets = probes.EvalSets(test & (tier == cat.HAZARD_TIER), test & (tier == cat.BENIGN_TIER),
                           test & (tier == DUAL_USE_TIER))
    rows = probes.auroc_table(methods, sets, cfg.n_boot, cfg.n_perm, cfg.seed)
    hazard = methods[OURS][1] if methods[OURS][1] is not None else np.full(n, np.nan)
    depth = [refusal_depth_category(lab, d, h, cfg.thresholds) if t else None
             for lab, d, h, t in zip(labels, D, hazard, test, strict=True)]
    return ScoreResult(
        store=store, layer=layer, sae=sae, sae_path=str(sae_path),
        baselines={k: str(v) for k, v in baselines.items()}, random_sae_config=saes[RANDOM_SAE].cfg.to_dict(),
        table=table, split=split, S=S, f=f, D=D, hazard=hazard, depth=depth, catalog=catalog,
        alignment=alignment, auroc=rows,
        contexts=_contexts(catalog, pools.codes[OURS], tokens, train, cfg), counts=pools.counts)


def score(store_path: str | os.PathLike[str], sae_path: str | os.PathLike[str], out: str | os.PathLike[str],
          cfg: ScoreConfig | None = None, baselines: Mapping[str, str | os.PathLike[str]] | None = None
          ) -> dict[str, Any]:
    """Score an eval store with an SAE (and baselines), write scores.parquet, catalog.json, report.json and
    report.html to ``out``; return the report.json contents."""
    cfg = cfg or ScoreConfig()
    return write_outputs(Path(out), compute_scores(store_path, sae_path, cfg, baselines), cfg)


def _contexts(catalog: Mapping[str, cat.CategoryEntry], codes: cat.SparseCodes, tokens: cat.TokenColumns,
              train: np.ndarray, cfg: ScoreConfig) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Top-activating contexts (training prompts only) of the first catalog latents of each category."""
    return {name: {j: cat.top_contexts(codes, tokens, j, train, n=cfg.contexts)
                   for j in entry.latents[:cfg.context_latents]}
            for name, entry in catalog.items()}


__all__ = ["ScoreConfig", "ScoreError", "ScoreResult", "compute_scores", "open_eval_store", "random_sae",
           "score", "split_prompts"]
