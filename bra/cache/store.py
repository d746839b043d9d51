"""Opening a store, and the read-side view of its attrs that every consumer shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from bra.cache import schema
from bra.errors import StoreError

logger = logging.getLogger(__name__)


def store_exists(path: str | Path) -> bool:
    """True when ``path`` holds a Zarr group."""
    return (Path(path) / "zarr.json").is_file()


@dataclass
class Store:
    """A read-only handle on a built store (use ``open_store``)."""

    path: Path
    """Store location."""
    group: zarr.Group
    """The root group, opened read-only."""

    @property
    def attrs(self) -> dict[str, Any]:
        """Group attrs as a plain dict."""
        return dict(self.group.attrs)

    @property
    def layers(self) -> list[int]:
        """Hooked layers."""
        return [int(x) for x in self.attrs[schema.ATTR_LAYERS]]

    @property
    def dtype(self) -> str:
        """Logical storage dtype."""
        return str(self.attrs[schema.ATTR_DTYPE])

    @property
    def d_model(self) -> int:
        """Residual width."""
        return int(self.attrs[schema.ATTR_D_MODEL])

    @property
    def n_tokens(self) -> int:
        """Rows in the store."""
        return int(self.attrs[schema.ATTR_N_TOKENS])

    @property
    def tier_names(self) -> list[str]:
        """Tier names; index = tier code."""
        return list(self.attrs[schema.ATTR_TIER_NAMES])

    @property
    def layout(self) -> schema.StoreLayout:
        """Chunk/shard geometry."""
        a = self.attrs
        return schema.StoreLayout(self.n_tokens, self.d_model, int(a[schema.ATTR_CHUNK_TOKENS]),
                                  int(a[schema.ATTR_SHARD_TOKENS]))

    def array(self, name: str) -> zarr.Array:
        """One array of the store by path."""
        node = self.group[name]
        assert isinstance(node, zarr.Array)
        return node

    def acts(self, layer: int) -> zarr.Array:
        """The activation array of a hooked layer (raw storage dtype)."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer} is not in store {self.path} (it has {self.layers})")
        return self.array(schema.acts_path(layer))

    def read_acts(self, layer: int, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a layer's activations, decoded to float32."""
        return schema.from_storage(self.acts(layer)[start:stop], self.dtype)

    def stats(self, layer: int) -> dict[str, Any]:
        """Final statistics of a layer (masked rows excluded)."""
        return dict(self.attrs[schema.ATTR_STATS][str(layer)])

    def docs(self) -> pd.DataFrame:
        """The per-document table."""
        path = self.path / schema.DOCS_TABLE
        if not path.is_file():
            raise StoreError(f"store {self.path} has no document table ({schema.DOCS_TABLE}); run `bra-cache verify`")
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a damaged file
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(f"store {self.path}: {schema.DOCS_TABLE} is unreadable ({first}); "
                             f"run `bra-cache verify {self.path}`") from None


def open_store(path: str | Path, require_complete: bool = True) -> Store:
    """Open a store read-only; refuse a missing store, or an incomplete one unless asked not to."""
    p = Path(path)
    if not store_exists(p):
        raise StoreError(f"no store at {p} (build one with `bra-cache build MANIFEST`)")
    try:
        group = zarr.open_group(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for unreadable metadata
        raise StoreError(f"store {p} is unreadable: {exc}; run `bra-cache verify {p}`") from None
    attrs = dict(group.attrs)
    if schema.ATTR_SCHEMA not in attrs:
        raise StoreError(f"{p} is a Zarr group but not a bra store (no {schema.ATTR_SCHEMA} attr)")
    if attrs[schema.ATTR_SCHEMA] != schema.SCHEMA_VERSION:
        raise StoreError(f"store {p} has schema version {attrs[schema.ATTR_SCHEMA]}, this bra reads "
                         f"{schema.SCHEMA_VERSION}")
    if require_complete and attrs.get(schema.ATTR_STATUS) != schema.STATUS_COMPLETE:
        raise StoreError(f"store {p} is incomplete (status {attrs.get(schema.ATTR_STATUS)!r}); resume it with "
                         f"`bra-cache build` or check it with `bra-cache verify {p}`")
    return Store(p, group)
