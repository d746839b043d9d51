"""Multi-process builds on CPU with gloo, through real torchrun processes (`bra-cache build --nproc 2`).

A 2-process build equals a 1-process build of the same manifest row for row (arrays bitwise: every rank
runs the same batches with the same thread count as the reference), every rank writes shards (the store
records the writer of each shard in ``shards/rank``), and a build with one rank SIGKILLed resumes without
loss or duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from helpers import done_count, eval_manifest, resume_manifest, snapshot, write_prompts

from bra.cache import schema
from bra.cache.verify import verify_store
from bra.dist import threads_per_rank
from bra.pipeline.build import build_store, owned_shards
from bra.pipeline.manifest import load_manifest

TIMEOUT_S = 180.0
NPROC = 2
N_SHARDS = 16  # of the resume manifest's store


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


def build_argv(manifest: Path, store: Path | str) -> list[str]:
    return [sys.executable, "-m", "bra.cache", "build", str(manifest), "--store", str(store),
            "--nproc", str(NPROC)]


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> tuple[Path, Path]:
    """(manifest, its 1-process build) computed with the thread count each of NPROC ranks uses."""
    tmp = tmp_path_factory.mktemp("dist")
    manifest = resume_manifest(tmp, tiny_gemma_dir)
    with rank_threads():
        result = build_store(load_manifest(manifest), tmp / "ref.zarr")
    return manifest, Path(result.path)


@pytest.fixture(scope="module")
def reference(reference_build: tuple[Path, Path]) -> tuple[Path, dict[str, Any]]:
    """(manifest, snapshot of its 1-process build)."""
    return reference_build[0], snapshot(reference_build[1])


@contextmanager
def rank_threads() -> Iterator[None]:
    """Run torch with the CPU threads of one of NPROC ranks on this machine (so results are bitwise equal)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_per_rank(NPROC))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_same_rows(got: Path, want: dict[str, Any]) -> None:
    """Every array but the writer record bitwise equal, same attrs (statistics included), same doc table."""
    snap = snapshot(got)
    names = sorted(set(want["arrays"]) - {schema.RANK_ARRAY})
    assert sorted(set(snap["arrays"]) - {schema.RANK_ARRAY}) == names
    for name in names:
        assert snap["arrays"][name].dtype == want["arrays"][name].dtype, name
        assert np.array_equal(snap["arrays"][name], want["arrays"][name]), f"{got}: array {name} differs"
    assert snap["attrs"] == want["attrs"]
    assert snap["docs"] == want["docs"]
    assert verify_store(got) == []


def test_owned_shards__contiguous_disjoint_cover() -> None:
    todo = [0, 1, 2, 5, 6, 9, 10]
    parts = [owned_shards(todo, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [5, 6], [9, 10]]
    assert owned_shards([4], 1, 2) == []


def run_build(manifest: Path, store: Path) -> str:
    """A complete `bra-cache build --nproc 2`; returns its log."""
    proc = subprocess.run(build_argv(manifest, store), env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def kill_rank_after(manifest: Path, store: Path, rank: int, trigger: Callable[[Path], bool]) -> None:
    """Start `bra-cache build --nproc 2` and SIGKILL one rank's process once ``trigger(store)``."""
    launcher = subprocess.Popen(build_argv(manifest, store), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    victim = None
    try:
        while launcher.poll() is None:
            assert time.monotonic() < deadline, "the distributed build did not finish in time"
            if victim is None:
                victim = _worker_pids(launcher).get(rank)
            elif trigger(store):
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert launcher.wait(timeout=60) != 0  # torchrun stops the other rank and fails
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert victim is not None, f"the build finished before its rank {rank} could be killed"


def done_shards(store: Path) -> set[int]:
    """Shards marked done, listed cheaply (polling must not slow the ranks down on a small machine): a done
    flag is one chunk file of its own, and Zarr writes no file for a chunk still at its fill value 0."""
    folder = store / schema.DONE_ARRAY / "c"
    return {int(name) for name in os.listdir(folder)} if folder.is_dir() else set()


def both_halves_done(store: Path) -> bool:
    """Each of the two ranks (rank 0: the first half of the shards, rank 1: the second) finished a shard."""
    done = done_shards(store)
    return bool(done) and min(done) < N_SHARDS // 2 <= max(done)


def _worker_pids(launcher: subprocess.Popen[bytes]) -> dict[int, int]:
    """RANK -> pid of torchrun's worker processes (found through the launcher's process tree; the workers run
    `-m bra.cli.cache`, whatever alias started the launcher)."""
    import psutil

    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env, cmd = child.environ(), " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "bra.cli.cache" in cmd:
            out[int(env["RANK"])] = child.pid
    return out


def interrupted_state(store: Path) -> tuple[int, str]:
    """(shards done, status) of a store whose build was stopped."""
    group = zarr.open_group(str(store), mode="r")
    return done_count(store), str(group.attrs[schema.ATTR_STATUS])


def test_distributed_build__rank_killed_then_resumed_equals_one_process(reference, tmp_path: Path) -> None:
    """A 2-process build; once each rank has written a shard, rank 1 is SIGKILLed (torchrun then stops rank
    0). A one-process build resumes it. The store equals the 1-process build row for row (no row lost or
    written twice), and its writer record shows both ranks of the 2-process build."""
    manifest, want = reference
    assert len(want["arrays"][schema.DONE_ARRAY]) == N_SHARDS
    store = tmp_path / "two.zarr"
    kill_rank_after(manifest, store, rank=1, trigger=both_halves_done)
    done, status = interrupted_state(store)
    assert 2 <= done < N_SHARDS and status == schema.STATUS_BUILDING
    before = zarr.open_group(str(store), mode="r")[schema.RANK_ARRAY][:]
    assert set(before[:N_SHARDS // 2].tolist()) <= {0, -1} and set(before[N_SHARDS // 2:].tolist()) <= {1, -1}
    assert {0, 1} <= set(before.tolist())  # every rank wrote at least one shard
    with rank_threads():
        result = build_store(load_manifest(manifest), store)
    assert result.status == "resumed"
    assert result.computed_tokens < result.n_tokens  # done shards were not computed again
    assert_same_rows(store, want)
    doc = snapshot(store)["arrays"]["doc_index"]
    assert np.all(np.diff(doc) >= 0)  # rows in document order (positions in order within each window)


@pytest.mark.slow
def test_distributed_build__rank_killed_then_two_processes_resume(reference, tmp_path: Path) -> None:
    """As above, and `--nproc 2` resumes: the not-done shards are split between the two new ranks."""
    manifest, want = reference
    store = tmp_path / "two.zarr"
    kill_rank_after(manifest, store, rank=1, trigger=lambda s: len(done_shards(s)) >= 2)
    n_shards = len(want["arrays"][schema.DONE_ARRAY])
    done, status = interrupted_state(store)
    assert 2 <= done < n_shards - 2 and status == schema.STATUS_BUILDING
    before = zarr.open_group(str(store), mode="r")[schema.RANK_ARRAY][:]
    log = run_build(manifest, store)
    assert "resumed" in log and f"{n_shards - done} shards to write" in log
    assert_same_rows(store, want)
    doc = snapshot(store)["arrays"]["doc_index"]
    assert np.all(np.diff(doc) >= 0)  # rows in document order (positions in order within each window)
    ranks = zarr.open_group(str(store), mode="r")[schema.RANK_ARRAY][:]
    resumed = before == -1  # shards written by the second run
    assert set(ranks[resumed].tolist()) == set(range(NPROC))  # every rank wrote at least one shard
    assert np.all(np.diff(ranks[resumed]) >= 0)  # contiguous runs, rank 0's first


@pytest.mark.slow
def test_distributed_build__two_processes_equal_one_process(reference, tmp_path: Path) -> None:
    manifest, want = reference
    store = tmp_path / "two.zarr"
    assert "built" in run_build(manifest, store)
    assert_same_rows(store, want)
    assert set(zarr.open_group(str(store), mode="r")[schema.RANK_ARRAY][:].tolist()) == set(range(NPROC))


@pytest.mark.slow
def test_distributed_build__rank_killed_then_one_process_resumes(reference, tmp_path: Path) -> None:
    manifest, want = reference
    store = tmp_path / "killed.zarr"
    kill_rank_after(manifest, store, rank=0, trigger=lambda s: len(done_shards(s)) >= 1)
    done, status = interrupted_state(store)
    assert done >= 1 and status == schema.STATUS_BUILDING
    with rank_threads():
        result = build_store(load_manifest(manifest), store)
    assert result.status == "resumed" and result.computed_tokens < result.n_tokens
    assert_same_rows(store, want)


def test_distributed_eval_build__ranks_share_generation_and_equal_one_process(
        tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """An eval manifest under 2 processes: each rank generates its run of the generation batches (5 prompts
    in batches of 2: rank 0 the first two batches, rank 1 the last), every rank writes shards, and the
    store (arrays, attrs, prompts and generation tables) equals a 1-process build's."""
    import pandas as pd

    manifest = eval_manifest(tmp_path, tiny_gemma_dir, write_prompts(tmp_path / "set.jsonl"))
    with rank_threads():
        want = snapshot(build_store(load_manifest(manifest), tmp_path / "one.zarr").path)
    log = run_build(manifest, tmp_path / "two.zarr")
    assert "generated 4 completions" in log and "generated 1 completions" in log, log[-2000:]
    assert_same_rows(tmp_path / "two.zarr", want)
    assert set(zarr.open_group(str(tmp_path / "two.zarr"), mode="r")[schema.RANK_ARRAY][:].tolist()) == {0, 1}
    for table in (schema.PROMPTS_TABLE, schema.GENERATION_TABLE):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two.zarr" / table),
                                      pd.read_parquet(tmp_path / "one.zarr" / table))


# --- distributed fit (DDP) ---------------------------------------------------------------------------------

FIT = {"d_sae": 64, "k": 4, "steps": 40, "batch_size": 128, "buffer_rows": 256, "log_every": 4,
       "checkpoint_every": 20, "dead_tokens": 256, "contrastive_rows": 16, "lr": 1e-3}


def torchrun_fit(store: Path, out: Path, *extra: str, via_nproc: bool = False, **overrides: Any) -> None:
    """A 2-process fit: torchrun itself, or (``via_nproc``) `bra-sae fit --nproc 2`, which starts torchrun."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**FIT, **overrides}.items()]
    fit_argv = ["fit", "--store", str(store), "--out", str(out), *flags, *extra]
    if via_nproc:
        cmd = [sys.executable, "-m", "bra.sae", *fit_argv, "--nproc", str(NPROC)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
               "-m", "bra.sae", *fit_argv]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_distributed_fit__two_processes_track_one_process_loss_curve(reference_build, tmp_path: Path) -> None:
    """Same global batch (128 rows: 64 per rank, each rank from its own shards) and seed. The data order
    differs, so the curves are compared with a tolerance: every logged step's FVU within 0.1 of the
    1-process run's (measured here: at most 0.04) and the mean FVU of the second half within 5% (measured:
    1%; the total loss is not compared: its NT-Xent term swings by ±0.1 from batch to batch, and its
    second-half mean differed by 6%). TopK near-ties may flip, so nothing is compared bitwise."""
    from safetensors.torch import load_file

    from bra.sae.config import TrainConfig
    from bra.sae.formats import load_saelens
    from bra.sae.train import fit

    _, store = reference_build
    with rank_threads():
        fit(store, tmp_path / "one", TrainConfig.from_dict(FIT))
    torchrun_fit(store, tmp_path / "two", via_nproc=True)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["step"] for x in one] == [x["step"] for x in two] == list(range(4, 41, 4))
    assert all(x["tokens"] == y["tokens"] for x, y in zip(one, two, strict=True))  # same global batch
    for x, y in zip(one, two, strict=True):
        assert abs(x["fvu"] - y["fvu"]) <= 0.1, (x["step"], x["fvu"], y["fvu"])
    half = len(one) // 2
    mean1, mean2 = (float(np.mean([m["fvu"] for m in run[half:]])) for run in (one, two))
    assert abs(mean2 - mean1) <= 0.05 * mean1
    assert two[-1]["fvu"] < two[0]["fvu"]  # it learns
    weights = load_file(str(tmp_path / "two" / "checkpoint" / "sae.safetensors"))  # before the export folds
    norms = weights["W_dec"].norm(dim=-1)  # the input scale into the decoder
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    assert load_saelens(tmp_path / "two" / "sae").cfg.d_sae == FIT["d_sae"]
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["world_size"] == NPROC


@pytest.mark.slow
def test_distributed_fit__resume_continues_the_same_curve(reference_build, tmp_path: Path) -> None:
    """Checkpoints are written by rank 0; a resumed 2-process fit continues each rank's data order, so it
    equals the uninterrupted 2-process fit exactly. A resume with another number of processes is refused."""
    _, store = reference_build
    flat = {"lr_decay_frac": 0.0}  # a constant learning rate, so a run may be extended by --resume --steps
    torchrun_fit(store, tmp_path / "full", steps=24, **flat)
    torchrun_fit(store, tmp_path / "part", steps=20, **flat)
    torchrun_fit(store, tmp_path / "part", "--resume", steps=24, **flat)
    strip = [[{k: v for k, v in m.items() if k != "tokens_per_s"} for m in metrics(tmp_path / r)]
             for r in ("full", "part")]
    assert strip[0] == strip[1]
    from bra.errors import SAEError
    from bra.sae.config import TrainConfig
    from bra.sae.train import fit

    with pytest.raises(SAEError, match="number of processes"):
        fit(store, tmp_path / "part", TrainConfig.from_dict({**FIT, **flat, "steps": 30}), resume=True)
