"""Check a store end to end: schema, attrs, completion, per-shard checksums, document table, statistics."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bra.cache import schema
from bra.cache.stats import Moments
from bra.cache.store import Store, open_store
from bra.errors import StoreError

logger = logging.getLogger(__name__)


def _check_attrs(store: Store) -> list[str]:
    attrs = store.attrs
    problems = [f"attrs: missing {k!r}" for k in schema.missing_attrs(attrs)]
    if store.status != schema.STATUS_COMPLETE:
        problems.append(f"status is {store.status!r}, not complete "
                        "(an interrupted build: re-run `bra-cache build` to resume)")
        return problems
    return problems + [f"attrs: {p}" for p in schema.digest_problems(attrs)]


def _check_shards(store: Store, columns: list[str], deep: bool) -> tuple[list[str], dict[int, Moments]]:
    layout = store.layout
    problems: list[str] = []
    done = store.array(schema.DONE_ARRAY)[:].astype(bool)
    for s in np.flatnonzero(~done):
        problems.append(f"shard {s}: not written")
    crcs = store.array(schema.CRC_ARRAY)[:]
    moments = {layer: Moments.empty(store.d_model) for layer in store.layers}
    scaled = schema.is_scaled(store.dtype)
    for shard in tqdm(range(layout.n_shards), desc="verify", unit="shard", leave=False):
        start, stop = layout.shard_bounds(shard)
        read: dict[str, np.ndarray] = {}
        for j, name in enumerate(columns):
            try:
                data = store.array(name)[start:stop]
            except Exception as exc:  # the CRC32C codec (or a decompressor) rejects a corrupt chunk
                lo, hi = store.first_bad_chunk(name, start, stop) or (start, stop)
                problems.append(f"shard {shard}: {name}: unreadable chunk, rows {lo}..{hi - 1} "
                                f"({type(exc).__name__}: {exc})")
                continue
            if schema.crc32(data) != int(crcs[shard, j]):
                gone = _missing_file(store, name, shard)
                problems.append(f"shard {shard}: {name}: checksum mismatch{gone} (rows {start}..{stop - 1})")
            if name.startswith(f"{schema.SCALES_GROUP}/"):
                problems += _check_scales(name, data, shard, start)
            read[name] = data
        mask = read.get("mask")
        if not deep or mask is None:
            continue
        for layer in store.layers:
            raw = read.get(schema.acts_path(layer))
            scale = read.get(schema.scales_path(layer)) if scaled else None
            if raw is None or (scaled and scale is None):
                continue
            moments[layer] = moments[layer].merge(Moments.of_stored(raw, ~mask, store.dtype, scale))
    return problems, moments


def _check_scales(name: str, scale: np.ndarray, shard: int, start: int) -> list[str]:
    """A per-row scale must be finite and positive (an all-zero row is stored with scale 1): name the first
    row that is not, and how many are not."""
    bad = ~(np.isfinite(scale) & (scale > 0))
    if not bad.any():
        return []
    first = int(np.flatnonzero(bad)[0])
    return [f"shard {shard}: {name}: row {start + first} has scale {float(scale[first])!r} (zero or not "
            f"finite; {int(bad.sum())} such row(s) in the shard)"]


def _missing_file(store: Store, name: str, shard: int) -> str:
    """``: shard file ... is missing`` when the shard's file is gone (zarr reads fill values), else ''."""
    arr = store.array(name)
    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
    if store.location.is_local and not store.location.has_file(f"{name}/{key}"):
        return f": shard file {name}/{key} is missing"
    return ""


def _check_prompts(store: Store) -> list[str]:
    """Eval stores: prompts.parquet must be there and readable (score and relabel read it)."""
    if store.meta.kind != "eval":
        return []
    if not store.location.has_file(schema.PROMPTS_TABLE):
        return [f"{schema.PROMPTS_TABLE}: missing"]
    try:
        table = store.location.read_table(schema.PROMPTS_TABLE)
    except Exception as exc:  # a truncated parquet raises pyarrow errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return [f"{schema.PROMPTS_TABLE}: unreadable ({first})"]
    n_docs = store.meta.n_docs
    if n_docs is not None and len(table) != n_docs:
        return [f"{schema.PROMPTS_TABLE}: {len(table)} rows, attrs say {n_docs} documents"]
    return []


def _check_docs(store: Store) -> list[str]:
    if not store.location.has_file(schema.DOCS_TABLE):
        return [f"{schema.DOCS_TABLE}: missing"]
    try:
        docs = store.location.read_table(schema.DOCS_TABLE)
    except Exception as exc:  # a truncated parquet raises pyarrow errors
        return [f"{schema.DOCS_TABLE}: unreadable "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"]
    problems = [f"{schema.DOCS_TABLE}: missing column {c!r}" for c in schema.DOC_COLUMNS
                if c not in docs.columns]
    if problems:
        return problems
    n_docs = store.meta.n_docs
    if n_docs is not None and len(docs) != n_docs:
        problems.append(f"{schema.DOCS_TABLE}: {len(docs)} rows, attrs say {n_docs}")
    n = docs["n_tokens"].to_numpy()
    if int(n.sum()) != store.n_tokens:
        problems.append(f"{schema.DOCS_TABLE}: n_tokens sum to {int(n.sum())}, "
                        f"store has {store.n_tokens} rows")
        return problems
    expected_offsets = np.concatenate([[0], np.cumsum(n)[:-1]])
    if not np.array_equal(docs["token_offset"].to_numpy(), expected_offsets):
        problems.append(f"{schema.DOCS_TABLE}: token offsets are not contiguous")
    try:
        doc_index = store.array("doc_index")[:]
        tier = store.array("tier")[:]
    except Exception:  # already reported by the shard checks
        return problems
    if not np.array_equal(doc_index, np.repeat(docs["doc_index"].to_numpy(), n)):
        problems.append("doc_index column disagrees with the document table")
    if not np.array_equal(tier, np.repeat(docs["tier_code"].to_numpy(), n)):
        problems.append("tier column disagrees with the document table")
    return problems


def _check_stats(store: Store, moments: dict[int, Moments]) -> list[str]:
    problems = []
    stats = schema.stats_of(store.attrs)
    for layer, m in moments.items():
        s = stats.get(str(layer))
        if s is None:
            problems.append(f"stats: layer {layer} missing")
            continue
        got = m.summary()
        if s["count"] != got["count"] or not np.allclose(s["mean"], got["mean"], rtol=1e-6, atol=1e-6) or \
                not np.allclose(s["var"], got["var"], rtol=1e-5, atol=1e-6):
            problems.append(f"stats: layer {layer} does not match the stored activations")
    return problems


def verify_store(path: str | Path, deep: bool = True) -> list[str]:
    """Return a list of problems (empty when the store is sound)."""
    try:
        store = open_store(path, require_complete=False)
    except StoreError as exc:
        return [str(exc)]
    problems = _check_attrs(store)
    if schema.missing_attrs(store.attrs):
        return problems
    try:  # edited attrs can make the geometry meaningless; report instead of crashing
        columns, layout = schema.column_names(store.layers, store.dtype), store.layout
    except (StoreError, ValueError) as exc:
        return problems + [f"attrs: layers/sizes unusable ({exc})"]
    expected_rows = {name: store.n_tokens for name in columns}
    per_shard = [schema.DONE_ARRAY, schema.CRC_ARRAY] + [schema.stats_path(layer, f) for layer in store.layers
                                                          for f in ("count", "sumsq", "mean", "m2")]
    expected_rows.update(dict.fromkeys(per_shard, layout.n_shards))
    for name, rows in expected_rows.items():
        try:
            arr = store.array(name)
        except KeyError:
            problems.append(f"array {name!r} is missing")
            continue
        except Exception as exc:  # unreadable array metadata (zarr raises several types)
            problems.append(f"array {name!r} is unreadable ({type(exc).__name__}: {exc})")
            continue
        if arr.shape[0] != rows:
            problems.append(f"array {name!r} has {arr.shape[0]} rows, attrs say {rows}")
    if problems and any(p.startswith("array") for p in problems):
        return problems
    shard_problems, moments = _check_shards(store, columns, deep)
    problems += shard_problems
    if store.status == schema.STATUS_COMPLETE:
        problems += _check_docs(store) + _check_prompts(store)
        if deep and not shard_problems:
            problems += _check_stats(store, moments)
    return problems


def summarize(problems: Iterable[str]) -> str:
    """Problems as lines."""
    return "\n".join(problems)
