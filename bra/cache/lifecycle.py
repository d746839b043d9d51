"""A store's life around a build: create it, or find an existing one to resume, leave alone or refuse.

A build states what its store must record (a ``StoreAttrs``: model, layers, dtype, geometry, manifest and
token digests). An existing store with the same manifest hash, tokenizer fingerprint and token digest is
resumed from its done shards, or left alone when complete; any other store is refused, never overwritten
unless asked. Only rank 0 of a multi-process build calls these; the other ranks reopen the store after.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bra.cache import schema
from bra.cache.location import StoreLocation
from bra.cache.store import store_exists
from bra.cache.writer import StoreWriter, remove_store
from bra.errors import StoreError, StoreMismatchError

logger = logging.getLogger(__name__)

BUILT, RESUMED, ALREADY_COMPLETE = "built", "resumed", "already-complete"


@dataclass(frozen=True)
class OpenedStore:
    """What ``open_for_build`` found or made."""

    status: str
    """``built`` (created now), ``resumed`` (some shards were done) or ``already-complete``."""
    todo: tuple[int, ...]
    """The shards not yet written, ascending (empty when already complete)."""


def completed_tokens(path: Path | str | StoreLocation, manifest_hash: str) -> int | None:
    """The row count of a complete store built from the same manifest, else None: a cheap check, made before
    any model is loaded, that the build has nothing to do."""
    if not store_exists(path):
        return None
    raw = _read_attrs(path)
    meta = _typed_or_none(raw)
    if meta is None or meta.manifest_hash != manifest_hash or schema.status_of(raw) != schema.STATUS_COMPLETE:
        return None
    return meta.n_tokens


def check_existing(path: Path | str | StoreLocation, new: schema.StoreAttrs) -> str:
    """Decide what to do with an existing store: ``resume``, ``complete`` or ``create`` (a remote store
    whose creation was interrupted); raise if it was built from other inputs or is not a bra store."""
    raw = _read_attrs(path)
    if schema.schema_version_of(raw) is None:
        raise StoreError(f"{path} exists and is not a bra store; choose another --store or pass --overwrite")
    old = schema.StoreAttrs.from_attrs(raw, f"store {path}")
    if old.edit != new.edit:  # its fingerprint differs too; say why in words
        was, now = ((e or {}).get("spec", "no edit") for e in (old.edit, new.edit))
        raise StoreMismatchError(f"store {path} was generated under another residual edit ({was!r}, not "
                                 f"{now!r}); pass --overwrite to rebuild it or choose another output")
    if old.manifest_hash != new.manifest_hash:
        diff = _differing_keys(old.manifest or {}, new.manifest or {}) or ["input files"]
        # a dtype change is named outright: resuming would mix rows of two dtypes (fp8 codes with bf16 bits)
        dtypes = f"; it holds {old.dtype} rows, the manifest asks for {new.dtype}" if old.dtype != new.dtype \
            else ""
        raise StoreMismatchError(
            f"store {path} was built from a different manifest (differs in: {', '.join(diff[:6])}){dtypes}; "
            f"pass --overwrite to rebuild it or choose another --store"
        )
    for what, was, now in (("tokenizer fingerprint", old.tokenizer_fingerprint, new.tokenizer_fingerprint),
                           ("tokens digest", old.tokens_digest, new.tokens_digest)):
        if was != now:
            raise StoreMismatchError(f"store {path} was built from different {what} "
                                     f"(the model or the corpus changed); pass --overwrite to rebuild it")
    status = schema.status_of(raw)
    if status == schema.STATUS_CREATING:
        return "create"
    return "complete" if status == schema.STATUS_COMPLETE else "resume"


def saved_generation(path: Path | str | StoreLocation, manifest_hash: str) -> pd.DataFrame | None:
    """The completions an interrupted build of the same manifest saved in the store, if any."""
    loc = StoreLocation.parse(path)
    if not store_exists(loc) or not loc.has_file(schema.GENERATION_TABLE):
        return None
    raw = _read_attrs(loc)
    meta = _typed_or_none(raw)
    if meta is None or meta.manifest_hash != manifest_hash \
            or schema.status_of(raw) == schema.STATUS_CREATING:
        return None
    return loc.read_table(schema.GENERATION_TABLE)


def open_for_build(path: Path | str | StoreLocation, attrs: schema.StoreAttrs, overwrite: bool,
                   early_tables: Mapping[str, pd.DataFrame]) -> OpenedStore:
    """Create, resume-check or refuse the store (rank 0 only). ``early_tables`` are written before any shard
    (when missing), so a resumed build can read them back."""
    loc = StoreLocation.parse(path)
    if overwrite:
        remove_store(loc)
    status = BUILT
    writer = None
    if store_exists(loc):
        state = check_existing(loc, attrs)
        if state == "complete":
            return OpenedStore(ALREADY_COMPLETE, ())
        if state == "create":
            remove_store(loc)
        else:
            writer, status = StoreWriter.reopen(loc), RESUMED
            logger.info("resuming %s: %d of %d shards done", loc, int(writer.done_shards().sum()),
                        writer.layout.n_shards)
    elif not loc.is_empty():
        raise StoreError(f"{loc} exists and is not a store; choose another --store or pass --overwrite")
    if writer is None:
        writer = StoreWriter.create(loc, attrs)
    for name, table in early_tables.items():
        if status == BUILT or not loc.has_file(name):
            loc.write_table(name, table)
    return OpenedStore(status, tuple(int(s) for s in np.flatnonzero(~writer.done_shards())))


def _read_attrs(path: Path | str | StoreLocation) -> dict[str, Any]:
    try:
        return dict(StoreLocation.parse(path).open_group(mode="r").attrs)
    except Exception:  # unreadable metadata: not ours to touch
        raise StoreError(f"{path} exists but is not a readable store; "
                         f"pass --overwrite to replace it") from None


def _typed_or_none(raw: Mapping[str, Any]) -> schema.StoreAttrs | None:
    """The typed attrs, or None when they are not a (sound) bra store's: then nothing is reused."""
    try:
        return schema.StoreAttrs.from_attrs(raw)
    except StoreError:
        return None


def _differing_keys(stored: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the keys whose values differ between two JSON objects (lists equal to tuples)."""
    out: list[str] = []
    for k in sorted(set(stored) | set(new)):
        a, b = stored.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}{k}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(f"{prefix}{k}")
    return out
