"""Run the studies in order, writing results.md / results.json after each one (a failed study is recorded,
not fatal)."""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench._common import Row, StudyResult, load_average, machine_record, one_line
from bench._context import BenchContext, set_threads
from bench.config import STUDIES, BenchConfig

logger = logging.getLogger(__name__)

MODULES = {
    "build": "bench.build_ratio",
    "codecs": "bench.codecs",
    "fp8": "bench.fp8",
    "train": "bench.train_ratio",
    "rescore": "bench.rescore",
    "saelens": "bench.saelens_side",
    "scaleout": "bench.scaleout",
    "resume": "bench.resume_ratio",
    "labels": "bench.labels",
    "writer": "bench.writer",
}
TITLES = {
    "build": "1. Build ÷ bare forward",
    "codecs": "2. Bytes per token: dtype × codec × shuffle",
    "fp8": "3. Opt-in lossy fp8 (e4m3) storage",
    "train": "4. Training from the store ÷ from RAM; reader memory",
    "rescore": "5. Re-score ÷ (rebuild + score)",
    "saelens": "6. Side by side with SAELens",
    "scaleout": "7. Scale-out: processes and object-store shard size",
    "resume": "8. Resume ÷ fresh start (first step)",
    "labels": "9. Surface labels vs hand labels",
    "writer": "10. Writer alone: threads vs raw disk",
}
REPO = Path(__file__).resolve().parent.parent


def wait_for_quiet(max_load: float | None, max_wait: float) -> None:
    """Poll the 1-minute load average until it is at most ``max_load`` or ``max_wait`` seconds pass."""
    if max_load is None:
        return
    t0 = time.monotonic()
    while load_average()[0] > max_load and time.monotonic() - t0 < max_wait:
        logger.info("load average %.2f > %.2f; waiting", load_average()[0], max_load)
        time.sleep(15)


def _not_measured(studies: list[StudyResult], cfg: BenchConfig) -> list[str]:
    out = [f"{s.key}: {r.name}: {r.note}" for s in studies for r in s.rows if r.value is None]
    if not torch.cuda.is_available():
        out.append(
            "GPU numbers (`--size full`): this run had no GPU; the same code runs there with device auto "
            "(bf16 compute), but no GPU figures are reported here."
        )
    out.append(
        "gemma-2-2b-it (the product model) is not available offline here; SmolLM2-135M-Instruct and the tiny "
        "random Gemma2 stand in for it."
    )
    return out


def run_bench(
    cfg: BenchConfig,
    md_path: Path,
    json_path: Path,
    studies: Sequence[str] = STUDIES,
    work: Path | None = None,
    threads: int | None = None,
    command: str = "python -m bench",
    keep_work: bool = False,
) -> list[StudyResult]:
    """Run ``studies`` at ``cfg``'s size and write both result files; return the study results."""
    threads = threads or torch.get_num_threads()
    set_threads(threads)
    own_work = work is None
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="bra-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(cfg, work, threads)
    meta: dict[str, Any] = {
        "command": command,
        "size": cfg.size,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_record(threads, REPO),
        "seconds": 0.0,
    }
    results: list[StudyResult] = []
    t_all = time.perf_counter()
    try:
        for key in studies:
            load, t0 = load_average(), time.perf_counter()
            logger.info("study %s (load %.2f)", key, load[0])
            try:
                res = importlib.import_module(MODULES[key]).run(ctx)
            except Exception as exc:  # recorded in results.md; the other studies still run
                logger.exception("study %s failed", key)
                msg = one_line(exc)
                res = StudyResult(key, TITLES[key], [Row(key, "study failed", None, note=msg)], error=msg)
            res.load_at_start, res.seconds = load, time.perf_counter() - t0
            results.append(res)
            meta["seconds"] = time.perf_counter() - t_all
            meta["not_measured"] = _not_measured(results, cfg)
            report.write(results, meta, cfg, md_path, json_path)
    finally:
        if own_work and not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return results
