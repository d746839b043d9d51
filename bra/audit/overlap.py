"""Train/eval overlap: eval prompts whose text the SAE saw in training.

An SAE fit on a corpus that contains an eval prompt has its latents shaped by that very text, so its
separation on the prompt measures memory, not a concept. `score` therefore checks every eval prompt's
token n-grams (default n = 13, the contamination window of the GPT-3 / WMDP-era decontamination work)
against the documents of the store named in the SAE's run record (``run.json`` ``store``), when that store
is reachable and was tokenised by the same tokenizer, and reports the prompts that share any n-gram.

n-grams are compared as 64-bit polynomial hashes of token ids, so the corpus is scanned in chunks with
numpy and never held as Python tuples; a hash collision could only add a false overlap, never hide one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

NGRAM = 13
"""Tokens per n-gram."""
_BASE = np.uint64(1_000_003)


def ngram_hashes(tokens: np.ndarray, docs: np.ndarray | None = None, n: int = NGRAM) -> np.ndarray:
    """Hashes of every window of ``n`` consecutive tokens (uint64, one per window start), windows that
    cross a document boundary (``docs``: [R] document of each token) left out."""
    t = np.asarray(tokens).astype(np.uint64)
    if t.size < n:
        return np.zeros(0, dtype=np.uint64)
    m = t.size - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for j in range(n):
            h = h * _BASE + t[j:j + m]
    if docs is not None:
        d = np.asarray(docs)
        h = h[d[:m] == d[n - 1:]]
    return h


def prompt_ngrams(prompt_tokens: Mapping[str, np.ndarray], n: int = NGRAM) -> dict[str, np.ndarray]:
    """Prompt id -> unique n-gram hashes of its prompt tokens."""
    return {pid: np.unique(ngram_hashes(t, n=n)) for pid, t in prompt_tokens.items()}


def shared_counts(per_prompt: Mapping[str, np.ndarray], corpus_hashes: np.ndarray) -> dict[str, int]:
    """Prompt id -> how many of its n-grams occur in ``corpus_hashes`` (only prompts with >= 1)."""
    corpus = np.unique(corpus_hashes)
    out = {}
    for pid, h in per_prompt.items():
        k = int(np.isin(h, corpus, assume_unique=True).sum()) if h.size else 0
        if k:
            out[pid] = k
    return out


def training_store_of(sae_path: str) -> tuple[str | None, str | None]:
    """(the store named in the SAE's run record, None) or (None, why there is none)."""
    from bra.sae.files import RUN_FILE

    run = Path(sae_path) / RUN_FILE
    if not run.is_file():
        return None, f"the SAE has no {RUN_FILE} naming its training store (a pretrained or exported SAE)"
    try:
        return str(json.loads(run.read_text())["store"]), None
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{run} names no training store"


def training_overlap(sae_path: str, prompt_tokens: Mapping[str, np.ndarray],
                     scan: Callable[[str, np.ndarray, int], tuple[np.ndarray | None, str | None]],
                     n: int = NGRAM) -> dict[str, Any]:
    """report.json ``overlap``: ``checked`` (bool), ``reason`` (why not, or None), ``store``, ``n``,
    ``n_prompts``, and ``overlapping``: [{id, shared_ngrams, ngrams}] for every prompt sharing an n-gram.

    ``scan(store, wanted, n)`` returns the hashes of ``wanted`` found in that store's documents, or None and
    why the store could not be read (`bra.audit.reader.scan_store_ngrams`: the reader owns store access)."""
    out: dict[str, Any] = {"checked": False, "reason": None, "store": None, "n": n,
                           "n_prompts": len(prompt_tokens), "overlapping": []}
    store, why = training_store_of(sae_path)
    out["store"] = store
    if store is None:
        out["reason"] = why
        return out
    per_prompt = prompt_ngrams(prompt_tokens, n)
    wanted = np.unique(np.concatenate([h for h in per_prompt.values()] or [np.zeros(0, np.uint64)]))
    hits, why = scan(store, wanted, n)
    if hits is None:
        out["reason"] = why
        return out
    counts = shared_counts(per_prompt, hits)
    out["checked"] = True
    out["overlapping"] = [{"id": pid, "shared_ngrams": k, "ngrams": int(per_prompt[pid].size)}
                          for pid, k in sorted(counts.items())]
    if counts:
        logger.warning("%d eval prompts share a %d-gram with the SAE's training store %s", len(counts), n,
                       store)
    return out


__all__ = ["NGRAM", "ngram_hashes", "prompt_ngrams", "shared_counts", "training_overlap", "training_store_of"]
