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
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bra.cache import schema
from bra.cache.store import Store

logger = logging.getLogger(__name__)

# The per-token label columns (mask, doc_index, tier: 6 bytes a token) are read a whole shard at a time and
# kept, up to this many bytes (about 11M tokens): a read call costs the same for 1 chunk as for 16, and
# every epoch needs them again, while the activations (4.6 kB a token at d 2304) are read once per visit.
LABEL_CACHE_BYTES = 64 << 20
LABEL_COLUMNS = ("mask", "doc_index", "tier")
LOCAL_READ_THREADS = 2
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
    """Reader threads (default: 2 on a local disk, 8 for a store at a URL, where each chunk is a request
    that waits on the network: more in flight hide the latency; the data order does not depend on it)."""

    def __post_init__(self) -> None:
        optional = [x for x in (self.prefetch, self.threads) if x is not None]
        if self.batch_size < 1 or self.buffer_rows < 1 or any(x < 1 for x in optional):
            raise ValueError("batch_size, buffer_rows, prefetch and threads must be positive")

    def resolved(self, remote: bool) -> tuple[int, int]:
        """(threads, prefetch) for a local or a remote store."""
        threads = self.threads or (REMOTE_READ_THREADS if remote else LOCAL_READ_THREADS)
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
        lo, hi = self.layout.shard_bounds(shard)
        # read_rows turns a corrupt chunk into a StoreError naming it
        return tuple(self.store.read_rows(name, lo, hi) for name in LABEL_COLUMNS)

    def _read_chunk(self, chunk: int,
                    with_acts: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        start = chunk * self.layout.chunk_tokens
        stop = min(start + self.layout.chunk_tokens, self.layout.n_tokens)
        shard = start // self.layout.shard_tokens
        offset = start - self.layout.shard_bounds(shard)[0]
        mask, doc, tier = (c[offset:offset + stop - start] for c in self._shard_labels(shard))
        keep = ~mask
        g = self.store
        if self.doc_selected is not None:
            keep &= self.doc_selected[doc]
        if self.tier_selected is not None:
            keep &= np.isin(tier, list(self.tier_selected))
        rows = np.flatnonzero(keep)
        acts = None
        if with_acts and len(rows):
            acts = schema.from_storage(g.read_rows(schema.acts_path(self.cfg.layer), start, stop)[rows],
                                       self.store.dtype)
        return rows + start, acts, tier[rows], doc[rows]

    def count_rows(self) -> int:
        """Rows the stream yields per epoch (reads only the small per-token columns)."""
        return sum(len(self._read_chunk(int(c), with_acts=False)[0]) for c in self.chunk_ids)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """Every selected row exactly once, shuffled; the last batch may be short."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order = self.chunk_ids[rng.permutation(len(self.chunk_ids))]
        cap = self.cfg.buffer_rows
        buf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        buf_rows = 0
        pending: list[np.ndarray] = []  # carry of rows not yet batched, as one concatenated block

        def emit(parts, final: bool) -> Iterator[Batch]:
            nonlocal pending
            rows, acts, tier, doc = (np.concatenate([p[i] for p in parts]) for i in range(4))
            perm = rng.permutation(len(rows))
            rows, acts, tier, doc = rows[perm], acts[perm], tier[perm], doc[perm]
            half = len(rows) if final else len(rows) // 2
            out, keep = (rows[:half], acts[:half], tier[:half], doc[:half]), \
                (rows[half:], acts[half:], tier[half:], doc[half:])
            b = self.cfg.batch_size
            n_full = (half // b) * b if not final else half
            for s in range(0, n_full, b):
                yield Batch(out[1][s:s + b], out[2][s:s + b], out[3][s:s + b], out[0][s:s + b])
            leftover = tuple(x[n_full:] for x in out)
            pending = [np.concatenate([leftover[i], keep[i]]) for i in range(4)]

        threads, prefetch = self.cfg.resolved(remote=not self.store.location.is_local)
        with ThreadPoolExecutor(threads, thread_name_prefix="bra-reader") as pool:
            futures = [pool.submit(self._read_chunk, int(c), True) for c in order[:prefetch]]
            next_i = len(futures)
            while futures:
                rows, acts, tier, doc = futures.pop(0).result()
                if next_i < len(order):
                    futures.append(pool.submit(self._read_chunk, int(order[next_i]), True))
                    next_i += 1
                if acts is None:
                    continue
                buf.append((rows, acts, tier, doc))
                buf_rows += len(rows)
                if buf_rows >= cap:
                    yield from emit(buf, final=False)
                    buf = [tuple(pending)]  # type: ignore[list-item]
                    buf_rows = len(pending[0])
        if buf_rows:
            yield from emit(buf, final=True)

    def forever(self, start_epoch: int = 0) -> Iterator[Batch]:
        """Epoch after epoch, batches of exactly batch_size (short epoch tails are carried over)."""
        carry: list[Batch] = []
        epoch = start_epoch
        b = self.cfg.batch_size
        while True:
            any_rows = False
            for batch in self.epoch(epoch):
                any_rows = True
                carry.append(batch)
                n = sum(len(x.row) for x in carry)
                if n >= b:
                    merged = _concat(carry)
                    yield _take(merged, 0, b)
                    rest = _take(merged, b, n)
                    carry = [rest] if len(rest.row) else []
            if not any_rows:
                raise ValueError("the stream selects no rows")
            epoch += 1


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
