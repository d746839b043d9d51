"""Temp siblings: a writer killed before its rename leaves a hidden leftover; the next writer of the same
target removes it (its process is gone) and leaves live writers' temp files alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bra.fsutil import make_temp_dir, replace_dir, sweep_leftovers, temp_sibling


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep__removes_dead_writers_leftovers_only(tmp_path: Path, dead_pid: int) -> None:
    target = tmp_path / "report"
    dead_dir = tmp_path / f".report.tmp-{dead_pid}-abc"
    (dead_dir / "sub").mkdir(parents=True)
    dead_file = tmp_path / f".report.old-{dead_pid}-def"
    dead_file.write_text("x")
    live = tmp_path / f".report.tmp-{os.getpid()}-ghi"
    live.mkdir()
    other = tmp_path / f".reports.tmp-{dead_pid}-jkl"  # another target's
    other.mkdir()
    assert sorted(sweep_leftovers(target)) == sorted([dead_dir, dead_file])
    assert not dead_dir.exists() and not dead_file.exists()
    assert live.exists() and other.exists()


def test_temp_sibling__hidden_beside_target_with_pid(tmp_path: Path) -> None:
    tmp = temp_sibling(tmp_path / "a.json")
    assert tmp.parent == tmp_path and tmp.name.startswith(f".a.json.tmp-{os.getpid()}-") and not tmp.exists()
    made = make_temp_dir(tmp_path / "out")
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o755


def test_replace_dir__swaps_and_leaves_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    for text in ("one", "two"):
        src = make_temp_dir(dst)
        (src / "f").write_text(text)
        replace_dir(src, dst)
    assert (dst / "f").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_after_a_killed_export__leftover_removed(tmp_path: Path, dead_pid: int) -> None:
    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    leftover = tmp_path / f".sae.tmp-{dead_pid}-0123456789ab"
    leftover.mkdir()
    (leftover / "sae_weights.safetensors").write_bytes(b"half")
    sae = TopKSAE.init_random(SAEConfig(d_model=8, d_sae=16, k=2), seed=0)
    save_saelens(sae, tmp_path / "sae")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_gguf_conversion_cache__named_by_content_not_path(tmp_path: Path, monkeypatch) -> None:
    """The same GGUF file at two paths (two virtualenvs, two clones) maps to one converted folder; other
    content maps elsewhere."""
    from bra.pipeline import model

    monkeypatch.setenv("BRA_MODEL_CACHE", str(tmp_path / "cache"))
    a, b, c = (tmp_path / d / "m.gguf" for d in ("env1", "env2", "env3"))
    for path, data in ((a, b"GGUF same"), (b, b"GGUF same"), (c, b"GGUF other")):
        path.parent.mkdir()
        path.write_bytes(data)
    assert model.converted_dir(str(a)) == model.converted_dir(str(b))
    assert model.converted_dir(str(a)) != model.converted_dir(str(c))
    assert model.converted_dir(str(a)).parent == tmp_path / "cache"


def test_atomic_file__publishes_on_success_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    from bra.fsutil import atomic_file, write_text_atomic

    target = tmp_path / "x.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_atomic_dir__swaps_whole_folder_or_nothing(tmp_path: Path) -> None:
    from bra.fsutil import atomic_dir

    target = tmp_path / "report"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("2")
        raise ValueError("bug")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_atomic_dir__keep_existing_keeps_the_first_published(tmp_path: Path) -> None:
    """Content-addressed caches (the GGUF conversion): a second writer finishing later keeps the first
    folder, which another process may be reading, and leaves no temp folder."""
    from bra.fsutil import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "config.json").write_text("first")
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
