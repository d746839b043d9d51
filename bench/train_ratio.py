"""Study 4: training steps/s streaming the store ÷ from the same rows in an in-RAM tensor (issue 4), and
peak RSS of reading a store much larger than the shuffle buffer.

Both sides run the product's `bra.sae.trainer.Trainer` with one TrainConfig (the product's defaults for the
loss terms: NT-Xent tier term, AuxK, balanced batches on the store side) on a fresh SAE from the same init.
The store side is `fit`'s own data path (`bra.sae.data.train_batches`: shuffled chunk order, background
decompression, mixing buffer, masked rows skipped, NaN check); the RAM side slices batches out of one
preloaded tensor of the same training rows, permuted once per epoch (the cheapest loader there is).
The store is study 1's store tiled several times (rows repeated, documents renamed), so it is many times
larger than the shuffle buffer; tiling changes nothing a timing depends on.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._common import (
    PeakSampler,
    Row,
    StudyResult,
    dir_bytes,
    interleaved,
    max_rss_bytes,
    median,
    rss_bytes,
)
from bench._context import BenchContext
from bench._stores import copy_store
from bench._worker import run_task
from bra.cache.reader import ReaderConfig, RowStream
from bra.cache.store import Store, open_store
from bra.sae.config import StreamConfig, TrainConfig
from bra.sae.data import TrainingData, check_finite, train_batches, training_data
from bra.sae.model import SAEConfig, TopKSAE
from bra.sae.train import resolve_device
from bra.sae.trainer import DataProvider, StoreInputs, Trainer, TrainInput

logger = logging.getLogger(__name__)

TARGET = "≥ 0.95"
"""Issue 18 (issue 4 asked ≥ 0.9)."""


def _trainer(store: Store, data: TrainingData, tcfg: TrainConfig, inputs: DataProvider,
             device: torch.device, n_steps: int) -> Trainer:
    """The product's `Trainer` on a fresh SAE from the same init, for ``n_steps`` steps (no run folder)."""
    sae_cfg = SAEConfig(d_model=store.d_model, d_sae=tcfg.d_sae, k=tcfg.k, input_scale=data.input_scale)
    sae = TopKSAE.init_random(sae_cfg, tcfg.seed, torch.as_tensor(data.mean, dtype=torch.float32)).to(device)
    return Trainer(sae, inputs, dataclasses.replace(tcfg, steps=n_steps), progress=False)


def _timed_fit(trainer: Trainer, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds of ``steps`` `Trainer.fit` steps after ``warmup`` untimed ones."""
    trainer.fit(stop_at=warmup)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit(stop_at=warmup + steps)
    _sync(device)
    return time.perf_counter() - t0


def steps_from_store(store: Store, data: TrainingData, tcfg: TrainConfig, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps fed by `train_batches` (after ``warmup`` untimed steps)."""
    device = resolve_device(tcfg.device)
    batches = train_batches(store, data, tcfg.batch_size, tcfg.stream.buffer_rows, tcfg.seed, tcfg.balanced,
                            own_loops=device.type != "cpu")  # as `fit` reads
    try:
        trainer = _trainer(store, data, tcfg, StoreInputs(batches, device), device, warmup + steps)
        return _timed_fit(trainer, device, warmup, steps)
    finally:
        batches.close()


def preload(store: Store, data: TrainingData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows `train_batches` draws from (unmasked rows of training documents), in RAM."""
    keep = ~store.array("mask")[:]
    doc = store.array("doc_index")[:]
    keep &= ~data.heldout[doc]
    x = store.read_acts(data.layer, 0, store.n_tokens)[keep]
    return (
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(data.doc_hazard[doc[keep]].astype(np.int64)),
        torch.from_numpy(doc[keep].astype(np.int64)),
    )


def ram_inputs(rows: tuple[torch.Tensor, ...], batch_size: int, seed: int,
               device: torch.device) -> Iterator[TrainInput]:
    """Batches sliced from the preloaded rows, permuted once per epoch (the cheapest loader there is)."""
    X, H, D = rows
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(X), generator=gen), 0
    while True:
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(X), generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield TrainInput(X[idx].to(device), H[idx].to(device), D[idx].to(device))


def steps_from_ram(
    store: Store,
    data: TrainingData,
    tcfg: TrainConfig,
    rows: tuple[torch.Tensor, ...],
    warmup: int,
    steps: int,
) -> float:
    """Seconds for ``steps`` steps on batches sliced from the preloaded rows (permuted once per epoch)."""
    device = resolve_device(tcfg.device)
    inputs = ram_inputs(rows, tcfg.batch_size, tcfg.seed, device)
    return _timed_fit(_trainer(store, data, tcfg, inputs, device, warmup + steps), device, warmup, steps)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reader_rows_per_s(store: Store, data: TrainingData, tcfg: TrainConfig, n_batches: int) -> float:
    """Rows per second the store path delivers with no SAE step (`train_batches` + the NaN check)."""
    batches = train_batches(store, data, tcfg.batch_size, tcfg.stream.buffer_rows, tcfg.seed, tcfg.balanced)
    next(batches)
    rows, t0 = 0, time.perf_counter()
    for _ in range(n_batches):
        batch, _hazard = next(batches)
        check_finite(batch)
        rows += len(batch.row)
    seconds = time.perf_counter() - t0
    batches.close()
    return rows / seconds


def _timed_pair(
    store: Store, data: TrainingData, tcfg: TrainConfig, warmup: int, steps: int, reps: int
) -> dict[str, list[float]]:
    """Interleaved store / RAM repetitions (the preloaded rows are freed when this returns)."""
    ram_rows = preload(store, data)
    return interleaved(
        {
            "store": lambda: steps_from_store(store, data, tcfg, warmup, steps),
            "ram": lambda: steps_from_ram(store, data, tcfg, ram_rows, warmup, steps),
        },
        reps,
    )


def rss_read_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker: stream one epoch of a store through `RowStream`; report baseline and peak RSS."""
    torch.set_num_threads(int(spec["threads"]))
    store = open_store(spec["store"])
    cfg = ReaderConfig(
        layer=store.layers[0], batch_size=int(spec["batch_size"]), buffer_rows=int(spec["buffer_rows"])
    )
    stream = RowStream(store, cfg)
    gc.collect()
    baseline = rss_bytes()
    rows, t0 = 0, time.perf_counter()
    with PeakSampler() as sampler:
        for batch in stream.epoch(0):
            rows += len(batch.row)
    return {
        "baseline_rss": baseline,
        "peak_rss": sampler.peak,
        "ru_maxrss": max_rss_bytes(),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "n_tokens": store.n_tokens,
        "d_model": store.d_model,
        "disk_bytes": dir_bytes(Path(spec["store"])),
    }


def run(ctx: BenchContext) -> StudyResult:
    """Interleaved store/RAM repetitions, then the RSS workers."""
    cfg = ctx.cfg
    store1, _ = ctx.ensure_store()
    tiled = copy_store(store1, ctx.work / "tiled.zarr", copies=cfg.rss_tile)
    store = open_store(tiled)
    tcfg = TrainConfig(
        d_sae=cfg.train_d_sae,
        k=cfg.sae_k,
        batch_size=cfg.train_batch,
        stream=StreamConfig(buffer_rows=cfg.train_buffer_rows),
        steps=cfg.train_steps,
        device=cfg.device,
        contrastive_rows=min(512, cfg.train_batch),
    )
    data = training_data(store, None, tcfg.heldout_fraction, tcfg.seed, tcfg.shuffle_tiers)
    w, s = cfg.train_warmup, cfg.train_steps
    times = _timed_pair(store, data, tcfg, w, s, cfg.train_reps)
    gc.collect()
    # best of N per side: other jobs on a shared machine only ever add time, in bursts
    sps_store, sps_ram = s / min(times["store"]), s / min(times["ram"])
    per_rep = [r / st for st, r in zip(times["store"], times["ram"], strict=True)]
    ratio = sps_store / sps_ram
    reader_rps = reader_rows_per_s(store, data, tcfg, 4 * s)

    spec = {"batch_size": cfg.train_batch, "buffer_rows": cfg.train_buffer_rows, "threads": ctx.threads}
    rss = {
        "1x": run_task("rss-read", {**spec, "store": str(store1)}, cfg.isolate),
        f"{cfg.rss_tile}x": run_task("rss-read", {**spec, "store": str(tiled)}, cfg.isolate),
    }
    d = store.d_model
    buf_mb = cfg.train_buffer_rows * d * 4 / 2**20
    big = rss[f"{cfg.rss_tile}x"]
    small = rss["1x"]
    delta = {k: (v["peak_rss"] - v["baseline_rss"]) / 2**20 for k, v in rss.items()}
    big_mb = big["n_tokens"] * d * 4 / 2**20
    note = (
        f"{store.n_tokens:,}-row store ({big_mb:.0f} MiB as fp32, {big['disk_bytes'] / 2**20:.0f} "
        "MiB on disk), "
        f"buffer {cfg.train_buffer_rows:,} rows ({buf_mb:.1f} MiB fp32); batch {tcfg.batch_size}, d_sae "
        f"{tcfg.d_sae}, k {tcfg.k}, {s} timed steps after {w}, best of {cfg.train_reps} interleaved reps "
        f"each (per-rep ratios {', '.join(f'{r:.3f}' for r in per_rep)}; their median {median(per_rep):.3f})"
    )
    rows_out = [
        Row("train", "training steps/s from store ÷ from in-RAM tensor", round(ratio, 3), "×", TARGET, note),
        Row("train", "steps/s streaming the store", round(sps_store, 2), "steps/s"),
        Row("train", "steps/s from the in-RAM tensor", round(sps_ram, 2), "steps/s"),
        Row(
            "train",
            "store reader alone (no SAE step), rows/s",
            round(reader_rps),
            "rows/s",
            note=f"{reader_rps / sps_ram / tcfg.batch_size:.1f}× the rows the in-RAM side consumed per "
            f"second; reading takes about {sps_ram * tcfg.batch_size / reader_rps:.0%} of the CPU time of a "
            "step",
        ),
        Row(
            "train",
            f"peak RSS above baseline, reading a store {big['n_tokens'] // cfg.train_buffer_rows}× "
            "the buffer",
            round(delta[f"{cfg.rss_tile}x"], 1),
            "MiB",
            note=f"store {big_mb:.0f} MiB as fp32; buffer {buf_mb:.1f} MiB; the {cfg.rss_tile}× "
            "smaller store "
            f"({small['n_tokens']:,} rows) peaked at {delta['1x']:.1f} MiB above baseline",
        ),
    ]
    details = {
        "train_config": tcfg.to_dict(),
        "store_rows": store.n_tokens,
        "train_rows": int(len(preload_index(store, data))),
        "store_seconds": times["store"],
        "ram_seconds": times["ram"],
        "per_rep_ratio": per_rep,
        "median_paired_ratio": median(per_rep),
        "reader_rows_per_s": reader_rps,
        "rss": rss,
        "rss_delta_mib": delta,
        "tile": cfg.rss_tile,
    }
    text = (
        f"Both sides: the same `Trainer`, TrainConfig and SAE init; torch threads {ctx.threads}. {note}. "
        "The store side also spends time in the reader threads (decompression of bf16 chunks, "
        "mixing buffer, "
        "balanced hazard/benign streams) that share the CPU cores with the SAE step: alone, the reader "
        f"delivers {reader_rps:,.0f} rows/s, so at {sps_ram * tcfg.batch_size:,.0f} rows/s of training it "
        f"needs about {sps_ram * tcfg.batch_size / reader_rps:.0%} of the CPU the step also wants; on these "
        f"2 cores, with torch already using both, that time comes out of the step (compare 1 − ratio = "
        f"{1 - ratio:.0%}). Peak RSS was "
        "sampled every "
        "10 ms in a fresh subprocess that streams one epoch through `RowStream` (baseline = RSS "
        "after opening "
        f"the store): it follows the buffer and the prefetched chunks, not the store size "
        f"({delta['1x']:.1f} MiB for {small['n_tokens']:,} rows, {delta[f'{cfg.rss_tile}x']:.1f} MiB for "
        f"{big['n_tokens']:,} rows)."
    )
    return StudyResult(
        "train", "4. Training from the store ÷ from RAM; reader memory", rows_out, details, text
    )


def preload_index(store: Store, data: TrainingData) -> np.ndarray:
    """Row indices of the training rows (for the record)."""
    keep = ~store.array("mask")[:] & ~data.heldout[store.array("doc_index")[:]]
    return np.flatnonzero(keep)
