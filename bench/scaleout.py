"""Study 7: scale-out, measured on this machine: 1 build process vs N, and object-store read throughput by
shard size.

(a) ``bra-cache build MANIFEST --store X`` against ``bra-cache build MANIFEST --store Y --nproc N`` (torchrun
--standalone, gloo) on study 1's manifest, each a fresh command (interleaved repetitions, best of each). Two
rates per side: the whole command's wall clock (interpreter start, model load on every rank, tokenisation,
rendezvous, finalising) and the rate the CLI prints from rank 0 (its forward/write loop up to the barrier
after the last shard). Both stores must hold identical token ids; anything else is a bug, not a number.

(b) The same rows (the 1-process store, tiled) written in several chunk/shard geometries, uploaded to a moto
S3 server on 127.0.0.1, and streamed once through the training reader (`RowStream`, as `bra.sae.data`
drives it) from S3 and from local disk; plus the number of objects each store is.

A sub-measurement that fails becomes a row without a value and a note saying why; the others still run.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from bench._common import Row, StudyResult, fmt, interleaved, one_line, stopwatch, worker_env
from bench._context import BenchContext
from bench._inputs import manifest_path
from bench._s3 import missing_packages, moto_s3
from bench._stores import copy_store
from bench.config import BenchConfig
from bra.cache import schema
from bra.cache.reader import ReaderConfig, RowStream
from bra.cache.store import open_store
from bra.dist import cpu_cores, threads_per_rank

logger = logging.getLogger(__name__)

KEY = "scaleout"
TITLE = "7. Scale-out: processes and object-store shard size"
BUCKET = "bench"
RATE_LINE = re.compile(r"([\d,]+) tokens \(([\d,]+) computed, ([\d,.]+) tok/s\)")
"""The line `bra-cache build` prints on stderr from rank 0 when it built something."""
BUILD_TIMEOUT = 1800.0
"""Seconds one `bra-cache build` command may take before it counts as failed."""

T = TypeVar("T")


def attempt(fn: Callable[[], T], what: str, errors: dict[str, str]) -> T | None:
    """``fn()``, or None with the error recorded under ``what``: one failed sub-measurement must not cost
    the study its other numbers."""
    try:
        return fn()
    except Exception as exc:  # recorded in the row's note
        logger.warning("%s failed: %s", what, one_line(exc))
        logger.debug("%s failed", what, exc_info=True)
        errors[what] = one_line(exc)
        return None


def timed_or_inf(fn: Callable[[], float], what: str, errors: dict[str, str]) -> Callable[[], float]:
    """A timed function for `interleaved` that reports a failure as infinitely slow (so the best of the
    repetitions is still well defined) and records the error."""

    def run() -> float:
        seconds = attempt(fn, what, errors)
        return math.inf if seconds is None else seconds

    return run


def best(times: list[float]) -> float | None:
    """The fastest finite time, None when every repetition failed."""
    finite = [t for t in times if math.isfinite(t)]
    return min(finite) if finite else None


# --------------------------------------------------------------------------- (a) 1 process vs N processes


@dataclass
class CliBuild:
    """One `bra-cache build` command."""

    wall: float
    """Seconds from launch to exit of the whole command."""
    n_tokens: int | None
    """Tokens in the store (from the CLI's line; None when it printed none)."""
    computed: int | None
    """Tokens the ranks computed (a batch across two ranks' shards is computed by both)."""
    rate: float | None
    """tok/s the CLI printed: computed tokens ÷ rank 0's forward/write loop."""

    @property
    def loop_seconds(self) -> float | None:
        """Rank 0's forward/write loop, as the printed rate implies (computed tokens ÷ rate)."""
        return self.computed / self.rate if self.computed and self.rate else None

    @property
    def loop_rate(self) -> float | None:
        """Store tokens per second of rank 0's loop (the printed rate without the duplicated batches)."""
        seconds = self.loop_seconds
        return self.n_tokens / seconds if self.n_tokens and seconds else None


def parse_rate(stderr: str) -> tuple[int | None, int | None, float | None]:
    """(tokens, computed, tok/s) from the CLI's stderr; Nones when the line is missing."""
    match = RATE_LINE.search(stderr)
    if match is None:
        return None, None, None
    n, computed, rate = (g.replace(",", "") for g in match.groups())
    return int(n), int(computed), float(rate)


def cli_build(manifest_file: Path, store: Path, nproc: int) -> CliBuild:
    """Run `bra-cache build` into a fresh ``store`` (a complete one would make it a no-op) in ``nproc``
    processes; the whole command is timed."""
    shutil.rmtree(store, ignore_errors=True)
    cmd = [sys.executable, "-m", "bra.cache", "build", str(manifest_file), "--store", str(store)]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    # the single process gets every core, as N ranks get cores / N each: both sides use the same CPU
    env = worker_env(OMP_NUM_THREADS=str(threads_per_rank(nproc)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"bra-cache build (nproc {nproc}) exited {proc.returncode}: {tail}")
    return CliBuild(wall, *parse_rate(proc.stderr))


def compare_stores(a: Path, b: Path) -> dict[str, bool]:
    """Which token-axis arrays of two stores are equal (token ids must be; activations may differ in the
    last bits: the two sides run different CPU thread counts)."""
    sa, sb = open_store(a), open_store(b)
    names = list(schema.TOKEN_COLUMNS) + [schema.acts_path(layer) for layer in sa.layers]
    same = {"n_tokens": sa.n_tokens == sb.n_tokens}
    for name in names:
        same[name] = same["n_tokens"] and bool(np.array_equal(sa.array(name)[:], sb.array(name)[:]))
    return same


def _multi_gpu_gap(ctx: BenchContext, nproc: int) -> str | None:
    """Why N ranks cannot run here (each CUDA rank takes GPU LOCAL_RANK), or None."""
    from bra.pipeline.model import resolve_device

    device = resolve_device(ctx.build_manifest().model.device)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        return f"{nproc} CUDA ranks need {nproc} GPUs; this machine has {torch.cuda.device_count()}"
    return None


@dataclass
class ProcessRuns:
    """Every repetition of both sides of part (a)."""

    runs: dict[int, list[CliBuild]]
    """Successful commands per process count."""
    errors: dict[str, str]
    """Failed commands: what, and the error."""
    stores: dict[int, Path]
    """Store of each process count."""


def run_builds(ctx: BenchContext, folder: Path) -> ProcessRuns:
    """Interleaved 1-process / N-process builds of study 1's manifest."""
    cfg, n = ctx.cfg, ctx.cfg.scaleout_nproc
    manifest = ctx.build_manifest()
    manifest_file = manifest_path(ctx.work, manifest.name)
    out = ProcessRuns({1: [], n: []}, {}, {p: folder / f"nproc{p}.zarr" for p in (1, n)})
    gap = _multi_gpu_gap(ctx, n)
    if gap is not None:
        out.errors[f"{n} processes"] = gap

    def side(p: int) -> Callable[[], float]:
        def build() -> float:
            result = cli_build(manifest_file, out.stores[p], p)
            out.runs[p].append(result)
            return result.wall

        return timed_or_inf(build, f"{p} process{'es' if p > 1 else ''}", out.errors)

    sides = {"1": side(1)} if gap else {"1": side(1), str(n): side(n)}
    interleaved(sides, cfg.scaleout_reps)
    return out


def _best_run(runs: list[CliBuild], key: Callable[[CliBuild], float | None]) -> float | None:
    values = [v for v in (key(r) for r in runs) if v is not None]
    return max(values) if values else None


def check_same_tokens(pr: ProcessRuns, n: int) -> dict[str, bool]:
    """Which arrays the 1-process and N-process stores share (empty when a side failed); raises when the
    token ids differ: the ranks must build exactly the one-process store, so that is a bug, not a number."""
    if not (pr.runs[1] and pr.runs[n]):
        return {}
    same = compare_stores(pr.stores[1], pr.stores[n])
    if not same["token_id"]:
        raise AssertionError(f"the {n}-process store's token ids differ from the 1-process store's")
    return same


def _same_note(same: dict[str, bool]) -> str:
    if not same:
        return "stores not compared (a side failed)"
    acts_equal = all(v for k, v in same.items() if k.startswith(f"{schema.ACTS_GROUP}/"))
    return "token ids identical in both stores (checked); activations " + (
        "bitwise equal" if acts_equal else "differ in the last bits (different thread counts)"
    )


def _loop_note(pr: ProcessRuns, n: int) -> str:
    """How long rank 0's loops took: a rate from a loop under a second is mostly noise (the tiny size)."""
    secs = {p: min((r.loop_seconds for r in pr.runs[p] if r.loop_seconds), default=None) for p in (1, n)}
    if None in secs.values():
        return ""
    short = " (under a second: mostly noise)" if min(secs.values()) < 1 else ""  # type: ignore[type-var]
    return f"; fastest loops {secs[1]:.2f} s and {secs[n]:.2f} s{short}"


def process_rows(ctx: BenchContext, pr: ProcessRuns) -> tuple[list[Row], dict[str, Any]]:
    """Rows of part (a): wall-clock and printed rates of each side, and their ratios."""
    n = ctx.cfg.scaleout_nproc
    same = check_same_tokens(pr, n)
    tokens = next((r.n_tokens for r in pr.runs[1] + pr.runs[n] if r.n_tokens), None)
    wall = {p: _best_run(pr.runs[p], lambda r: tokens / r.wall if tokens else None) for p in (1, n)}
    loop = {p: _best_run(pr.runs[p], lambda r: r.loop_rate) for p in (1, n)}
    printed = {p: _best_run(pr.runs[p], lambda r: r.rate) for p in (1, n)}
    computed = _best_run(pr.runs[n], lambda r: r.computed)
    cores, t1, tn = cpu_cores(), threads_per_rank(1), threads_per_rank(n)
    why = {1: pr.errors.get("1 process", ""), n: pr.errors.get(f"{n} processes", "")}
    sharing = (
        f"{cores} cores here: the {n} ranks share them ({tn} torch thread(s) each, `threads_per_rank`) where "
        f"the 1 process has {t1}, so no speed-up is expected on CPU; the ratio shows the overhead of the "
        "distributed path (one more interpreter and model load, the gloo rendezvous, barriers, merging)"
    )
    reps = f"best of {ctx.cfg.scaleout_reps} interleaved reps"
    rows = [
        _rate_row(
            "bra-cache build, 1 process: wall-clock rate",
            wall[1],
            why[1],
            f"{tokens or 0:,} tokens ÷ the whole command (start, model load, tokenisation, finalize); {reps}",
        ),
        _rate_row(
            f"bra-cache build --nproc {n} (torchrun, gloo): wall-clock rate",
            wall[n],
            why[n],
            f"the same tokens; every rank loads the model; {reps}",
        ),
        _ratio_row(f"{n} ÷ 1 processes, wall-clock rate", wall, n, f"{_same_note(same)}; {sharing}"),
        _rate_row(
            "bra-cache build, 1 process: rate it prints",
            printed[1],
            why[1],
            "the CLI's own figure: tokens ÷ the forward/write loop (no start-up, no model load)",
        ),
        _rate_row(
            f"bra-cache build --nproc {n}: rate it prints",
            printed[n],
            why[n],
            f"rank 0's figure: {computed or 0:,} computed tokens (a batch across two ranks' shards is "
            f"computed by both) ÷ its loop up to the barrier after the last shard; "
            f"{fmt(loop[n])} store tok/s",
        ),
        _ratio_row(
            f"{n} ÷ 1 processes, loop rate (store tokens)",
            loop,
            n,
            "store tokens ÷ rank 0's loop on each side (the printed rates without duplicated batches)"
            + _loop_note(pr, n),
        ),
    ]
    details = {
        "nproc": n,
        "cores": cores,
        "threads": {"1": t1, str(n): tn},
        "runs": {str(p): [asdict(r) for r in pr.runs[p]] for p in (1, n)},
        "errors": pr.errors,
        "same_arrays": same,
        "wall_tok_s": {str(p): wall[p] for p in (1, n)},
        "loop_tok_s": {str(p): loop[p] for p in (1, n)},
        "printed_tok_s": {str(p): printed[p] for p in (1, n)},
    }
    return rows, details


def _rate_row(name: str, value: float | None, error: str, note: str) -> Row:
    if value is None:
        return Row(KEY, name, None, "tok/s", note=error or "the CLI printed no rate")
    return Row(KEY, name, round(value, 1), "tok/s", note=note)


def _ratio_row(name: str, rates: dict[int, float | None], n: int, note: str) -> Row:
    if rates[1] is None or rates[n] is None:
        return Row(KEY, name, None, "×", note="one side has no rate (see its row)")
    return Row(KEY, name, round(rates[n] / rates[1], 3), "×", note=note)


# --------------------------------------------------------------------------- (b) shard size vs read rate


@dataclass(frozen=True)
class Geometry:
    """A chunk/shard layout of the read stores."""

    chunk: int
    """Rows per chunk (a reader fetches one chunk of each array it reads at a time)."""
    shard: int
    """Rows per shard (one object per array)."""

    @property
    def name(self) -> str:
        """Store name."""
        return f"c{self.chunk}-s{self.shard}"

    @property
    def label(self) -> str:
        """For row names."""
        return f"chunk {self.chunk} / shard {self.shard} rows"


def geometries(cfg: BenchConfig) -> list[Geometry]:
    """The config's geometries in rows."""
    return [Geometry(c * cfg.chunk_tokens, s * cfg.chunk_tokens) for c, s in cfg.scaleout_geometries]


def read_epoch(location: Path | str, cfg: BenchConfig, rows_seen: dict[str, int], key: str,
               threads: int | None = None) -> float:
    """Seconds to stream every row of a store once through `RowStream` with the training reader's settings
    (``threads``: the reader's default for the location unless given); opening the store, a few metadata
    reads, is outside the clock."""
    store = open_store(location)
    rcfg = ReaderConfig(layer=store.layers[0], batch_size=cfg.train_batch, buffer_rows=cfg.train_buffer_rows,
                        threads=threads)
    stream = RowStream(store, rcfg)
    rows = 0
    with stopwatch() as t:
        for batch in stream.epoch(0):
            rows += len(batch.row)
    rows_seen[key] = rows
    return t[0]


def object_census(fs: Any, root: str, layer: int) -> dict[str, float]:
    """Objects under ``root`` and the activation objects' count and mean size (bytes, compressed)."""
    files = fs.find(root, detail=True)
    acts = [
        info["size"]
        for path, info in files.items()
        if path.startswith(f"{root}/{schema.acts_path(layer)}/c/")
    ]
    return {
        "objects": len(files),
        "bytes": sum(info["size"] for info in files.values()),
        "acts_objects": len(acts),
        "acts_object_bytes": float(np.mean(acts)) if acts else 0.0,
    }


@dataclass
class ReadStores:
    """Part (b)'s stores: local folders, and their S3 URLs once uploaded."""

    local: dict[Geometry, Path]
    s3: dict[Geometry, str]
    census: dict[Geometry, dict[str, float]]
    act_bytes: int
    """Activation bytes of every store (rows × d_model × storage item size, before compression)."""
    layer: int


def write_read_stores(source: Path, folder: Path, cfg: BenchConfig, errors: dict[str, str]) -> ReadStores:
    """The source rows, tiled, in every geometry (local folders)."""
    local: dict[Geometry, Path] = {}
    for g in geometries(cfg):
        path = attempt(
            lambda g=g: copy_store(source, folder / f"{g.name}.zarr", cfg.scaleout_tile, g.chunk, g.shard),
            f"write {g.name}",
            errors,
        )
        if path is not None:
            local[g] = path
    src = open_store(source)
    layer = src.layers[0]
    act_bytes = src.n_tokens * cfg.scaleout_tile * src.d_model * src.acts(layer).dtype.itemsize
    return ReadStores(local, {}, {}, act_bytes, layer)


def _put(fs: Any, path: Path, root: str) -> bool:
    fs.put(str(path), root, recursive=True)
    return True


def upload(stores: ReadStores, errors: dict[str, str]) -> None:
    """Copy every local store into the bucket (one PUT per file) and count its objects."""
    import s3fs

    fs = s3fs.S3FileSystem()
    for g, path in stores.local.items():
        root = f"{BUCKET}/{g.name}.zarr"
        if attempt(lambda path=path, root=root: _put(fs, path, root), f"upload {g.name}", errors) is None:
            continue
        fs.invalidate_cache()
        census = attempt(lambda root=root: object_census(fs, root, stores.layer), f"count {g.name}", errors)
        if census is not None:
            stores.census[g] = census
            stores.s3[g] = f"s3://{root}"


FEW_THREADS = 2
"""Reader threads of the comparison against the default at the added latency."""


def latency_geometry(cfg: BenchConfig) -> Geometry:
    """The geometry of the threads comparison: the largest shard with the base chunk (the README default's
    shape)."""
    return max((g for g in geometries(cfg) if g.chunk == cfg.chunk_tokens), key=lambda g: g.shard)


def time_latency_reads(stores: ReadStores, cfg: BenchConfig, errors: dict[str, str],
                       rows_seen: dict[str, int], endpoint: Any) -> dict[str, list[float]]:
    """Every uploaded geometry read again with ``scaleout_latency_ms`` added to each GET, and the threads
    comparison on ``latency_geometry``."""
    fns: dict[str, Callable[[], float]] = {}
    for g, url in stores.s3.items():
        key = f"s3+lat {g.name}"
        fns[key] = timed_or_inf(lambda url=url, k=key: read_epoch(url, cfg, rows_seen, k), key, errors)
    g = latency_geometry(cfg)
    if g in stores.s3:
        key = f"s3+lat threads{FEW_THREADS} {g.name}"
        fns[key] = timed_or_inf(
            lambda url=stores.s3[g], k=key: read_epoch(url, cfg, rows_seen, k, FEW_THREADS), key, errors)
    endpoint.latency_s = cfg.scaleout_latency_ms / 1000
    try:
        return interleaved(fns, cfg.scaleout_read_reps)
    finally:
        endpoint.latency_s = 0.0


def time_reads(
    stores: ReadStores, cfg: BenchConfig, errors: dict[str, str], rows_seen: dict[str, int]
) -> dict[str, list[float]]:
    """Interleaved epoch reads of every store, local and (when uploaded) from S3."""
    fns: dict[str, Callable[[], float]] = {}
    for g, path in stores.local.items():
        fns[f"local {g.name}"] = timed_or_inf(
            lambda path=path, k=f"local {g.name}": read_epoch(path, cfg, rows_seen, k),
            f"local {g.name}",
            errors,
        )
        if g in stores.s3:
            fns[f"s3 {g.name}"] = timed_or_inf(
                lambda url=stores.s3[g], k=f"s3 {g.name}": read_epoch(url, cfg, rows_seen, k),
                f"s3 {g.name}",
                errors,
            )
    return interleaved(fns, cfg.scaleout_read_reps)


def _why(g: Geometry, what: str, errors: dict[str, str], s3_gap: str | None) -> str:
    """Why a read or count of geometry ``g`` has no value: the first error on its way there."""
    keys = [f"write {g.name}", f"{what} {g.name}"]
    if what != "local":
        if s3_gap:
            return s3_gap
        keys[1:1] = [f"upload {g.name}", f"count {g.name}"]
    return next((errors[k] for k in keys if k in errors), "not measured")


def _read_row(
    where: str, g: Geometry, seconds: float | None, mb: float, rows: int, why: str, extra: str = ""
) -> Row:
    """One read's row: MB/s of activation bytes, rows/s in the note."""
    name = f"read from {where}, {g.label}"
    if seconds is None:
        return Row(KEY, name, None, "MB/s", note=why)
    return Row(KEY, name, round(mb / seconds, 1), "MB/s", note=f"{rows / seconds:,.0f} rows/s{extra}")


def _census_row(g: Geometry, census: dict[str, float] | None, why: str) -> Row:
    """How many objects a store is on S3, and how large its activation objects are."""
    name = f"objects in the S3 store, {g.label}"
    if census is None:
        return Row(KEY, name, None, "objects", note=why)
    note = (
        f"{int(census['acts_objects'])} activation objects of {census['acts_object_bytes'] / 1024:,.0f} KiB "
        "on average (compressed)"
    )
    return Row(KEY, name, int(census["objects"]), "objects", note=note)


def read_rows_out(
    stores: ReadStores,
    times: dict[str, list[float]],
    rows_seen: dict[str, int],
    errors: dict[str, str],
    cfg: BenchConfig,
    s3_gap: str | None,
) -> list[Row]:
    """Three rows per geometry: the S3 read, the local-disk read, and the object count."""
    rows: list[Row] = []
    mb = stores.act_bytes / 1e6
    for g in geometries(cfg):
        local_s, s3_s = best(times.get(f"local {g.name}", [])), best(times.get(f"s3 {g.name}", []))
        vs = f"; {local_s / s3_s:.2f}× the local-disk rate" if local_s and s3_s else ""
        rows += [
            _read_row(
                "moto S3", g, s3_s, mb, rows_seen.get(f"s3 {g.name}", 0), _why(g, "s3", errors, s3_gap), vs
            ),
            _read_row(
                "local disk",
                g,
                local_s,
                mb,
                rows_seen.get(f"local {g.name}", 0),
                _why(g, "local", errors, s3_gap),
                "; page cache warm",
            ),
            _census_row(g, stores.census.get(g), _why(g, "count", errors, s3_gap)),
        ]
    return rows + latency_rows(stores, times, rows_seen, errors, cfg, s3_gap)


def latency_rows(stores: ReadStores, times: dict[str, list[float]], rows_seen: dict[str, int],
                 errors: dict[str, str], cfg: BenchConfig, s3_gap: str | None) -> list[Row]:
    """The reads with added latency: one row per geometry, then default threads ÷ FEW_THREADS."""
    mb, ms = stores.act_bytes / 1e6, f"{cfg.scaleout_latency_ms:g} ms"
    threads = ReaderConfig(layer=0).resolved(remote=True)[0]
    rows = []
    for g in geometries(cfg):
        key = f"s3+lat {g.name}"
        rows.append(_read_row(f"moto S3 + {ms} per GET", g, best(times.get(key, [])), mb,
                              rows_seen.get(key, 0), errors.get(key) or _why(g, "s3", errors, s3_gap),
                              f"; {threads} reader threads"))
    g = latency_geometry(cfg)
    many, few = (best(times.get(f"s3+lat {g.name}", [])),
                 best(times.get(f"s3+lat threads{FEW_THREADS} {g.name}", [])))
    name = f"reader threads {threads} ÷ {FEW_THREADS} at + {ms} per GET, {g.label}"
    if many is None or few is None:
        rows.append(Row(KEY, name, None, "×", note=s3_gap or "a side failed (see its row)"))
    else:
        rows.append(Row(KEY, name, round(few / many, 2), "×",
                        note=f"read rate with the default {threads} threads ÷ with {FEW_THREADS}: "
                             f"requests in flight hide the latency ({few:.2f} s vs {many:.2f} s per epoch)"))
    return rows


def measure_reads(ctx: BenchContext, source: Path, folder: Path) -> tuple[list[Row], dict[str, Any]]:
    """Part (b): write the geometries, serve them from moto S3, read each once (best of the reps)."""
    cfg = ctx.cfg
    errors: dict[str, str] = {}
    rows_seen: dict[str, int] = {}
    with stopwatch() as t:
        stores = write_read_stores(source, folder, cfg, errors)
    logger.info("scaleout (b): %d stores written in %.1f s", len(stores.local), t[0])
    missing = missing_packages()
    s3_gap = f"{', '.join(missing)} not installed (pip install -e '.[test]')" if missing else None
    times: dict[str, list[float]] = {}
    if s3_gap is None:
        try:
            with moto_s3(BUCKET) as endpoint:
                with stopwatch() as t:
                    upload(stores, errors)
                logger.info("scaleout (b): %d stores uploaded in %.1f s", len(stores.s3), t[0])
                times = time_reads(stores, cfg, errors, rows_seen)
                times.update(time_latency_reads(stores, cfg, errors, rows_seen, endpoint))
        except Exception as exc:  # the server itself failed: the local reads below still run
            s3_gap = f"moto S3 server: {one_line(exc)}"
            logger.warning("%s", s3_gap)
            stores.s3.clear()
    if s3_gap is not None:
        times = time_reads(stores, cfg, errors, rows_seen)
    rows = read_rows_out(stores, times, rows_seen, errors, cfg, s3_gap)
    details = {
        "rows_per_epoch": sorted(set(rows_seen.values())),
        "activation_bytes": stores.act_bytes,
        "tile": cfg.scaleout_tile,
        "geometries": [asdict(g) for g in geometries(cfg)],
        "seconds": times,
        "rows_seen": rows_seen,
        "census": {g.name: c for g, c in stores.census.items()},
        "errors": errors,
        "s3_gap": s3_gap,
    }
    return rows, details


# --------------------------------------------------------------------------- the study


def _source(ctx: BenchContext, pr: ProcessRuns) -> Path:
    """Rows for part (b): this study's 1-process store, or study 1's store when that build failed."""
    if pr.runs[1]:
        return pr.stores[1]
    return ctx.ensure_store()[0]


def _text(ctx: BenchContext, details: dict[str, Any]) -> str:
    cfg, n = ctx.cfg, ctx.cfg.scaleout_nproc
    a, b = details["processes"], details["reads"]
    local_threads, local_prefetch = ReaderConfig(layer=0).resolved(remote=False)  # the reader's defaults,
    s3_threads, s3_prefetch = ReaderConfig(layer=0).resolved(remote=True)  # which read_epoch keeps
    processes = (
        f"**(a) Processes.** `bra-cache build` on study 1's manifest ({ctx.ref().name}), in 1 process and "
        f"with `--nproc {n}` (torchrun --standalone, gloo), each a fresh command; {cfg.scaleout_reps} "
        f"interleaved reps, best of each. This machine has {a['cores']} cores and the {n} ranks share them "
        f"(`threads_per_rank` gives each {a['threads'][str(n)]} torch thread(s), the single process "
        f"{a['threads']['1']})"
        + (
            ""
            if torch.cuda.is_available()
            else ": on CPU the same cores do the same forward passes on both sides, so no speed-up is "
            "expected and the ratio is the price of the distributed path (one more interpreter and model "
            "load, the rendezvous, barriers, rank 0 merging the statistics)"
        )
        + ". The wall-clock rate is what a user waits for; the printed rate is the build loop alone. The "
        "study fails if the two stores' token ids differ. A speed-up needs a GPU per rank or idle cores."
    )
    reads = (
        f"**(b) Shard size on object storage.** The 1-process store's rows, tiled {cfg.scaleout_tile}×, "
        f"written in {len(b['geometries'])} chunk/shard geometries with `StoreWriter`, uploaded to a moto "
        f"S3 server on 127.0.0.1 (bucket `{BUCKET}`) and streamed once through `RowStream` with the training "
        f"reader's settings (batch {cfg.train_batch}, buffer {cfg.train_buffer_rows} rows, "
        f"{s3_threads} reader threads and {s3_prefetch} chunks in flight from S3, {local_threads} and "
        f"{local_prefetch} from the same local "
        "folder. MB/s counts activation bytes as "
        "stored (before compression). The reader fetches activations a chunk at a time (a byte range of "
        "the shard object, after the shard's index) and the label columns (mask, doc_index, tier) a whole "
        "shard at a time into a cache: larger chunks mean fewer and larger activation requests, larger "
        "shards fewer objects and fewer label reads. Loopback moto has ~0 "
        "network latency and runs inside the bench's process (sharing its cores and GIL), so these numbers "
        "show per-request overhead of client and server, not S3's first-byte latency (tens of ms). The "
        f"server then adds {cfg.scaleout_latency_ms:g} ms before every GET and every geometry is read again, "
        f"and the default reader is compared with one of {FEW_THREADS} threads: a stand-in for that latency "
        "(bandwidth limits are not modelled); "
        "README's shard-size advice (16k–64k-token shards, 1k-token chunks, so few-MB GETs) is derived from "
        "that latency, which this machine cannot measure."
    )
    return processes + "\n\n" + reads


def run(ctx: BenchContext) -> StudyResult:
    """Part (a), then part (b) on the rows part (a) built."""
    folder = ctx.work / "scaleout"
    folder.mkdir(parents=True, exist_ok=True)
    with stopwatch() as t_a:
        pr = run_builds(ctx, folder)
    logger.info(
        "scaleout (a): %d + %d builds in %.1f s",
        len(pr.runs[1]),
        len(pr.runs[ctx.cfg.scaleout_nproc]),
        t_a[0],
    )
    rows_a, details_a = process_rows(ctx, pr)
    with stopwatch() as t_b:
        rows_b, details_b = measure_reads(ctx, _source(ctx, pr), folder / "reads")
    logger.info("scaleout (b): stores written, served and read in %.1f s", t_b[0])
    details = {"processes": details_a, "reads": details_b}
    return StudyResult(KEY, TITLE, rows_a + rows_b, details, _text(ctx, details))
