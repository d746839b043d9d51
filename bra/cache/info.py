"""Describe a store: tiers, token counts, bytes on disk, compression ratio, provenance attrs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bra.cache import schema
from bra.cache.store import open_store


def store_info(path: str | Path) -> dict[str, Any]:
    """A JSON-ready description of a store (complete or not)."""
    store = open_store(path, require_complete=False)
    meta = store.meta
    n, d = store.n_tokens, store.d_model
    itemsize = np.dtype(schema.STORAGE_DTYPES[store.dtype]).itemsize
    done = store.array(schema.DONE_ARRAY)[:].astype(bool)
    # An unfinished store holds only its done shards: sizes and ratios count the rows actually written.
    rows_written = sum(hi - lo for lo, hi in map(store.layout.shard_bounds, np.flatnonzero(done).tolist()))
    scaled = schema.is_scaled(store.dtype)
    # a scaled (fp8) dtype's rows are codes plus a float32 scale each: both count as activation bytes
    acts_raw = rows_written * (d * itemsize + (4 if scaled else 0)) * len(store.layers)
    loc = store.location
    acts_disk = sum(loc.nbytes(schema.acts_path(layer)) for layer in store.layers)
    if scaled:
        acts_disk += sum(loc.nbytes(schema.scales_path(layer)) for layer in store.layers)
    total_disk = loc.nbytes()
    bf16_raw = rows_written * d * 2 * len(store.layers)
    info: dict[str, Any] = {
        "path": str(store.path),
        "status": store.status,
        "kind": meta.kind,
        "model": meta.model_id,
        "model_revision": meta.model_revision,
        "layers": store.layers,
        "hook_names": list(meta.hook_names),
        "d_model": d,
        "dtype": store.dtype,
        "lossy": scaled,
        "compute_dtype": meta.compute_dtype,
        "codec": meta.codec,
        "n_tokens": n,
        "n_docs": meta.n_docs,
        "shards": store.layout.n_shards,
        "shards_done": int(done.sum()),
        "tokens_written": int(rows_written),
        "bytes_on_disk": total_disk,
        "activation_bytes_raw": acts_raw,
        "activation_bytes_on_disk": acts_disk,
        "compression_ratio": round(acts_raw / acts_disk, 3) if acts_disk else None,
        "bytes_per_token": round(total_disk / rows_written, 1) if rows_written else None,
        # what the activations take beside raw (uncompressed) bf16 rows, the default dtype's size before its
        # codec (bf16 itself compresses ~1.3x: bench study 3 compares the two stores on disk)
        "activation_bytes_bf16_raw": bf16_raw,
        "bytes_saved_vs_bf16_raw": round(1 - acts_disk / bf16_raw, 4) if bf16_raw and acts_disk else None,
        "tokenizer_fingerprint": meta.tokenizer_fingerprint,
        "manifest_hash": meta.manifest_hash,
        "dataset_revisions": meta.dataset_revisions,
        "package_version": meta.package_version,
        "tier_names": store.tier_names,
        "hazard_tiers": None if meta.hazard_tiers is None else list(meta.hazard_tiers),
        "corpus_counts": meta.corpus_counts,
    }
    if info["status"] == schema.STATUS_COMPLETE:
        docs = store.docs()
        tiers = docs.groupby("tier").agg(docs=("doc_index", "size"), tokens=("n_tokens", "sum"))
        info["tiers"] = {t: {"docs": int(r.docs), "tokens": int(r.tokens)} for t, r in tiers.iterrows()}
        info["stats"] = {layer: {"count": s["count"], "mean_sq_norm": round(s["mean_sq_norm"], 4),
                                 "mean_var": round(float(np.mean(s["var"])), 6)}
                         for layer, s in schema.stats_of(store.attrs).items()}
    return info


def format_info(info: dict[str, Any]) -> str:
    """Human-readable rendering of ``store_info``."""
    lines = [f"store        {info['path']}  ({info['status']}, {info['kind']})",
             f"model        {info['model']}  revision={info['model_revision']}",
             f"layers       {info['layers']}  hooks={info['hook_names']}",
             f"d_model      {info['d_model']}  dtype={info['dtype']}{' (lossy)' if info['lossy'] else ''}  "
             f"compute={info['compute_dtype']}",
             f"tokens       {info['n_tokens']:,} in {info['n_docs']} docs, "
             f"{info['shards_done']}/{info['shards']} shards"
             + ("" if info["tokens_written"] == info["n_tokens"] else
                f" ({info['tokens_written']:,} tokens written so far; sizes below count those)"),
             f"disk         {info['bytes_on_disk']:,} bytes ({info['bytes_per_token']} B/token); activations "
             f"{info['activation_bytes_on_disk']:,} of {info['activation_bytes_raw']:,} raw "
             f"(ratio {info['compression_ratio']}, codec {info['codec']})"]
    if info["lossy"] and info["bytes_saved_vs_bf16_raw"] is not None:
        lines.append(f"lossy        {info['dtype']}: rows are codes x a per-row scale; activations take "
                     f"{info['bytes_saved_vs_bf16_raw']:.1%} fewer bytes than raw bf16 "
                     f"({info['activation_bytes_bf16_raw']:,} bytes)")
    for tier, t in info.get("tiers", {}).items():
        hz = " (hazard class)" if tier in (info.get("hazard_tiers") or []) else ""
        lines.append(f"tier         {tier}{hz}: {t['docs']} docs, {t['tokens']:,} tokens")
    for layer, s in info.get("stats", {}).items():
        lines.append(f"stats L{layer:<6}count={s['count']:,} mean_sq_norm={s['mean_sq_norm']} "
                     f"mean_var={s['mean_var']}")
    lines += [f"tokenizer    {info['tokenizer_fingerprint']}  manifest={info['manifest_hash']}  "
              f"bra={info['package_version']}",
              f"datasets     {info['dataset_revisions']}"]
    return "\n".join(lines)


def env_summary() -> str:
    """One line about threads, for logs of benchmark-like commands."""
    return f"threads={os.cpu_count()}"
