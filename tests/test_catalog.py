"""bra/audit/catalog.py: Cohen's d by hand, the feature catalog with its empty-category reasons, and f."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bra.audit.catalog import NO_CONTRAST, build_catalog, cohens_d, feature_profile
from bra.vocab import FEATURE_CATEGORIES


def test_cohens_d__by_hand() -> None:
    pos = np.array([[2.0, 1.0], [4.0, 1.0]])
    neg = np.array([[0.0, 1.0], [2.0, 1.0]])
    d = cohens_d(pos, neg)
    assert d[0] == pytest.approx(2 / math.sqrt(2)) and d[1] == 0.0


def test_build_catalog__empty_with_reasons_when_contrasts_missing() -> None:
    rng = np.random.default_rng(0)
    n, d_sae = 12, 20
    pooled = {"prompt": rng.uniform(0, 1, (n, d_sae)), "completion": rng.uniform(0, 1, (n, d_sae))}
    pooled["prompt"][:6, 3] += 5.0  # latent 3 marks the hazard tier
    table = pd.DataFrame({"tier": ["hazard_adjacent_category"] * 6 + ["benign_bio"] * 6,
                          "surface_label": ["refuse"] * 6 + ["comply"] * 5 + ["hedge"]})
    catalog = build_catalog(pooled, table, np.ones(n, bool), top_n=4, min_effect=0.5)
    assert catalog["hazard_adjacent"].latents[0] == 3
    for name in ("bio_content", "deception_correlate"):
        assert catalog[name].latents == [] and catalog[name].reason == NO_CONTRAST[name]
    assert catalog["hedging"].latents == [] and "too few" in catalog["hedging"].reason  # one hedge sample
    f = feature_profile(pooled["completion"], catalog)
    assert f.shape == (n, len(FEATURE_CATEGORIES))
    np.testing.assert_allclose(f.sum(1), 1.0)
    assert (f[:, [0, 3, 4]] == 0).all()  # empty categories contribute nothing
