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

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bra.audit.config import TFIDF_METHOD
from bra.audit.metrics import auroc_ci, permutation_pvalue, roc_band

logger = logging.getLogger(__name__)

PROBE_C = 1.0
"""Inverse L2 strength of every logistic probe (scikit-learn's default; not tuned on the test split)."""


class ProbeUnavailable(ValueError):
    """A scorer cannot be fit (too few training samples of a class)."""


def _labels(train_pos: np.ndarray, train_neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n1, n0 = int(train_pos.sum()), int(train_neg.sum())
    if n1 < 2 or n0 < 2:
        raise ProbeUnavailable(f"needs >= 2 training prompts per class, got {n1} hazard and {n0} benign")
    idx = np.flatnonzero(train_pos | train_neg)
    return idx, train_pos[idx].astype(int)


def logistic_scores(X: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray, seed: int = 0) -> np.ndarray:
    """P(hazard) for every row of X [n, d] from a standardised logistic probe on the training rows."""
    idx, y = _labels(train_pos, train_neg)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=5000, random_state=seed))
    probe.fit(X[idx], y)
    return probe.predict_proba(X)[:, 1]


def tfidf_scores(texts: Sequence[str], train_pos: np.ndarray, train_neg: np.ndarray,
                 seed: int = 0) -> np.ndarray:
    """P(hazard) from TF-IDF (1-2 grams, sublinear tf) + logistic regression fit on the training prompts."""
    idx, y = _labels(train_pos, train_neg)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    X_train = vec.fit_transform([texts[i] for i in idx])
    clf = LogisticRegression(C=PROBE_C, max_iter=5000, random_state=seed).fit(X_train, y)
    return clf.predict_proba(vec.transform(list(texts)))[:, 1]


def diff_of_means_scores(X: np.ndarray, train_pos: np.ndarray, train_neg: np.ndarray) -> np.ndarray:
    """x · (mean_hazard - mean_benign) over the training rows; a ranking score, not a probability."""
    _labels(train_pos, train_neg)
    direction = X[train_pos].mean(0) - X[train_neg].mean(0)
    return X @ direction


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


def method_row(name: str, kind: str, scores: np.ndarray | None, sets: EvalSets, n_boot: int, n_perm: int,
               seed: int, reason: str | None = None) -> dict[str, Any]:
    """One AUROC-table row: AUROC with bootstrap CI, permutation p, and per-group mean scores (``n_<group>``
    and ``mean_score_<group>`` for each of ``sets.groups``; ``hazard`` / ``benign`` are the two classes)."""
    row: dict[str, Any] = {"method": name, "kind": kind, "n_positive": int(sets.positive.sum()),
                           "n_negative": int(sets.negative.sum()),
                           **{f"n_{g}": int(mask.sum()) for g, mask in sets.groups.items()}}
    if scores is None:
        return {**row, "auroc": None, "ci_low": None, "ci_high": None, "p_value": None, "reason": reason}
    sel = sets.positive | sets.negative
    y, s = sets.positive[sel].astype(int), scores[sel]
    for group, mask in (("hazard", sets.positive), ("benign", sets.negative), *sets.groups.items()):
        row[f"mean_score_{group}"] = float(scores[mask].mean()) if mask.any() else None
    if not sets.positive.any() or not sets.negative.any():
        return {**row, "auroc": None, "ci_low": None, "ci_high": None, "p_value": None,
                "reason": "the test split lacks a hazard or a benign prompt"}
    auc, lo, hi = auroc_ci(y, s, n_boot=n_boot, seed=seed)
    row.update({"auroc": auc, "ci_low": lo, "ci_high": hi, "p_value": permutation_pvalue(y, s, n_perm, seed),
                "reason": None, "roc": roc_band(y, s, n_boot=min(n_boot, 200), seed=seed)})
    return row


def auroc_table(methods: Mapping[str, tuple[str, np.ndarray | None, str | None]], sets: EvalSets, n_boot: int,
                n_perm: int, seed: int) -> list[dict[str, Any]]:
    """Rows for ``{name: (kind, scores or None, reason)}``, each with its margin over the TF-IDF baseline."""
    rows = [method_row(name, kind, scores, sets, n_boot, n_perm, seed, reason)
            for name, (kind, scores, reason) in methods.items()]
    base = next((r["auroc"] for r in rows if r["method"] == TFIDF_METHOD), None)
    for r in rows:
        r["margin_over_tfidf"] = None if r["auroc"] is None or base is None else r["auroc"] - base
    return rows
