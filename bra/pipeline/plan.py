"""Tokenise every document up front into windows, so each row's place in the store is fixed before any
forward pass: shards map to row ranges, batches are fixed groups of windows, and a resumed build
recomputes exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from bra.cache import schema
from bra.errors import CorpusError
from bra.pipeline.corpora import corpus_name, dataset_revision, iter_documents
from bra.pipeline.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """One model input sequence (a document, or a piece of a long one)."""

    doc_index: int
    """Row of the document table it belongs to."""
    ids: np.ndarray
    """[T] int32 token ids, BOS included when the tokenizer adds one."""
    segment: np.ndarray | None = None
    """[T] int8 segment codes (eval stores: prompt vs completion); None = all document."""


@dataclass
class TokenPlan:
    """All windows in store order, plus the document table."""

    windows: list[Window] = field(default_factory=list)
    """Windows in document order."""
    docs: list[dict[str, Any]] = field(default_factory=list)
    """One dict per document (schema.DOC_COLUMNS)."""
    tier_codes: dict[int, int] = field(default_factory=dict)
    """doc_index -> tier code."""
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per corpus: documents used, skipped by limits, split into several windows, tokens."""
    tier_names: tuple[str, ...] = ()
    """Tier names, index = tier code (the store's ``tier_names``)."""

    @property
    def n_tokens(self) -> int:
        """Total rows."""
        return int(sum(len(w.ids) for w in self.windows))

    def offsets(self) -> np.ndarray:
        """[n_windows + 1] row offset of each window."""
        return np.concatenate([[0], np.cumsum([len(w.ids) for w in self.windows])]).astype(np.int64)

    def doc_table(self) -> pd.DataFrame:
        """The per-document table."""
        return pd.DataFrame(self.docs, columns=list(schema.DOC_COLUMNS))


def uses_bos(tokenizer: Any, add_bos: bool | None) -> bool:
    """Whether windows start with BOS: the manifest's choice, else what the tokenizer does by default."""
    if tokenizer.bos_token_id is None:
        return False
    if add_bos is not None:
        return add_bos
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def split_windows(content: list[int], max_len: int, bos: int | None) -> list[np.ndarray]:
    """Split content ids into consecutive windows of at most ``max_len`` (BOS counted), none dropped."""
    room = max_len - (1 if bos is not None else 0)
    pieces = [content[i:i + room] for i in range(0, len(content), room)] or [[]]
    prefix = [bos] if bos is not None else []
    return [np.asarray(prefix + p, dtype=np.int32) for p in pieces if prefix + p]


def plan_corpora(manifest: Manifest, tokenizer: Any) -> TokenPlan:
    """Tokenise the manifest's corpora into a TokenPlan, applying per-corpus limits."""
    plan = TokenPlan(tier_names=manifest.tier_names)
    tiers = list(manifest.tier_names)
    bos = tokenizer.bos_token_id if uses_bos(tokenizer, manifest.add_bos) else None
    seen_ids: set[str] = set()
    offset = 0
    for spec in manifest.corpora:
        name = corpus_name(spec)
        counts = {"docs": 0, "tokens": 0, "skipped_by_limit": 0, "split_docs": 0, "windows": 0}
        for doc in tqdm(iter_documents(spec, manifest), desc=f"tokenise {name}", unit="doc", leave=False):
            if spec.max_docs is not None and counts["docs"] >= spec.max_docs:
                break
            text = doc.text
            if manifest.chat_template:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
            content = tokenizer(text, add_special_tokens=False)["input_ids"]
            if manifest.chat_template and bos is not None and content[:1] == [bos]:
                content = content[1:]  # the template's own BOS (Gemma's has one); each window gets its own
            windows = split_windows(content, manifest.max_seq_len, bos)
            n = sum(len(w) for w in windows)
            if spec.max_tokens is not None and counts["tokens"] + n > spec.max_tokens:
                counts["skipped_by_limit"] += 1
                break
            if doc.doc_id in seen_ids:
                raise CorpusError(f"duplicate document id {doc.doc_id!r} (give corpora distinct names)")
            seen_ids.add(doc.doc_id)
            doc_index = len(plan.docs)
            plan.docs.append({
                "doc_index": doc_index, "doc_id": doc.doc_id, "tier": spec.tier,
                "tier_code": tiers.index(spec.tier), "corpus": name, "source": doc.source, "n_tokens": n,
                "token_offset": offset, "n_windows": len(windows), "n_text_tokens": len(content),
            })
            offset += n
            plan.tier_codes[doc_index] = tiers.index(spec.tier)
            plan.windows.extend(Window(doc_index, w) for w in windows)
            counts["docs"] += 1
            counts["tokens"] += n
            counts["windows"] += len(windows)
            counts["split_docs"] += len(windows) > 1
        if counts["docs"] == 0:
            raise CorpusError(f"corpus {name!r} (tier {spec.tier}) is empty after filtering")
        counts["revision"] = dataset_revision(spec)  # type: ignore[assignment]
        plan.counts[name] = counts
        logger.info("corpus %s: %d docs, %d tokens, %d split into windows", name, counts["docs"],
                    counts["tokens"], counts["split_docs"])
    return plan
