"""Crash torture: one build, and one fit, SIGKILLed again and again at random moments and resumed each time.

`bra-cache build` runs as a subprocess; each run is killed once it has finished at least one more shard,
either a random 0-40 ms later or the moment a shard's first array is on disk while its done flag is not
(in the middle of writing that shard). The next run resumes the same store. After the last kill the build is
resumed to the end, and the store must equal an uninterrupted build: every array (activations, columns,
per-shard CRC32s and statistics, done flags), the group attrs (statistics, digests) and docs.parquet's bytes.

`bra-sae fit --resume` gets the same treatment: each run is killed at a random step after it has written at
least one new checkpoint (often while it is writing the next one), and the final SAE parameters and the
metrics log must equal an uninterrupted fit's (torch.equal).

The default run kills 3 times each; `--runslow` kills 20 times, and BRA_TORTURE_KILLS=N sets N. The long
run's record is docs/torture.md (BRA_TORTURE_LOG=FILE writes that log).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import (
    SAMPLE_TEXT,
    TIMEOUT_S,
    KilledBuild,
    assert_same_store,
    snapshot,
    tiny_manifest,
    write_corpus,
)

from bra.cache import schema
from bra.cache.verify import verify_store
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest
from bra.sae.config import TrainConfig
from bra.sae.train import CHECKPOINT_DIR, METRICS_FILE, fit

pytestmark = pytest.mark.usefixtures("one_thread")

FIT_FLAGS = {"d_sae": 64, "k": 4, "batch_size": 32, "buffer_rows": 128, "log_every": 1, "checkpoint_every": 3,
             "dead_tokens": 64, "contrastive_rows": 16, "device": "cpu"}


# The killed runs are forked from one "zygote" process that has imported torch, transformers and bra once (and
# touched no data, no zarr store and no torch op), so a chain of kills costs the runs, not one interpreter
# start-up per kill. Each run is a real process of its own that dies by SIGKILL; the zygote reaps it and
# reports its wait status.
ZYGOTE = """
import json, os, sys
import {module}
{preload}
for line in sys.stdin:
    argv, log = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 0
        try:
            {module}.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""
PRELOAD = {"bra.cli.cache": "import bra.pipeline.build, transformers.models.gemma2.modeling_gemma2",
           "bra.cli.sae": "import bra.sae.train, torch._dynamo  # AdamW imports dynamo on first use"}


class Zygote:
    """A process that forks one CLI run at a time (see ZYGOTE)."""

    def __init__(self, cli_module: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "TQDM_DISABLE": "1"}
        code = ZYGOTE.format(module=cli_module, preload=PRELOAD[cli_module])
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        self._buf = b""

    def _line(self, timeout: float) -> str | None:
        """The next line the zygote printed, or None if none arrives within ``timeout`` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left < 0 or not select.select([fd], [], [], max(left, 0))[0]:
                return None
            chunk = os.read(fd, 4096)
            assert chunk, f"the zygote died (exit code {self.proc.wait()})"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], log: Path) -> int:
        """Fork a run of ``argv``; return its pid."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps([argv, str(log)]) + "\n").encode())
        pid = self._line(TIMEOUT_S)
        assert pid is not None, "the zygote did not fork in time"
        return int(pid)

    def wait(self, timeout: float) -> int | None:
        """The wait status of the current run once it has ended, or None while it runs."""
        line = self._line(timeout)
        return None if line is None else int(line)

    def close(self) -> None:
        """End the zygote (it exits when its input closes; killed if a run is still going)."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_chain(runs: list[KilledBuild], zygote: Zygote, logs: Path, after_kill: Callable[[int], None]) -> None:
    """Run ``runs`` one after another (``argv``: CLI arguments), SIGKILLing each when its trigger fires and
    calling ``after_kill(i)`` before the next starts. A run that ends before its trigger fails the test."""
    for i, run in enumerate(runs):
        log = logs / f"run-{i + 1}.log"
        pid = zygote.start(run.argv or [], log)
        deadline = time.monotonic() + TIMEOUT_S
        status = None
        try:
            while status is None:
                assert time.monotonic() < deadline, f"run {i + 1} did not finish in time"
                if run.trigger(run.store):
                    with contextlib.suppress(ProcessLookupError):  # it may have just ended by itself
                        os.kill(pid, signal.SIGKILL)
                    status = zygote.wait(TIMEOUT_S)
                    break
                status = zygote.wait(0.005)
        finally:
            if status is None:  # the test failed while the run was going
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        run.killed = status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert run.killed, f"run {i + 1} ended (status {status}) early: {log.read_text()[-2000:]}"
        after_kill(i)


def n_kills(config: pytest.Config) -> int:
    """3 by default, 20 with --runslow, BRA_TORTURE_KILLS when set."""
    env = os.environ.get("BRA_TORTURE_KILLS")
    if env:
        return int(env)
    return 20 if config.getoption("--runslow") else 3


def torture_manifest(tmp: Path, model_dir: Path, kills: int) -> Path:
    """Two tiers of paired sample sentences in 32-token shards (two 16-token chunks each): ~1,000 tokens
    (~32 shards) for a few kills, ~2,000 (~64 shards) for many, so every kill can follow a new shard."""
    path = tiny_manifest(tmp, model_dir, batch_size=2, layers=[1, 3])
    firsts = SAMPLE_TEXT if kills <= 5 else SAMPLE_TEXT + SAMPLE_TEXT[::-1]
    texts = [f"{a} {b}" for a in firsts for b in SAMPLE_TEXT[:3]]
    write_corpus(tmp / "haz.jsonl", texts[::2], "h")
    write_corpus(tmp / "ben.jsonl", texts[1::2], "b")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["storage"]["shard_tokens"] = 32
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def done_set(store: Path) -> set[int]:
    """Shards whose done flag is set: the flag's chunk file exists only once it is 1 (fill value 0)."""
    try:
        return {int(name) for name in os.listdir(store / schema.DONE_ARRAY / "c") if name.isdigit()}
    except FileNotFoundError:
        return set()


def written_not_done(store: Path, since: float) -> list[int]:
    """Shards whose token_id (the first array a shard write touches) was written after ``since`` but whose
    done flag is not set: a shard in the middle of being written."""
    folder = store / "token_id" / "c"
    try:
        names = [n for n in os.listdir(folder) if n.isdigit()]
    except FileNotFoundError:
        return []
    done = done_set(store)
    out = []
    for name in names:
        try:
            if int(name) not in done and (folder / name).stat().st_mtime >= since:
                out.append(int(name))
        except FileNotFoundError:
            continue
    return out


def written_arrays(store: Path, shard: int, since: float) -> list[str]:
    """The arrays of ``shard`` whose files were (re)written after ``since``: how far its write got."""
    out = []
    # (segment is all zeros in a corpus store, and zarr writes no file for an all-fill-value chunk)
    for name in ("token_id", "doc_index", "position", "tier", "mask", "acts/layer_1", "acts/layer_3",
                 schema.CRC_ARRAY):
        folder = store / name / "c"
        key = folder / str(shard) if name in schema.TOKEN_COLUMNS else folder / str(shard) / "0"
        if key.is_file() and key.stat().st_mtime >= since:
            out.append(name)
    return out


def build_trigger(kind: str, rng: random.Random, log: dict) -> Callable[[Path], bool]:
    """Fire after one more shard is done than at the run's start: ``mid-write`` as soon as a shard is half
    written, ``random`` a random 0-100 ms later (a shard takes some 30 ms here)."""
    state: dict = {}
    delay = rng.uniform(0.0, 0.1)

    def trigger(store: Path) -> bool:
        now = time.time()
        if not state:
            state.update(start=now, base=len(done_set(store)))
        if "progress" not in state:
            if len(done_set(store)) <= state["base"]:
                return False
            state["progress"] = now
        fire = bool(written_not_done(store, state["start"])) if kind == "mid-write" \
            else now - state["progress"] >= delay
        if fire:
            log.update(base=state["base"], start=state["start"])
        return fire

    return trigger


def kill_build_repeatedly(zygote: Zygote, manifest: Path, store: Path, kills: int,
                          rng: random.Random) -> list[dict]:
    """Run and SIGKILL the build ``kills`` times; return what each kill interrupted."""
    record: list[dict] = []
    logs: list[dict] = [{} for _ in range(kills)]
    kinds = ["mid-write" if i % 2 else "random" for i in range(kills)]

    def after_kill(i: int) -> None:
        attrs = json.loads((store / "zarr.json").read_text())["attributes"]
        assert attrs[schema.ATTR_STATUS] == schema.STATUS_BUILDING  # never looks complete when killed
        half = written_not_done(store, logs[i]["start"])
        record.append({"kill": i + 1, "trigger": kinds[i], "done_before": logs[i]["base"],
                       "done_after": len(done_set(store)), "shards": -(-attrs[schema.ATTR_N_TOKENS] // 32),
                       "mid_shard_write": {k: written_arrays(store, k, logs[i]["start"]) for k in half}})

    argv = ["build", str(manifest), "--store", str(store)]
    runs = [KilledBuild(store, build_trigger(kinds[i], rng, logs[i]), argv=argv) for i in range(kills)]
    run_chain(runs, zygote, store.parent.parent, after_kill)
    return record


def test_torture__build_killed_repeatedly_equals_uninterrupted(tmp_path: Path, tiny_gemma_dir: Path,
                                                                request: pytest.FixtureRequest) -> None:
    kills = n_kills(request.config)
    rng = random.Random(int(os.environ.get("BRA_TORTURE_SEED", "8")))
    manifest = torture_manifest(tmp_path, tiny_gemma_dir, kills)
    store = tmp_path / "killed" / "s.zarr"
    store.parent.mkdir()
    t0 = time.perf_counter()
    zygote = Zygote("bra.cli.cache")  # imports while the reference is built here
    try:
        reference = build_store(load_manifest(manifest), tmp_path / "ref.zarr")
        record = kill_build_repeatedly(zygote, manifest, store, kills, rng)
    finally:
        zygote.close()
    problems = verify_store(store)
    assert any("status is 'building'" in p for p in problems), problems
    result = build_store(load_manifest(manifest), store)
    assert result.status == "resumed" and 0 < result.computed_tokens < result.n_tokens
    assert reference.status == "built"
    assert_same_store(store, snapshot(reference.path))
    assert [p.name for p in store.parent.iterdir()] == ["s.zarr"]  # no half-created store left beside it
    # no half-written table, and no temp file of a zarr write that a kill interrupted (finalize sweeps them)
    # (temp siblings are named .NAME.tmp-PID-RANDOM; the pattern also catches the older .tmp-RANDOM names)
    assert not [p for p in store.rglob("*") if ".tmp-" in p.name] and not list(store.rglob("*.partial"))
    _log("build", record, {"seconds": round(time.perf_counter() - t0, 1), "n_tokens": result.n_tokens,
                           "arrays_equal": True, "crc32_equal": True, "docs_parquet_equal": True,
                           "attrs_and_stats_equal": True, "verify": "OK", "temp_files_left": 0})
    mids = [r for r in record if r["mid_shard_write"]]
    if kills >= 3:
        assert mids, f"no kill landed inside a shard write: {record}"


def fit_argv(store: Path, out: Path, steps: int, resume: bool) -> list[str]:
    argv = ["fit", "--store", str(store), "--out", str(out), "--steps", str(steps)]
    for k, v in FIT_FLAGS.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv + (["--resume"] if resume else [])


def metrics_step(out: Path) -> int:
    """Last step in metrics.jsonl (0 when there is none yet)."""
    try:
        lines = (out / METRICS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def fit_trigger(rng: random.Random, log: dict) -> Callable[[Path], bool]:
    """Fire at a random step after the run has checkpointed at least once more than the run it resumes."""
    every = FIT_FLAGS["checkpoint_every"]
    extra = rng.randint(0, every)
    state: dict = {}

    def trigger(out: Path) -> bool:
        step = metrics_step(out)
        if not state:  # the last checkpoint of the previous run (a line at step s follows the save at s - 1)
            state["ckpt"] = max(step - 1, 0) // every * every
        target = state["ckpt"] + every + 1 + extra  # past the next checkpoint: this run has saved one
        if step >= target:
            log.update(resumed_from=state["ckpt"], killed_at_step=step)
            return True
        return False

    return trigger


@pytest.fixture(scope="module")
def train_store(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("torture-fit")
    return build_store(load_manifest(tiny_manifest(tmp, tiny_gemma_dir)), tmp / "s.zarr").path


def test_torture__fit_killed_repeatedly_equals_uninterrupted(tmp_path: Path, train_store: Path,
                                                              request: pytest.FixtureRequest) -> None:
    kills = n_kills(request.config)
    rng = random.Random(int(os.environ.get("BRA_TORTURE_SEED", "8")) + 1)
    t0 = time.perf_counter()
    zygote = Zygote("bra.cli.sae")  # imports while the reference fit is made here
    store = train_store
    steps = 10 * kills + 10  # each kill advances the last checkpoint by 3 to 6 steps
    cfg = TrainConfig.from_dict({"steps": steps, **FIT_FLAGS})
    out = tmp_path / "killed"
    record: list[dict] = []
    logs: list[dict] = [{} for _ in range(kills)]

    def after_kill(i: int) -> None:
        assert not (out / "sae").exists()  # the exported SAE appears only at the end
        record.append({"kill": i + 1, **logs[i],
                       "checkpoint_dirs": sorted(p.name for p in out.iterdir() if CHECKPOINT_DIR in p.name)})

    runs = [KilledBuild(out, fit_trigger(rng, logs[i]), argv=fit_argv(store, out, steps, resume=i > 0))
            for i in range(kills)]
    try:
        reference = fit(store, tmp_path / "ref", cfg)
        run_chain(runs, zygote, tmp_path, after_kill)
    finally:
        zygote.close()
    resumed = fit(store, out, cfg, resume=True)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(reference, name)), name

    def curve(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                for line in (run / METRICS_FILE).read_text().splitlines()]

    assert curve(out) == curve(tmp_path / "ref")
    assert [x["step"] for x in curve(out)] == list(range(1, steps + 1))
    for name in ("sae/sae_weights.safetensors", "sae_weights.pt", "split.json"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert np.isfinite(curve(out)[-1]["loss"])
    _log("fit", record, {"seconds": round(time.perf_counter() - t0, 1), "steps": steps,
                         "parameters_equal": True, "metrics_equal": True})


def _log(what: str, record: list[dict], summary: dict) -> None:
    """Append the kill record to BRA_TORTURE_LOG (docs/torture.md is made from it)."""
    path = os.environ.get("BRA_TORTURE_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"what": what, "kills": record, **summary}) + "\n")


def test_resume__sweeps_temp_files_of_killed_writes(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """zarr writes a file via ``<name>.<uuid>.partial`` and a rename; a kill in between leaves the temp file.
    The resumed build removes such files once every shard is done (then no writer can still own one)."""
    import zarr

    manifest = load_manifest(tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0]))
    store = build_store(manifest, tmp_path / "s.zarr").path
    group = zarr.open_group(str(store), mode="r+")
    group[schema.DONE_ARRAY][1] = 0
    group.attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING
    stray = store / "acts" / "layer_0" / "c" / "1" / "0.0123456789abcdef.partial"
    stray.write_bytes(b"half a shard")
    assert build_store(manifest, store).status == "resumed"
    assert not stray.exists() and verify_store(store) == []


def _dead_pid() -> int:
    """The id of a process that has ended (what a killed writer leaves in its temp names)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("layout", ["atomic_dir", "legacy"])
def test_fit__resume_after_a_kill_between_the_checkpoint_renames(tmp_path: Path, train_store: Path,
                                                                   layout: str) -> None:
    """A checkpoint is swapped in by two renames (bra.fsutil.atomic_dir: checkpoint ->
    .checkpoint.old-PID-X, then .checkpoint.tmp-PID-Y -> checkpoint; runs made before it used
    .checkpoint.old and .checkpoint.tmp). Killed between them, a run has only .old (and a .tmp, complete or
    not): --resume continues from .old, exactly, and leaves no temp folder behind."""
    cfg = TrainConfig.from_dict({"steps": 12, **FIT_FLAGS})
    reference = fit(train_store, tmp_path / "ref", cfg)
    out = tmp_path / "killed"
    fit(train_store, out, cfg, stop_at=7)
    pid = _dead_pid()
    old, tmp = ((f".{CHECKPOINT_DIR}.old-{pid}-0123456789ab", f".{CHECKPOINT_DIR}.tmp-{pid}-ba9876543210")
                if layout == "atomic_dir" else (f".{CHECKPOINT_DIR}.old", f".{CHECKPOINT_DIR}.tmp"))
    os.replace(out / CHECKPOINT_DIR, out / old)
    (out / tmp).mkdir()
    (out / tmp / "sae.safetensors").write_bytes(b"half")
    resumed = fit(train_store, out, cfg, resume=True)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(resumed, name), getattr(reference, name)), name
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
