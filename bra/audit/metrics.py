"""AUROC with a bootstrap confidence interval, a label-permutation p-value, and a bootstrap ROC band.

Pure functions of (labels, scores, seed). The observed AUROC is scikit-learn's ``roc_auc_score``; the
thousands of resampled ones use the equivalent Mann-Whitney rank formula (`rank_auroc`, average ranks
for ties), and ROC points come from `roc_points`; both are tested equal to scikit-learn
(``roc_auc_score``, ``roc_curve``) and are ~100x faster than calling it per resample. The interval of a
proportion (`wilson_interval`) and of a mean (`mean_t_interval`) serve `bra-sae compare`.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata
from scipy.stats import t as student_t
from sklearn.metrics import roc_auc_score


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
