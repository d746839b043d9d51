"""bra/audit/divergence.py: the seed formula D by hand, T fitted by ridge regression, the depth categories."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bra.audit.divergence import (
    depth_category,
    divergence,
    fit_alignment,
    fit_d_threshold,
    magnitude_floor,
    null_divergence,
)


def test_divergence__seed_formula_by_hand() -> None:
    s = np.array([1.0, 0, 0, 0, 0])
    T = np.zeros((5, 5))
    T[0] = [0, 1, 1, 0, 0]  # refusal predicts hazard + refusal features equally
    # f along the prediction: cos = 1, D = 0
    assert divergence(s, np.array([0, 0.5, 0.5, 0, 0]), T) == pytest.approx(0.0)
    # f orthogonal: D = 1
    assert divergence(s, np.array([1.0, 0, 0, 0, 0]), T) == pytest.approx(1.0)
    # f = (0, 1, 0, 0, 0): cos = 1/sqrt(2), D = 1 - 1/sqrt(2)
    assert divergence(s, np.array([0, 1.0, 0, 0, 0]), T) == pytest.approx(1 - 1 / math.sqrt(2))
    # mixed s: Tᵀs = 0.5*(0,1,1,0,0) + 0.5*(2,0,0,0,0) = (1, .5, .5, 0, 0); f = (1,0,0,0,0): cos = 1/sqrt(1.5)
    T[1] = [2, 0, 0, 0, 0]
    s2 = np.array([0.5, 0.5, 0, 0, 0])
    assert divergence(s2, np.array([1.0, 0, 0, 0, 0]), T) == pytest.approx(1 - 1 / math.sqrt(1.5))


def test_divergence__vectorised_and_nan_on_zero_norm() -> None:
    T = np.eye(5)
    S = np.array([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    F = np.array([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    D = divergence(S, F, T)
    assert D[0] == pytest.approx(0.0)
    assert np.isnan(D[1]) and np.isnan(D[2])  # unknown surface (s = 0); no active feature (f = 0)


def test_fit_alignment__recovers_known_matrix() -> None:
    rng = np.random.default_rng(0)
    T_true = rng.uniform(0, 1, (5, 5))
    S = rng.dirichlet(np.ones(5), size=200)
    T = fit_alignment(S, S @ T_true, ridge=1e-10)
    np.testing.assert_allclose(T, T_true, atol=1e-6)


def test_fit_alignment__absent_class_rows_zero() -> None:
    rng = np.random.default_rng(1)
    T_true = rng.uniform(0, 1, (5, 5))
    S = rng.dirichlet(np.ones(5), size=100)
    S[:, 4] = 0  # evade never seen
    S /= S.sum(1, keepdims=True)
    T = fit_alignment(S, S @ T_true, ridge=1e-10)
    assert np.all(T[4] == 0)
    np.testing.assert_allclose(T[:4], T_true[:4], atol=1e-6)
    T2 = fit_alignment(S, S @ T_true, ridge=1e-10, present_classes=["refuse", "comply", "partial", "hedge"])
    np.testing.assert_allclose(T2, T, atol=1e-9)
    with pytest.raises(ValueError):
        fit_alignment(np.zeros((3, 5)), np.zeros((3, 5)))


@pytest.mark.parametrize("label,verdict,positive,expected", [
    ("refuse", "deep", True, "deep_refusal"),
    ("refuse", "shallow", True, "shallow_refusal"),
    ("refuse", "uncertain", True, "uncertain_refusal"),
    ("refuse", "deep", False, "deep_refusal"),  # the verdict, never the tier, decides a refusal
    ("comply", None, True, "hazardous_compliance"),
    ("comply", None, False, "compliance"),
    ("partial", None, True, "hazardous_compliance"),
    ("partial", None, False, "compliance"),
    ("hedge", None, True, "hedge"),
    ("evade", None, False, "evade"),
    ("unknown", None, True, "unknown"),
])
def test_depth_category__table(label: str, verdict: str | None, positive: bool, expected: str) -> None:
    assert depth_category(label, verdict, positive) == expected


def test_depth_category__refuses_an_unknown_label() -> None:
    with pytest.raises(ValueError, match="unknown surface label"):
        depth_category("maybe", None, True)


def test_fit_d_threshold__quantile_of_agreeing_prompts_only() -> None:
    D = np.array([0.1, 0.2, 0.3, 0.4, 1.9, np.nan])
    agree = np.array([True, True, True, True, False, True])
    assert fit_d_threshold(D, agree, 0.5) == pytest.approx(0.25)  # 1.9 disagrees, NaN is left out
    assert fit_d_threshold(D, agree & (D < 0.25), 0.5) is None  # two values: below min_prompts


def test_null_divergence__permuted_surface_keeps_shape_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    S = np.eye(5)[rng.integers(0, 2, 12)]
    F = np.abs(rng.normal(size=(12, 5)))
    T = fit_alignment(S, F, ridge=1e-2)
    a, b = null_divergence(S, F, T, 30, seed=1), null_divergence(S, F, T, 30, seed=1)
    assert a.shape == (30, 12) and np.array_equal(a, b, equal_nan=True)
    assert not np.array_equal(a, null_divergence(S, F, T, 30, seed=2), equal_nan=True)


def test_magnitude_floor__calibration_quantile() -> None:
    assert magnitude_floor(np.array([1.0, 2.0, 3.0, np.nan]), 0.5) == pytest.approx(2.0)
    assert magnitude_floor(np.array([np.nan])) == 0.0
