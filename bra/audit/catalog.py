"""The feature catalog and the category activations f (pure functions of pooled latents and the prompts).

Catalog. Which latents belong to a category is decided on the TRAINING split only, by Cohen's d of the
pooled activation between the two sides of a defining contrast (`contrasts`; hazard_adjacent contrasts the
run's positive and negative tier classes, `bra.audit.classes`). A category without a contrast the data can
support stays empty, with the reason recorded; nothing is filled arbitrarily.

f. A prompt's f is, per category, the mean pooled activation of that category's catalog latents (an
empty category gives 0), L1-normalised into a distribution over `FEATURE_CATEGORIES` as in the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

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

NO_CONTRAST: dict[str, str] = {
    BIO_CONTENT: f"no defining contrast: every eval tier is biology ({', '.join(TIERS)}), so no non-biology "
                 f"prompts to contrast against",
    DECEPTION_CORRELATE: "no defining contrast: no eval prompt or completion carries a deception label",
}


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


@dataclass(frozen=True)
class CategoryEntry:
    """One category of the catalog."""

    latents: list[int] = field(default_factory=list)
    """Catalog latents, strongest effect first (empty when the category could not be defined)."""
    effect_sizes: list[float] = field(default_factory=list)
    """Cohen's d of each latent on the training split."""
    contrast: str | None = None
    """The defining contrast in words, or None."""
    segment: str | None = None
    """Pooled segment the contrast compared."""
    n_positive: int = 0
    """Training prompts on the contrast's positive side."""
    n_negative: int = 0
    """Training prompts on the contrast's negative side."""
    reason: str | None = None
    """Why the category is empty; None when it has latents."""


def build_catalog(pooled: Mapping[str, np.ndarray], table: pd.DataFrame, train: np.ndarray, top_n: int = 16,
                  min_effect: float = 0.5, defining: Mapping[str, Contrast] | None = None
                  ) -> dict[str, CategoryEntry]:
    """Catalog from the training rows of ``table`` (one row per doc, aligned with ``pooled``), with the
    contrasts ``defining`` (default `CONTRASTS`; `contrasts` of the run's classes)."""
    defining = CONTRASTS if defining is None else defining
    return {cat: CategoryEntry(reason=NO_CONTRAST[cat]) if cat in NO_CONTRAST
            else _contrast_entry(defining[cat], pooled, table, train, top_n, min_effect)
            for cat in FEATURE_CATEGORIES}


def _contrast_entry(c: Contrast, pooled: Mapping[str, np.ndarray], table: pd.DataFrame, train: np.ndarray,
                    top_n: int, min_effect: float) -> CategoryEntry:
    """The latents whose Cohen's d between the two training sides of ``c`` exceeds ``min_effect``."""
    values = table[c.column].to_numpy()
    pos, neg = train & np.isin(values, c.positive), train & np.isin(values, c.negative)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    p, q = c.describe()
    described = {"contrast": f"{c.column} {p} vs {q} ({c.segment} segment, training split)",
                 "segment": c.segment, "n_positive": n_pos, "n_negative": n_neg}
    if n_pos < 2 or n_neg < 2:
        return CategoryEntry(**described, reason=f"too few training samples for the contrast: {n_pos} "
                                                 f"{p}, {n_neg} {q} (need >= 2 each)")
    d = cohens_d(pooled[c.segment][pos], pooled[c.segment][neg])
    order = [int(j) for j in np.argsort(-d, kind="stable")[:top_n] if d[j] > min_effect]
    reason = None if order else f"no latent has Cohen's d > {min_effect} for the contrast"
    return CategoryEntry(latents=order, effect_sizes=[float(d[j]) for j in order], **described, reason=reason)


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
