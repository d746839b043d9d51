"""bra/audit/catalog.py: Cohen's d by hand, the feature catalog against a null (BH on Welch tests, the
permutation false share, the re-estimate on another split), its empty-category reasons, and f."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ttest_ind

from bra.audit.catalog import (
    NO_CONTRAST,
    build_catalog,
    catalog_to_json,
    cohens_d,
    feature_profile,
    no_contrast_reasons,
    welch_pvalues,
)
from bra.vocab import FEATURE_CATEGORIES

HAZ, BEN = "hazard_adjacent_category", "benign_bio"


def test_cohens_d__by_hand() -> None:
    pos = np.array([[2.0, 1.0], [4.0, 1.0]])
    neg = np.array([[0.0, 1.0], [2.0, 1.0]])
    d = cohens_d(pos, neg)
    assert d[0] == pytest.approx(2 / math.sqrt(2)) and d[1] == 0.0


def test_welch_pvalues__match_scipy_per_column_and_constant_columns_get_one() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(1, 1, (6, 3)), rng.normal(0, 2, (9, 3))
    pos[:, 2], neg[:, 2] = 0.0, 0.0  # a dead latent
    p = welch_pvalues(pos, neg)
    for j in range(2):
        assert p[j] == pytest.approx(ttest_ind(pos[:, j], neg[:, j], equal_var=False).pvalue)
    assert p[2] == 1.0


def _table(n_pos: int, n_neg: int) -> pd.DataFrame:
    """Tier sides; surface labels that split each side in half between refuse and comply (hedging: none)."""
    surface = [("refuse" if i % 2 else "comply") for i in range(n_pos + n_neg)]
    return pd.DataFrame({"tier": [HAZ] * n_pos + [BEN] * n_neg, "surface_label": surface})


def test_build_catalog__pure_noise_gives_empty_categories_with_the_reason() -> None:
    rng = np.random.default_rng(0)
    n, d_sae = 20, 2000
    pooled = {"prompt": rng.normal(size=(n, d_sae)), "completion": rng.normal(size=(n, d_sae))}
    # the old rule (d > 0.5, no null) keeps 294 of these 2,000 noise latents, the top 16 at d 1.2-1.7
    assert (cohens_d(pooled["prompt"][:10], pooled["prompt"][10:]) > 0.5).sum() > 200
    catalog = build_catalog(pooled, _table(10, 10), np.ones(n, bool), 16, 0.0, fdr=0.05, n_null=5)
    assert all(entry.latents == [] for entry in catalog.values())
    for name in ("hazard_adjacent", "refusal_circuitry"):
        entry = catalog[name]
        assert entry.n_tested == d_sae and entry.n_passed == 0 and entry.expected_false_share is None
        assert entry.reason.startswith(f"no latent passed Benjamini-Hochberg at q=0.05 among {d_sae} latents")
    assert "too few" in catalog["hedging"].reason
    json.dumps(catalog_to_json(catalog))  # JSON-ready (asdict)


def test_build_catalog__planted_latents_are_selected_with_a_small_false_share() -> None:
    rng = np.random.default_rng(3)
    n, d_sae, planted = 40, 2000, [7, 70, 700, 1500, 1999]
    x = rng.normal(size=(n, d_sae))
    tiers = np.array(([HAZ] * 10 + [BEN] * 10) * 2)
    x[np.ix_(tiers == HAZ, planted)] += 4.0
    table = pd.DataFrame({"tier": tiers, "surface_label": "comply"})
    train, estimate = np.arange(n) < 20, np.arange(n) >= 20
    entry = build_catalog({"prompt": x, "completion": x}, table, train, 16, 0.0, estimate=estimate,
                          n_null=10, seed=2)["hazard_adjacent"]
    # BH bounds the expected false share, not every draw: here one noise latent (565) passes beside the 5
    assert set(planted) <= set(entry.latents) and entry.n_passed == len(entry.latents) <= 6
    assert entry.reason is None and entry.n_tested == d_sae
    assert all(q <= 0.05 for q in entry.q_values) and entry.q_values == sorted(entry.q_values)
    assert entry.expected_false_share is not None and entry.expected_false_share < 0.1
    assert entry.null_selected_mean == pytest.approx(entry.expected_false_share * entry.n_passed)
    assert (entry.n_positive, entry.n_negative, entry.n_positive_estimate, entry.n_negative_estimate) == \
        (10, 10, 10, 10)
    # the re-estimate: Cohen's d on the estimate rows only; the training d is the one that selected
    on_pos, on_neg = estimate & (tiers == HAZ), estimate & (tiers == BEN)
    np.testing.assert_allclose(entry.effect_sizes_estimate,
                               cohens_d(x[on_pos][:, entry.latents], x[on_neg][:, entry.latents]))
    np.testing.assert_allclose(entry.effect_sizes,
                               cohens_d(x[train & (tiers == HAZ)][:, entry.latents],
                                        x[train & (tiers == BEN)][:, entry.latents]))
    # the winner's curse: the noise latent that passed has a training d of 2.6, re-estimated at 0.6
    for j, d_train, d_est in zip(entry.latents, entry.effect_sizes, entry.effect_sizes_estimate, strict=True):
        if j not in planted:
            assert d_est is not None and d_est < d_train - 1.0
    # a floor on the training d above every planted latent's: BH passes them, the floor rejects them
    floored = build_catalog({"prompt": x, "completion": x}, table, train, 16, 100.0, n_null=0)
    assert floored["hazard_adjacent"].latents == [] and floored["hazard_adjacent"].reason.startswith(
        f"{entry.n_passed} latents passed Benjamini-Hochberg at q=0.05 among 2000 latents tested, none "
        f"with training Cohen's d > 100.0")


def test_build_catalog__reads_only_the_train_and_estimate_rows() -> None:
    rng = np.random.default_rng(4)
    n, d_sae = 36, 300
    x = rng.normal(size=(n, d_sae))
    tiers = np.array(([HAZ] * 6 + [BEN] * 6) * 3)
    x[np.ix_(tiers == HAZ, [5, 9])] += 6.0
    table = pd.DataFrame({"tier": tiers, "surface_label": ["refuse", "comply"] * (n // 2)})
    train, estimate, test = (np.arange(n) // 12 == k for k in range(3))

    def run(xx: np.ndarray, tt: pd.DataFrame) -> dict:
        return catalog_to_json(build_catalog({"prompt": xx, "completion": xx}, tt, train, 16, 0.0,
                                             estimate=estimate, n_null=5))

    base = run(x, table)
    assert sorted(base["hazard_adjacent"]["latents"]) == [5, 9]
    x2, table2 = x.copy(), table.copy()
    x2[test] = rng.normal(size=(int(test.sum()), d_sae)) * 10  # test rows: new activations and labels
    table2.loc[test, "tier"] = "benign_legal"
    table2.loc[test, "surface_label"] = "hedge"
    assert run(x2, table2) == base
    x3 = x.copy()
    x3[estimate] += rng.normal(size=(int(estimate.sum()), d_sae))  # estimate rows move the re-estimate only
    moved = run(x3, table)["hazard_adjacent"]
    assert moved["latents"] == base["hazard_adjacent"]["latents"]
    assert moved["effect_sizes"] == base["hazard_adjacent"]["effect_sizes"]
    assert moved["effect_sizes_estimate"] != base["hazard_adjacent"]["effect_sizes_estimate"]


def test_build_catalog__null_is_seeded() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(20, 500))
    x[:10, :3] += 3.0
    args = ({"prompt": x, "completion": x}, _table(10, 10), np.ones(20, bool), 16, 0.0)
    a, b = (build_catalog(*args, n_null=8, seed=1)["hazard_adjacent"] for _ in range(2))
    assert a == b and a.null_selected_mean is not None


def test_build_catalog__empty_with_reasons_when_contrasts_missing() -> None:
    rng = np.random.default_rng(0)
    n, d_sae = 12, 20
    pooled = {"prompt": rng.uniform(0, 1, (n, d_sae)), "completion": rng.uniform(0, 1, (n, d_sae))}
    pooled["prompt"][:6, 3] += 5.0  # latent 3 marks the hazard tier
    table = pd.DataFrame({"tier": [HAZ] * 6 + [BEN] * 6,
                          "surface_label": ["refuse"] * 6 + ["comply"] * 5 + ["hedge"]})
    catalog = build_catalog(pooled, table, np.ones(n, bool), top_n=4, min_effect=0.5)
    assert catalog["hazard_adjacent"].latents[0] == 3
    reasons = no_contrast_reasons([HAZ, BEN])
    for name in ("bio_content", "deception_correlate"):
        assert catalog[name].latents == [] and catalog[name].reason == reasons[name]
    assert catalog["hedging"].latents == [] and "too few" in catalog["hedging"].reason  # one hedge sample
    f = feature_profile(pooled["completion"], catalog)
    assert f.shape == (n, len(FEATURE_CATEGORIES))
    np.testing.assert_allclose(f.sum(1), 1.0)
    assert (f[:, [0, 3, 4]] == 0).all()  # empty categories contribute nothing


def test_no_contrast_reasons__name_the_tiers_present() -> None:
    assert NO_CONTRAST == no_contrast_reasons()
    assert "every eval tier present is biology (benign_bio, hazard_adjacent_category)" in \
        no_contrast_reasons([HAZ, BEN])["bio_content"]
    legal = no_contrast_reasons(["hazard_adjacent_legal", "benign_legal", BEN])["bio_content"]
    assert "every eval tier" not in legal
    assert "tiers outside biology are present (benign_legal, hazard_adjacent_legal)" in legal
