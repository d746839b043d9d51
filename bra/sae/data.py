"""What `fit`, `eval` and `score` need from a store: the layer, input scale, document split and row
streams."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bra.cache.reader import Batch, ReaderConfig, RowStream, StreamPosition, document_split
from bra.cache.store import Store
from bra.errors import SAEError

logger = logging.getLogger(__name__)


def pick_layer(store: Store, layer: int | None) -> int:
    """The requested layer, or the store's first; refuse one the store lacks."""
    if layer is None:
        return store.layers[0]
    if layer not in store.layers:
        raise SAEError(f"layer {layer} is not in store {store.path} (it has {store.layers})")
    return layer


@dataclass(frozen=True)
class TrainingData:
    """Store-derived facts a fit needs."""

    layer: int
    """Hooked layer."""
    input_scale: float
    """sqrt(d_model / mean squared norm): training inputs then have mean squared norm d_model."""
    mean: np.ndarray
    """[d_model] mean activation (masked rows excluded)."""
    heldout: np.ndarray
    """[n_docs] bool, True for held-out documents."""
    doc_hazard: np.ndarray
    """[n_docs] bool, the hazard label of each document (permuted when shuffle_tiers)."""
    doc_ids: list[str]
    """Document ids, to record the split."""


def training_data(store: Store, layer: int | None, heldout_fraction: float, seed: int,
                  shuffle_tiers: bool) -> TrainingData:
    """Read statistics, split documents, and label each document hazard or not."""
    layer = pick_layer(store, layer)
    stats = store.stats(layer)
    mean = np.asarray(stats["mean"], dtype=np.float64)
    msn = float(stats["mean_sq_norm"])
    if not np.isfinite(mean).all() or not np.isfinite(msn):
        raise SAEError(f"store {store.path} layer {layer} has NaN/inf activations (its statistics are not "
                       f"finite); rebuild it or check the model's compute dtype")
    if stats["count"] == 0 or msn <= 0:
        raise SAEError(f"store {store.path} has no unmasked rows at layer {layer}")
    docs = store.docs()
    hazard_names = set(store.meta.hazard_tiers or ())
    doc_hazard = docs["tier"].isin(hazard_names).to_numpy()
    if shuffle_tiers:
        doc_hazard = np.random.default_rng([seed, 7]).permutation(doc_hazard)
    heldout = document_split(docs, heldout_fraction, seed)
    return TrainingData(layer, float(np.sqrt(store.d_model / msn)), mean, heldout, doc_hazard,
                        docs["doc_id"].tolist())


def rank_shards(n_shards: int, rank: int, world: int) -> np.ndarray:
    """The shards one rank of a distributed fit reads: every ``world``-th, from ``rank`` (disjoint, and
    interleaved so that every rank sees every part of the store: its tiers are stored one after another)."""
    return np.arange(rank, n_shards, world)


def _docs_in_shards(store: Store, shards: Sequence[int]) -> np.ndarray:
    """[n_docs] bool: documents with at least one row in ``shards``."""
    docs, size = store.docs(), store.layout.shard_tokens
    first = docs["token_offset"].to_numpy() // size
    last = (docs["token_offset"].to_numpy() + docs["n_tokens"].to_numpy() - 1) // size
    owned = np.zeros(store.layout.n_shards + 1, dtype=np.int64)
    owned[np.asarray(shards, dtype=np.int64) + 1] = 1
    cum = np.cumsum(owned)  # cum[i] = owned shards before shard i
    return cum[last + 1] - cum[first] > 0


class TrainBatches:
    """Endless (batch, hazard label per row) pairs from training documents, with a saveable position.

    Balanced: half of each batch from hazard documents and half from the rest (two independent streams,
    so the smaller class simply cycles more often); otherwise one stream. `position` is the state of every
    stream (`StreamPosition.to_state`); `seek` to it continues exactly there, reading only the chunks of
    the rows the streams' buffers held.
    """

    def __init__(self, data: TrainingData, streams: list[RowStream]):
        self.data = data
        self.streams = streams
        self.cursors = [s.forever() for s in streams]

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[Batch, np.ndarray]:
        parts = [next(c) for c in self.cursors]
        batch = parts[0] if len(parts) == 1 else Batch(*(np.concatenate([getattr(p, f) for p in parts])
                                                        for f in ("acts", "tier", "doc_index", "row")))
        return batch, self.data.doc_hazard[batch.doc_index]

    def position(self) -> dict[str, Any]:
        """The state of every stream before the next batch (plain values and tensors, for ``torch.save``)."""
        return {"streams": [c.position().to_state() for c in self.cursors]}

    def seek(self, position: dict[str, Any]) -> None:
        """Continue from a `position` of batches over the same store and settings."""
        states = list(position["streams"])
        if len(states) != len(self.streams):
            raise ValueError(f"the data position has {len(states)} streams, this fit {len(self.streams)}")
        self.close()
        self.cursors = [s.forever(position=StreamPosition.from_state(st))
                        for s, st in zip(self.streams, states, strict=True)]

    def close(self) -> None:
        """Stop the reader threads."""
        for c in self.cursors:
            c.close()


def train_batches(store: Store, data: TrainingData, batch_size: int, buffer_rows: int, seed: int,
                  balanced: bool, shards: Sequence[int] | None = None,
                  own_loops: bool = False) -> TrainBatches:
    """The batches of a fit (see `TrainBatches`). ``shards``: read only those (one rank's share of a
    distributed fit). ``own_loops``: decode on several cores (`ReaderConfig.own_loops`: a fit on a GPU)."""
    train = ~data.heldout
    if shards is not None:
        inside = _docs_in_shards(store, shards)
        groups = [("hazard", train & data.doc_hazard), ("benign", train & ~data.doc_hazard)] if balanced \
            else [("training", train)]
        for label, sel in groups:
            if sel.any() and not (sel & inside).any():
                raise SAEError(f"this rank's shards of {store.path} hold no {label} rows; use more, smaller "
                               f"shards (storage.shard_tokens) or fewer processes")
    streams: list[RowStream] = []
    if balanced:
        half = batch_size // 2
        for label, sel in (("hazard", train & data.doc_hazard), ("benign", train & ~data.doc_hazard)):
            if not sel.any():
                raise SAEError(f"the {label} tier has no training documents in store {store.path} "
                               f"(balanced sampling needs both; use --no-balanced or add data)")
            cfg = ReaderConfig(layer=data.layer, batch_size=half if label == "hazard" else batch_size - half,
                               buffer_rows=max(buffer_rows // 2, 1),
                               seed=seed + (0 if label == "hazard" else 1), own_loops=own_loops)
            streams.append(RowStream(store, cfg, doc_selected=sel, shards=shards))
    else:
        if not train.any():
            raise SAEError(f"store {store.path} has no training documents")
        cfg = ReaderConfig(layer=data.layer, batch_size=batch_size, buffer_rows=buffer_rows, seed=seed,
                           own_loops=own_loops)
        streams.append(RowStream(store, cfg, doc_selected=train, shards=shards))
    return TrainBatches(data, streams)


def check_finite(batch: Batch) -> None:
    """Refuse NaN/inf activations, naming the first offending store row and document."""
    bad = ~np.isfinite(batch.acts).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise SAEError(f"NaN/inf activation at store row {int(batch.row[i])} (document index "
                       f"{int(batch.doc_index[i])}); refusing to train on it")
