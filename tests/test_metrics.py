"""bra/audit/metrics.py: AUROC, bootstrap CIs, ROC points and bands, permutation p-values, each against
scikit-learn; DeLong's variance and paired test, Holm, the bootstrap mean, Brier and reliability bins against
values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from bra.audit.metrics import (
    auroc_ci,
    bootstrap_mean_ci,
    brier_score,
    delong_auroc_ci,
    delong_variance,
    holm,
    paired_auroc_diff,
    permutation_pvalue,
    rank_auroc,
    reliability_bins,
    roc_band,
    roc_points,
    wilson_interval,
)


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


# Three positives and two negatives, one tie across the classes (0.4). Scorer b ranks them worse.
HAND_Y = np.array([1, 1, 1, 0, 0])
HAND_A = np.array([0.8, 0.4, 0.6, 0.4, 0.2])
HAND_B = np.array([0.3, 0.7, 0.5, 0.6, 0.1])


def test_delong_variance__by_hand() -> None:
    # Placements of a. Positives (share of the 2 negatives each outranks, a tie counts 1/2):
    #   0.8 -> 2/2 = 1;  0.4 -> (1/2 + 1)/2 = 3/4;  0.6 -> 1.      V10 = [1, 3/4, 1], mean 11/12
    # Negatives (share of the 3 positives above each):
    #   0.4 -> (1 + 1 + 1/2)/3 = 5/6;  0.2 -> 1.                     V01 = [5/6, 1], mean 11/12 = AUROC
    # S10 = var(V10, ddof 1) = ((1/12)^2 + (2/12)^2 + (1/12)^2) / 2 = 1/48
    # S01 = var(V01, ddof 1) = ((1/12)^2 + (1/12)^2) / 1 = 1/72
    # Var = S10 / 3 + S01 / 2 = 1/144 + 1/144 = 1/72
    assert delong_variance(HAND_Y, HAND_A) == pytest.approx(1 / 72, abs=1e-12)
    auc, lo, hi = delong_auroc_ci(HAND_Y, HAND_A)
    assert auc == pytest.approx(11 / 12) == roc_auc_score(HAND_Y, HAND_A)
    assert lo == pytest.approx(11 / 12 - norm.ppf(0.975) * np.sqrt(1 / 72))
    assert hi == 1.0  # 11/12 + 0.231 clipped


def test_delong_auroc_ci__agrees_with_sklearn_and_is_zero_width_at_separation() -> None:
    y, s = _fixed_data()
    auc, lo, hi = delong_auroc_ci(y, s)
    assert auc == pytest.approx(roc_auc_score(y, s)) and lo < auc < hi
    boot = auroc_ci(y, s, n_boot=500, seed=0)
    assert hi - lo == pytest.approx(boot[2] - boot[1], rel=0.35)  # same order as the bootstrap's width
    separated = np.array([1] * 5 + [0] * 5) + np.linspace(0, 0.1, 10)
    assert delong_auroc_ci(np.array([1] * 5 + [0] * 5), separated) == (1.0, 1.0, 1.0)


def test_paired_auroc_diff__by_hand() -> None:
    # Placements of b: V10_b = [1/2, 1, 1/2] (AUROC 2/3), V01_b = [1/3, 1]; a's are in the test above.
    # S10: cov_ab = ((1/12)(-1/6) + (-2/12)(1/3) + (1/12)(-1/6)) / 2 = -1/24
    #      var_b  = ((1/6)^2 + (1/3)^2 + (1/6)^2) / 2 = 1/12
    # S01: cov_ab = ((-1/12)(-1/3) + (1/12)(1/3)) / 1 = 1/18;  var_b = ((1/3)^2 + (1/3)^2) / 1 = 2/9
    # var_a = 1/72, var_b = 1/12/3 + 2/9/2 = 5/36, cov = -1/24/3 + 1/18/2 = 1/72
    # var(diff) = 1/72 + 5/36 - 2/72 = 1/8;  diff = 11/12 - 2/3 = 1/4;  z = (1/4) / sqrt(1/8) = 1/sqrt(2)
    out = paired_auroc_diff(HAND_Y, HAND_A, HAND_B, n_boot=200, seed=1)
    assert out["diff"] == pytest.approx(0.25)
    assert out["p_value"] == pytest.approx(2 * norm.sf(1 / np.sqrt(2)))  # 0.4795
    assert out["n_boot"] == 200 and out["ci_low"] <= out["diff"] <= out["ci_high"]
    # the interval: both methods scored on the same stratified resamples (reference with scikit-learn)
    rng = np.random.default_rng(1)
    pos, neg = np.flatnonzero(HAND_Y == 1), np.flatnonzero(HAND_Y == 0)
    ref = []
    for _ in range(200):
        i = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        ref.append(roc_auc_score(HAND_Y[i], HAND_A[i]) - roc_auc_score(HAND_Y[i], HAND_B[i]))
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))


def test_paired_auroc_diff__identical_scores_give_zero_and_p_one() -> None:
    y, s = _fixed_data()
    out = paired_auroc_diff(y, s, s.copy(), n_boot=50)
    assert (out["diff"], out["ci_low"], out["ci_high"], out["p_value"]) == (0.0, 0.0, 0.0, 1.0)


def test_holm__by_hand_and_against_statsmodels() -> None:
    # m = 4 tested (None does not count): sorted 0.01, 0.03, 0.04, 0.5
    #   -> 4*0.01 = 0.04, 3*0.03 = 0.09, max(0.09, 2*0.04) = 0.09, max(0.09, 1*0.5) = 0.5
    assert holm([0.01, 0.04, 0.03, None, 0.5]) == pytest.approx([0.04, 0.09, 0.09, None, 0.5])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # 2*0.3, then max(0.6, 1*0.6): monotone
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # 2*0.6 capped at 1, then max(1, 0.7)
    assert holm([]) == [] and holm([None]) == [None]
    with pytest.raises(ValueError):
        holm([1.5])
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(0).uniform(0, 0.2, 12)
    np.testing.assert_allclose(holm(list(p)), multitest.multipletests(p, method="holm")[1])


def test_bootstrap_mean_ci__by_definition_and_degenerate_inputs() -> None:
    values = np.array([1.0, 2.0, np.nan, 6.0])
    mean, lo, hi = bootstrap_mean_ci(values, n_boot=300, seed=5)
    assert mean == pytest.approx(3.0)
    rng = np.random.default_rng(5)  # same draws as the function: one block of 300 resamples of 3 values
    ref = values[np.isfinite(values)][rng.integers(0, 3, (300, 3))].mean(axis=1)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert 1.0 <= lo < mean < hi <= 6.0
    assert bootstrap_mean_ci([np.nan, np.inf]) is None and bootstrap_mean_ci([]) is None
    one = bootstrap_mean_ci([np.nan, 4.0])
    assert one is not None and one[0] == 4.0 and np.isnan(one[1]) and np.isnan(one[2])


def test_brier_score__by_hand() -> None:
    # ((0.9-1)^2 + (0.2-0)^2 + (0.6-1)^2 + (0.5-0)^2) / 4 = (0.01 + 0.04 + 0.16 + 0.25) / 4 = 0.115
    assert brier_score(np.array([1, 0, 1, 0]), np.array([0.9, 0.2, 0.6, 0.5])) == pytest.approx(0.115)
    with pytest.raises(ValueError):
        brier_score(np.array([1, 0]), np.array([0.5, 1.5]))


def test_reliability_bins__keep_empty_bins_and_match_calibration_curve() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.1, 0.15, 0.85, 0.95, 0.9])  # 0.1 sits on an edge: the lower bin, as sklearn
    bins = reliability_bins(y, p, n_bins=5)
    assert bins["n"] == [3, 0, 0, 0, 3]
    assert bins["bin_low"] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8]) and bins["bin_high"][-1] == 1.0
    assert bins["observed_rate"] == pytest.approx([1 / 3, None, None, None, 2 / 3])
    assert bins["mean_predicted"] == pytest.approx([0.1, None, None, None, 0.9])
    assert (bins["observed_lo"][0], bins["observed_hi"][0]) == pytest.approx(wilson_interval(1, 3))
    assert bins["observed_lo"][1] is None and bins["observed_hi"][1] is None
    yy, ss = _fixed_data()
    probs = 1 / (1 + np.exp(-ss))
    observed, predicted = calibration_curve(yy, probs, n_bins=10)
    full = reliability_bins(yy, probs, n_bins=10)
    kept = [i for i, n in enumerate(full["n"]) if n]
    np.testing.assert_allclose([full["observed_rate"][i] for i in kept], observed)
    np.testing.assert_allclose([full["mean_predicted"][i] for i in kept], predicted)
