"""The feature catalog and the category activations f (pure functions of pooled latents and the prompts).

Catalog. Which latents belong to a category is decided on the TRAINING split only, against a null: each
latent's pooled activation is compared between the two sides of a defining contrast (`contrasts`;
hazard_adjacent contrasts the run's positive and negative tier classes, `bra.audit.classes`) by a two-sided
Welch t-test, and the latents that survive Benjamini-Hochberg at ``fdr`` and are more active on the positive
side are kept (at most ``top_n``). A label-permutation null on the same rows says how many latents the
procedure selects when the labels carry nothing (``expected_false_share``). The kept latents' effect sizes
are then re-estimated on another split (the calibration split): the training d that selected them is biased
upwards (the winner's curse), the re-estimate is not. A category without a contrast the data can support
stays empty, with the reason recorded; nothing is filled arbitrarily.

Why a null: with 10 vs 10 training prompts and 6,144 pure-noise latents, about 840 pass the old "Cohen's
d > 0.5" rule and the top 16 reach d of 1.5-2.2 (issue 13); at q = 0.05 none pass BH (measured on one
such draw, seed 0; tests/test_catalog.py checks 2,000).

f. A prompt's f is, per category, the mean pooled activation of that category's catalog latents (an
empty category gives 0), L1-normalised into a distribution over `FEATURE_CATEGORIES` as in the seed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control, ttest_ind

from bra.audit.divergence import normalise_l1
from bra.vocab import (
    BIO_CONTENT,
    COMPLETION,
    COMPLY,
    DECEPTION_CORRELATE,
    DEFAULT_NEGATIVE_TIERS,
    DEFAULT_POSITIVE_TIERS,
    FEATURE_CATEGORIES,
    HAZARD_ADJACENT,
    HEDGE,
    HEDGING,
    PROMPT,
    REFUSAL_CIRCUITRY,
    REFUSE,
    TIERS,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contrast:
    """Positive vs negative prompts that define a category, and the segment pooled for it."""

    column: str
    """prompts-table column the sides are read from (``tier`` or ``surface_label``)."""
    positive: tuple[str, ...]
    """Values of ``column`` on the positive side."""
    negative: tuple[str, ...]
    """Values of ``column`` on the negative side."""
    segment: str
    """Pooled segment compared: the prompt for a property of the request, the completion for behaviour."""

    def describe(self) -> tuple[str, str]:
        """(positive, negative) side in words: the values joined by ``+``."""
        return "+".join(self.positive), "+".join(self.negative)


def contrasts(positive_tiers: tuple[str, ...] = DEFAULT_POSITIVE_TIERS,
              negative_tiers: tuple[str, ...] = DEFAULT_NEGATIVE_TIERS) -> dict[str, Contrast]:
    """Defining contrasts, hazard_adjacent being the run's positive vs negative class (prompt segment).
    bio_content and deception_correlate have none in a bio-only eval set (see `NO_CONTRAST`)."""
    return {
        HAZARD_ADJACENT: Contrast("tier", tuple(positive_tiers), tuple(negative_tiers), PROMPT),
        REFUSAL_CIRCUITRY: Contrast("surface_label", (REFUSE,), (COMPLY,), COMPLETION),
        HEDGING: Contrast("surface_label", (HEDGE,), (COMPLY,), COMPLETION),
    }


CONTRASTS: dict[str, Contrast] = contrasts()
"""The defining contrasts under the default classes (hazard_adjacent_category vs benign_bio)."""

def no_contrast_reasons(tiers_present: Iterable[str] = TIERS) -> dict[str, str]:
    """Why bio_content and deception_correlate have no defining contrast, given the tiers the prompts carry.

    bio_content would contrast biology with non-biology prompts. In a bio-only eval set there are none; when
    other tiers are present (the legal and scheduled-compound controls) the reason is that no such contrast
    is defined, not that the data lacks one."""
    seen = {str(t) for t in tiers_present}
    present = [t for t in TIERS if t in seen] + sorted(seen - set(TIERS))
    non_bio = present[len(seen & set(TIERS)):]
    if non_bio:
        bio = (f"no defining contrast: tiers outside biology are present ({', '.join(non_bio)}), but no "
               f"biology vs non-biology contrast is defined (tiers present: {', '.join(present)})")
    else:
        bio = (f"no defining contrast: every eval tier present is biology ({', '.join(present or TIERS)}), "
               f"so no non-biology prompts to contrast against")
    deception = "no defining contrast: no eval prompt or completion carries a deception label"
    return {BIO_CONTENT: bio, DECEPTION_CORRELATE: deception}


NO_CONTRAST: dict[str, str] = no_contrast_reasons()
"""The reasons of `no_contrast_reasons` for a bio-only eval set (the bundled tiers)."""


def cohens_d(pos_ND: np.ndarray, neg_ND: np.ndarray) -> np.ndarray:
    """Cohen's d per column: (mean_pos - mean_neg) / pooled SD; 0 where the pooled SD is 0 (a latent
    constant on both sides, e.g. dead, carries no evidence). Needs >= 2 rows per side."""
    n1, n0 = len(pos_ND), len(neg_ND)
    if n1 < 2 or n0 < 2:
        raise ValueError(f"Cohen's d needs >= 2 samples per side, got {n1} and {n0}")
    var = ((n1 - 1) * pos_ND.var(0, ddof=1) + (n0 - 1) * neg_ND.var(0, ddof=1)) / (n1 + n0 - 2)
    sd = np.sqrt(var)
    diff = pos_ND.mean(0) - neg_ND.mean(0)
    return np.divide(diff, sd, out=np.zeros_like(diff), where=sd > 0)


def welch_pvalues(pos_ND: np.ndarray, neg_ND: np.ndarray) -> np.ndarray:
    """Two-sided Welch t-test p-value per column (scipy ``ttest_ind(equal_var=False)``); 1 where both sides
    are constant, as `cohens_d` gives such a latent 0: with no spread there is no test."""
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on the constant columns set to 1 below
        p = np.asarray(ttest_ind(pos_ND, neg_ND, axis=0, equal_var=False).pvalue, dtype=np.float64)
    flat = (pos_ND.var(0) == 0) & (neg_ND.var(0) == 0)
    return np.where(flat | ~np.isfinite(p), 1.0, p)


@dataclass(frozen=True)
class Selection:
    """What one run of the selection rule gives on one labelling of the contrast's rows."""

    passed: np.ndarray
    """Latents that pass (BH, positive side, d floor), by q then d (all of them, before the top_n cap)."""
    q_ND: np.ndarray
    """[d_sae] BH q-value of each latent (1 outside the tested family)."""
    d_ND: np.ndarray
    """[d_sae] Cohen's d of each latent."""
    n_tested: int
    """Latents in the BH family: those not constant over the contrast's rows."""
    n_bh: int
    """Latents with q <= fdr and d > 0 (before the d floor)."""


def select_latents(x_ND: np.ndarray, is_pos: np.ndarray, fdr: float, min_effect: float) -> Selection:
    """The selection rule on rows ``x_ND`` labelled ``is_pos`` (True: positive side).

    The BH family leaves out latents constant over all the rows: a filter blind to the labels, so the
    family's p-values stay valid (Bourgon, Gentleman & Huber 2010) and dead latents cost no power. The test
    is two-sided; only latents more active on the positive side are kept, as the catalog describes what
    marks that side."""
    pos, neg = x_ND[is_pos], x_ND[~is_pos]
    d = cohens_d(pos, neg)
    p = welch_pvalues(pos, neg)
    varies = x_ND.var(0) > 0
    q = np.ones_like(p)
    if varies.any():
        q[varies] = false_discovery_control(p[varies], method="bh")
    bh = (q <= fdr) & (d > 0)
    passed = np.flatnonzero(bh & (d > min_effect))
    passed = passed[np.lexsort((-d[passed], q[passed]))]
    return Selection(passed, q, d, int(varies.sum()), int(bh.sum()))


@dataclass(frozen=True)
class CategoryEntry:
    """One category of the catalog."""

    latents: list[int] = field(default_factory=list)
    """Catalog latents, most significant first (q, then training d); empty when none passed or the category
    could not be defined."""
    effect_sizes: list[float] = field(default_factory=list)
    """Cohen's d of each latent on the training split: the d that selected it, so biased upwards (read
    ``effect_sizes_estimate``)."""
    effect_sizes_estimate: list[float | None] = field(default_factory=list)
    """Cohen's d of each latent re-estimated on the estimate split (calibration), which took no part in the
    selection; None when that split has < 2 prompts on a side (or none was given)."""
    q_values: list[float] = field(default_factory=list)
    """Benjamini-Hochberg q-value of each latent (Welch t-test on the training split)."""
    contrast: str | None = None
    """The defining contrast in words, or None."""
    segment: str | None = None
    """Pooled segment the contrast compared."""
    n_positive: int = 0
    """Training prompts on the contrast's positive side."""
    n_negative: int = 0
    """Training prompts on the contrast's negative side."""
    n_positive_estimate: int = 0
    """Estimate-split prompts on the positive side."""
    n_negative_estimate: int = 0
    """Estimate-split prompts on the negative side."""
    n_tested: int = 0
    """Latents in the BH family (not constant over the contrast's training prompts)."""
    n_passed: int = 0
    """Latents that passed, before the top_n cap (``latents`` keeps the first top_n)."""
    fdr: float = 0.05
    """BH level the latents were selected at."""
    null_selected_mean: float | None = None
    """Mean number of latents passing over the label permutations of the training prompts (None: not run)."""
    expected_false_share: float | None = None
    """Estimated false-discovery share among the passing latents: null_selected_mean / n_passed, capped at
    1 (a permutation estimate assuming every latent is null, so conservative; the kept top_n are the most
    significant of them). None when nothing passed or no permutation was run."""
    reason: str | None = None
    """Why the category is empty; None when it has latents."""


def build_catalog(pooled: Mapping[str, np.ndarray], table: pd.DataFrame, train: np.ndarray, top_n: int = 16,
                  min_effect: float = 0.5, defining: Mapping[str, Contrast] | None = None, *,
                  estimate: np.ndarray | None = None, fdr: float = 0.05, n_null: int = 20, seed: int = 0
                  ) -> dict[str, CategoryEntry]:
    """Catalog from the training rows of ``table`` (one row per doc, aligned with ``pooled``), with the
    contrasts ``defining`` (default `CONTRASTS`; `contrasts` of the run's classes).

    Latents are selected by `select_latents` at BH level ``fdr``, with ``min_effect`` a further floor on
    their training d; ``n_null`` label permutations of the training prompts (seeded by ``seed``) estimate
    the false share; the effect sizes of the kept latents are re-estimated on the ``estimate`` rows. Only
    ``train`` and ``estimate`` rows are read."""
    if not 0 < fdr < 1:
        raise ValueError(f"fdr must be in (0, 1), got {fdr}")
    defining = CONTRASTS if defining is None else defining
    # the tiers of the training prompts only: the catalog must not change with what the test split holds
    reasons = no_contrast_reasons(table["tier"].astype(str)[train]) if "tier" in table else NO_CONTRAST
    estimate = np.zeros(len(table), bool) if estimate is None else np.asarray(estimate, bool)
    settings = _Settings(top_n, min_effect, fdr, n_null, seed)
    return {cat: CategoryEntry(reason=reasons[cat], fdr=fdr) if cat in reasons
            else _contrast_entry(defining[cat], pooled, table, train, estimate, settings)
            for cat in FEATURE_CATEGORIES}


@dataclass(frozen=True)
class _Settings:
    """build_catalog's selection settings, handed down as one."""

    top_n: int
    min_effect: float
    fdr: float
    n_null: int
    seed: int


def _contrast_entry(c: Contrast, pooled: Mapping[str, np.ndarray], table: pd.DataFrame, train: np.ndarray,
                    estimate: np.ndarray, s: _Settings) -> CategoryEntry:
    """The latents of `select_latents` on the training sides of ``c``, with the null and the re-estimate."""
    values = table[c.column].to_numpy()
    on_pos, on_neg = np.isin(values, c.positive), np.isin(values, c.negative)
    pos, neg = train & on_pos, train & on_neg
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    est_pos, est_neg = estimate & on_pos, estimate & on_neg
    p, q = c.describe()
    described = {"contrast": f"{c.column} {p} vs {q} ({c.segment} segment, training split)",
                 "segment": c.segment, "n_positive": n_pos, "n_negative": n_neg,
                 "n_positive_estimate": int(est_pos.sum()), "n_negative_estimate": int(est_neg.sum()),
                 "fdr": s.fdr}
    if n_pos < 2 or n_neg < 2:
        return CategoryEntry(**described, reason=f"too few training samples for the contrast: {n_pos} "
                                                 f"{p}, {n_neg} {q} (need >= 2 each)")
    x = pooled[c.segment]
    rows = pos | neg
    x_ND, is_pos = x[rows], pos[rows]
    real = select_latents(x_ND, is_pos, s.fdr, s.min_effect)
    kept = [int(j) for j in real.passed[:s.top_n]]
    rng = np.random.default_rng(s.seed)
    null = [select_latents(x_ND, rng.permutation(is_pos), s.fdr, s.min_effect).passed.size
            for _ in range(s.n_null)]
    null_mean = float(np.mean(null)) if null else None
    share = None if null_mean is None or not real.passed.size else min(1.0, null_mean / real.passed.size)
    if est_pos.sum() >= 2 and est_neg.sum() >= 2 and kept:
        d_est: list[float | None] = [float(v) for v in cohens_d(x[est_pos][:, kept], x[est_neg][:, kept])]
    else:
        d_est = [None] * len(kept)
    reason = None
    if not kept:
        reason = (f"no latent passed Benjamini-Hochberg at q={s.fdr} among {real.n_tested} latents tested "
                  f"(Welch t-test, {p} vs {q}, training split)")
        if real.n_bh:
            reason = (f"{real.n_bh} latents passed Benjamini-Hochberg at q={s.fdr} among {real.n_tested} "
                      f"latents tested, none with training Cohen's d > {s.min_effect}")
    return CategoryEntry(latents=kept, effect_sizes=[float(real.d_ND[j]) for j in kept],
                         effect_sizes_estimate=d_est, q_values=[float(real.q_ND[j]) for j in kept],
                         **described, n_tested=real.n_tested, n_passed=int(real.passed.size),
                         null_selected_mean=null_mean, expected_false_share=share, reason=reason)


def catalog_to_json(catalog: Mapping[str, CategoryEntry]) -> dict[str, Any]:
    """JSON-ready catalog."""
    return {cat: asdict(entry) for cat, entry in catalog.items()}


def category_activations(pooled_ND: np.ndarray, catalog: Mapping[str, CategoryEntry]) -> np.ndarray:
    """[n, len(FEATURE_CATEGORIES)]: mean pooled activation of each category's latents (0 if it is empty)."""
    out = np.zeros((pooled_ND.shape[0], len(FEATURE_CATEGORIES)))
    for k, cat in enumerate(FEATURE_CATEGORIES):
        latents = catalog[cat].latents
        if latents:
            out[:, k] = pooled_ND[:, latents].mean(axis=1)
    return out


def feature_profile(pooled_ND: np.ndarray, catalog: Mapping[str, CategoryEntry]) -> np.ndarray:
    """f: `category_activations` L1-normalised per prompt (all zeros when no catalog latent is active)."""
    return normalise_l1(category_activations(pooled_ND, catalog))
