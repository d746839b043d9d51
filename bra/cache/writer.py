"""Create a store, write whole shards, resume, and mark the store complete.

A shard is written array by array, then its checksums and statistics partials, and only then its
``done`` flag: a process killed at any moment leaves the shard not-done, and a resumed build rewrites
it whole. The group's ``status`` becomes ``complete`` only after every shard is done and the document
table is in place, so nothing half-written can look complete.

Several processes may write one store at once (``torchrun``) as long as each owns whole shards: the
per-shard arrays (done, crc32, rank, statistics) have one chunk per shard, so no two writers ever touch the
same object. Only the process that finalizes writes the group attrs and tables.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from bra.cache import parallel, schema
from bra.cache.location import StoreLocation
from bra.cache.stats import Moments
from bra.cache.store import cached_array
from bra.errors import StoreError
from bra.fsutil import atomic_file, make_temp_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodecSpec:
    """Compression of every array (per inner chunk, followed by a CRC32C so corruption is caught on read)."""

    codec: str = "blosc-zstd"
    """none, blosc-zstd, blosc-lz4 or zstd."""
    clevel: int = 3
    """Compression level."""
    shuffle: str = "shuffle"
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

    def to_attrs(self) -> dict[str, Any]:
        """The store's ``codec`` attr value."""
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, value: dict[str, Any]) -> CodecSpec:
        """The spec a store's ``codec`` attr value records."""
        return cls(**value)


def _wrap_os_error(path: Path | str, exc: OSError) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"disk full while writing store {path}; free space and re-run to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"cannot write store at {path}: {os.strerror(exc.errno)}")
    blocked = exc.filename is not None and Path(exc.filename).exists() and not Path(exc.filename).is_dir()
    if exc.errno == errno.ENOTDIR or (exc.errno == errno.EEXIST and blocked):  # a path component is a file
        parent = Path(path).parent if isinstance(path, Path) else path
        return StoreError(f"cannot write store at {path}: {exc.filename or parent} is not a directory")
    return StoreError(f"cannot write store at {path}: {exc}")


class StoreWriter:
    """Writes one store. Create with ``create`` or ``reopen``."""

    def __init__(self, path: Path | str | StoreLocation, group: zarr.Group):
        self.location = StoreLocation.parse(path)
        self.path = self.location.handle
        self.group = group
        self.meta = schema.StoreAttrs.from_attrs(dict(group.attrs), f"store {self.path}")
        self.layers: list[int] = list(self.meta.layers)
        self.dtype: str = self.meta.dtype
        self.layout = self.meta.layout
        self.columns = schema.column_names(self.layers, self.dtype)

    @classmethod
    def create(cls, path: Path | str | StoreLocation, attrs: schema.StoreAttrs) -> StoreWriter:
        """Create an empty store (status ``building``) with the arrays ``attrs`` describe (layers, dtype,
        geometry and codec).

        Local: the skeleton is made in a temp folder beside ``path`` and renamed into place, so a process
        killed mid-creation never leaves a half-made store that a resume would refuse. Remote (no rename):
        the group is written first with status ``creating`` and switched to ``building`` once every array
        exists; a build finding ``creating`` makes the store again.
        """
        if attrs.codec is None:
            raise ValueError("a new store's attrs must record its codec")
        loc = StoreLocation.parse(path)
        values = attrs.to_attrs()
        if loc.local is None:
            try:
                group = loc.open_group(mode="w")
                group.attrs.update({**values, **schema.status_update(schema.STATUS_CREATING)})
                _create_arrays(group, attrs)
                group.attrs.update(schema.status_update(schema.STATUS_BUILDING))
            except OSError as exc:
                raise _wrap_os_error(loc.handle, exc) from None
            return cls.reopen(loc)
        path = loc.local
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = make_temp_dir(path)  # also removes half-created stores of builds killed while creating
            group = zarr.open_group(str(tmp), mode="w")
            _create_arrays(group, attrs)
            group.attrs.update({**values, **schema.status_update(schema.STATUS_BUILDING)})
            os.rename(tmp, path)  # also replaces an empty directory at path
            tmp = None
        except OSError as exc:
            raise _wrap_os_error(path, exc) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.reopen(path)

    @classmethod
    def reopen(cls, path: Path | str | StoreLocation) -> StoreWriter:
        """Open an existing store for resuming (or for writing more shards from another process)."""
        loc = StoreLocation.parse(path)
        return cls(loc, loc.open_group(mode="r+"))

    def done_shards(self) -> np.ndarray:
        """Boolean [n_shards]: which shards are completely written."""
        return self._array(schema.DONE_ARRAY)[:].astype(bool)

    def write_shard(self, shard: int, columns: dict[str, np.ndarray], acts: dict[int, np.ndarray],
                    rank: int = 0, scales: dict[int, np.ndarray] | None = None) -> None:
        """Write one whole shard: data, then checksums, statistics and writer rank, then its done flag.

        ``acts`` holds each layer's rows in the on-disk dtype (``schema.encode_rows``); a scaled dtype (fp8)
        also needs each layer's per-row ``scales``. Threads may write different shards at once
        (`bra.cache.parallel.ShardWriterPool`): nothing here is shared between two shards.
        """
        start, stop = self.layout.shard_bounds(shard)
        n = stop - start
        scaled = schema.is_scaled(self.dtype)
        if scaled and (scales is None or set(scales) != set(self.layers)):
            raise ValueError(f"a {self.dtype} store needs the per-row scales of every layer")
        try:
            crcs = []
            for name in schema.TOKEN_COLUMNS:
                data = columns[name]
                assert data.shape[0] == n, (name, data.shape, n)
                self._set(name, start, stop, data)
                crcs.append(schema.crc32(data))
            keep = ~columns["mask"]
            for layer in self.layers:
                data = acts[layer]
                assert data.shape == (n, self.layout.d_model)
                self._set(schema.acts_path(layer), start, stop, data)
                crcs.append(schema.crc32(data))
                scale = None
                if scales is not None and scaled:
                    scale = np.ascontiguousarray(scales[layer], dtype=np.float32)
                    assert scale.shape == (n,), (layer, scale.shape, n)
                    self._set(schema.scales_path(layer), start, stop, scale)
                m = Moments.of_stored(data, keep, self.dtype, scale)
                self._set(schema.stats_path(layer, "count"), shard, shard + 1, np.asarray([m.count]))
                self._set(schema.stats_path(layer, "sumsq"), shard, shard + 1, np.asarray([m.sumsq]))
                self._set(schema.stats_path(layer, "mean"), shard, shard + 1, m.mean[None])
                self._set(schema.stats_path(layer, "m2"), shard, shard + 1, m.m2[None])
            if scaled and scales is not None:
                crcs += [schema.crc32(np.ascontiguousarray(scales[layer], dtype=np.float32))
                         for layer in self.layers]
            self._set(schema.CRC_ARRAY, shard, shard + 1, np.asarray([crcs], dtype=np.uint32))
            if self._has_rank_array:
                self._set(schema.RANK_ARRAY, shard, shard + 1, np.asarray([rank], dtype=np.int16))
            self._set(schema.DONE_ARRAY, shard, shard + 1, np.ones(1, dtype=np.uint8))
        except OSError as exc:
            raise _wrap_os_error(self.path, exc) from None

    def _set(self, name: str, start: int, stop: int, data: np.ndarray) -> None:
        """Rows [start, stop) of one array. On a thread of a `ShardWriterPool` writing a local store, through
        that thread's own event loop (``bra.cache.parallel``), so several shards compress at once; else
        through zarr's synchronous API (one event loop for the process)."""
        arr = self._array(name)
        loop = parallel.thread_loop() if self.location.is_local else None
        if loop is None:
            arr[start:stop] = data
        else:
            loop.run_until_complete(arr.async_array.setitem(slice(start, stop), data))

    @property
    def _has_rank_array(self) -> bool:
        if not hasattr(self, "_rank_array"):
            self._rank_array = schema.RANK_ARRAY in self.group
        return self._rank_array

    def _array(self, name: str) -> zarr.Array:
        """An array of the store, opened once (writer threads share the cache)."""
        return cached_array(self, self.group, name)

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
            if self.location.local is not None:  # every shard is done, so no writer is still going:
                for stale in self.location.local.rglob("*.partial"):  # zarr's temp files of killed writes
                    stale.unlink(missing_ok=True)
            self.location.write_table(schema.DOCS_TABLE, docs)
            for name, table in (extra_tables or {}).items():
                self.location.write_table(name, table)
            stats = {str(layer): self.merged_moments(layer).summary() for layer in self.layers}
            # one metadata write: the store becomes complete together with its statistics and digests
            self.group.attrs.update(schema.completion_update(dict(self.group.attrs), stats))
        except OSError as exc:
            raise _wrap_os_error(self.path, exc) from None


def write_table_atomic(table: pd.DataFrame, path: Path) -> None:
    """Write a parquet file via a temp sibling and rename (``bra.fsutil.atomic_file``), so a reader never
    sees half a table."""
    with atomic_file(path) as tmp:
        table.to_parquet(tmp, index=False)


def remove_store(path: Path | str | StoreLocation) -> None:
    """Delete a store (used by --overwrite); refuse to delete a folder that is not a store."""
    loc = StoreLocation.parse(path)
    if loc.local is not None:
        if not loc.local.exists():
            return
        if loc.local.is_dir() and not loc.is_store() and any(loc.local.iterdir()):
            raise StoreError(f"{loc.local} is not a store; refusing to delete it for --overwrite "
                             f"(remove it yourself)")
        loc.remove()
        return
    if loc.is_empty():
        return
    if not loc.is_store():
        raise StoreError(f"{loc} is not a store; refusing to delete it for --overwrite (remove it yourself)")
    loc.remove()


def _create_arrays(group: zarr.Group, attrs: schema.StoreAttrs) -> None:
    """Every array of an empty store sized for its layout (per-shard arrays: one chunk per shard)."""
    layout, layers, dtype = attrs.layout, list(attrs.layers), attrs.dtype
    codec = CodecSpec.from_attrs(attrs.codec or {})
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
    if schema.is_scaled(dtype):
        for layer in layers:
            group.create_array(schema.scales_path(layer), shape=(n,), dtype="float32", chunks=(c,),
                               shards=(s,), compressors=codec.compressors(4), fill_value=0,
                               dimension_names=("token",))
    k = layout.n_shards
    group.create_array(schema.DONE_ARRAY, shape=(k,), dtype="uint8", chunks=(1,), fill_value=0)
    n_columns = len(schema.column_names(layers, dtype))
    group.create_array(schema.CRC_ARRAY, shape=(k, n_columns), dtype="uint32", chunks=(1, n_columns),
                       fill_value=0)
    group.create_array(schema.RANK_ARRAY, shape=(k,), dtype="int16", chunks=(1,), fill_value=-1)
    for layer in layers:
        for field, shape in (("count", (k,)), ("sumsq", (k,)), ("mean", (k, layout.d_model)),
                             ("m2", (k, layout.d_model))):
            group.create_array(schema.stats_path(layer, field), shape=shape,
                               dtype="int64" if field == "count" else "float64",
                               chunks=(1,) + shape[1:], fill_value=0)
