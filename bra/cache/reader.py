"""Stream token rows (activations + tier labels) out of a store for training, without loading it into RAM.

Random row gathers from compressed chunks are hundreds of times slower than sequential reads, so the
shuffle happens in two stages: chunks are visited in a seeded random order (decompressed by background
threads, ahead of use) and their rows are mixed in an in-memory buffer (SAELens-style mixing buffer:
fill, permute, emit half, keep half). Peak memory is about ``buffer_rows`` + ``prefetch`` chunks plus the
label cache (at most ``LABEL_CACHE_BYTES``), whatever the store size. Masked rows (attention sink, BOS)
and rows of documents outside the split are dropped. Everything is a pure function of (store, config,
epoch), so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from bra.cache import schema
from bra.cache.parallel import LoopThreadPool
from bra.cache.store import Store

logger = logging.getLogger(__name__)

# The per-token label columns (mask, doc_index, tier: 6 bytes a token) are read a whole shard at a time and
# kept, up to this many bytes (about 11M tokens): a read call costs the same for 1 chunk as for 16, and
# every epoch needs them again, while the activations (4.6 kB a token at d 2304) are read once per visit.
LABEL_CACHE_BYTES = 64 << 20
LABEL_COLUMNS = ("mask", "doc_index", "tier")
LOCAL_READ_THREADS = 2
"""Reader threads on a local disk; with ``own_loops``, the fewest (more with more cores, up to
``MAX_LOCAL_READ_THREADS``)."""
MAX_LOCAL_READ_THREADS = 8
"""One reader thread decodes ~100k-200k rows/s at d_model 576 here (its own event loop, default codec), a
few times fewer at 2304, while a GPU step at batch 4096 wants several hundred thousand: a fit on a GPU host
needs several cores reading (``own_loops``)."""
REMOTE_READ_THREADS = 8


@dataclass(frozen=True)
class ReaderConfig:
    """How rows are streamed."""

    layer: int
    """Hooked layer to read."""
    batch_size: int = 4096
    """Rows per batch."""
    buffer_rows: int = 65536
    """Shuffle buffer capacity in rows (memory: buffer_rows x d_model x 4 bytes)."""
    seed: int = 0
    """Seed of chunk order and buffer permutations."""
    prefetch: int | None = None
    """Chunks requested ahead by background threads (default: twice the threads)."""
    threads: int | None = None
    """Reader threads (default: on a local disk 2, or with ``own_loops`` the cores, at most 8; 8 for a store
    at a URL, where each chunk is a request that waits on the network: more in flight hide the latency; the
    data order does not depend on it)."""
    own_loops: bool = False
    """Local stores: each reader thread decodes on its own event loop (`bra.cache.parallel.LoopThreadPool`),
    so chunks decompress on several cores at once (2 threads read 1.3-1.4x one here, where zarr's shared
    loop gives 1.05x): what a fit on a GPU needs. Off for a CPU fit, whose SAE step wants those cores:
    training steps/s from the store ÷ from RAM was 0.94 with it and 1.00 without (d_model 576, 2 cores,
    interleaved, best of 5, load under 1)."""

    def __post_init__(self) -> None:
        optional = [x for x in (self.prefetch, self.threads) if x is not None]
        if self.batch_size < 1 or self.buffer_rows < 1 or any(x < 1 for x in optional):
            raise ValueError("batch_size, buffer_rows, prefetch and threads must be positive")

    def resolved(self, remote: bool) -> tuple[int, int]:
        """(threads, prefetch) for a local or a remote store."""
        from bra.dist import cpu_cores  # bra.dist imports torch: only a stream being read needs it

        local = max(LOCAL_READ_THREADS, min(MAX_LOCAL_READ_THREADS, cpu_cores())) if self.own_loops \
            else LOCAL_READ_THREADS
        threads = self.threads or (REMOTE_READ_THREADS if remote else local)
        return threads, self.prefetch or 2 * threads


@dataclass(frozen=True)
class Batch:
    """Rows of one training batch."""

    acts: np.ndarray
    """[B, d_model] float32 activations."""
    tier: np.ndarray
    """[B] int8 tier codes."""
    doc_index: np.ndarray
    """[B] int32 document of each row."""
    row: np.ndarray
    """[B] int64 store row index (for error messages and the exactly-once test)."""


def document_split(docs: pd.DataFrame, heldout_fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean [n_docs]: True for held-out documents.

    Split by document, never by token, stratified by tier; membership depends only on (seed, doc_id),
    so rebuilding the store does not move documents between splits.
    """
    heldout = np.zeros(len(docs), dtype=bool)
    if heldout_fraction <= 0:
        return heldout
    keys = np.array([hashlib.sha256(f"{seed}:{d}".encode()).hexdigest() for d in docs["doc_id"]])
    for _, group in docs.groupby("tier"):
        idx = group.index.to_numpy()
        n = len(idx)
        take = int(round(n * heldout_fraction))
        take = min(max(take, 1 if n >= 2 else 0), n - 1) if n > 1 else 0
        order = idx[np.argsort(keys[idx], kind="stable")]
        heldout[docs.loc[order[:take], "doc_index"].to_numpy()] = True
    return heldout


class RowStream:
    """Shuffled, prefetched stream of rows of selected documents of one store layer."""

    def __init__(self, store: Store, cfg: ReaderConfig, doc_selected: np.ndarray | None = None,
                 tier_selected: set[int] | None = None, shards: Sequence[int] | None = None):
        self.store = store
        self.cfg = cfg
        self.layout = store.layout
        self.acts = store.acts(cfg.layer)
        self.doc_selected = doc_selected
        self.tier_selected = tier_selected
        self.n_chunks = -(-self.layout.n_tokens // self.layout.chunk_tokens)
        # the chunks visited: all, or those of ``shards`` (one rank's disjoint share in a distributed fit)
        self.chunk_ids = np.arange(self.n_chunks) if shards is None else shard_chunks(self.layout, shards)
        self._labels: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()  # shard -> LABEL_COLUMNS (LRU)
        self._labels_bytes = 0
        self._labels_lock = threading.Lock()
        self._loading: dict[int, threading.Event] = {}  # shards whose labels a thread is reading now

    def _shard_labels(self, shard: int) -> tuple[np.ndarray, ...]:
        """``LABEL_COLUMNS`` of a whole shard, from the LRU cache or the store (see ``LABEL_CACHE_BYTES``).
        Threads that miss the same shard at once wait for one read (at the start of an epoch many prefetched
        chunks fall in few shards; on object storage each read is three requests)."""
        with self._labels_lock:
            hit = self._labels.get(shard)
            if hit is not None:
                self._labels.move_to_end(shard)
                return hit
            loading = self._loading.get(shard)
            if loading is None:
                self._loading[shard] = threading.Event()
        if loading is not None:
            loading.wait()
            with self._labels_lock:
                hit = self._labels.get(shard)
            if hit is not None:
                return hit
            return self._read_labels(shard)  # the other read failed, or the shard was evicted at once
        try:
            cols = self._read_labels(shard)
            with self._labels_lock:
                if shard not in self._labels:
                    self._labels[shard] = cols
                    self._labels_bytes += sum(c.nbytes for c in cols)
                    while self._labels_bytes > LABEL_CACHE_BYTES and len(self._labels) > 1:
                        _, old = self._labels.popitem(last=False)
                        self._labels_bytes -= sum(c.nbytes for c in old)
            return cols
        finally:
            with self._labels_lock:
                self._loading.pop(shard).set()

    def _read_labels(self, shard: int) -> tuple[np.ndarray, ...]:
        """``LABEL_COLUMNS`` of a shard, and for a scaled (fp8) store the layer's per-row scales (4 bytes a
        token, cached with the labels: a chunk's rows then need one read)."""
        lo, hi = self.layout.shard_bounds(shard)
        # read_rows turns a corrupt chunk into a StoreError naming it
        cols = tuple(self.store.read_rows(name, lo, hi) for name in LABEL_COLUMNS)
        scales = self.store.read_scales(self.cfg.layer, lo, hi)
        return cols if scales is None else (*cols, scales)

    def _read_chunk(self, chunk: int,
                    with_acts: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        start = chunk * self.layout.chunk_tokens
        stop = min(start + self.layout.chunk_tokens, self.layout.n_tokens)
        shard = start // self.layout.shard_tokens
        offset = start - self.layout.shard_bounds(shard)[0]
        mask, doc, tier, *scale = (c[offset:offset + stop - start] for c in self._shard_labels(shard))
        keep = ~mask
        g = self.store
        if self.doc_selected is not None:
            keep &= self.doc_selected[doc]
        if self.tier_selected is not None:
            keep &= np.isin(tier, list(self.tier_selected))
        rows = np.flatnonzero(keep)
        acts = None
        if with_acts and len(rows):
            raw = g.read_rows(schema.acts_path(self.cfg.layer), start, stop)[rows]
            acts = schema.decode_rows(raw, self.store.dtype, scale[0][rows] if scale else None)
        return rows + start, acts, tier[rows], doc[rows]

    def count_rows(self) -> int:
        """Rows the stream yields per epoch (reads only the small per-token columns)."""
        return sum(len(self._read_chunk(int(c), with_acts=False)[0]) for c in self.chunk_ids)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Every selected row exactly once, shuffled; the last batch may be short."""
        cursor = RowCursor(self, StreamPosition.start(epoch), forever=False)
        try:
            yield from cursor
        finally:
            cursor.close()

    def forever(self, start_epoch: int = 0, position: StreamPosition | None = None) -> RowCursor:
        """Epoch after epoch, batches of exactly batch_size (short epoch tails are carried over).

        ``position`` (a `RowCursor.position` of an earlier stream with the same store and config) continues
        that stream exactly where it stood, without reading the chunks before it."""
        return RowCursor(self, position or StreamPosition.start(start_epoch), forever=True)

    def chunk_order(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
        """The seeded chunk order of ``epoch`` and the epoch's RNG after drawing it (the buffer's shuffles
        continue from there)."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        return self.chunk_ids[rng.permutation(len(self.chunk_ids))], rng

    def read_rows_of(self, rows: np.ndarray, pool: ThreadPoolExecutor, window: int) -> Batch:
        """The (selected) store ``rows``, in the given order, read chunk by chunk (``window`` chunks in flight
        on ``pool``): how a resumed stream gets back the rows its buffer held."""
        chunk_of = rows // self.layout.chunk_tokens
        chunks = np.unique(chunk_of)
        by_chunk = np.argsort(chunk_of, kind="stable")
        bounds = np.searchsorted(chunk_of[by_chunk], chunks, side="left").tolist() + [len(rows)]
        places, parts = [], []
        futures = deque(pool.submit(self._read_chunk, int(c), True) for c in chunks[:window])
        for i in range(len(chunks)):
            got_rows, acts, tier, doc = futures.popleft().result()
            if i + window < len(chunks):
                futures.append(pool.submit(self._read_chunk, int(chunks[i + window]), True))
            place = by_chunk[bounds[i]:bounds[i + 1]]
            at = np.searchsorted(got_rows, rows[place])
            if acts is None or (at >= len(got_rows)).any() or not np.array_equal(got_rows[at], rows[place]):
                raise ValueError(f"store {self.store.path} no longer holds rows of chunk {int(chunks[i])} "
                                 f"that this stream position refers to (was the store rebuilt?)")
            places.append(place)
            parts.append(Batch(acts[at], tier[at], doc[at], rows[place]))
        if not parts:
            return _empty(self.store.d_model)
        merged = _concat(parts)
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[np.concatenate(places)] = np.arange(len(rows))
        return _take_index(merged, inverse)


@dataclass(frozen=True)
class StreamPosition:
    """Where a `RowCursor` stands between two batches; `RowStream.forever(position=...)` continues from it.

    Rows are kept as store row indices, not activations: a resumed stream re-reads them (a few chunks)
    instead of replaying every batch before it. Saved with each `bra-sae fit` checkpoint (`to_state`)."""

    epoch: int
    """Epoch being read."""
    next_chunk: int
    """Index into the epoch's seeded chunk order (`RowStream.chunk_order`) of the next chunk to read."""
    rng_state: dict[str, Any] | None
    """The epoch RNG's bit-generator state after its last draw; None before the epoch's first draw."""
    queued: np.ndarray
    """[n] int64 rows already shuffled into output order and not yet yielded (a forever carry included)."""
    buffer: np.ndarray
    """[m] int64 rows in the shuffle buffer, in buffer order."""

    @classmethod
    def start(cls, epoch: int = 0) -> StreamPosition:
        """The position before the first batch of ``epoch``."""
        return cls(epoch, 0, None, np.zeros(0, np.int64), np.zeros(0, np.int64))

    def to_state(self) -> dict[str, Any]:
        """Plain ints, strings and tensors (what ``torch.load(weights_only=True)`` reads back)."""
        import torch

        return {"version": POSITION_VERSION, "epoch": self.epoch, "next_chunk": self.next_chunk,
                "rng_state": self.rng_state, "queued": torch.from_numpy(self.queued.astype(np.int64)),
                "buffer": torch.from_numpy(self.buffer.astype(np.int64))}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StreamPosition:
        """Inverse of `to_state`; ValueError for a state this version cannot continue."""
        if state.get("version") != POSITION_VERSION:
            raise ValueError(f"stream position version {state.get('version')!r} "
                             f"(expected {POSITION_VERSION})")
        return cls(int(state["epoch"]), int(state["next_chunk"]), state["rng_state"],
                   np.asarray(state["queued"], dtype=np.int64), np.asarray(state["buffer"], dtype=np.int64))


POSITION_VERSION = 1


class RowCursor:
    """Iterator over a `RowStream`'s batches whose `position` can be saved between any two batches.

    The stream is a sequence of shuffles: chunks enter the buffer in the epoch's seeded order; when it
    holds ``buffer_rows`` rows it is permuted, the first half goes to the output queue and the rest stays
    (SAELens mixing buffer); at the epoch's end the remainder is permuted and queued whole. Batches are
    cut from the queue: ``batch_size`` rows each, plus, without ``forever``, a short last one per epoch.
    """

    def __init__(self, stream: RowStream, position: StreamPosition, forever: bool):
        self.stream = stream
        self.forever = forever
        self._epoch, self._next_chunk = position.epoch, position.next_chunk
        self._rng: np.random.Generator | None = None
        if position.rng_state is not None:
            self._rng = np.random.Generator(np.random.PCG64())
            self._rng.bit_generator.state = position.rng_state
        self._restore = position if len(position.queued) or len(position.buffer) else None
        self._queued = _empty(stream.store.d_model)
        self._queued_rows = position.queued  # re-read (with the buffer's rows) on the first next()
        self._buffer: list[Batch] = []
        self._buffer_rows = position.buffer
        self._gen = self._run()

    def __iter__(self) -> RowCursor:
        return self

    def __next__(self) -> Batch:
        return next(self._gen)

    def close(self) -> None:
        """Stop the reader threads."""
        self._gen.close()

    def position(self) -> StreamPosition:
        """Where the stream stands now (before the batch the next ``next`` returns)."""
        if self._restore is not None:  # not started since the restore: nothing moved
            return self._restore
        buffer = (np.concatenate([p.row for p in self._buffer]) if self._buffer else np.zeros(0, np.int64))
        return StreamPosition(self._epoch, self._next_chunk,
                              None if self._rng is None else self._rng.bit_generator.state,
                              self._queued.row.astype(np.int64), buffer.astype(np.int64))

    def _run(self) -> Iterator[Batch]:
        stream, b = self.stream, self.stream.cfg.batch_size
        threads, prefetch = stream.cfg.resolved(remote=not stream.store.location.is_local)
        while True:
            order, rng = stream.chunk_order(self._epoch)
            resumed = self._next_chunk > 0 or self._restore is not None
            if self._rng is None:
                self._rng = rng
            any_rows = resumed
            with (LoopThreadPool(threads) if stream.cfg.own_loops and stream.store.location.is_local
                  else ThreadPoolExecutor(threads, thread_name_prefix="bra-reader")) as pool:
                if self._restore is not None:
                    self._reread(pool, prefetch)
                futures = deque(pool.submit(stream._read_chunk, int(c), True)
                                for c in order[self._next_chunk:self._next_chunk + prefetch])
                next_i = self._next_chunk + len(futures)
                while futures:
                    part = Batch(*_reorder(futures.popleft().result()))
                    self._next_chunk += 1
                    if next_i < len(order):
                        futures.append(pool.submit(stream._read_chunk, int(order[next_i]), True))
                        next_i += 1
                    if part.acts is None:
                        continue
                    any_rows = True
                    self._buffer.append(part)
                    if sum(len(p.row) for p in self._buffer) >= stream.cfg.buffer_rows:  # full
                        self._mix(final=False)
                        while len(self._queued.row) >= b:
                            yield self._pop(b)
            if self._buffer:
                self._mix(final=True)
            while len(self._queued.row) >= b:
                yield self._pop(b)
            if not self.forever:
                if len(self._queued.row):
                    yield self._pop(len(self._queued.row))
                return
            if not any_rows:
                raise ValueError("the stream selects no rows")
            self._epoch, self._next_chunk, self._rng = self._epoch + 1, 0, None

    def _reread(self, pool: ThreadPoolExecutor, window: int) -> None:
        """Read back the rows of the restored position's queue and buffer."""
        queued, buffer = self._queued_rows, self._buffer_rows
        both = self.stream.read_rows_of(np.concatenate([queued, buffer]), pool, window)
        self._queued = _take(both, 0, len(queued))
        self._buffer = [_take(both, len(queued), len(both.row))] if len(buffer) else []
        self._restore = None
        logger.info("stream resumed at epoch %d, chunk %d: %d queued and %d buffered rows re-read",
                    self._epoch, self._next_chunk, len(queued), len(buffer))

    def _mix(self, final: bool) -> None:
        """Permute the buffer; queue its first half (all of it when ``final``), keep the rest."""
        assert self._rng is not None
        merged = _concat(self._buffer)
        merged = _take_index(merged, self._rng.permutation(len(merged.row)))
        n = len(merged.row)
        half = n if final else n // 2
        b = self.stream.cfg.batch_size
        # queue whole batches only; the rest of the half goes back to the front of the buffer
        n_out = half if final else (half // b) * b
        out = _take(merged, 0, n_out)
        self._queued = _concat([self._queued, out]) if len(self._queued.row) else out
        keep = _take(merged, n_out, n)
        self._buffer = [keep] if len(keep.row) else []

    def _pop(self, n: int) -> Batch:
        batch = _take(self._queued, 0, n)
        self._queued = _take(self._queued, n, len(self._queued.row))
        return batch


def shard_chunks(layout: schema.StoreLayout, shards: Sequence[int]) -> np.ndarray:
    """Ids of the chunks inside ``shards``, ascending."""
    per = layout.shard_tokens // layout.chunk_tokens
    n_chunks = -(-layout.n_tokens // layout.chunk_tokens)
    ids = np.concatenate([np.arange(s * per, (s + 1) * per) for s in sorted(shards)] or [np.zeros(0, int)])
    return ids[ids < n_chunks].astype(np.int64)


def _concat(batches: list[Batch]) -> Batch:
    return Batch(*(np.concatenate([getattr(x, f) for x in batches])
                   for f in ("acts", "tier", "doc_index", "row")))


def _take(b: Batch, start: int, stop: int) -> Batch:
    return Batch(b.acts[start:stop], b.tier[start:stop], b.doc_index[start:stop], b.row[start:stop])


def _take_index(b: Batch, index: np.ndarray) -> Batch:
    return Batch(b.acts[index], b.tier[index], b.doc_index[index], b.row[index])


def _empty(d_model: int) -> Batch:
    return Batch(np.zeros((0, d_model), np.float32), np.zeros(0, np.int8), np.zeros(0, np.int32),
                 np.zeros(0, np.int64))


def _reorder(chunk: tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]) -> tuple:
    """`RowStream._read_chunk`'s (rows, acts, tier, doc) in `Batch` field order."""
    rows, acts, tier, doc = chunk
    return acts, tier, doc, rows
