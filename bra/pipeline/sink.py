"""The build's write path: rows in store order → encoded (bf16 bits, fp8 codes + scales) → whole shards →
the writer threads (`bra.cache.parallel.ShardWriterPool`).

Bench study 10 feeds precomputed activations through `ShardSink` to measure what the writer sustains, apart
from any forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from bra.cache import schema
from bra.cache.parallel import ShardWriterPool
from bra.cache.writer import StoreWriter


class ShardAssembler:
    """Collects rows arriving in store order into whole shards; drops rows of shards already done.

    Rows come as named arrays (the token columns, ``acts/layer_<L>``, and for a scaled dtype
    ``scales/layer_<L>``), each with the same number of rows; a completed shard is the same names, whole.
    A written shard's arrays can be handed back (``recycle``) for a later shard: every row of a shard is
    overwritten before it is complete, and fresh 75 MB buffers are page faults (bench study 10).
    """

    def __init__(self, layout: schema.StoreLayout, dtypes: dict[str, tuple[np.dtype, tuple[int, ...]]],
                 todo: Iterable[int]):
        self.layout, self.dtypes, self.todo = layout, dtypes, set(todo)
        self._buf: dict[int, tuple[dict[str, np.ndarray], list[int]]] = {}
        self._free: list[dict[str, np.ndarray]] = []
        self._lock = threading.Lock()

    def add(self, start: int, arrays: dict[str, np.ndarray]) -> list[tuple[int, dict[str, np.ndarray]]]:
        """Place rows [start, start+n) and return the shards this completed, as (shard, arrays)."""
        n = len(next(iter(arrays.values())))
        out = []
        pos = start
        while pos < start + n:
            shard = pos // self.layout.shard_tokens
            s0, s1 = self.layout.shard_bounds(shard)
            take = min(s1, start + n) - pos
            if shard in self.todo:
                buf, filled = self._buf.setdefault(shard, self._alloc(s1 - s0))
                lo, hi = pos - s0, pos - s0 + take
                for name, v in arrays.items():
                    buf[name][lo:hi] = v[pos - start:pos - start + take]
                filled[0] += take
                if filled[0] == s1 - s0:
                    out.append((shard, buf))
                    del self._buf[shard]
            pos += take
        return out

    def recycle(self, arrays: dict[str, np.ndarray]) -> None:
        """Hand back a completed shard's arrays once it is written (any thread)."""
        with self._lock:
            self._free.append(arrays)

    def _alloc(self, n: int) -> tuple[dict[str, np.ndarray], list[int]]:
        with self._lock:
            for i, arrays in enumerate(self._free):
                if len(next(iter(arrays.values()))) == n:
                    return self._free.pop(i), [0]
        return {name: np.zeros((n, *tail), dtype=dt) for name, (dt, tail) in self.dtypes.items()}, [0]


class ShardSink:
    """Encodes rows to the store's dtype, assembles whole shards and hands each to a writer thread. Use as a
    context manager: leaving it waits for every shard handed over (and raises a failed write's error)."""

    def __init__(self, writer: StoreWriter, todo: Iterable[int], threads: int, rank: int = 0):
        self.writer, self.rank = writer, rank
        self.layers = list(writer.layers)
        self.scaled = schema.is_scaled(writer.dtype)
        d = writer.layout.d_model
        dtypes: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            k: (np.dtype(dt), ()) for k, dt in schema.TOKEN_COLUMNS.items()}
        for layer in self.layers:
            dtypes[schema.acts_path(layer)] = (np.dtype(schema.STORAGE_DTYPES[writer.dtype]), (d,))
            if self.scaled:
                dtypes[schema.scales_path(layer)] = (np.dtype(np.float32), ())
        self.assembler = ShardAssembler(writer.layout, dtypes, todo)
        # shards in memory: one per thread being written, as many queued, and the one being assembled
        self.pool = ShardWriterPool(threads, queued=threads)

    def add(self, start: int, cols: dict[str, np.ndarray], acts: dict[int, np.ndarray]) -> None:
        """Rows [start, start+n): token ``cols`` and float32 ``acts`` per layer."""
        arrays = dict(cols)
        for layer in self.layers:
            raw, scale = schema.encode_rows(acts[layer], self.writer.dtype)
            arrays[schema.acts_path(layer)] = raw
            if scale is not None:
                arrays[schema.scales_path(layer)] = scale
        for shard, buf in self.assembler.add(start, arrays):
            columns = {k: buf[k] for k in schema.TOKEN_COLUMNS}
            rows = {layer: buf[schema.acts_path(layer)] for layer in self.layers}
            scales = {layer: buf[schema.scales_path(layer)] for layer in self.layers} if self.scaled else None
            self.pool.submit(self._write, shard, buf, columns, rows, scales)

    def _write(self, shard: int, buf: dict[str, np.ndarray], columns: dict[str, np.ndarray],
               rows: dict[int, np.ndarray], scales: dict[int, np.ndarray] | None) -> None:
        try:
            self.writer.write_shard(shard, columns, rows, self.rank, scales=scales)
        finally:
            self.assembler.recycle(buf)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.pool.close(abort=exc_type is not None)
