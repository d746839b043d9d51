"""Study 8: `fit --resume` of a run stopped at step N: time to its first new step ÷ time to the first step of
a fresh run (issue 12: ≤ 1.5 at any N).

Both sides are the product's `bra.sae.train.fit` on study 1's store, timed from the call to the end of the
first optimizer step it takes (the clock stops inside `Trainer._train_step`, after a device sync): opening
the store, statistics and split, SAE init, the run folder, and for the resume the checkpoint load and the
data position. A checkpoint holds each stream's position (epoch, place in the seeded chunk order, RNG
state and the row indices in the shuffle buffer), so a resume reads back the chunks of those rows instead
of replaying N batches; the replay (what checkpoints written before positions were saved still get) is
measured too, for comparison.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench._common import Row, StudyResult, interleaved, median
from bench._context import BenchContext
from bra.sae.config import StreamConfig, TrainConfig
from bra.sae.train import CHECKPOINT_DIR, CKPT_STATE, fit, resolve_device
from bra.sae.trainer import Trainer

logger = logging.getLogger(__name__)

TARGET = "≤ 1.5"


@contextmanager
def first_step_clock(device: torch.device) -> Iterator[list[float]]:
    """While active, the `perf_counter` at the end of the first `Trainer._train_step` lands in the list."""
    real = Trainer._train_step
    stamps: list[float] = []

    def timed(self: Trainer, batch: Any) -> Any:
        out = real(self, batch)
        if not stamps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        return out

    with mock.patch.object(Trainer, "_train_step", timed):
        yield stamps


def time_to_first_step(store: Path, out: Path, cfg: TrainConfig, resume: bool, stop_at: int) -> float:
    """Seconds from the `fit` call to the end of its first step."""
    with first_step_clock(resolve_device(cfg.device)) as stamps:
        t0 = time.perf_counter()
        fit(store, out, cfg, resume=resume, stop_at=stop_at)
    return stamps[0] - t0


def _strip_position(run: Path) -> None:
    """Make ``run``'s checkpoint look like one written before data positions were saved."""
    path = run / CHECKPOINT_DIR / CKPT_STATE
    state = torch.load(path, map_location="cpu", weights_only=True)
    state.pop("data_position", None)
    torch.save(state, path)


def run(ctx: BenchContext) -> StudyResult:
    """Fresh / resumed first steps, interleaved, at every N of ``cfg.resume_stops``."""
    cfg = ctx.cfg
    store, _ = ctx.ensure_store()
    stops = cfg.resume_stops
    tcfg = TrainConfig(d_sae=cfg.train_d_sae, k=cfg.sae_k, batch_size=cfg.train_batch,
                       stream=StreamConfig(buffer_rows=cfg.train_buffer_rows), steps=max(stops) + 1,
                       checkpoint_every=max(stops) + 1, device=cfg.device,
                       contrastive_rows=min(512, cfg.train_batch))
    work = ctx.work / "resume"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    count = [0]

    def fresh() -> float:
        count[0] += 1
        return time_to_first_step(store, work / f"fresh-{count[0]}", tcfg, False, 1)

    def resumed(base: Path, n: int) -> float:
        count[0] += 1
        copy = Path(shutil.copytree(base, work / f"{base.name}-{count[0]}"))
        return time_to_first_step(store, copy, tcfg, True, n + 1)

    rows, details = [], {"train_config": tcfg.to_dict(), "stops": {}}
    for n in stops:
        fit(store, work / f"stopped-{n}", tcfg, stop_at=n)
        _strip_position(Path(shutil.copytree(work / f"stopped-{n}", work / f"replay-{n}")))
    # untimed: the first fit and the first resume of a process pay one-off costs (lazy imports, allocator)
    fresh(), resumed(work / f"stopped-{stops[0]}", stops[0])
    for n in stops:
        base, replay_base = work / f"stopped-{n}", work / f"replay-{n}"
        times = interleaved({"fresh": fresh, "seek": lambda b=base, n=n: resumed(b, n),
                             "replay": lambda b=replay_base, n=n: resumed(b, n)}, cfg.resume_reps)
        # best of N per side: other jobs on a shared machine only ever add time, in bursts
        best = {k: min(v) for k, v in times.items()}
        ratio, replay_ratio = best["seek"] / best["fresh"], best["replay"] / best["fresh"]
        per_rep = [s / f for s, f in zip(times["seek"], times["fresh"], strict=True)]
        details["stops"][n] = {"seconds": times, "per_rep_ratio": per_rep, "replay_ratio": replay_ratio}
        reps = ", ".join(f"{r:.2f}" for r in per_rep)
        note = (f"first step {best['seek']:.2f} s resumed vs {best['fresh']:.2f} s fresh, best of "
                f"{cfg.resume_reps} interleaved reps (per-rep ratios {reps}; median {median(per_rep):.2f})")
        name = f"fit --resume stopped at step {n}: first new step ÷ fresh run's first step"
        rows.append(Row("resume", name, round(ratio, 3), "×", TARGET, note))
        rows.append(Row("resume", f"the same, data position replayed (pre-cursor checkpoint), step {n}",
                        round(replay_ratio, 3), "×",
                        note=f"{best['replay']:.2f} s: reads and decompresses the {n} batches before it"))
    text = (f"The run: batch {tcfg.batch_size}, buffer {tcfg.stream.buffer_rows:,} rows (balanced: two "
            f"streams), d_sae {tcfg.d_sae}, k {tcfg.k}, on study 1's store; each resume starts from a copy "
            "of the stopped run. A seek reads back only the chunks holding the rows that sat in the two "
            "shuffle buffers at the checkpoint (row indices are saved, not activations), so its cost does "
            "not grow with N; a replay reads every chunk of the N batches before it.")
    return StudyResult("resume", "8. Resume ÷ fresh start (first step)", rows, details, text)
