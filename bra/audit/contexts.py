"""Top-activating token contexts of catalog latents, decoded with the store's tokenizer when it is at hand.

The contexts are chosen from the training split only (`top_contexts`, pure), and decoded once while
scoring (`decode_contexts`), so the report only formats them. The tokenizer comes from local files only
(`load_tokenizer`), and only when its fingerprint matches the one the store was built with; otherwise the
report shows token ids and says why. Loading it never loads (or converts) the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bra.audit.bundle import SparseCodes, StoreFacts, TokenColumns
from bra.audit.catalog import CategoryEntry
from bra.vocab import SEGMENT_NAMES

logger = logging.getLogger(__name__)


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
                    "segment": SEGMENT_NAMES[int(tokens.segment[row])],
                    "token_ids": tokens.token_id[lo:hi].astype(int).tolist(), "center": int(row) - lo})
    return out


def catalog_contexts(catalog: Mapping[str, CategoryEntry], codes: SparseCodes, tokens: TokenColumns,
                     docs: np.ndarray, n: int, n_latents: int) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """category -> latent -> `top_contexts` of the first ``n_latents`` catalog latents of each category."""
    return {name: {j: top_contexts(codes, tokens, j, docs, n=n) for j in entry.latents[:n_latents]}
            for name, entry in catalog.items()}


def decode_contexts(contexts: Mapping[str, Mapping[int, Sequence[dict[str, Any]]]], ids: Sequence[str],
                    tokenizer: Any | None) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """JSON-ready contexts: each gains the prompt ``id`` and, with a tokenizer, ``text`` = [before, the
    activating token, after]; latents become string keys."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for category, latents in contexts.items():
        out[category] = {}
        for j, ctxs in latents.items():
            rows = []
            for c in ctxs:
                row = {**c, "id": ids[c["doc_index"]]}
                if tokenizer is not None:
                    tids, k = c["token_ids"], c["center"]
                    row["text"] = [tokenizer.decode(tids[:k]), tokenizer.decode(tids[k:k + 1]),
                                   tokenizer.decode(tids[k + 1:])]
                rows.append(row)
            out[category][str(j)] = rows
    return out


def load_tokenizer(facts: StoreFacts) -> tuple[Any, str]:
    """The store's tokenizer from local files only, if its fingerprint matches the store; else (None, why)."""
    try:
        if facts.model is None:
            return None, "token ids only: the store records no model"
        from bra.pipeline.manifest import ModelSpec

        spec = ModelSpec(**{k: v for k, v in facts.model.items() if k in ModelSpec.__dataclass_fields__})
        local = Path(spec.id).expanduser()
        if not spec.gguf and (local.is_absolute() or spec.id.startswith(".")) and not local.is_dir():
            return None, f"token ids only: the model folder {spec.id} is gone"
        tok = _tokenizer_files(spec)
        from bra.pipeline.model import tokenizer_fingerprint

        if tokenizer_fingerprint(tok) != facts.tokenizer_fingerprint:
            return None, "token ids only: the local tokenizer differs from the store's (fingerprint)"
        return tok, "decoded with the store's tokenizer (local files)"
    except Exception as exc:  # any failure just means contexts stay token ids
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        return None, f"token ids only: tokenizer not available offline ({first})"


def _tokenizer_files(spec: Any) -> Any:
    """Load the tokenizer of a `ModelSpec` from local files (raises when they are not there)."""
    from transformers import AutoTokenizer

    from bra.pipeline.model import converted_dir, locate_gguf, model_path

    converted = converted_dir(spec.gguf) if spec.gguf else None
    if converted is not None and (converted / "tokenizer_config.json").is_file():
        # the build's converted folder: loading it takes a fraction of a second
        return AutoTokenizer.from_pretrained(str(converted), local_files_only=True, trust_remote_code=False)
    if spec.gguf:  # read the tokenizer out of the GGUF itself (slow); never convert (or load) the model
        gguf = locate_gguf(spec.gguf)
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                             trust_remote_code=False)
    return AutoTokenizer.from_pretrained(model_path(spec), revision=spec.revision, local_files_only=True,
                                         trust_remote_code=False)
