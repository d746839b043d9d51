"""A build killed with SIGKILL at any moment, then resumed, gives exactly what an uninterrupted build gives.

The killed builds are real `python -m bra.cache build` processes. They start together (their start-up is
mostly imports) and each is killed when its own trigger fires: once the first shard is done, at the
build's first write to disk (while the store is being created), or a random few milliseconds after a random
number of shards are done (so the kill lands anywhere inside a shard write, whatever the machine's speed).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import TIMEOUT_S, KilledBuild, assert_same_store, done_count, resume_manifest, snapshot

from bra.cache import schema
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest


def store_appeared(store: Path) -> bool:
    return (store / "zarr.json").is_file()


def first_write(store: Path) -> bool:
    """Trigger on the build's first write of anything into the store's (otherwise empty) folder."""
    return store.parent.is_dir() and any(store.parent.iterdir())


def run_and_kill(manifest: Path, builds: list[KilledBuild]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for b in builds:
        args = b.argv or ["build", str(manifest), "--store", str(b.store)]
        argv = [sys.executable, "-m", "bra.cache", *args]
        b.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(b.proc.poll() is None for b in builds if b.proc):
            assert time.monotonic() < deadline, "killed builds did not finish in time"
            for b in builds:
                if b.proc and b.proc.poll() is None and b.trigger(b.store):
                    b.proc.send_signal(signal.SIGKILL)
                    b.proc.wait()
                    b.killed = True
            time.sleep(0.01)
    finally:
        for b in builds:
            if b.proc and b.proc.poll() is None:
                b.proc.kill()
                b.proc.wait()


def after_shards(n_done: int, delay: float = 0.0) -> Callable[[Path], bool]:
    """Trigger ``delay`` seconds after at least ``n_done`` shards are marked done."""
    seen: list[float] = []

    def trigger(store: Path) -> bool:
        if not seen and done_count(store) >= n_done:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay

    return trigger


def random_moment(rng: random.Random) -> Callable[[Path], bool]:
    """A random point of the build: after 2..12 of its ~16 shards, plus 0-60 ms."""
    return after_shards(rng.randint(2, 12), rng.uniform(0.0, 0.06))


def check_resume(tmp_path: Path, tiny_gemma_dir: Path, triggers: list[Callable[[Path], bool]]) -> None:
    manifest = resume_manifest(tmp_path, tiny_gemma_dir)
    builds = [KilledBuild(tmp_path / f"killed{i}" / "s.zarr", t) for i, t in enumerate(triggers)]
    for b in builds:
        b.store.parent.mkdir()
    run_and_kill(manifest, builds)
    reference = build_store(load_manifest(manifest), tmp_path / "ref.zarr")
    assert reference.status == "built" and reference.n_tokens > 10 * 64
    want = snapshot(reference.path)
    for b in builds:
        assert b.killed, f"{b.store}: the build finished before its trigger fired"
        existed, interrupted = store_appeared(b.store), done_count(b.store)
        if existed:
            attrs = json.loads((b.store / "zarr.json").read_text())["attributes"]
            assert attrs[schema.ATTR_STATUS] == schema.STATUS_BUILDING
        result = build_store(load_manifest(manifest), b.store)
        assert result.status == ("resumed" if existed else "built")
        # only batches that touch a not-done shard are run again
        assert result.n_tokens - interrupted * 64 <= result.computed_tokens
        assert result.computed_tokens < result.n_tokens or not interrupted
        assert_same_store(b.store, want)
        assert [p.name for p in b.store.parent.iterdir()] == ["s.zarr"]  # no temp folder left behind


def test_resume__killed_after_first_shard_and_at_random_moments(tmp_path: Path, tiny_gemma_dir: Path,
                                                                 one_thread: None) -> None:
    check_resume(tmp_path, tiny_gemma_dir, [after_shards(1), first_write, random_moment(random.Random(1234))])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_resume__killed_at_more_random_moments(tmp_path: Path, tiny_gemma_dir: Path, one_thread: None,
                                               seed: int) -> None:
    rng = random.Random(seed)
    check_resume(tmp_path, tiny_gemma_dir, [random_moment(rng) for _ in range(3)])


@pytest.mark.slow
def test_resume__killed_twice(tmp_path: Path, tiny_gemma_dir: Path, one_thread: None) -> None:
    """Resume after a kill, kill the resumed build after one more shard, resume again."""
    manifest = resume_manifest(tmp_path, tiny_gemma_dir)
    store = tmp_path / "s.zarr"
    first = KilledBuild(store, after_shards(2))
    run_and_kill(manifest, [first])
    n_done = done_count(store)
    second = KilledBuild(store, after_shards(n_done + 1, 0.01))
    run_and_kill(manifest, [second])
    assert first.killed and second.killed and done_count(store) > n_done
    result = build_store(load_manifest(manifest), store)
    assert result.status == "resumed"
    want = snapshot(build_store(load_manifest(manifest), tmp_path / "ref.zarr").path)
    assert_same_store(store, want)
