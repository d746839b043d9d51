"""bra/audit/metrics.py: AUROC, bootstrap CIs, ROC points and bands, permutation p-values, each against
scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from bra.audit.metrics import auroc_ci, permutation_pvalue, rank_auroc, roc_band, roc_points


def _fixed_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    y = np.array([1] * 15 + [0] * 20)
    return y, y * 0.8 + rng.normal(0, 0.7, y.size)


def test_rank_auroc__equals_sklearn_with_ties() -> None:
    y, s = _fixed_data()
    assert rank_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    tied = np.round(s, 1)  # many ties
    assert rank_auroc(y, tied) == pytest.approx(roc_auc_score(y, tied), abs=1e-12)


def test_auroc_ci__matches_sklearn_point_and_bootstrap() -> None:
    y, s = _fixed_data()
    auc, lo, hi = auroc_ci(y, s, n_boot=100, seed=3)
    assert auc == pytest.approx(roc_auc_score(y, s))
    # reference: the same stratified resamples, scored by scikit-learn
    rng = np.random.default_rng(3)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    ref = [roc_auc_score(y[i], s[i]) for i in
           (np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(100))]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert lo < auc < hi


def test_roc_points__match_sklearn_roc_curve() -> None:
    y, s = _fixed_data()
    for scores in (s, np.round(s, 1)):  # with and without ties
        fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
        top = np.r_[fpr[1:] != fpr[:-1], True]
        ours = roc_points(y, scores)
        np.testing.assert_allclose(ours[0], fpr[top])
        np.testing.assert_allclose(ours[1], tpr[top])


def test_roc_band__observed_curve_matches_sklearn() -> None:
    y, s = _fixed_data()
    band = roc_band(y, s, n_boot=50, seed=0)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    top = np.r_[fpr[1:] != fpr[:-1], True]
    np.testing.assert_allclose(band["tpr"], np.interp(band["fpr"], fpr[top], tpr[top]))
    assert all(lo <= hi for lo, hi in zip(band["lo"], band["hi"], strict=True))


def test_permutation_pvalue__small_when_separable_large_when_random() -> None:
    y = np.array([1] * 12 + [0] * 12)
    separable = y + np.linspace(0, 0.1, y.size)
    assert permutation_pvalue(y, separable, n_perm=500, seed=0) == pytest.approx(1 / 501)
    rng = np.random.default_rng(7)
    p_random = permutation_pvalue(rng.permutation(y), rng.normal(size=y.size), n_perm=500, seed=0)
    assert p_random > 0.05
    # against the definition with scikit-learn, same permutations
    ys, ss = rng.permutation(y), rng.normal(size=y.size) + 0.5 * y
    perm = np.random.default_rng(4)
    observed = roc_auc_score(ys, ss)  # permutations that tie it count (float rounding aside)
    ref = sum(roc_auc_score(perm.permutation(ys), ss) >= observed - 1e-12 for _ in range(100))
    assert permutation_pvalue(ys, ss, n_perm=100, seed=4) == pytest.approx((ref + 1) / 101)
