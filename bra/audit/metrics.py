"""AUROC with a bootstrap confidence interval, a label-permutation p-value, and a bootstrap ROC band.

Pure functions of (labels, scores, seed). The observed AUROC is scikit-learn's ``roc_auc_score``; the
thousands of resampled ones use the equivalent Mann-Whitney rank formula (`rank_auroc`, average ranks
for ties), and ROC points come from `roc_points`; both are tested equal to scikit-learn
(``roc_auc_score``, ``roc_curve``) and are ~100x faster than calling it per resample. The interval of a
proportion (`wilson_interval`) and of a mean (`mean_t_interval`) serve `bra-sae compare`.

Beside the bootstrap: DeLong's variance of an AUROC (`delong_variance`, `delong_auroc_ci`) and of the
difference of two AUROCs on the same prompts (`paired_auroc_diff`), Holm's correction across a table's rows
(`holm`), a bootstrap interval of a mean (`bootstrap_mean_ci`), and the Brier score and reliability bins of
a probability (`brier_score`, `reliability_bins`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t
from sklearn.metrics import brier_score_loss, roc_auc_score


def rank_auroc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUROC = (sum of positive ranks - n1(n1+1)/2) / (n1 n0), ties at average rank (= roc_auc_score)."""
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    ranks = rankdata(scores)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _check(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != scores.shape:
        raise ValueError(f"y has {y.size} entries, scores {scores.size}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("y must be binary (0/1)")
    if (y == 1).sum() == 0 or (y == 0).sum() == 0:
        raise ValueError("AUROC needs at least one positive and one negative")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    return y, scores


def _stratified_resamples(y: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Index arrays, each resampling positives and negatives with replacement separately."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return [np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(n_boot)]


def auroc_ci(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
             level: float = 0.95) -> tuple[float, float, float]:
    """(AUROC, lower, upper): percentile bootstrap CI at ``level``.

    Resampling is stratified (positives and negatives drawn with replacement within their class), so
    each resample keeps the class balance and always has both classes; a resample whose AUROC is still
    undefined (non-finite) would be skipped. With fewer than 2 samples in a class the bootstrap cannot
    vary that class, so the interval understates the uncertainty: read it with the counts.
    """
    y, scores = _check(y, scores)
    auc = float(roc_auc_score(y, scores))
    stats = []
    for idx in _stratified_resamples(y, n_boot, seed):
        value = rank_auroc(y[idx], scores[idx])
        if np.isfinite(value):
            stats.append(value)
    if not stats:
        return auc, float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return auc, float(lo), float(hi)


def permutation_pvalue(y: np.ndarray, scores: np.ndarray, n_perm: int = 1000, seed: int = 0) -> float:
    """One-sided p-value of the AUROC under label permutation: (#{AUROC_perm >= AUROC} + 1) / (n_perm + 1).

    The +1 counts the observed labelling as one of the permutations, so p is never 0 (Phipson & Smyth
    2010, "Permutation p-values should never be zero").
    """
    y, scores = _check(y, scores)
    observed = roc_auc_score(y, scores)
    rng = np.random.default_rng(seed)
    # Ranks do not change under a label permutation, so each permuted AUROC is a sum of fixed ranks.
    ranks = rankdata(scores)
    n1, n0 = int(y.sum()), int((y == 0).sum())
    perm_auc = np.array([ranks[rng.permutation(y).astype(bool)].sum() for _ in range(n_perm)])
    perm_auc = (perm_auc - n1 * (n1 + 1) / 2) / (n1 * n0)
    # a tolerance so that permutations tying the observed AUROC count despite float rounding
    count = int((perm_auc >= observed - 1e-12).sum())
    return float((count + 1) / (n_perm + 1))


def roc_points(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1), as ``roc_curve(...,
    drop_intermediate=False)`` computes them; a vertical run of points keeps only its top."""
    y = np.asarray(y).astype(int)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s_sorted = np.asarray(scores, dtype=np.float64)[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]  # last index of each distinct score
    tps = np.cumsum(y[order])[last]
    fps = last + 1 - tps
    fpr = np.r_[0.0, fps / max(int((y == 0).sum()), 1)]
    tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
    keep = np.r_[fpr[1:] != fpr[:-1], True]  # the top of each vertical run
    return fpr[keep], tpr[keep]


def roc_band(y: np.ndarray, scores: np.ndarray, n_boot: int = 200, seed: int = 0, level: float = 0.95,
             n_grid: int = 101) -> dict[str, list[float]]:
    """ROC curve on a false-positive-rate grid with a pointwise bootstrap band of the true-positive rate.

    Returns ``{"fpr": grid, "tpr": observed TPR, "lo": lower, "hi": upper}`` (stratified resamples as
    in `auroc_ci`; TPR linearly interpolated between ROC points, the top of a vertical step at its FPR).
    """
    y, scores = _check(y, scores)
    grid = np.linspace(0.0, 1.0, n_grid)

    def tpr_on_grid(yy: np.ndarray, ss: np.ndarray) -> np.ndarray:
        fpr, tpr = roc_points(yy, ss)
        return np.interp(grid, fpr, tpr)

    curves = np.array([tpr_on_grid(y[idx], scores[idx]) for idx in _stratified_resamples(y, n_boot, seed)])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(curves, [alpha, 1.0 - alpha], axis=0)
    return {"fpr": grid.tolist(), "tpr": tpr_on_grid(y, scores).tolist(), "lo": lo.tolist(),
            "hi": hi.tolist()}


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of the proportion k/n (Wilson 1927), None when n == 0.

    Chosen over the normal (Wald) interval because refusal counts are often 0 or n in small eval sets,
    where Wald collapses to a zero-width interval; Wilson stays inside [0, 1] and keeps its coverage there.
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return None
    z = float(norm.ppf(0.5 + level / 2.0))
    p, z2n = k / n, z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * float(np.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n)))
    # at k = 0 (k = n) the lower (upper) bound is exactly 0 (1); the formula gets there only up to rounding
    return (0.0 if k == 0 else max(0.0, centre - half)), (1.0 if k == n else min(1.0, centre + half))


def mean_t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean, mean ± t(level, n-1) · sd / sqrt(n); None with fewer than 2 values
    (the spread is then unknown)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        return None
    half = float(student_t.ppf(0.5 + level / 2.0, x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))
    return float(x.mean()) - half, float(x.mean()) + half


def _placements(y: np.ndarray, scores_KN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of K score vectors, by midranks (Sun & Xu 2014, eqs. 6-7).

    ``v10_KM[k, i]``: share of negatives that positive i outranks under scorer k (a tie counts 1/2);
    ``v01_KL[k, j]``: share of positives that outrank negative j. Each row's mean is that scorer's AUROC.
    Midranks replace the O(M·L) pairwise comparisons: a positive's rank among all minus its rank among the
    positives is the (tie-halved) number of negatives below it."""
    pos, neg = y == 1, y == 0
    m, n = int(pos.sum()), int(neg.sum())
    rank_all = rankdata(scores_KN, axis=1)
    v10 = (rank_all[:, pos] - rankdata(scores_KN[:, pos], axis=1)) / n
    v01 = 1.0 - (rank_all[:, neg] - rankdata(scores_KN[:, neg], axis=1)) / m
    return v10, v01


def _delong_cov(y: np.ndarray, scores_KN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUROCs [K], DeLong covariance [K, K]) = S10 / M + S01 / L (DeLong, DeLong & Clarke-Pearson 1988)."""
    v10, v01 = _placements(y, scores_KN)
    m, n = v10.shape[1], v01.shape[1]
    # a class of one sample has no spread to estimate: its term is 0 and the variance is understated
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores_KN),) * 2)
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores_KN),) * 2)
    return v10.mean(axis=1), s10 / m + s01 / n


def delong_variance(y: np.ndarray, scores: np.ndarray) -> float:
    """DeLong's estimate of the variance of the AUROC of ``scores`` for labels ``y`` (0/1).

    Nonparametric (from the structural components, `_placements`), so it needs no resampling and does not
    depend on a seed. It is 0 when the classes are perfectly separated: the AUROC is then at its bound and
    the estimator sees no spread (read it with the counts)."""
    y, scores = _check(y, scores)
    return float(_delong_cov(y, scores[None])[1][0, 0])


def delong_auroc_ci(y: np.ndarray, scores: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(AUROC, lower, upper): AUROC ± z · sqrt(DeLong variance), clipped to [0, 1].

    A normal-approximation interval beside the bootstrap's (`auroc_ci`); like it, it collapses to a point
    at perfect separation (`delong_variance` is then 0), so neither says how a larger set would rank."""
    y, scores = _check(y, scores)
    auc, cov = _delong_cov(y, scores[None])
    half = float(norm.ppf(0.5 + level / 2.0)) * float(np.sqrt(cov[0, 0]))
    return float(auc[0]), max(0.0, float(auc[0]) - half), min(1.0, float(auc[0]) + half)


def paired_auroc_diff(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """AUROC_a - AUROC_b of two scorers of the same prompts, with a paired interval and DeLong's p-value.

    Returns ``diff``; ``ci_low``/``ci_high``, the percentile interval of a stratified paired bootstrap (each
    resample draws positives and negatives with replacement, as `auroc_ci`, and scores both methods on the
    SAME indices, so what the two share cancels); ``p_value``, the two-sided p of DeLong's paired z-test,
    z = diff / sqrt(var_a + var_b - 2 cov_ab) with the DeLong covariance of the two AUROCs (1 when the
    difference and its variance are both 0, e.g. identical scores; 0 when only the variance is); and
    ``n_boot``. The bootstrap gives the interval, DeLong the test: the p-value needs no seed."""
    y, a = _check(y, scores_a)
    _, b = _check(y, scores_b)
    auc, cov = _delong_cov(y, np.stack([a, b]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    if var > 1e-15:
        p = float(2.0 * norm.sf(abs(diff) / np.sqrt(var)))
    else:  # no spread in the difference: it is exactly what was seen
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    boot = [rank_auroc(y[idx], a[idx]) - rank_auroc(y[idx], b[idx])
            for idx in _stratified_resamples(y, n_boot, seed)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha]) if boot else (float("nan"), float("nan"))
    return {"diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p_value": p, "n_boot": n_boot}


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (Holm 1979), in the input order.

    The i-th smallest of m p-values becomes max over j <= i of (m - j + 1) · p_(j), capped at 1, so the
    adjusted values keep the order of the raw ones and reject exactly what Holm's step-down rejects at any
    level. None (a row without a test) and NaN pass through unchanged and do not count in m."""
    values = [None if p is None else float(p) for p in pvalues]
    tested = [(i, p) for i, p in enumerate(values) if p is not None and not np.isnan(p)]
    raw = np.array([p for _, p in tested], dtype=np.float64)
    if ((raw < 0) | (raw > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(raw, kind="stable")
    m = raw.size
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * raw[order]))
    out = list(values)
    for rank, pos in enumerate(order):
        out[tested[pos][0]] = float(stepped[rank])
    return out


def bootstrap_mean_ci(values: np.ndarray | Sequence[float], n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float, float] | None:
    """(mean, lower, upper): percentile bootstrap interval of the mean of the finite ``values``.

    NaN/inf are dropped (a prompt whose D is undefined has no value to average). None when no finite
    value is left; with a single value the spread is unknown, so the bounds are NaN, never a zero-width
    interval at the value."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // x.size)  # resamples per draw: bounds memory at ~16 MB whatever n is
    means = np.concatenate([x[rng.integers(0, x.size, (min(chunk, n_boot - start), x.size))].mean(axis=1)
                            for start in range(0, n_boot, chunk)])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)


def _check_probabilities(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(int).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y has {y.size} entries, p {p.size}")
    if not set(np.unique(y)) <= {0, 1}:
        raise ValueError("y must be binary (0/1)")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probabilities must be finite and in [0, 1]")
    return y, p


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the predicted probability of class 1 (Brier 1950; scikit-learn's
    ``brier_score_loss``): 0 is perfect, 0.25 is a constant 0.5."""
    y, p = _check_probabilities(y, p)
    return float(brier_score_loss(y, p, pos_label=1))


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, list[Any]]:
    """Reliability diagram data: ``n_bins`` equal-width bins of the predicted probability over [0, 1].

    Lists, one entry per bin: ``bin_low``, ``bin_high``, ``n``, ``mean_predicted``, ``observed_rate`` and
    the Wilson interval of the observed rate (``observed_lo``, ``observed_hi``; `wilson_interval`). A bin
    is (low, high], the first [0, high], as in scikit-learn's ``calibration_curve`` (whose non-empty bins
    these equal); empty bins are kept, with n = 0 and None values, so that the plot shows where the probe
    never predicts."""
    if n_bins < 1:
        raise ValueError("n_bins must be positive")
    y, p = _check_probabilities(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.searchsorted(edges[1:-1], p)  # calibration_curve's binning
    out: dict[str, list[Any]] = {k: [] for k in ("bin_low", "bin_high", "n", "mean_predicted",
                                                 "observed_rate", "observed_lo", "observed_hi")}
    for b in range(n_bins):
        sel = which == b
        n, k = int(sel.sum()), int(y[sel].sum())
        interval = wilson_interval(k, n)
        out["bin_low"].append(float(edges[b]))
        out["bin_high"].append(float(edges[b + 1]))
        out["n"].append(n)
        out["mean_predicted"].append(float(p[sel].mean()) if n else None)
        out["observed_rate"].append(k / n if n else None)
        out["observed_lo"].append(interval[0] if interval else None)
        out["observed_hi"].append(interval[1] if interval else None)
    return out
