"""What scoring reads from an eval store, as one typed value: `EvalBundle` (built by
`bra.audit.reader.read_eval_bundle`, the only audit code that touches a `Store`).

Everything after the read (catalog, probes, divergence, metrics, the report) is a function of a bundle and
the `ScoreConfig`, so a re-score never re-enters the store, and the report can be written with the store
gone. Shape suffixes: N prompts (= documents), R store rows, K sparse width (top-k), L latents (d_sae),
D d_model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bra.vocab import SEGMENT_COMPLETION, SEGMENT_PROMPT

_SEGMENT_CODES = (SEGMENT_PROMPT, SEGMENT_COMPLETION)
"""Store segment code of each pooled segment, in `bra.vocab.POOLED_SEGMENTS` order."""


@dataclass(frozen=True)
class TokenColumns:
    """The per-token columns of a store (small; read whole)."""

    doc_index: np.ndarray
    """[R] document (= prompt) of each row."""
    segment: np.ndarray
    """[R] segment code of each row (`bra.vocab.SEGMENT_*`)."""
    mask: np.ndarray
    """[R] bool: rows left out of statistics and pooling (the attention sink, BOS)."""
    token_id: np.ndarray
    """[R] token id of each row."""

    def groups(self) -> np.ndarray:
        """[R] pooling group (doc * 2 + 0 prompt / 1 completion), -1 for rows that are not pooled."""
        seg = np.full(self.segment.shape, -1, dtype=np.int64)
        for i, code in enumerate(_SEGMENT_CODES):
            seg[self.segment == code] = i
        return np.where((seg >= 0) & ~self.mask, self.doc_index.astype(np.int64) * 2 + seg, -1)


@dataclass(frozen=True)
class SparseCodes:
    """Sparse SAE codes of every store row: each row lists its active latents (`SparseAutoencoder.
    encode_sparse`); a latent a row does not list is 0 there. K is the SAE's k for TopK, else the most
    active latents of any row (shorter rows and rows that are not pooled hold padding)."""

    indices: np.ndarray
    """[R, K] int32 latent indices; `bra.sae.base.PAD_INDEX` (-1) marks padding."""
    values: np.ndarray
    """[R, K] float32 activations (>= 0, except the signed residual dimensions of `--sae none`); 0 at
    padding."""
    d_sae: int
    """Number of latents."""

    def latent(self, j: int) -> np.ndarray:
        """[R] activation of latent j (j >= 0, so padding never matches)."""
        return np.where(self.indices == j, self.values, 0.0).sum(axis=1)


@dataclass(frozen=True)
class StoreFacts:
    """The facts about the store that the outputs print (read once, with the rest of the bundle)."""

    path: str
    """Store location as given to `open_store` (a folder or a URL)."""
    kind: str | None
    """``eval`` for a store built from an eval manifest."""
    model_id: str | None
    """Model the activations came from."""
    model: Mapping[str, Any] | None
    """The build manifest's ``model`` section (finds the tokenizer that decodes contexts)."""
    tokenizer_fingerprint: str | None
    """Fingerprint of the tokenizer the store was built with (a local tokenizer must match it)."""
    d_model: int
    """Residual width."""
    n_tokens: int
    """Rows in the store."""
    hazard_tiers: tuple[str, ...] | None = None
    """The store's recorded positive (hazard) class (attr ``hazard_tiers``); None when it has none."""
    benign_tiers: tuple[str, ...] | None = None
    """The store's recorded negative (benign) class (attr ``benign_tiers``); None in stores built before it
    was recorded."""
    variant: Mapping[str, Any] | None = None
    """The store's generation variant (name, chat_template, system_prompt, prefill, max_new_tokens); None for
    a store built without variants."""


@dataclass(frozen=True)
class EvalBundle:
    """Everything `score` needs from an eval store and its SAEs, read in one pass."""

    facts: StoreFacts
    """What the report says about the store."""
    layer: int
    """Store layer that was read (the SAE's own unless asked)."""
    table: pd.DataFrame
    """prompts.parquet sorted by doc_index: row i = doc i."""
    tokens: TokenColumns
    """Per-token columns of every row."""
    pooled: Mapping[str, Mapping[str, np.ndarray]]
    """SAE name -> pooled segment -> [N, L] latents pooled over that segment's unmasked rows."""
    raw: Mapping[str, np.ndarray]
    """Pooled segment -> [N, D] residual stream pooled the same way (the raw-activation baselines)."""
    counts: np.ndarray
    """[N, 2] pooled rows per prompt and segment (`bra.vocab.POOLED_SEGMENTS` order)."""
    codes: SparseCodes
    """Our SAE's sparse codes of every row (the top-activating contexts of catalog latents)."""
    sae_configs: Mapping[str, Mapping[str, Any]]
    """SAE name -> its architecture + provenance config (ours, baselines, the random SAE)."""
    sae_paths: Mapping[str, str]
    """SAE name -> the path it was loaded from (ours and the baselines; the random SAE has none)."""
    labels: Mapping[str, Any] | None = None
    """The surface-label source the table's surface columns hold, and its disagreement summary
    (`bra.audit.labels.LabelChoice.to_json`)."""

    @property
    def n_docs(self) -> int:
        """Prompts (= documents) in the store."""
        return len(self.table)


__all__ = ["EvalBundle", "SparseCodes", "StoreFacts", "TokenColumns"]
