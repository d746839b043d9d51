"""Per-prompt pooled features of an eval store, the feature catalog, and category activations f.

Pooling. Every prompt is one window: prompt-segment rows, then completion-segment rows. For each prompt
the SAE latents are pooled over its prompt rows and, separately, over its completion rows; masked rows
(the attention sink at position 0, BOS) are excluded. ``mean`` (the default) averages the dense latent
vector over the rows, so a latent that fires on a few tokens of a long completion counts in proportion;
``max`` takes each latent's peak, which favours rare, sharp features. The raw residual stream is pooled
the same way (for the raw-activation baselines). SAE codes are kept sparse (top-k indices and values per
row), so a store of any size costs rows x k x 8 bytes, not rows x d_sae.

Catalog. Which latents belong to a category is decided on the TRAINING split only, by Cohen's d of the
pooled activation between the two sides of a defining contrast (`CONTRASTS`). A category without a
contrast the data can support stays empty, with the reason recorded; nothing is filled arbitrarily.

f. A prompt's f is, per category, the mean pooled activation of that category's catalog latents (an
empty category gives 0), L1-normalised into a distribution over `CATEGORIES` as in the seed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from bra.audit.divergence import CATEGORIES, normalise_l1
from bra.cache import schema
from bra.cache.store import Store
from bra.sae.evaluate import refuse_non_finite
from bra.sae.model import TopKSAE
from bra.vocab import BENIGN_TIER, HAZARD_TIER, POOLED_SEGMENTS, POOLS

logger = logging.getLogger(__name__)

SEGMENTS: tuple[str, ...] = POOLED_SEGMENTS
"""Pooled segments, in the order of the group index (doc * 2 + segment position)."""
_SEGMENT_CODES = (schema.SEGMENT_PROMPT, schema.SEGMENT_COMPLETION)


@dataclass(frozen=True)
class Contrast:
    """Positive vs negative prompts that define a category, and the segment pooled for it."""

    column: str
    """prompts-table column the sides are read from (``tier`` or ``surface_label``)."""
    positive: str
    """Value of ``column`` on the positive side."""
    negative: str
    """Value of ``column`` on the negative side."""
    segment: str
    """Pooled segment compared: the prompt for a property of the request, the completion for behaviour."""


CONTRASTS: dict[str, Contrast] = {
    "hazard_adjacent": Contrast("tier", HAZARD_TIER, BENIGN_TIER, "prompt"),
    "refusal_circuitry": Contrast("surface_label", "refuse", "comply", "completion"),
    "hedging": Contrast("surface_label", "hedge", "comply", "completion"),
}
"""Defining contrasts. bio_content and deception_correlate have none in a bio-only eval set (see
`NO_CONTRAST`)."""

NO_CONTRAST: dict[str, str] = {
    "bio_content": "no defining contrast: every eval tier is biology (benign_bio, dual_use_bio, "
                   "hazard_adjacent_category), so no non-biology prompts to contrast against",
    "deception_correlate": "no defining contrast: no eval prompt or completion carries a deception label",
}


@dataclass
class TokenColumns:
    """The per-token columns of a store (small; read whole)."""

    doc_index: np.ndarray
    segment: np.ndarray
    mask: np.ndarray
    token_id: np.ndarray

    @classmethod
    def read(cls, store: Store) -> TokenColumns:
        """Read the columns from ``store``."""
        names = ("doc_index", "segment", "mask", "token_id")
        return cls(*(store.read_rows(n, 0, store.n_tokens) for n in names))

    def groups(self) -> np.ndarray:
        """[rows] pooling group (doc * 2 + 0 prompt / 1 completion), -1 for rows that are not pooled."""
        seg = np.full(self.segment.shape, -1, dtype=np.int64)
        for i, code in enumerate(_SEGMENT_CODES):
            seg[self.segment == code] = i
        return np.where((seg >= 0) & ~self.mask, self.doc_index.astype(np.int64) * 2 + seg, -1)


@dataclass
class SparseCodes:
    """Top-k SAE codes of every store row (zeros where a row is not pooled)."""

    indices: np.ndarray
    """[rows, k] int32 latent indices."""
    values: np.ndarray
    """[rows, k] float32 activations (>= 0)."""
    d_sae: int
    """Number of latents."""

    def latent(self, j: int) -> np.ndarray:
        """[rows] activation of latent j."""
        return np.where(self.indices == j, self.values, 0.0).sum(axis=1)


@dataclass
class StorePools:
    """Everything scoring needs from the activations, read in one pass over the store."""

    raw: dict[str, np.ndarray]
    """segment -> [n_docs, d_model] pooled residual stream."""
    codes: dict[str, SparseCodes]
    """SAE name -> sparse codes of every row."""
    counts: np.ndarray
    """[n_docs, 2] pooled rows per (doc, segment)."""


@torch.no_grad()
def read_pools(store: Store, layer: int, saes: Mapping[str, TopKSAE], tokens: TokenColumns, n_docs: int,
               pool: str, rows_per_read: int = 4096) -> StorePools:
    """Stream the layer once: pool the raw rows per (doc, segment) and encode them with every SAE."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    groups = tokens.groups()
    n_groups = 2 * n_docs
    d_model = store.d_model
    raw = np.zeros((n_groups, d_model)) if pool == "mean" else np.full((n_groups, d_model), -np.inf)
    codes = {name: SparseCodes(np.zeros((len(groups), sae.cfg.k), np.int32),
                               np.zeros((len(groups), sae.cfg.k), np.float32), sae.cfg.d_sae)
             for name, sae in saes.items()}
    for start in range(0, len(groups), rows_per_read):
        stop = min(start + rows_per_read, len(groups))
        g = groups[start:stop]
        keep = np.flatnonzero(g >= 0)
        if not keep.size:
            continue
        x = store.read_acts(layer, start, stop)[keep]
        refuse_non_finite(x, start + keep, store, "score")
        for gid in np.unique(g[keep]):
            rows = x[g[keep] == gid].astype(np.float64)
            raw[gid] = raw[gid] + rows.sum(0) if pool == "mean" else np.maximum(raw[gid], rows.max(0))
        xt = torch.from_numpy(x)
        for name, sae in saes.items():
            values, indices, _ = sae.encode_topk(xt.to(sae.W_enc.device))
            codes[name].indices[start + keep] = indices.cpu().numpy()
            codes[name].values[start + keep] = values.float().cpu().numpy()
    counts = np.bincount(groups[groups >= 0], minlength=n_groups).reshape(n_docs, 2)
    if pool == "mean":
        raw /= np.maximum(counts.reshape(-1, 1), 1)
    raw[~np.isfinite(raw)] = 0.0  # a (doc, segment) with no pooled rows
    raw = raw.reshape(n_docs, 2, d_model)
    return StorePools({s: raw[:, i] for i, s in enumerate(SEGMENTS)}, codes, counts)


def pool_codes(codes: SparseCodes, tokens: TokenColumns, n_docs: int, pool: str) -> dict[str, np.ndarray]:
    """segment -> [n_docs, d_sae] latents pooled over each prompt's rows of that segment (see module doc)."""
    groups = tokens.groups()
    keep = groups >= 0
    g = np.repeat(groups[keep], codes.indices.shape[1])
    j = codes.indices[keep].ravel()
    v = codes.values[keep].ravel().astype(np.float64)
    out = np.zeros((2 * n_docs, codes.d_sae))
    if pool == "mean":
        np.add.at(out, (g, j), v)
        out /= np.maximum(np.bincount(groups[keep], minlength=2 * n_docs), 1)[:, None]
    else:
        np.maximum.at(out, (g, j), v)
    out = out.reshape(n_docs, 2, codes.d_sae)
    return {s: out[:, i] for i, s in enumerate(SEGMENTS)}


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


@dataclass
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
    n_negative: int = 0
    reason: str | None = None
    """Why the category is empty; None when it has latents."""


def build_catalog(pooled: Mapping[str, np.ndarray], table: pd.DataFrame, train: np.ndarray, top_n: int = 16,
                  min_effect: float = 0.5) -> dict[str, CategoryEntry]:
    """Catalog from the training rows of ``table`` (one row per doc, aligned with ``pooled``)."""
    catalog: dict[str, CategoryEntry] = {}
    for cat in CATEGORIES:
        if cat in NO_CONTRAST:
            catalog[cat] = CategoryEntry(reason=NO_CONTRAST[cat])
            continue
        c = CONTRASTS[cat]
        values = table[c.column].to_numpy()
        pos, neg = train & (values == c.positive), train & (values == c.negative)
        entry = CategoryEntry(contrast=f"{c.column} {c.positive} vs {c.negative} ({c.segment} segment, "
                                       f"training split)", segment=c.segment,
                              n_positive=int(pos.sum()), n_negative=int(neg.sum()))
        if entry.n_positive < 2 or entry.n_negative < 2:
            entry.reason = (f"too few training samples for the contrast: {entry.n_positive} {c.positive}, "
                            f"{entry.n_negative} {c.negative} (need >= 2 each)")
        else:
            d = cohens_d(pooled[c.segment][pos], pooled[c.segment][neg])
            order = [int(j) for j in np.argsort(-d, kind="stable")[:top_n] if d[j] > min_effect]
            entry.latents, entry.effect_sizes = order, [float(d[j]) for j in order]
            if not order:
                entry.reason = f"no latent has Cohen's d > {min_effect} for the contrast"
        catalog[cat] = entry
    return catalog


def catalog_to_json(catalog: Mapping[str, CategoryEntry]) -> dict[str, Any]:
    """JSON-ready catalog."""
    return {cat: asdict(entry) for cat, entry in catalog.items()}


def category_activations(pooled_ND: np.ndarray, catalog: Mapping[str, CategoryEntry]) -> np.ndarray:
    """[n, len(CATEGORIES)]: mean pooled activation of each category's latents (0 for an empty one)."""
    out = np.zeros((pooled_ND.shape[0], len(CATEGORIES)))
    for k, cat in enumerate(CATEGORIES):
        latents = catalog[cat].latents
        if latents:
            out[:, k] = pooled_ND[:, latents].mean(axis=1)
    return out


def feature_profile(pooled_ND: np.ndarray, catalog: Mapping[str, CategoryEntry]) -> np.ndarray:
    """f: `category_activations` L1-normalised per prompt (all zeros when no catalog latent is active)."""
    return normalise_l1(category_activations(pooled_ND, catalog))


def top_contexts(codes: SparseCodes, tokens: TokenColumns, latent: int, docs: np.ndarray, n: int = 3,
                 before: int = 8, after: int = 3) -> list[dict[str, Any]]:
    """The ``n`` strongest activations of ``latent`` on pooled rows of the selected docs (at most one per
    doc), each with the token-id window around it, clipped to its own prompt window."""
    act = codes.latent(latent)
    eligible = (tokens.groups() >= 0) & docs[tokens.doc_index]
    act = np.where(eligible, act, -np.inf)
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for row in np.argsort(-act, kind="stable"):
        if len(out) == n or not np.isfinite(act[row]) or act[row] <= 0:
            break
        doc = int(tokens.doc_index[row])
        if doc in seen:
            continue
        seen.add(doc)
        same = np.flatnonzero(tokens.doc_index == doc)
        lo, hi = max(int(row) - before, int(same[0])), min(int(row) + after + 1, int(same[-1]) + 1)
        out.append({"doc_index": doc, "row": int(row), "activation": float(act[row]),
                    "segment": schema.SEGMENT_NAMES[int(tokens.segment[row])],
                    "token_ids": tokens.token_id[lo:hi].astype(int).tolist(), "center": int(row) - lo})
    return out
