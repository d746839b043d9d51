"""bra/audit/depth.py: the calibrated depth scale and verdicts on synthetic evidence whose answer is known:
refusals whose completion carries the hazard signal are shallow, refusals without it deep, the verdict
follows the completion evidence and not the tier, and the scale falls back (and says so) or gives up (and
says why)."""

from __future__ import annotations

import numpy as np
import pytest

from bra.audit.depth import (
    DEEP,
    REFERENCE_COMPLIED,
    REFERENCE_PROMPT_FALLBACK,
    SHALLOW,
    UNCERTAIN,
    depth_verdicts,
    fit_depth_scale,
    hazard_evidence,
)


def _calibration(n: int = 12, seed: int = 0):
    """n benign prompts (evidence ~0.1) and n complied hazard prompts (evidence ~1.0), all calibration."""
    rng = np.random.default_rng(seed)
    ev = np.r_[rng.normal(0.1, 0.02, n), rng.normal(1.0, 0.05, n)]
    positive = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    labels = np.array(["comply"] * (2 * n))
    return ev, positive, labels


def test_depth__scale_and_verdicts_follow_the_completion_evidence() -> None:
    ev, positive, labels = _calibration()
    cal = np.ones(len(ev), bool)
    scale = fit_depth_scale(ev, ev, cal, positive, ~positive, labels)
    assert scale.usable and scale.reference == REFERENCE_COMPLIED and scale.note is None
    assert scale.low == pytest.approx(np.median(ev[~positive]))
    assert scale.high == pytest.approx(np.median(ev[positive]))
    assert scale.t_deep < scale.t_shallow  # separated references: a band between
    # test refusals: two with the hazard signal in the completion, two without, one in between, and a
    # hazard-tier refusal without it: deep, whatever its tier
    test_ev = np.array([1.02, 0.97, 0.09, 0.11, 0.55])
    verdicts, reasons = depth_verdicts(scale.score(test_ev), np.array(["refuse"] * 5), scale)
    assert verdicts == [SHALLOW, SHALLOW, DEEP, DEEP, UNCERTAIN]
    assert reasons[:4] == [None] * 4 and "between" in reasons[4]


def test_depth__non_refusals_get_no_verdict() -> None:
    ev, positive, labels = _calibration()
    scale = fit_depth_scale(ev, ev, np.ones(len(ev), bool), positive, ~positive, labels)
    verdicts, _ = depth_verdicts(scale.score(np.array([1.0, 0.1])), np.array(["comply", "hedge"]), scale)
    assert verdicts == [None, None]


def test_depth__overlapping_references_make_the_overlap_uncertain() -> None:
    rng = np.random.default_rng(1)
    ev = np.r_[rng.uniform(0.0, 1.0, 20), rng.uniform(0.4, 1.4, 20)]
    positive = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    scale = fit_depth_scale(ev, ev, np.ones(40, bool), positive, ~positive, np.array(["comply"] * 40))
    assert scale.usable and scale.t_shallow <= scale.t_deep
    mid = (scale.t_shallow + scale.t_deep) / 2
    v, r = depth_verdicts(np.array([mid, scale.t_shallow - 1, scale.t_deep + 1]),
                          np.array(["refuse"] * 3), scale)
    assert v == [UNCERTAIN, DEEP, SHALLOW] and "overlap" in r[0]


def test_depth__model_that_refuses_everything_uses_the_stated_fallback() -> None:
    ev, positive, _ = _calibration()
    labels = np.where(positive, "refuse", "comply")  # no complied hazard prompt
    prompt_ev = np.where(positive, 2.0, 0.2)
    scale = fit_depth_scale(ev, prompt_ev, np.ones(len(ev), bool), positive, ~positive, labels)
    assert scale.reference == REFERENCE_PROMPT_FALLBACK and scale.usable
    assert "fallback reference: 0 complied" in scale.note
    assert scale.high == pytest.approx(2.0)


def test_depth__unusable_scale_says_why_and_every_refusal_is_uncertain() -> None:
    ev, positive, labels = _calibration()
    flipped = np.where(positive, 0.0, 1.0)  # the hazard reference below the benign one
    scale = fit_depth_scale(flipped, flipped, np.ones(len(ev), bool), positive, ~positive, labels)
    assert not scale.usable and "not above the benign reference" in scale.note
    v, r = depth_verdicts(scale.score(np.array([0.5])), np.array(["refuse"]), scale)
    assert v == [UNCERTAIN] and "no calibrated scale" in r[0]
    few = fit_depth_scale(ev, ev, np.arange(len(ev)) % 12 < 2, positive, ~positive, labels)
    assert not few.usable and "too few calibration prompts" in few.note
    empty = hazard_evidence(np.ones((4, 3)), [])
    none = fit_depth_scale(empty, empty, np.ones(4, bool), np.array([1, 1, 0, 0], bool),
                           np.array([0, 0, 1, 1], bool), np.array(["comply"] * 4))
    assert not none.usable and "hazard_adjacent_category is empty" in none.note


def test_depth__missing_completion_evidence_is_uncertain() -> None:
    ev, positive, labels = _calibration()
    scale = fit_depth_scale(ev, ev, np.ones(len(ev), bool), positive, ~positive, labels)
    v, r = depth_verdicts(scale.score(np.array([np.nan])), np.array(["refuse"]), scale)
    assert v == [UNCERTAIN] and "no completion evidence" in r[0]


def test_depth__only_calibration_prompts_fit_the_scale() -> None:
    ev, positive, labels = _calibration()
    cal = np.arange(len(ev)) % 2 == 0
    a = fit_depth_scale(ev, ev, cal, positive, ~positive, labels)
    moved = np.where(cal, ev, ev * 100 + 7)
    b = fit_depth_scale(moved, moved, cal, positive, ~positive, labels)
    assert a == b


def test_hazard_evidence__mean_of_the_latents() -> None:
    pooled = np.arange(12, dtype=float).reshape(3, 4)
    np.testing.assert_allclose(hazard_evidence(pooled, [1, 3]), [2.0, 6.0, 10.0])
    with pytest.raises(ValueError, match="quantile"):
        fit_depth_scale(np.ones(2), np.ones(2), np.ones(2, bool), np.ones(2, bool), np.ones(2, bool),
                        np.array(["comply"] * 2), quantile=0.7)
