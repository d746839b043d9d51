"""Hazard-vs-benign scorers fit on the training split, and the AUROC table that compares them.

Every method is fit on training prompts of the positive (hazard) class (label 1) and the negative (benign)
class (label 0) only (`bra.audit.classes.TierClasses`); the tiers in neither class (dual-use, by default)
are never a label, they are scored and reported as their own groups. Scores are computed for every prompt,
but the table is evaluated on the test split alone.

- ``logistic_scores``: standardised features, L2 logistic regression (lbfgs, deterministic); the score is
  the probability of the hazard class. Used for SAE latents (ours, baselines, a random SAE) and for the
  raw residual stream.
- ``tfidf_scores``: TF-IDF of the prompt text (word 1-2 grams) with the same logistic regression, the
  words-only baseline: tiers that differ in topic separate from the words alone, so an activation
  method's value is its margin over this one.
- ``diff_of_means_scores``: projection on mean(hazard) - mean(benign) of the training rows (no fitting
  beyond two means; the "difference-in-means direction" of the refusal-direction literature).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from bra.audit.config import TFIDF_METHOD
from bra.audit.metrics import auroc_ci, delong_auroc_ci, holm, paired_auroc_diff, permutation_pvalue, roc_band

logger = logging.getLogger(__name__)

PROBE_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths the probes choose from by cross-validation on the training split (log loss)."""
DEFAULT_C = 1.0
"""The C used when the training split is too small to cross-validate (fewer than 2 folds per class)."""
MAX_FOLDS = 5


class ProbeUnavailable(ValueError):
    """A scorer cannot be fit (too few training samples of a class)."""


@dataclass(frozen=True)
class ProbeScores:
    """A fitted scorer's scores on every prompt and how it was fit."""

    values: np.ndarray
    """[n] score per prompt (a probability for the logistic probes)."""
    C: float | None = None
    """The inverse L2 strength chosen by cross-validation (None: no regularisation to choose)."""
    folds: int = 0
    """Cross-validation folds used to choose C (0: too few training prompts, ``DEFAULT_C`` used)."""


def _labels(train_pos: np.ndarray, train_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n1, n0 = int(train_pos.sum()), int(train_neg.sum())
    if n1 < 2 or n0 < 2:
        raise ProbeUnavailable(f"needs >= 2 training prompts per class, got {n1} hazard and {n0} benign")
    idx = np.flatnonzero(train_pos | train_neg)
    return idx, train_pos[idx].astype(int)


def _lrcv_options() -> dict[str, Any]:
    """scikit-learn >= 1.8 warns unless the L2-only path and the new fitted attributes are asked for; older
    releases lack those arguments."""
    if "use_legacy_attributes" in inspect.signature(LogisticRegressionCV).parameters:
        return {"l1_ratios": (0.0,), "use_legacy_attributes": False}
    return {}


def _cv_fit(X: Any, y: np.ndarray, groups: np.ndarray | None, seed: int) -> tuple[Any, float, int]:
    """A logistic regression on (X, y) with C chosen from `PROBE_CS` by grouped, stratified k-fold log loss
    (paraphrases of one request stay in one fold; the C path is warm-started per fold), refit on all rows;
    `DEFAULT_C` when a class has fewer than 2 groups."""
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    folds = min(MAX_FOLDS, *(len(set(g[y == c])) for c in (0, 1)))
    if folds < 2:
        return LogisticRegression(C=DEFAULT_C, max_iter=5000, random_state=seed).fit(X, y), DEFAULT_C, 0
    cv = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y, g))
    model = LogisticRegressionCV(Cs=list(PROBE_CS), cv=cv, scoring="neg_log_loss", max_iter=5000,
                                 random_state=seed, **_lrcv_options()).fit(X, y)
    return model, float(np.ravel(model.C_)[0]), folds


def logistic_scores(X: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray, seed: int = 0,
                    groups: np.ndarray | None = None) -> ProbeScores:
    """P(hazard) for every row of X [n, d] from a logistic probe on the training rows, standardised by the
    training rows' mean and SD, its C cross-validated on them (``groups``: [n] group keys, folds never
    split a group)."""
    idx, y = _labels(train_pos, train_neg)
    scaler = StandardScaler().fit(X[idx])
    model, C, folds = _cv_fit(scaler.transform(X[idx]), y, None if groups is None else groups[idx], seed)
    return ProbeScores(model.predict_proba(scaler.transform(X))[:, 1], C, folds)


def tfidf_scores(texts: Sequence[str], train_pos: np.ndarray, train_neg: np.ndarray, seed: int = 0,
                 groups: np.ndarray | None = None) -> ProbeScores:
    """P(hazard) from TF-IDF (1-2 grams, sublinear tf; vocabulary and IDF from the training texts) +
    logistic regression, C cross-validated as in `logistic_scores`."""
    idx, y = _labels(train_pos, train_neg)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    X_train = vec.fit_transform([texts[i] for i in idx])
    model, C, folds = _cv_fit(X_train, y, None if groups is None else groups[idx], seed)
    return ProbeScores(model.predict_proba(vec.transform(list(texts)))[:, 1], C, folds)


def diff_of_means_direction(X: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray) -> np.ndarray:
    """mean_hazard - mean_benign over the training rows of X [n, d]: the "difference-in-means direction"."""
    _labels(train_pos, train_neg)
    return X[train_pos].mean(0) - X[train_neg].mean(0)


def diff_of_means_scores(X: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray) -> ProbeScores:
    """x · (mean_hazard - mean_benign) over the training rows; a ranking score, not a probability."""
    return ProbeScores(X @ diff_of_means_direction(X, train_pos, train_neg))


@dataclass(frozen=True)
class EvalSets:
    """Which prompts the table is evaluated on."""

    positive: np.ndarray
    """[n] bool: test prompts of the positive (hazard) class."""
    negative: np.ndarray
    """[n] bool: test prompts of the negative (benign) class."""
    groups: Mapping[str, np.ndarray]
    """Group name -> [n] bool: test prompts of a tier in neither class (reported apart with its count and
    mean score, never in the AUROC), in report order; ``dual_use`` is dual_use_bio's."""


@dataclass(frozen=True)
class Method:
    """One row of the AUROC table before evaluation: a scorer on one input segment."""

    name: str
    """Method name (`bra.audit.config` names, or a baseline SAE's name)."""
    kind: str
    """sae, sae_baseline, text or activations."""
    segment: str
    """Input the scorer saw: prompt, completion or both (prompt + completion)."""
    scores: ProbeScores | None
    """Its scores, or None when it could not be fit."""
    reason: str | None = None
    """Why ``scores`` is None."""

    @property
    def key(self) -> str:
        """``name@segment``: unique within a table."""
        return f"{self.name}@{self.segment}"


def method_row(m: Method, sets: EvalSets, n_boot: int, n_perm: int, seed: int) -> dict[str, Any]:
    """One AUROC-table row: AUROC with a stratified bootstrap CI and DeLong's CI, permutation p, and
    per-group mean scores (``n_<group>`` and ``mean_score_<group>`` for each of ``sets.groups``;
    ``hazard`` / ``benign`` are the two classes)."""
    row: dict[str, Any] = {"method": m.name, "segment": m.segment, "key": m.key, "kind": m.kind,
                           "n_positive": int(sets.positive.sum()), "n_negative": int(sets.negative.sum()),
                           **{f"n_{g}": int(mask.sum()) for g, mask in sets.groups.items()},
                           "probe_C": None if m.scores is None else m.scores.C,
                           "cv_folds": None if m.scores is None else m.scores.folds}
    empty = {"auroc": None, "ci_low": None, "ci_high": None, "delong_low": None, "delong_high": None,
             "p_value": None}
    if m.scores is None:
        return {**row, **empty, "reason": m.reason}
    scores = m.scores.values
    sel = sets.positive | sets.negative
    y, s = sets.positive[sel].astype(int), scores[sel]
    for group, mask in (("hazard", sets.positive), ("benign", sets.negative), *sets.groups.items()):
        row[f"mean_score_{group}"] = float(scores[mask].mean()) if mask.any() else None
    if not sets.positive.any() or not sets.negative.any():
        return {**row, **empty, "reason": "the test split lacks a hazard or a benign prompt"}
    auc, lo, hi = auroc_ci(y, s, n_boot=n_boot, seed=seed)
    _, dlo, dhi = delong_auroc_ci(y, s)
    row.update({"auroc": auc, "ci_low": lo, "ci_high": hi, "delong_low": dlo, "delong_high": dhi,
                "p_value": permutation_pvalue(y, s, n_perm, seed), "reason": None,
                "roc": roc_band(y, s, n_boot=min(n_boot, 200), seed=seed)})
    return row


def auroc_table(methods: Sequence[Method], sets: EvalSets, n_boot: int, n_perm: int, seed: int
                ) -> list[dict[str, Any]]:
    """A row per method, each with its margin over the TF-IDF baseline of the same input segment (the
    margin is never taken between rows that saw different inputs)."""
    rows = [method_row(m, sets, n_boot, n_perm, seed) for m in methods]
    base = {r["segment"]: r["auroc"] for r in rows if r["method"] == TFIDF_METHOD}
    for r in rows:
        b = base.get(r["segment"])
        r["margin_over_tfidf"] = None if r["auroc"] is None or b is None else r["auroc"] - b
    return rows


def paired_comparisons(methods: Sequence[Method], sets: EvalSets, subject: str, n_boot: int, seed: int
                       ) -> list[dict[str, Any]]:
    """``subject`` against every other method of the same segment whose kind is text, sae_baseline or a
    random SAE (the explanations of its AUROC), on the same test prompts: the AUROC difference with a paired
    stratified bootstrap CI and DeLong's paired p, Holm-adjusted across all rows (``p_holm``)."""
    sel = sets.positive | sets.negative
    y = sets.positive[sel].astype(int)
    rows: list[dict[str, Any]] = []
    if not sets.positive.any() or not sets.negative.any():
        return rows
    by_segment: dict[str, list[Method]] = {}
    for m in methods:
        by_segment.setdefault(m.segment, []).append(m)
    for segment, ms in by_segment.items():
        ours = next((m for m in ms if m.name == subject and m.scores is not None), None)
        if ours is None:
            continue
        for other in ms:
            if other is ours or other.scores is None or other.kind == "activations":
                continue
            d = paired_auroc_diff(y, ours.scores.values[sel], other.scores.values[sel], n_boot=n_boot,
                                  seed=seed)
            rows.append({"segment": segment, "method": subject, "versus": other.name, "kind": other.kind,
                         **{k: d[k] for k in ("diff", "ci_low", "ci_high", "p_value")}})
    for r, p in zip(rows, holm([r["p_value"] for r in rows]), strict=True):
        r["p_holm"] = p
    return rows
