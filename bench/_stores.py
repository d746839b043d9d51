"""Stores derived from a built one without running the model again: its rows tiled several times (study 4's
store many times the shuffle buffer) or laid out in other chunk/shard sizes (study 7's object-store reads).
Everything goes through `StoreWriter`, so statistics, checksums and status are those of a real build."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from bra.cache import schema
from bra.cache.store import open_store
from bra.cache.writer import StoreWriter

logger = logging.getLogger(__name__)


def _tiled_docs(docs: pd.DataFrame, copies: int, n_tokens: int) -> pd.DataFrame:
    """The document table of ``copies`` consecutive copies (copy i's documents renamed ``id#i``)."""
    tiled = []
    for i in range(copies):
        t = docs.copy()
        t["doc_index"] += i * len(docs)
        t["token_offset"] += i * n_tokens
        t["doc_id"] = t["doc_id"] + f"#{i}"
        tiled.append(t)
    return pd.concat(tiled, ignore_index=True)


def copy_store(
    src_path: Path | str,
    dst: Path,
    copies: int = 1,
    chunk_tokens: int | None = None,
    shard_tokens: int | None = None,
) -> Path:
    """Write a local store holding ``copies`` consecutive copies of ``src_path``'s rows (documents renamed
    per copy), with the source's dtype and codec and its chunk/shard sizes unless given.

    Rows are the same bytes whatever the geometry, so stores that differ only in ``chunk_tokens`` or
    ``shard_tokens`` isolate what the layout alone costs a reader.
    """
    src = open_store(src_path)
    shutil.rmtree(dst, ignore_errors=True)
    n, layout = src.n_tokens, src.layout
    chunk = chunk_tokens or layout.chunk_tokens
    shard = shard_tokens or layout.shard_tokens
    docs = src.docs()
    cols = {k: src.array(k)[:] for k in schema.TOKEN_COLUMNS}
    raws = {layer: src.acts(layer)[:] for layer in src.layers}
    attrs = dataclasses.replace(
        src.meta, n_tokens=n * copies, n_docs=len(docs) * copies, chunk_tokens=chunk, shard_tokens=shard
    )
    new_layout = attrs.layout
    writer = StoreWriter.create(dst, attrs)
    for i in range(new_layout.n_shards):
        s0, s1 = new_layout.shard_bounds(i)
        rows = np.arange(s0, s1)
        src_rows, copy = rows % n, rows // n
        c = {k: v[src_rows] for k, v in cols.items()}
        c["doc_index"] = (c["doc_index"] + copy * len(docs)).astype(np.int32)
        writer.write_shard(i, c, {layer: raw[src_rows] for layer, raw in raws.items()})
    writer.finalize(_tiled_docs(docs, copies, n))
    logger.debug("wrote %s: %d rows, chunk %d, shard %d", dst, n * copies, chunk, shard)
    return dst
