"""The one place `bra-sae score` touches the store: `read_eval_bundle` opens the eval store once, checks
it, loads the SAEs against it (`bra.sae.workflows.load_checked`), streams the layer once, and returns an
`EvalBundle`. Nothing after it reads the store.

Every store attr the audit needs is read in `_store_facts` (one spot, for typed attr access to replace).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from bra.audit.bundle import EvalBundle, SparseCodes, StoreFacts, TokenColumns
from bra.audit.config import RANDOM_SAE, ScoreError
from bra.audit.labels import AUTO, choose_labels
from bra.audit.overlap import ngram_hashes
from bra.audit.pooling import accumulate_raw_, empty_raw, finish_raw, pool_codes
from bra.cache import schema
from bra.cache.store import Store, open_store
from bra.sae.base import PAD_INDEX, SparseAutoencoder, sae_device
from bra.sae.evaluate import refuse_non_finite
from bra.sae.registry import architecture_of
from bra.sae.workflows import load_checked
from bra.vocab import SEGMENT_COMPLETION

logger = logging.getLogger(__name__)

PROMPT_COLUMNS = ("id", "tier", "framing", "prompt", "completion", "doc_index", "surface_label",
                  "surface_probs")
"""prompts.parquet columns scoring needs."""
TOKEN_COLUMNS = ("doc_index", "segment", "mask", "token_id")
"""Per-token store arrays scoring reads whole."""


def read_eval_bundle(store_path: str | os.PathLike[str], sae_paths: Mapping[str, str | os.PathLike[str]],
                     layer: int | None, pool: str, seed: int, rows_per_read: int = 4096,
                     check: Callable[[StoreFacts, pd.DataFrame], object] | None = None,
                     labels: str = AUTO) -> EvalBundle:
    """Open the eval store once and read everything scoring needs.

    ``sae_paths``: SAE name -> path (or `none`), ours (`OURS`) first, then the baselines. ``layer``: the
    store layer (None = our SAE's own). A random SAE of our SAE's architecture and size (`random_sae`,
    seeded by ``seed``) is added as `RANDOM_SAE`. ``check`` is called with the store facts and the prompts
    table before the SAEs are loaded and the layer is streamed, so that a request the prompts cannot serve
    (a tier no prompt has) fails before the long read. ``labels``: which surface labels the table's
    ``surface_label`` / ``surface_probs`` hold (`bra.audit.labels.choose_labels`).
    Raises ScoreError for a store that is not an eval store, SAEError for a mismatched SAE.
    """
    store = open_store(store_path)
    facts = _store_facts(store)
    table, choice = choose_labels(_read_prompts(store, facts), labels, str(store.path))
    if check is not None:
        check(facts, table)
    tokens = TokenColumns(*(store.read_rows(n, 0, facts.n_tokens) for n in TOKEN_COLUMNS))
    if not (tokens.segment == SEGMENT_COMPLETION).any():
        raise ScoreError(f"{store.path}: not an eval store: build it from an eval manifest (it has no "
                         f"completion tokens)")
    (ours, ours_path), *others = sae_paths.items()
    sae, layer = load_checked(ours_path, store, layer, "SAE")
    saes: dict[str, SparseAutoencoder] = {ours: sae}
    for name, path in others:
        saes[name] = load_checked(path, store, layer, f"baseline {name}")[0]
    saes[RANDOM_SAE] = random_sae(sae, store.stats(layer), seed)
    n_docs = len(table)
    codes, raw, counts = _stream_layer(store, layer, saes, tokens, n_docs, pool, rows_per_read)
    return EvalBundle(
        facts=facts, layer=layer, table=table, tokens=tokens,
        pooled={name: pool_codes(c, tokens, n_docs, pool) for name, c in codes.items()},
        raw=raw, counts=counts, codes=codes[ours],
        sae_configs={name: s.cfg.to_dict() for name, s in saes.items()},
        sae_paths={name: str(path) for name, path in sae_paths.items()}, labels=choice.to_json())


def _store_facts(store: Store) -> StoreFacts:
    """Every store attr scoring uses, read here and nowhere else in the audit."""
    meta = store.meta
    model = (meta.manifest or {}).get("model")
    return StoreFacts(path=str(store.path), kind=meta.kind, model_id=meta.model_id,
                      model=dict(model) if isinstance(model, Mapping) else None,
                      tokenizer_fingerprint=meta.tokenizer_fingerprint, d_model=store.d_model,
                      n_tokens=store.n_tokens, hazard_tiers=meta.hazard_tiers, benign_tiers=meta.benign_tiers,
                      variant=meta.variant)


def _read_prompts(store: Store, facts: StoreFacts) -> pd.DataFrame:
    """The prompts table, row i = doc i; refuses a store that is not an eval store."""
    table_path = store.location.child(schema.PROMPTS_TABLE)
    if facts.kind != "eval" or not store.location.has_file(schema.PROMPTS_TABLE):
        raise ScoreError(f"{store.path}: not an eval store: build it from an eval manifest (it has no "
                         f"{schema.PROMPTS_TABLE} with completions)")
    table = store.read_table(schema.PROMPTS_TABLE)
    table = table.sort_values("doc_index", kind="stable").reset_index(drop=True)
    missing = [c for c in PROMPT_COLUMNS if c not in table.columns]
    if missing:
        raise ScoreError(f"{table_path} lacks column {missing[0]!r}: rebuild the eval store")
    if table["doc_index"].tolist() != list(range(len(store.docs()))):
        raise ScoreError(f"{table_path} does not have one row per document of the store: rebuild it")
    return table


def random_sae(like: SparseAutoencoder, stats: Mapping[str, Any], seed: int) -> SparseAutoencoder:
    """The random baseline of ``like``'s architecture and size (`bra.sae.registry.Architecture.random_like`):
    TopK: TopK-paper init with the same k, input scale from the store layer's statistics ``stats``;
    JumpReLU / standard: random directions with ``like``'s norms, biases and thresholds; `none`: a random
    orthonormal basis of the residual stream."""
    return architecture_of(like).random_like(like, stats, seed)


class _CodesBuffer:
    """Sparse codes of every row, written batch by batch; widened when a batch has more active latents
    per row than any before (JumpReLU / ReLU), so nothing active is dropped."""

    def __init__(self, n_rows: int, d_sae: int) -> None:
        self.d_sae = d_sae
        self.indices = np.full((n_rows, 0), PAD_INDEX, np.int32)
        self.values = np.zeros((n_rows, 0), np.float32)
        self.width = 0  # most entries any row has used

    def put(self, rows: np.ndarray, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Store (values [B, C], indices [B, C]) as the codes of store rows ``rows`` [B]."""
        width = values.shape[1]
        if width > self.indices.shape[1]:
            grow = max(width, self.indices.shape[1] * 3 // 2) - self.indices.shape[1]
            self.indices = np.pad(self.indices, ((0, 0), (0, grow)), constant_values=PAD_INDEX)
            self.values = np.pad(self.values, ((0, 0), (0, grow)))
        self.indices[rows, :width] = indices.cpu().numpy()
        self.values[rows, :width] = values.float().cpu().numpy()
        self.width = max(self.width, width)

    def finish(self) -> SparseCodes:
        """The codes, trimmed to the widest row."""
        return SparseCodes(np.ascontiguousarray(self.indices[:, :self.width]),
                           np.ascontiguousarray(self.values[:, :self.width]), self.d_sae)


@torch.no_grad()
def _stream_layer(store: Store, layer: int, saes: Mapping[str, SparseAutoencoder], tokens: TokenColumns,
                  n_docs: int, pool: str, rows_per_read: int
                  ) -> tuple[dict[str, SparseCodes], dict[str, np.ndarray], np.ndarray]:
    """Read the layer once: pool the raw rows per (doc, segment) and encode them with every SAE.

    Returns (SAE name -> sparse codes of every row, segment -> [n_docs, d_model] pooled raw rows,
    [n_docs, 2] pooled rows per doc and segment)."""
    groups = tokens.groups()
    raw = empty_raw(n_docs, store.d_model, pool)
    buffers = {name: _CodesBuffer(len(groups), sae.cfg.d_sae) for name, sae in saes.items()}
    for start in range(0, len(groups), rows_per_read):
        stop = min(start + rows_per_read, len(groups))
        g = groups[start:stop]
        keep = np.flatnonzero(g >= 0)
        if not keep.size:
            continue
        x = store.read_acts(layer, start, stop)[keep]
        refuse_non_finite(x, start + keep, store, "score")
        accumulate_raw_(raw, x, g[keep], pool)
        xt = torch.from_numpy(x)
        for name, sae in saes.items():
            values, indices = sae.encode_sparse(xt.to(sae_device(sae)))
            buffers[name].put(start + keep, values, indices)
    codes = {name: buf.finish() for name, buf in buffers.items()}
    for name, c in codes.items():
        active = (c.indices >= 0).sum(axis=1)[groups >= 0]
        logger.info("%s: sparse width %d (mean %.1f latents listed per pooled row); nothing dropped", name,
                    c.indices.shape[1], float(active.mean()) if active.size else 0.0)
    counts = np.bincount(groups[groups >= 0], minlength=2 * n_docs).reshape(n_docs, 2)
    return codes, finish_raw(raw, counts, n_docs, pool), counts


__all__ = ["latent_firing_rates", "read_eval_bundle", "random_sae", "read_prompts", "scan_store_ngrams"]


SCAN_ROWS = 1 << 22
"""Token rows read per step of the n-gram scan of a training store."""


def scan_store_ngrams(store_path: str, tokenizer_fingerprint: str | None, wanted: np.ndarray, n: int
                      ) -> tuple[np.ndarray | None, str | None]:
    """(the hashes of ``wanted`` that occur in the store's documents, None), scanned in chunks of
    `SCAN_ROWS` token rows; or (None, why not): the store is not reachable, or its tokenizer differs from
    ``tokenizer_fingerprint`` (token n-grams would not be comparable)."""
    from bra.errors import BraError

    try:
        store = open_store(store_path)
    except (BraError, OSError) as exc:
        return None, f"training store not reachable from here: {exc}"
    fp = store.meta.tokenizer_fingerprint
    if tokenizer_fingerprint is None or fp != tokenizer_fingerprint:
        return None, (f"training store tokenizer {fp} differs from the eval store's {tokenizer_fingerprint}: "
                      f"token n-grams are not comparable")
    found: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]
    for start in range(0, store.n_tokens, SCAN_ROWS) if wanted.size else ():
        stop = min(store.n_tokens, start + SCAN_ROWS + n - 1)  # windows across the step boundary included
        tokens, docs = store.read_rows("token_id", start, stop), store.read_rows("doc_index", start, stop)
        h = ngram_hashes(tokens, docs, n)
        found.append(h[np.isin(h, wanted)])
    return np.unique(np.concatenate(found)), None


def read_prompts(path: str | os.PathLike[str]) -> tuple[str, Any, Any, pd.DataFrame]:
    """(store path, its ``edit`` attr, its manifest, prompts.parquet sorted by doc_index) of an eval store;
    anything else is an `EditError` (`bra-sae effects` reads only this)."""
    from bra.errors import EditError

    store = open_store(path)
    if store.meta.kind != "eval" or not store.location.has_file(schema.PROMPTS_TABLE):
        raise EditError(f"{store.path}: not an eval store")
    table = store.read_table(schema.PROMPTS_TABLE).sort_values("doc_index", kind="stable")
    return str(store.path), store.meta.edit, store.meta.manifest, table.reset_index(drop=True)


@torch.no_grad()
def latent_firing_rates(store_path: str | os.PathLike[str], sae: SparseAutoencoder, layer: int,
                        rows_per_read: int = 4096) -> tuple[np.ndarray, int]:
    """([d_sae] share of the store's unmasked rows at ``layer`` where each latent of ``sae`` is active,
    rows counted), streamed in chunks (the firing-rate match of `bra-sae intervene`'s latent controls)."""
    store = open_store(store_path)
    mask = store.read_rows("mask", 0, store.n_tokens)
    counts = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for start in range(0, store.n_tokens, rows_per_read):
        stop = min(start + rows_per_read, store.n_tokens)
        keep = np.flatnonzero(~mask[start:stop])
        if not keep.size:
            continue
        x = store.read_acts(layer, start, stop)[keep]
        refuse_non_finite(x, start + keep, store, "count firing rates of")
        z = sae.encode(torch.from_numpy(x).to(sae_device(sae)).float())
        counts += (z > 0).sum(dim=0).double().cpu()
        n += keep.size
    return (counts / max(n, 1)).numpy(), n
