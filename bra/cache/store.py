"""Opening a store, and the read-side view of its attrs that every consumer shares."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from bra.cache import parallel, schema
from bra.cache.location import StoreLocation
from bra.errors import StoreError

logger = logging.getLogger(__name__)


def store_exists(path: str | Path | StoreLocation) -> bool:
    """True when ``path`` (a folder or a URL) holds a Zarr group."""
    return StoreLocation.parse(path).is_store()


_OPEN_LOCK = threading.Lock()


def cached_array(owner: object, group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group``, opened once per ``owner`` (a store handle or writer; opening reads
    its metadata, a request on object stores); reader and writer threads may share the owner."""
    cache: dict[str, zarr.Array] = owner.__dict__.setdefault("_arrays", {})
    node = cache.get(name)
    if node is None:
        with _OPEN_LOCK:
            node = cache.get(name)
            if node is None:
                node = group[name]
                assert isinstance(node, zarr.Array)
                cache[name] = node
    return node


@dataclass
class Store:
    """A read-only handle on a built store (use ``open_store``)."""

    path: Path | str
    """Store location: a Path for local stores, the URL for remote ones."""
    group: zarr.Group
    """The root group, opened read-only."""
    location: StoreLocation = field(default=None)  # type: ignore[assignment]
    """Where the store lives (derived from ``path`` when not given)."""

    def __post_init__(self) -> None:
        if self.location is None:
            self.location = StoreLocation.parse(self.path)

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attrs as a plain dict, untyped (verify digests them); read fields through ``meta``."""
        return dict(self.group.attrs)

    @cached_property
    def meta(self) -> schema.StoreAttrs:
        """The typed provenance and geometry attrs (a StoreError names a missing or unusable key). Parsed
        once: these keys are written when the store is created and never change."""
        return schema.StoreAttrs.from_attrs(self.attrs, f"store {self.path}")

    @property
    def status(self) -> str | None:
        """Build status: building, complete (creating: a remote store whose arrays are being made)."""
        return schema.status_of(self.group.attrs)

    @property
    def layers(self) -> list[int]:
        """Hooked layers."""
        return list(self.meta.layers)

    @property
    def dtype(self) -> str:
        """Logical storage dtype."""
        return self.meta.dtype

    @property
    def d_model(self) -> int:
        """Residual width."""
        return self.meta.d_model

    @property
    def n_tokens(self) -> int:
        """Rows in the store."""
        return self.meta.n_tokens

    @property
    def tier_names(self) -> list[str]:
        """Tier names; index = tier code."""
        return list(self.meta.tier_names)

    @property
    def layout(self) -> schema.StoreLayout:
        """Chunk/shard geometry."""
        return self.meta.layout

    def array(self, name: str) -> zarr.Array:
        """One array of the store by path (opened once: opening reads its metadata from disk)."""
        return cached_array(self, self.group, name)

    def acts(self, layer: int) -> zarr.Array:
        """The activation array of a hooked layer (raw storage dtype)."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer} is not in store {self.path} (it has {self.layers})")
        return self.array(schema.acts_path(layer))

    def read_acts(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a layer's activations as float32 (fp8 rows: codes x their scales)."""
        self.acts(layer)  # refuses a layer the store lacks
        raw = self.read_rows(schema.acts_path(layer), start, stop)
        return schema.decode_rows(raw, self.dtype, self.read_scales(layer, start, stop))

    def read_scales(self, layer: int, start: int, stop: int) -> np.ndarray | None:
        """Per-row scales [start, stop) of a layer of a scaled (fp8) store; None for the other dtypes."""
        if not schema.is_scaled(self.dtype):
            return None
        return self.read_rows(schema.scales_path(layer), start, stop)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one token-axis array, raw. A chunk that fails its CRC32C (or that no
        decompressor accepts), or a missing activation shard file, is a one-line StoreError naming the
        array, the rows and the shard: every consumer (fit, eval, score) reads through here."""
        arr = self.array(name)
        loop = parallel.thread_loop() if self.location.is_local else None  # a `LoopThreadPool` thread's
        try:
            data = arr[start:stop] if loop is None else loop.run_until_complete(
                arr.async_array.getitem(slice(start, stop)))
        except Exception:  # zarr raises ValueError for a checksum mismatch, others for undecodable bytes
            bad = self.first_bad_chunk(name, start, stop)
            if bad is None:  # every chunk reads on its own: not damage (memory, ...), so not ours to rename
                raise
            lo, hi = bad
            raise StoreError(f"corrupt chunk in {name} rows {lo}..{hi - 1} ({self._shard_of(lo)}) of "
                             f"{self.path}; run `bra-cache verify {self.path}`") from None
        if name.startswith((f"{schema.ACTS_GROUP}/", f"{schema.SCALES_GROUP}/")) and self.location.is_local \
                and arr.shards is not None:
            # A missing shard file reads back as fill values (zeros) without any error; activations are never
            # all zero (nor is a scale), so the file's absence is damage. Token columns can legitimately be
            # all zero.
            rows = arr.shards[0]
            for shard in range(start // rows, -(-stop // rows)):
                key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
                if not self.location.has_file(f"{name}/{key}"):
                    lo, hi = shard * rows, min((shard + 1) * rows, arr.shape[0])
                    raise StoreError(f"missing shard file {name}/{key} (rows {lo}..{hi - 1}) of {self.path}; "
                                     f"run `bra-cache verify {self.path}`")
        return data

    def first_bad_chunk(self, name: str, start: int, stop: int) -> tuple[int, int] | None:
        """Row range of the first chunk in [start, stop) that cannot be read, or None."""
        arr = self.array(name)
        rows = arr.chunks[0]
        for lo in range(start - start % rows, stop, rows):
            hi = min(lo + rows, arr.shape[0])
            try:
                arr[lo:hi]
            except Exception:
                return lo, hi
        return None

    def _shard_of(self, row: int) -> str:
        try:
            return f"shard {row // self.layout.shard_tokens}"
        except (StoreError, ValueError):  # attrs too damaged to say
            return "shard unknown"

    def stats(self, layer: int) -> dict[str, Any]:
        """Final statistics of a layer (masked rows excluded)."""
        return dict(schema.stats_of(self.group.attrs)[str(layer)])

    def docs(self) -> pd.DataFrame:
        """The per-document table."""
        if not self.location.has_file(schema.DOCS_TABLE):
            raise StoreError(f"store {self.path} has no document table ({schema.DOCS_TABLE}); "
                             f"run `bra-cache verify`")
        return self.read_table(schema.DOCS_TABLE)

    def read_table(self, name: str) -> pd.DataFrame:
        """A parquet table of the store (docs.parquet, prompts.parquet); a damaged one is a StoreError."""
        try:
            return self.location.read_table(name)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(f"store {self.path}: {name} is unreadable ({first}); "
                             f"run `bra-cache verify {self.path}`") from None


def open_store(path: str | Path | StoreLocation, require_complete: bool = True) -> Store:
    """Open a store (folder or URL) read-only; refuse a missing store, or an incomplete one unless asked."""
    loc = StoreLocation.parse(path)
    p = loc.handle
    if not loc.is_store():
        raise StoreError(f"no store at {p} (build one with `bra-cache build MANIFEST`)")
    try:
        group = loc.open_group(mode="r")
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise StoreError(f"store {p} is unreadable: {exc}; run `bra-cache verify {p}`") from None
    attrs = dict(group.attrs)
    version = schema.schema_version_of(attrs)
    if version is None:
        raise StoreError(f"{p} is a Zarr group but not a bra store (no {schema.ATTR_SCHEMA} attr)")
    if version != schema.SCHEMA_VERSION:
        raise StoreError(f"store {p} has schema version {version}, this bra reads {schema.SCHEMA_VERSION}")
    status = schema.status_of(attrs)
    if require_complete and status != schema.STATUS_COMPLETE:
        raise StoreError(f"store {p} is incomplete (status {status!r}); "
                         f"resume it with `bra-cache build` or check it with `bra-cache verify {p}`")
    return Store(p, group, loc)
