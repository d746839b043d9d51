"""bra/cache/reader.py: shuffled, prefetched row streams over conftest's ``tiny_store``: every row once per
epoch, bounded label cache, threads, document selection, saved and restored stream positions."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bra.cache.reader import ReaderConfig, RowStream, document_split
from bra.cache.store import open_store


def test_reader__every_unmasked_row_exactly_once_per_epoch_shuffled(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    mask = store.array("mask")[:]
    expected = np.flatnonzero(~mask)
    stream = RowStream(store, ReaderConfig(layer=1, batch_size=9, buffer_rows=40, seed=5, prefetch=2))
    rows = np.concatenate([b.row for b in stream.epoch(0)])
    assert Counter(rows.tolist()) == Counter(expected.tolist())  # multiset: each row once
    assert not np.array_equal(rows, expected)  # shuffled
    again = np.concatenate([b.row for b in stream.epoch(0)])
    assert np.array_equal(rows, again)  # deterministic given the seed
    other = np.concatenate([b.row for b in stream.epoch(1)])
    assert not np.array_equal(rows, other)  # a new order each epoch
    batch = next(iter(stream.epoch(0)))
    assert np.array_equal(batch.acts, store.read_acts(1, 0, store.n_tokens)[batch.row])
    assert np.array_equal(batch.tier, store.array("tier")[:][batch.row])


def test_reader__label_cache_bounded_and_same_stream(tiny_store: Path, monkeypatch) -> None:
    """The shard label cache changes nothing but speed: with room for one shard only (evicting all the
    time) the stream is identical to one with every shard cached, and it never holds more than allowed."""
    import bra.cache.reader as reader

    store = open_store(tiny_store)
    cfg = ReaderConfig(layer=1, batch_size=9, buffer_rows=40, seed=3, prefetch=2)
    roomy = RowStream(store, cfg)
    want = [(b.row, b.tier, b.doc_index, b.acts) for e in (0, 1) for b in roomy.epoch(e)]
    assert len(roomy._labels) == store.layout.n_shards > 1
    shard_bytes = sum(c.nbytes for c in roomy._labels[0])
    monkeypatch.setattr(reader, "LABEL_CACHE_BYTES", shard_bytes)
    tight = RowStream(store, cfg)
    got = [(b.row, b.tier, b.doc_index, b.acts) for e in (0, 1) for b in tight.epoch(e)]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(g, w, strict=True))
    assert len(tight._labels) == 1 and tight._labels_bytes <= shard_bytes


def test_reader__threads_change_speed_not_order(tiny_store: Path) -> None:
    """More reader threads (the default for stores at URLs) keep the exact stream: chunks are consumed in
    the seeded order whatever finishes first."""
    store = open_store(tiny_store)
    streams = [[b.row for b in RowStream(store, ReaderConfig(layer=1, batch_size=9, buffer_rows=40, seed=2,
                                                             threads=t, prefetch=p)).epoch(0)]
               for t, p in ((1, 1), (8, 16))]
    assert all(np.array_equal(a, b) for a, b in zip(*streams, strict=True))
    assert ReaderConfig(layer=1).resolved(remote=False) == (2, 4)
    assert ReaderConfig(layer=1).resolved(remote=True) == (8, 16)
    assert ReaderConfig(layer=1, threads=3).resolved(remote=True) == (3, 6)
    with pytest.raises(ValueError):
        ReaderConfig(layer=1, threads=0)


def test_reader__concurrent_misses_read_a_shards_labels_once(tiny_store: Path, monkeypatch) -> None:
    """Many threads starting on chunks of the same shards wait for one read of its label columns."""
    import threading
    import time
    from collections import Counter as Count

    store = open_store(tiny_store)
    calls: Count[tuple[str, int]] = Count()
    lock = threading.Lock()
    real = store.read_rows

    def counting(name: str, start: int, stop: int):
        if not name.startswith("acts/"):
            with lock:
                calls[(name, start)] += 1
            time.sleep(0.01)  # widen the window in which other threads miss the same shard
        return real(name, start, stop)

    monkeypatch.setattr(store, "read_rows", counting)
    stream = RowStream(store, ReaderConfig(layer=1, batch_size=9, buffer_rows=40, threads=8, prefetch=16))
    for epoch in (0, 1):
        for _ in stream.epoch(epoch):
            pass
    assert len(calls) == 3 * store.layout.n_shards and set(calls.values()) == {1}


def test_reader__document_selection_and_split_by_document(tiny_store: Path) -> None:
    store = open_store(tiny_store)
    docs = store.docs()
    heldout = document_split(docs, 0.25, seed=1)
    assert heldout.any() and (~heldout).any()
    assert set(docs[heldout]["tier"]) == set(docs["tier"])  # stratified: every tier held out
    assert np.array_equal(heldout, document_split(docs, 0.25, seed=1))
    stream = RowStream(store, ReaderConfig(layer=2, batch_size=16, buffer_rows=64), doc_selected=~heldout)
    seen_docs = {int(d) for b in stream.epoch(0) for d in b.doc_index}
    assert seen_docs == set(np.flatnonzero(~heldout).tolist())


def test_reader__saved_position_continues_the_same_stream(tiny_store: Path, tmp_path: Path) -> None:
    """A cursor's position, saved between any two batches (through torch.save / weights_only load, as a
    checkpoint does), continues with exactly the batches the uninterrupted stream yields next: inside the
    shuffle buffer, across its mixes and across epochs (the forever carry)."""
    from bra.cache.reader import StreamPosition

    store = open_store(tiny_store)
    cfg = ReaderConfig(layer=1, batch_size=7, buffer_rows=30, seed=4, prefetch=2)
    sel = ~document_split(store.docs(), 0.2, seed=0)
    whole = RowStream(store, cfg, doc_selected=sel).forever()
    want = [next(whole) for _ in range(120)]
    whole.close()
    epochs = set()
    for k in (0, 1, 5, 17, 51, 100, 119):
        head = RowStream(store, cfg, doc_selected=sel).forever()
        for _ in range(k):
            next(head)
        epochs.add(head.position().epoch)
        torch.save(head.position().to_state(), tmp_path / "pos.pt")
        head.close()
        saved = torch.load(tmp_path / "pos.pt", weights_only=True)
        tail = RowStream(store, cfg, doc_selected=sel).forever(position=StreamPosition.from_state(saved))
        for w in want[k:]:
            got = next(tail)
            assert all(np.array_equal(getattr(got, f), getattr(w, f))
                       for f in ("row", "acts", "tier", "doc_index")), k
        tail.close()
    assert epochs >= {0, 1, 2}  # positions inside the first three epochs


def test_loop_thread_pool__own_loops_read_what_the_sync_api_reads_and_close(tiny_store: Path) -> None:
    """Reads on a `LoopThreadPool` thread go through that thread's event loop (not zarr's shared one), give
    the same rows, and the loops are closed when the pool shuts down."""
    from bra.cache import parallel, schema

    store = open_store(tiny_store)
    name, size = schema.acts_path(1), store.layout.chunk_tokens
    chunks = range(-(-store.n_tokens // size))

    def read(c: int) -> tuple[object, np.ndarray]:
        return parallel.thread_loop(), store.read_rows(name, c * size, min((c + 1) * size, store.n_tokens))

    pool = parallel.LoopThreadPool(2)
    got = list(pool.map(read, chunks))
    pool.shutdown()
    loops = {id(loop): loop for loop, _ in got}
    assert parallel.thread_loop() is None and all(loop is not None for loop, _ in got) and len(loops) >= 1
    assert all(loop.is_closed() for loop in loops.values())
    assert np.array_equal(np.concatenate([rows for _, rows in got]), store.read_rows(name, 0, store.n_tokens))


def test_reader__own_loops_give_the_same_stream_and_exit_cleanly(tiny_store: Path) -> None:
    """``own_loops`` changes only where chunks decode: the same batches. A stream left open when the
    interpreter exits (its generator finalised then) must not hang: closing its loops once started a
    thread, which blocks at exit."""
    import subprocess
    import sys

    store = open_store(tiny_store)
    cfg = {"layer": 1, "batch_size": 9, "buffer_rows": 40, "seed": 5, "prefetch": 2}
    plain = [b.row for b in RowStream(store, ReaderConfig(**cfg)).epoch(0)]
    own = [b.row for b in RowStream(store, ReaderConfig(**cfg, own_loops=True)).epoch(0)]
    assert len(plain) == len(own) and all(np.array_equal(a, b) for a, b in zip(plain, own, strict=True))
    # the open cursor sits in a reference cycle, so only the collector at interpreter exit closes it (the
    # old shutdown hung here: measured, timeout)
    code = ("import sys; from bra.cache.store import open_store; from bra.cache.reader import ReaderConfig, "
            "RowStream; s = RowStream(open_store(sys.argv[1]), ReaderConfig(layer=1, batch_size=9, "
            "buffer_rows=40, own_loops=True)); it = s.forever(); next(it); next(it); "
            "h = type('Holder', (), {})(); h.me = h; h.it = it; del it, h")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_store)], timeout=120, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
