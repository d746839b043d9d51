"""Study 10: the writer alone, vs writer threads, next to raw disk writes (issue 18).

Precomputed float32 activations at gemma-2-2b's width (d_model 2304) go straight into the build's write path
(`bra.pipeline.sink.ShardSink`: bf16 encoding, shard assembly, `ShardWriterPool` threads each compressing and
writing whole shards with the repo's default codec, CRC32s and Welford partials), with no forward pass, so
the rate is what the writer sustains for a GPU. Each side writes a fresh store of the same rows; sides are
interleaved and the best of N reported. References: the same rows as plain files (raw uncompressed disk
writes of the bf16 bytes), the writer before this study (one thread through zarr's synchronous API), and
the writer with no codec.

The rows are synthetic (seeded Gaussians with log-normal per-dimension scales and a few outlier dimensions,
like a residual stream's): no gemma-2-2b forward runs on these CPUs. Their compression ratio is reported
beside the codec study's ratio on real SmolLM2 residuals, since speed depends on it.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import Row, StudyResult, dir_bytes, fmt, interleaved, load_average
from bench._context import BenchContext
from bra.cache import schema
from bra.cache.writer import CodecSpec, StoreWriter
from bra.dist import cpu_cores
from bra.pipeline.sink import ShardSink

logger = logging.getLogger(__name__)

TARGET = "≥ 1.7"
D_MODEL = 2304
GPU_RATES = (100_000, 200_000)
"""gemma-2-2b-it tokens/s to block 12 on one H100 (the README's sizing: 20-40% MFU), to size a host."""


def synthetic_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    """[n, d] float32 rows shaped like a residual stream: per-dimension log-normal scales, 8 outlier
    dimensions 20x larger, and per-row norms that vary."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0.0, 0.5, d)).astype(np.float32)
    scale[rng.choice(d, size=min(8, d), replace=False)] *= 20
    rows = rng.standard_normal((n, d), dtype=np.float32) * scale
    rows *= np.exp(rng.normal(0.0, 0.3, (n, 1))).astype(np.float32)
    return rows


def _attrs(n: int, d: int, chunk: int, shard: int, dtype: str, codec: CodecSpec) -> schema.StoreAttrs:
    return schema.StoreAttrs(
        kind="corpus",
        model_id="bench/synthetic",
        layers=(12,),
        hook_names=(schema.hook_name(12),),
        d_model=d,
        dtype=dtype,
        tokenizer_fingerprint="synthetic",
        manifest_hash="synthetic",
        tier_names=("benign",),
        n_tokens=n,
        chunk_tokens=chunk,
        shard_tokens=shard,
        codec=codec.to_attrs(),
    )


def _columns(n: int, window: int = 1024) -> dict[str, np.ndarray]:
    position = (np.arange(n) % window).astype(np.int32)
    return {
        "token_id": (np.arange(n) * 7919 % 256_000).astype(np.int32),
        "doc_index": (np.arange(n) // window).astype(np.int32),
        "position": position,
        "tier": np.zeros(n, np.int8),
        "segment": np.zeros(n, np.int8),
        "mask": position == 0,
    }


class _LegacyPool:
    """The writer before study 10: one thread, zarr's synchronous API, at most 2 shards queued."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-legacy-writer")
        self.pending: deque[Future[None]] = deque()

    def submit(self, fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        self.pending.append(self.pool.submit(fn, *args, **kwargs))
        while len(self.pending) > 2 or (self.pending and self.pending[0].done()):
            self.pending.popleft().result()

    def close(self, abort: bool = False) -> None:
        while self.pending:
            self.pending.popleft().result()
        self.pool.shutdown()


def write_store(
    path: Path,
    block: np.ndarray,
    n: int,
    chunk: int,
    shard: int,
    batch: int,
    threads: int,
    dtype: str = "bfloat16",
    codec: CodecSpec | None = None,
    legacy: bool = False,
) -> tuple[float, float, Any]:
    """Write a fresh store of ``n`` rows (``block``'s rows, repeated) through the build's write path; return
    (seconds from the first row handed over until every shard is done, CPU seconds of this process meanwhile
    (user + system, all threads), the per-shard CRC32 array)."""
    shutil.rmtree(path, ignore_errors=True)
    writer = StoreWriter.create(path, _attrs(n, block.shape[1], chunk, shard, dtype, codec or CodecSpec()))
    cols = _columns(n)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    with ShardSink(writer, range(writer.layout.n_shards), threads) as sink:
        if legacy:
            sink.pool.close()
            sink.pool = _LegacyPool()  # type: ignore[assignment]
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            at = start % (len(block) - batch + 1)  # a whole batch of distinct rows
            rows = block[at : at + stop - start]
            sink.add(start, {k: v[start:stop] for k, v in cols.items()}, {12: rows})
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    assert writer.done_shards().all()
    return seconds, cpu, writer.group[schema.CRC_ARRAY][:]


def _cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def write_raw(path: Path, raw: np.ndarray, n: int, shard: int) -> float:
    """Write ``n`` rows of the bf16 bytes ``raw`` (repeated) as one plain file per shard; return seconds."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, start in enumerate(range(0, n, shard)):
        rows = min(shard, n - start)
        with open(path / f"{i}", "wb") as fh:
            done = 0
            while done < rows:
                take = min(rows - done, len(raw))
                fh.write(memoryview(raw[:take]))
                done += take
    seconds = time.perf_counter() - t0
    shutil.rmtree(path, ignore_errors=True)
    return seconds


def run(ctx: BenchContext) -> StudyResult:
    """Every side on the same rows, interleaved, best of ``writer_reps``."""
    cfg = ctx.cfg
    chunk, shard = cfg.writer_chunk_tokens, cfg.writer_shard_tokens
    n = cfg.writer_shards * shard
    batch = min(cfg.writer_batch_rows, shard)
    block = synthetic_rows(max(batch, min(cfg.writer_block_rows, n)), D_MODEL)
    raw = schema.to_storage(block, "bfloat16")
    cores = cpu_cores()
    counts = sorted({1, 2, cores})
    tmp = ctx.work / "writer"
    tmp.mkdir(exist_ok=True)
    crcs: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    cpu: dict[str, list[float]] = {}
    before = "1 thread, zarr's synchronous API (as before this study)"
    sides: dict[str, dict[str, Any]] = {f"threads={t}": {"threads": t} for t in counts}
    sides[before] = {"threads": 1, "legacy": True}
    sides[f"codec none, threads={cores}"] = {"threads": cores, "codec": CodecSpec("none", 0, "noshuffle")}
    sides[f"fp8, threads={cores}"] = {"threads": cores, "dtype": "float8_e4m3"}

    def side(key: str, folder: Path, **kw: Any) -> Callable[[], float]:
        def go() -> float:
            seconds, cpu_s, crc = write_store(folder, block, n, chunk, shard, batch, **kw)
            crcs.setdefault(key, crc)
            cpu.setdefault(key, []).append(cpu_s)
            sizes.setdefault(key, dir_bytes(folder))
            shutil.rmtree(folder, ignore_errors=True)
            return seconds

        return go

    fns = {key: side(key, tmp / f"side{i}", **kw) for i, (key, kw) in enumerate(sides.items())}
    fns["raw file writes"] = lambda: write_raw(tmp / "raw", raw, n, shard)
    side("warm-up", tmp / "warm-up", threads=counts[0])()  # page cache, zarr's imports: untimed
    load_before = load_average()
    times = interleaved(fns, cfg.writer_reps)
    load_after = load_average()
    best = {k: min(v) for k, v in times.items()}
    same = all(np.array_equal(crcs[f"threads={t}"], crcs["threads=1"]) for t in counts)
    bf16_bytes = n * D_MODEL * 2
    tok = {k: n / s for k, s in best.items()}
    gbps = {k: bf16_bytes / s / 1e9 for k, s in best.items()}
    # tokens per CPU-second (user + system, every thread): what one fully used core writes, however loaded
    # the machine is (wall-clock rates under load only say how much of the cores this process got)
    per_cpu = {k: n / min(v) for k, v in cpu.items()}
    ratio = best["threads=1"] / best["threads=2"]
    per_rep = [a / b for a, b in zip(times["threads=1"], times["threads=2"], strict=True)]
    ratio_disk = bf16_bytes / (sizes["threads=1"] or bf16_bytes)
    one = per_cpu["threads=1"]
    need = [math.ceil(r / one) for r in GPU_RATES]
    geometry = (
        f"{n:,} rows × d_model {D_MODEL} bf16 ({bf16_bytes / 1e9:.2f} GB raw), chunk {chunk}, shard "
        f"{shard} rows, batches of {batch} rows; best of {cfg.writer_reps} interleaved reps"
    )
    rows = [
        Row(
            "writer",
            f"writer, {t} thread{'s' if t > 1 else ''}: rate (bf16, d_model {D_MODEL})",
            round(tok[f"threads={t}"]),
            "tok/s",
            note=f"{gbps[f'threads={t}']:.3f} GB/s of raw bf16; {round(per_cpu[f'threads={t}']):,} tok per "
            f"CPU-second; {CodecSpec().codec}-{CodecSpec().clevel}-{CodecSpec().shuffle} + CRC32C"
            + (f"; {cores} = all cores" if t == cores else ""),
        )
        for t in counts
    ]
    rows += [
        Row(
            "writer",
            "writer 2 ÷ 1 threads, tokens/s",
            round(ratio, 3),
            "×",
            TARGET,
            note=f"{geometry} (per-rep ratios {', '.join(f'{r:.2f}' for r in per_rep)}); stores identical "
            f"across thread counts (per-shard CRC32s compared): {same}",
        ),
        Row(
            "writer",
            "writer, 1 thread through zarr's synchronous API (as before this study): rate",
            round(tok[before]),
            "tok/s",
            note=f"{gbps[before]:.3f} GB/s, {round(per_cpu[before]):,} tok per CPU-second; {cores} threads "
            f"now: {best[before] / best[f'threads={cores}']:.2f}× that (shard buffers reused on both)",
        ),
        Row(
            "writer",
            "raw uncompressed disk writes (same bf16 bytes, one file per shard)",
            round(gbps["raw file writes"], 3),
            "GB/s",
            note=f"{round(tok['raw file writes']):,} tok/s; page cache",
        ),
        Row(
            "writer",
            f"writer, codec none, {cores} threads",
            round(gbps[f"codec none, threads={cores}"], 3),
            "GB/s",
            note=f"{round(tok[f'codec none, threads={cores}']):,} tok/s: zarr, CRC32C and statistics "
            f"without compression",
        ),
        Row(
            "writer",
            f"writer, fp8 e4m3 store, {cores} threads",
            round(tok[f"fp8, threads={cores}"]),
            "tok/s",
            note=f"{gbps[f'fp8, threads={cores}']:.3f} GB/s of bf16-equivalent rows (per-row scales, "
            f"quantised on the feeding thread)",
        ),
        Row(
            "writer",
            "writer cores one GPU needs (gemma-2-2b-it to block 12)",
            f"{need[0]}–{need[1]}",
            "cores",
            note=f"at {GPU_RATES[0]:,}–{GPU_RATES[1]:,} tok/s (README sizing) and {round(one):,} tokens per "
            f"CPU-second of one writer thread on this CPU (bf16, default codec), with threads scaling",
        ),
    ]
    details = {
        "n_tokens": n,
        "d_model": D_MODEL,
        "chunk_tokens": chunk,
        "shard_tokens": shard,
        "batch_rows": batch,
        "reps": cfg.writer_reps,
        "cores": cores,
        "seconds": times,
        "best_seconds": best,
        "tokens_per_s": tok,
        "gb_per_s": gbps,
        "cpu_seconds": cpu,
        "tokens_per_cpu_second": per_cpu,
        "bytes_on_disk": sizes,
        "identical_across_threads": same,
        "compression_ratio": ratio_disk,
        "load_before": load_before,
        "load_after": load_after,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    return StudyResult(
        "writer",
        "10. Writer alone: threads vs raw disk",
        rows,
        details,
        _text(geometry, ratio_disk, load_before, load_after, counts, gbps, cores),
    )


def _text(
    geometry: str,
    ratio_disk: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    counts: list[int],
    gbps: dict[str, float],
    cores: int,
) -> str:
    table = ["| side | GB/s (raw bf16) |", "| --- | ---: |"]
    table += [f"| {k} | {fmt(v)} |" for k, v in gbps.items()]
    return "\n".join(
        [
            f"{geometry}. Synthetic residual-like rows (see `bench/writer.py`) compress {ratio_disk:.2f}× "
            f"with the default codec (real SmolLM2 bf16 residuals: 1.31× in study 2). Load average "
            f"{load_before[0]} before the timed reps, {load_after[0]} after (other jobs only add time; "
            "best of N per side).",
            "",
            *table,
            "",
            "Each writer thread runs its own event loop with one compressor thread and writes whole shards "
            "(two writers in one shard would lose data). Before this study one thread wrote through zarr's "
            "synchronous API, whose single event-loop thread also runs the CRC32C codec and the shard "
            f"assembly (see `bra/cache/parallel.py` for a side measurement of both). Thread counts measured: "
            f"{', '.join(map(str, counts))} ({cores} cores here). The raw-disk row is the ceiling no codec "
            "can pass on this disk.",
            *(
                [
                    "",
                    f"**Load caveat:** the 1-minute load ({load_before[0]}) was above half this machine's "
                    f"{cores} cores, so other jobs held the cores the extra threads need: the thread ratio "
                    "says little here (CPU-seconds per token, in the JSON, show what each thread count "
                    "costs). Rerun on an idle machine: `python -m bench --size small --studies writer "
                    "--max-load 0.5`.",
                ]
                if load_before[0] > cores / 2
                else []
            ),
        ]
    )
