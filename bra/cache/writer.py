"""Create a store, write whole shards, resume, and mark the store complete.

A shard is written array by array, then its checksums and statistics partials, and only then its
``done`` flag: a process killed at any moment leaves the shard not-done, and a resumed build rewrites
it whole. The group's ``status`` becomes ``complete`` only after every shard is done and the document
table is in place, so nothing half-written can look complete.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from bra.cache import schema
from bra.cache.stats import Moments
from bra.cache.store import store_exists
from bra.errors import StoreError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecSpec:
    """Compression of every array (per inner chunk, followed by a CRC32C so corruption is caught on read)."""

    codec: str = "blosc-zstd"
    """none, blosc-zstd, blosc-lz4 or zstd."""
    clevel: int = 1
    """Compression level."""
    shuffle: str = "bitshuffle"
    """Blosc shuffle mode."""

    def compressors(self, itemsize: int) -> list[Any]:
        """Zarr bytes-to-bytes codecs for arrays of this item size."""
        out: list[Any] = []
        if self.codec.startswith("blosc-"):
            out.append(BloscCodec(cname=self.codec.split("-", 1)[1], clevel=self.clevel,
                                  shuffle=self.shuffle, typesize=itemsize))
        elif self.codec == "zstd":
            out.append(ZstdCodec(level=self.clevel))
        out.append(Crc32cCodec())
        return out


def _wrap_os_error(path: Path, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing store {path}; free space and re-run to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write store at {path}: {os.strerror(exc.errno)}")
    blocked = exc.filename is not None and Path(exc.filename).exists() and not Path(exc.filename).is_dir()
    if exc.errno == errno.ENOTDIR or (exc.errno == errno.EEXIST and blocked):  # a path component is a file
        return StoreError(f"cannot write store at {path}: {exc.filename or path.parent} is not a directory")
    return StoreError(f"cannot write store at {path}: {exc}")


class StoreWriter:
    """Writes one store. Create with ``create`` or ``reopen``."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        attrs = dict(group.attrs)
        self.layers: list[int] = [int(x) for x in attrs[schema.ATTR_LAYERS]]
        self.dtype: str = attrs[schema.ATTR_DTYPE]
        self.layout = schema.StoreLayout(int(attrs[schema.ATTR_N_TOKENS]), int(attrs[schema.ATTR_D_MODEL]),
                                         int(attrs[schema.ATTR_CHUNK_TOKENS]), int(attrs[schema.ATTR_SHARD_TOKENS]))
        self.columns = schema.column_names(self.layers)

    @classmethod
    def create(cls, path: Path, layout: schema.StoreLayout, layers: list[int], dtype: str, codec: CodecSpec,
               attrs: dict[str, Any]) -> StoreWriter:
        """Create an empty store (status ``building``) with all arrays sized for ``layout``.

        The skeleton is made in a temp folder beside ``path`` and renamed into place, so a process killed
        mid-creation never leaves a half-made store that a resume would refuse.
        """
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a build killed while creating
                shutil.rmtree(stale, ignore_errors=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
            group = zarr.open_group(str(tmp), mode="w")
            n, c, s = layout.n_tokens, layout.chunk_tokens, layout.shard_tokens
            for name, dt in schema.TOKEN_COLUMNS.items():
                group.create_array(name, shape=(n,), dtype=dt, chunks=(c,), shards=(s,),
                                   compressors=codec.compressors(np.dtype(dt).itemsize), fill_value=0)
            disk = schema.STORAGE_DTYPES[dtype]
            for layer in layers:
                group.create_array(schema.acts_path(layer), shape=(n, layout.d_model), dtype=disk,
                                   chunks=(c, layout.d_model), shards=(s, layout.d_model),
                                   compressors=codec.compressors(np.dtype(disk).itemsize), fill_value=0,
                                   dimension_names=("token", "d_model"),
                                   attributes={"logical_dtype": dtype, "hook_name": schema.hook_name(layer)})
            k = layout.n_shards
            group.create_array(schema.DONE_ARRAY, shape=(k,), dtype="uint8", chunks=(1,), fill_value=0)
            group.create_array(schema.CRC_ARRAY, shape=(k, len(schema.column_names(layers))), dtype="uint32",
                               chunks=(1, len(schema.column_names(layers))), fill_value=0)
            for layer in layers:
                for field, shape in (("count", (k,)), ("sumsq", (k,)), ("mean", (k, layout.d_model)),
                                     ("m2", (k, layout.d_model))):
                    group.create_array(schema.stats_path(layer, field), shape=shape,
                                       dtype="int64" if field == "count" else "float64",
                                       chunks=(1,) + shape[1:], fill_value=0)
            group.attrs.update({**attrs, schema.ATTR_STATUS: schema.STATUS_BUILDING})
            os.rename(tmp, path)  # also replaces an empty directory at path
            tmp = None
        except OSError as exc:
            raise _wrap_os_error(path, exc) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.reopen(path)

    @classmethod
    def reopen(cls, path: Path) -> StoreWriter:
        """Open an existing store for resuming."""
        return cls(path, zarr.open_group(str(path), mode="r+"))

    def done_shards(self) -> np.ndarray:
        """Boolean [n_shards]: which shards are completely written."""
        return self.group[schema.DONE_ARRAY][:].astype(bool)

    def write_shard(self, shard: int, columns: dict[str, np.ndarray], acts: dict[int, np.ndarray]) -> None:
        """Write one whole shard: data, then checksums and statistics, then its done flag."""
        start, stop = self.layout.shard_bounds(shard)
        n = stop - start
        try:
            crcs = []
            for name in schema.TOKEN_COLUMNS:
                data = columns[name]
                assert data.shape[0] == n, (name, data.shape, n)
                self.group[name][start:stop] = data
                crcs.append(schema.crc32(data))
            keep = ~columns["mask"]
            for layer in self.layers:
                data = acts[layer]
                assert data.shape == (n, self.layout.d_model)
                self.group[schema.acts_path(layer)][start:stop] = data
                crcs.append(schema.crc32(data))
                m = Moments.of(schema.from_storage(data[keep], self.dtype))
                self.group[schema.stats_path(layer, "count")][shard] = m.count
                self.group[schema.stats_path(layer, "sumsq")][shard] = m.sumsq
                self.group[schema.stats_path(layer, "mean")][shard] = m.mean
                self.group[schema.stats_path(layer, "m2")][shard] = m.m2
            self.group[schema.CRC_ARRAY][shard] = np.asarray(crcs, dtype=np.uint32)
            self.group[schema.DONE_ARRAY][shard] = 1
        except OSError as exc:
            raise _wrap_os_error(self.path, exc) from None

    def merged_moments(self, layer: int) -> Moments:
        """Merge the per-shard partials in shard order."""
        g = self.group
        counts = g[schema.stats_path(layer, "count")][:]
        sumsq = g[schema.stats_path(layer, "sumsq")][:]
        means = g[schema.stats_path(layer, "mean")][:]
        m2s = g[schema.stats_path(layer, "m2")][:]
        total = Moments.empty(self.layout.d_model)
        for i in range(len(counts)):
            total = total.merge(Moments(int(counts[i]), means[i], m2s[i], float(sumsq[i])))
        return total

    def finalize(self, docs: pd.DataFrame, extra_tables: dict[str, pd.DataFrame] | None = None) -> None:
        """Write the document table (and any extra tables), merged statistics, then status complete."""
        done = self.done_shards()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise StoreError(f"cannot finalize {self.path}: shards {missing[:5].tolist()} are not written")
        try:
            write_table_atomic(docs, self.path / schema.DOCS_TABLE)
            for name, table in (extra_tables or {}).items():
                write_table_atomic(table, self.path / name)
            stats = {str(layer): self.merged_moments(layer).summary() for layer in self.layers}
            final = {**dict(self.group.attrs), schema.ATTR_STATS: stats, schema.ATTR_STATUS: schema.STATUS_COMPLETE}
            # one metadata write: the store becomes complete together with its statistics and digests
            self.group.attrs.update({schema.ATTR_STATS: stats, schema.ATTR_STATUS: schema.STATUS_COMPLETE,
                                     schema.ATTR_DIGESTS: schema.attr_digests(final)})
        except OSError as exc:
            raise _wrap_os_error(self.path, exc) from None


def write_table_atomic(table: pd.DataFrame, path: Path) -> None:
    """Write a parquet file via a temp file and rename, so a reader never sees half a table."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_store(path: Path) -> None:
    """Delete a store directory (used by --overwrite); refuse to delete a folder that is not a store."""
    if not path.exists():
        return
    if path.is_dir() and not store_exists(path) and any(path.iterdir()):
        raise StoreError(f"{path} is not a store; refusing to delete it for --overwrite (remove it yourself)")
    shutil.rmtree(path)
