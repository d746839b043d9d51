"""Bad input to every CLI command: exit != 0, exactly one ``error: ...`` line, and nothing half-written that
looks complete. One row per (command, kind of bad input); tests/test_cli_badinput.py has the `bra-cache build`
rows (malformed YAML, unknown keys, missing files, unwritable store, disk full, ...) and is not repeated here.

Disk full is simulated (ENOSPC raised by the first write of each output); "unwritable" is a path under a
regular file, which refuses writes whatever the user (root ignores permission bits). A corrupt chunk is a
flipped byte inside an activation shard: the CRC32C codec rejects it when fit/eval/score read it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
import zarr
from helpers import (
    disk_full,
    error_lines,
    flip_chunk,
    linear_sae_weights,
    mark_incomplete,
    put_nan,
    sae_main_code,
    tiny_manifest,
    truncate,
    write_gemma_scope_npz,
    write_pickled_code,
    write_saelens_dir,
)

from bra.cache import schema
from bra.cli.cache import main as cache_main
from bra.cli.sae import main as sae_main
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest
from bra.sae.formats import save_saelens
from bra.sae.model import SAEConfig, TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

BRA = Path(__file__).resolve().parent.parent / "bra"
SMALL_FIT = ["--d-sae", "64", "--k", "4", "--steps", "4", "--batch-size", "16", "--buffer-rows", "64",
             "--checkpoint-every", "2", "--dead-tokens", "64", "--contrastive-rows", "8", "--device", "cpu"]
FAST_SCORE = ["--n-boot", "10", "--n-perm", "10", "--repeats", "1", "--n-d-null", "10"]


@dataclass
class Env:
    """Inputs shared by the rows (module-scoped, never modified) and the row's own scratch space."""

    tmp: Path
    train_store: Path
    run_dir: Path
    eval_store: Path
    eval_sae: Path
    manifest: Path
    monkeypatch: pytest.MonkeyPatch
    marker: Path = field(init=False)
    """A file that pickled code in a checkpoint would create if it were ever run."""

    def __post_init__(self) -> None:
        self.marker = self.tmp / "pwned"

    def copy(self, store: Path, name: str = "copy.zarr") -> Path:
        return Path(shutil.copytree(store, self.tmp / name))


@pytest.fixture(scope="module")
def shared(tiny_gemma_dir: Path, labelled_eval_store: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("matrix")
    manifest = tiny_manifest(tmp, tiny_gemma_dir)
    train_store = build_store(load_manifest(manifest), tmp / "train.zarr").path
    assert sae_main_code(["fit", "--store", str(train_store), "--out", str(tmp / "run"), *SMALL_FIT]) == 0
    eval_store, model_copy = labelled_eval_store
    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_copy),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    eval_sae = save_saelens(TopKSAE.init_random(cfg, seed=5), tmp / "eval-sae")
    return {"train_store": train_store, "run_dir": tmp / "run", "eval_store": eval_store,
            "eval_sae": eval_sae, "manifest": manifest}


# ------------------------------------------------------------------------------------------- damage


def sae_dir_copy(env: Env, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of the fit's SAELens export with cfg.json edited."""
    out = Path(shutil.copytree(env.run_dir / "sae", env.tmp / "sae-copy"))
    if edit is not None:
        cfg = json.loads((out / "cfg.json").read_text())
        edit(cfg)
        (out / "cfg.json").write_text(json.dumps(cfg))
    return out


def other_sae(env: Env, **cfg: Any) -> Path:
    base = {"d_model": 64, "d_sae": 48, "k": 4, "layer": 1}
    return save_saelens(TopKSAE.init_random(SAEConfig(**{**base, **cfg}), seed=1), env.tmp / "other-sae")


def pretrained_sae(env: Env, architecture: str, d_model: int = 64, layer: int = 1,
                   edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A SAELens jumprelu / standard folder, or (``gemma_scope``) a params.npz under ``layer_<layer>/``;
    ``edit`` changes the weights first."""
    weights = linear_sae_weights(d_model, 48, 1, "standard" if architecture == "standard" else "jumprelu")
    if edit is not None:
        edit(weights)
    if architecture == "gemma_scope":
        return write_gemma_scope_npz(env.tmp / "gs" / f"layer_{layer}" / "width_48" / "params.npz", weights)
    return write_saelens_dir(env.tmp / architecture, architecture, weights,
                             hook_name=f"blocks.{layer}.hook_resid_post")


# --------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One bad invocation: the CLI, its arguments, a fragment of the expected error line, and a check that
    nothing complete-looking was left behind."""

    cli: Callable[[list[str]], None]
    argv: list[str]
    expect: str
    after: Callable[[], None] = lambda: None
    exit_code: int | None = None
    detail: str = ""
    """Expected elsewhere on stderr (verify lists the problems above its error line)."""


ROWS: list[Any] = []
"""Every row as ``pytest.param(builder, id=name)``, in registration order: the matrix test's parameters."""


def row(name: str) -> Callable[[Callable[[Env], Row]], Callable[[Env], Row]]:
    """Register the decorated ``builder(env) -> Row`` as the row ``name`` (its test id); a name registered
    twice is refused when this module is imported."""
    if any(param.id == name for param in ROWS):
        raise ValueError(f"bad-input row {name!r} is registered twice")

    def register(fn: Callable[[Env], Row]) -> Callable[[Env], Row]:
        ROWS.append(pytest.param(fn, id=name))
        return fn

    return register


def absent(*paths: Path) -> Callable[[], None]:
    """Check: none of ``paths`` exists, and no temp file or folder of theirs either."""

    def check() -> None:
        for p in paths:
            assert not p.exists(), f"{p} was left behind"
            assert not list(p.parent.glob(f".{p.name}.tmp*")), f"a temp file of {p} was left behind"

    return check


def unchanged(path: Path) -> Callable[[], None]:
    """Check: ``path`` still has its bytes, and no temp table lies beside it."""
    before = path.read_bytes()

    def check() -> None:
        assert path.read_bytes() == before, f"{path} changed"
        assert not [t for t in path.parent.iterdir() if ".tmp-" in t.name], "a temp table was left behind"

    return check


def fit(env: Env, store: Path, expect: str, *extra: str, out: Path | None = None) -> Row:
    out = out or env.tmp / "run"
    argv = ["fit", "--store", str(store), "--out", str(out), *SMALL_FIT, *extra]
    return Row(sae_main, argv, expect, absent(out / "sae", out / "sae_weights.pt"))


def evaluate(env: Env, store: Path, expect: str, *extra: str, sae: Path | None = None) -> Row:
    return Row(sae_main, ["eval", "--sae", str(sae or env.run_dir), "--store", str(store), *extra], expect)


def score(env: Env, store: Path, expect: str, *extra: str, sae: Path | None = None,
          out: Path | None = None) -> Row:
    out = out or env.tmp / "report"
    argv = ["score", "--store", str(store), "--sae", str(sae or env.eval_sae), "--out", str(out), *FAST_SCORE,
            *extra]
    return Row(sae_main, argv, expect, absent(out))


def export(env: Env, sae: Path, expect: str, *extra: str) -> Row:
    out = env.tmp / "exported"
    return Row(sae_main, ["export", "--sae", str(sae), "--out", str(out), *extra], expect, absent(out))


def edited_manifest(env: Env, fn: Callable[[dict[str, Any]], None]) -> Path:
    data = yaml.safe_load(env.manifest.read_text())
    fn(data)
    path = env.tmp / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def a_file(env: Env) -> Path:
    """A regular file, so that a path under it cannot be written (even by root)."""
    path = env.tmp / "a-file"
    path.write_text("not a folder")
    return path


def copy_run(env: Env) -> Path:
    return Path(shutil.copytree(env.run_dir, env.tmp / "run"))


def damaged(env: Env, which: str, how: str) -> Path:
    """A copy of the train or eval store with one kind of damage."""
    store = env.copy(env.train_store if which == "train" else env.eval_store)
    if how == "incomplete":
        mark_incomplete(store)
    elif how == "corrupt-chunk":
        flip_chunk(store)
    elif how == "missing-shard":
        (store / "acts" / "layer_1" / "c" / "1" / "0").unlink()
    elif how == "zarr-json":
        (store / "zarr.json").write_text("{garbage")
    elif how == "prompts":
        truncate(store / schema.PROMPTS_TABLE)
    return store


def plain_zarr_group(env: Env) -> Path:
    zarr.open_group(str(env.tmp / "plain.zarr"), mode="w")
    return env.tmp / "plain.zarr"


# bra-cache build (its other rows are in tests/test_cli_badinput.py)


@row("build/wrong-type")
def _(env: Env) -> Row:
    manifest = edited_manifest(env, lambda d: d.update(batch_size="three"))
    store = env.tmp / "s.zarr"
    return Row(cache_main, ["build", str(manifest), "--store", str(store)], "batch_size: expected an integer",
               absent(store))


@row("build/malformed-jsonl")
def _(env: Env) -> Row:
    (env.tmp / "bad.jsonl").write_text('{"id": 1, "text": "fine"}\n{"id": 2,\n')
    bad = str(env.tmp / "bad.jsonl")
    manifest = edited_manifest(env, lambda d: d["corpora"][1]["source"].update(path=bad))
    store = env.tmp / "s.zarr"
    return Row(cache_main, ["build", str(manifest), "--store", str(store)], "bad.jsonl:2: invalid JSON",
               absent(store))


@row("build/unknown-flag")
def _(env: Env) -> Row:
    return Row(cache_main, ["build", str(env.manifest), "--stroe", "x"], "No such option")


# bra-cache info / verify


@row("info/not-a-bra-store")
def _(env: Env) -> Row:
    return Row(cache_main, ["info", str(plain_zarr_group(env))], "not a bra store")


@row("info/malformed-zarr-json")
def _(env: Env) -> Row:
    return Row(cache_main, ["info", str(damaged(env, "train", "zarr-json"))], "is unreadable")


@row("verify/malformed-zarr-json")
def _(env: Env) -> Row:
    return Row(cache_main, ["verify", str(damaged(env, "train", "zarr-json"))], "1 problem(s)", exit_code=1)


@row("verify/truncated-prompts-table")
def _(env: Env) -> Row:
    return Row(cache_main, ["verify", str(damaged(env, "eval", "prompts"))], "1 problem(s)", exit_code=1,
               detail="prompts.parquet: unreadable")


@row("verify/not-a-bra-store")
def _(env: Env) -> Row:
    return Row(cache_main, ["verify", str(plain_zarr_group(env))], "1 problem(s)", exit_code=1)


# bra-cache relabel


@row("relabel/missing")
def _(env: Env) -> Row:
    return Row(cache_main, ["relabel", str(env.tmp / "nope.zarr")], "no store at")


@row("relabel/not-an-eval-store")
def _(env: Env) -> Row:
    return Row(cache_main, ["relabel", str(env.train_store)], "no prompts.parquet")


@row("relabel/incomplete-store")
def _(env: Env) -> Row:
    return Row(cache_main, ["relabel", str(damaged(env, "eval", "incomplete"))], "is incomplete")


@row("relabel/truncated-table")
def _(env: Env) -> Row:
    return Row(cache_main, ["relabel", str(damaged(env, "eval", "prompts"))], "prompts.parquet is unreadable")


def relabel_write_fails(env: Env, err: int, expect: str) -> Row:
    store = env.copy(env.eval_store)
    check = unchanged(store / schema.PROMPTS_TABLE)

    def fail(*_a: Any, **_k: Any) -> None:
        raise OSError(err, os.strerror(err), str(store / schema.PROMPTS_TABLE))

    env.monkeypatch.setattr(pd.DataFrame, "to_parquet", fail)
    return Row(cache_main, ["relabel", str(store)], expect, check)


@row("relabel/disk-full")
def _(env: Env) -> Row:
    return relabel_write_fails(env, errno.ENOSPC, "disk full")


@row("relabel/read-only-file-system")
def _(env: Env) -> Row:
    return relabel_write_fails(env, errno.EROFS, "Read-only file system")


# bra-sae fit


@row("fit/missing-store")
def _(env: Env) -> Row:
    return fit(env, env.tmp / "nope.zarr", "no store at")


@row("fit/incomplete-store")
def _(env: Env) -> Row:
    return fit(env, damaged(env, "train", "incomplete"), "is incomplete")


@row("fit/wrong-type")
def _(env: Env) -> Row:
    return fit(env, env.train_store, "Invalid value for '--steps'", "--steps", "four")


@row("fit/bad-value")
def _(env: Env) -> Row:
    return fit(env, env.train_store, "k (999) must be <= d_sae", "--k", "999")


@row("fit/unknown-flag")
def _(env: Env) -> Row:
    return fit(env, env.train_store, "No such option", "--stepz", "3")


@row("fit/unwritable-out")
def _(env: Env) -> Row:
    return fit(env, env.train_store, "a-file is a file, not a directory", out=a_file(env) / "run")


@row("fit/disk-full")
def _(env: Env) -> Row:
    import bra.sae.trainer as trainer

    disk_full(env.monkeypatch, trainer, "save_file")  # the first checkpoint
    out = env.tmp / "run"
    row_ = fit(env, env.train_store, "disk full", out=out)
    check = row_.after

    def after() -> None:  # stopped before its first checkpoint: --resume starts it over, and finishes
        check()
        assert not (out / "checkpoint").exists() and not list(out.glob(".checkpoint.tmp*"))
        env.monkeypatch.undo()
        assert sae_main_code(["fit", "--store", str(env.train_store), "--out", str(out), *SMALL_FIT,
                              "--resume"]) == 0
        assert (out / "sae" / "cfg.json").is_file()

    row_.after = after
    return row_


@row("fit/nan-activations")
def _(env: Env) -> Row:
    store = env.copy(env.train_store)
    nan_row = put_nan(store)
    return fit(env, store, f"NaN/inf activation at store row {nan_row}", "--no-balanced", "--steps", "40",
               "--heldout-fraction", "0")


@row("fit/corrupt-chunk")
def _(env: Env) -> Row:
    return fit(env, damaged(env, "train", "corrupt-chunk"),
               "corrupt chunk in acts/layer_1 rows 96..111 (shard 1)", "--steps", "40")


@row("fit/missing-shard-file")
def _(env: Env) -> Row:
    return fit(env, damaged(env, "train", "missing-shard"),
               "missing shard file acts/layer_1/c/1/0 (rows 64..127)", "--steps", "40")


@row("fit/resume-pickled-state")
def _(env: Env) -> Row:
    out = copy_run(env)
    shutil.rmtree(out / "sae")
    (out / "sae_weights.pt").unlink()
    write_pickled_code(out / "checkpoint" / "trainer_state.pt", env.marker, key="step")
    return fit(env, env.train_store, "pickled code", "--resume", out=out)


@row("fit/resume-other-layer")
def _(env: Env) -> Row:
    out = copy_run(env)
    shutil.rmtree(out / "sae")
    (out / "sae_weights.pt").unlink()
    return fit(env, env.train_store, "different settings", "--resume", "--layer", "2", out=out)


@row("fit/resume-malformed-run-json")
def _(env: Env) -> Row:
    out = copy_run(env)
    (out / "run.json").write_text("{not json")
    return Row(sae_main, ["fit", "--store", str(env.train_store), "--out", str(out), *SMALL_FIT, "--resume"],
               "run.json is unreadable")


# bra-sae eval


@row("eval/missing-sae")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "no SAE at", sae=env.tmp / "nope")


@row("eval/incomplete-store")
def _(env: Env) -> Row:
    return evaluate(env, damaged(env, "train", "incomplete"), "is incomplete")


@row("eval/d_model-mismatch")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "SAE d_model 32 does not match", sae=other_sae(env, d_model=32))


@row("eval/layer-mismatch")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "but layer 2 was requested", "--layer", "2")


@row("eval/model-mismatch")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "SAE was trained on", sae=env.eval_sae)


@row("eval/jumprelu-d_model-mismatch")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "SAE d_model 32 does not match",
                    sae=pretrained_sae(env, "jumprelu", d_model=32))


@row("eval/gemma-scope-layer-mismatch")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "SAE reads layer 2", "--layer", "1",
                    sae=pretrained_sae(env, "gemma_scope", layer=2))


@row("eval/npz-missing-threshold")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "lacks ['threshold']",
                    sae=pretrained_sae(env, "gemma_scope", edit=lambda w: w.pop("threshold")))


@row("eval/none-layer-not-in-store")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "layer 3 is not in store", "--layer", "3", sae=Path("none"))


@row("eval/nan-activations")
def _(env: Env) -> Row:
    store = env.copy(env.train_store)
    return evaluate(env, store, f"NaN/inf activation at store row {put_nan(store)}", "--split", "all")


@row("eval/corrupt-chunk")
def _(env: Env) -> Row:
    return evaluate(env, damaged(env, "train", "corrupt-chunk"), "corrupt chunk in acts/layer_1 rows 96..111",
                    "--split", "all")


@row("eval/malformed-split-json")
def _(env: Env) -> Row:
    run = copy_run(env)
    (run / "split.json").write_text("{oops")
    return evaluate(env, env.train_store, "split.json is not a readable split record", sae=run)


@row("eval/unwritable-out")
def _(env: Env) -> Row:
    return evaluate(env, env.train_store, "is a file, not a directory", "--out", str(a_file(env) / "e.json"))


@row("eval/disk-full")
def _(env: Env) -> Row:
    out = env.tmp / "eval.json"
    real = Path.write_bytes

    def half_then_full(self: Path, data: bytes) -> int:  # the atomic writer's one write of the bytes
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    env.monkeypatch.setattr(Path, "write_bytes", half_then_full)
    row_ = evaluate(env, env.train_store, "disk full", "--out", str(out))
    row_.after = absent(out)
    return row_


# bra-sae export / info


@row("export/pickled-code")
def _(env: Env) -> Row:
    return export(env, write_pickled_code(env.tmp / "evil.pt", env.marker), "pickled code")


@row("export/malformed-cfg-json")
def _(env: Env) -> Row:
    sae = sae_dir_copy(env)
    (sae / "cfg.json").write_text("{oops")
    return export(env, sae, "cfg.json: malformed JSON")


@row("export/truncated-weights")
def _(env: Env) -> Row:
    sae = sae_dir_copy(env)
    truncate(sae / "sae_weights.safetensors")
    return export(env, sae, "not a readable safetensors file")


@row("export/out-exists")
def _(env: Env) -> Row:
    out = env.tmp / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    row_ = export(env, env.run_dir, "is not empty")
    row_.after = unchanged(out / "mine.txt")
    return row_


@row("export/disk-full")
def _(env: Env) -> Row:
    import bra.sae.formats as formats

    disk_full(env.monkeypatch, formats, "save_file")
    return export(env, env.run_dir, "disk full")


@row("export/not-topk")
def _(env: Env) -> Row:
    return export(env, pretrained_sae(env, "jumprelu"), "export writes TopK SAEs only")


@row("info/gemma-scope-pickled-npz")
def _(env: Env) -> Row:
    path = env.tmp / "layer_1" / "params.npz"
    path.parent.mkdir()
    np.savez(path, W_enc=np.array([object()], dtype=object))
    return Row(sae_main, ["info", str(path)], "not a readable .npz")


@row("export/bad-format")
def _(env: Env) -> Row:
    return export(env, env.run_dir, "Invalid value for '--format'", "--format", "gguf")


@row("info/pickled-code")
def _(env: Env) -> Row:
    return Row(sae_main, ["info", str(write_pickled_code(env.tmp / "evil.pt", env.marker))], "pickled code")


@row("info/truncated-pt")
def _(env: Env) -> Row:
    weights = Path(shutil.copy(env.run_dir / "sae_weights.pt", env.tmp / "w.pt"))
    truncate(weights)
    return Row(sae_main, ["info", str(weights)], "not a readable torch checkpoint")


@row("info/wrong-type-in-cfg")
def _(env: Env) -> Row:
    sae = sae_dir_copy(env, lambda c: (c["metadata"].pop("bra"), c.update(k="eight")))
    return Row(sae_main, ["info", str(sae)], "k must be a positive int, got 'eight'")


@row("info/unknown-key-in-cfg")
def _(env: Env) -> Row:
    sae = sae_dir_copy(env, lambda c: c["metadata"]["bra"]["config"].update(colour="red"))
    return Row(sae_main, ["info", str(sae)], "unknown SAEConfig keys: ['colour']")


@row("info/missing")
def _(env: Env) -> Row:
    return Row(sae_main, ["info", str(env.tmp / "nope")], "no SAE at")


# bra-sae score


@row("score/incomplete-store")
def _(env: Env) -> Row:
    return score(env, damaged(env, "eval", "incomplete"), "is incomplete")


@row("score/not-an-eval-store")
def _(env: Env) -> Row:
    return score(env, env.train_store, "not an eval store", sae=other_sae(env))


@row("score/d_model-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "SAE d_model 32 does not match", sae=other_sae(env, d_model=32))


@row("score/layer-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "layer 2 is not in store", sae=other_sae(env, layer=2))


@row("score/jumprelu-d_model-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "SAE d_model 32 does not match", sae=pretrained_sae(env, "jumprelu",
                                                                                          d_model=32))


@row("score/standard-layer-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "layer 2 is not in store", sae=pretrained_sae(env, "standard", layer=2))


@row("score/gemma-scope-d_model-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "SAE d_model 32 does not match",
                 sae=pretrained_sae(env, "gemma_scope", d_model=32))


@row("score/gemma-scope-layer-mismatch")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "layer 2 is not in store",
                 sae=pretrained_sae(env, "gemma_scope", layer=2))


@row("score/npz-missing-threshold")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "lacks ['threshold']",
                 sae=pretrained_sae(env, "gemma_scope", edit=lambda w: w.pop("threshold")))


@row("score/jumprelu-negative-threshold")
def _(env: Env) -> Row:
    def negate(w: dict[str, Any]) -> None:
        w["threshold"] = -w["threshold"]

    return score(env, env.eval_store, "JumpReLU thresholds must be >= 0", sae=pretrained_sae(env, "jumprelu",
                                                                                             edit=negate))


@row("score/unsupported-architecture")
def _(env: Env) -> Row:
    sae = sae_dir_copy(env, lambda c: c.update(architecture="gated"))
    return score(env, env.eval_store, "SAELens architecture 'gated' is not supported", sae=sae)


@row("score/none-layer-not-in-store")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "layer 3 is not in store", "--layer", "3", sae=Path("none"))


@row("score/nan-activations")
def _(env: Env) -> Row:
    store = env.copy(env.eval_store)
    return score(env, store, f"NaN/inf activation at store row {put_nan(store)}")


@row("score/corrupt-chunk")
def _(env: Env) -> Row:
    return score(env, damaged(env, "eval", "corrupt-chunk"),
                 # which inner chunk sits mid-file depends on compressed sizes, so only the array is fixed
                 "corrupt chunk in acts/layer_1 rows ")


@row("score/missing-shard-file")
def _(env: Env) -> Row:
    return score(env, damaged(env, "eval", "missing-shard"), "missing shard file acts/layer_1/c/1/0")


@row("score/truncated-prompts")
def _(env: Env) -> Row:
    return score(env, damaged(env, "eval", "prompts"), "prompts.parquet is unreadable")


@row("score/pickled-code")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "pickled code", sae=write_pickled_code(env.tmp / "evil.pt", env.marker))


@row("score/wrong-type")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "Invalid value for '--n-boot'", "--n-boot", "many")


@row("score/bad-baseline")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "expected NAME=SAE", "--baseline", "nope")


@row("score/unwritable-out")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "is a file, not a directory", out=a_file(env) / "report")


@row("score/disk-full")
def _(env: Env) -> Row:
    disk_full(env.monkeypatch, pd.DataFrame, "to_parquet")
    return score(env, env.eval_store, "disk full")


@row("score/positive-tier-no-prompt-has")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "--positive-tiers: no prompt has tier 'hazard_adjacent_legal' (tiers "
                 "present: benign_bio, dual_use_bio, hazard_adjacent_category)",
                 "--positive-tiers", "hazard_adjacent_category,hazard_adjacent_legal")


@row("score/negative-tier-no-prompt-has")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "--negative-tiers: no prompt has tier 'benign_bi' (tiers present: ",
                 "--negative-tiers", "benign_bi")


@row("score/tier-in-both-flags")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "tier 'dual_use_bio' is in both positive_tiers and negative_tiers",
                 "--positive-tiers", "hazard_adjacent_category,dual_use_bio", "--negative-tiers",
                 "dual_use_bio")


@row("score/tier-in-flag-and-store-class")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "tier 'benign_bio' is in both classes (positive from --positive-tiers, "
                 "negative from the store attrs)", "--positive-tiers", "benign_bio")


@row("score/empty-positive-class")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "positive_tiers is empty", "--positive-tiers", "")


@row("score/blank-negative-tier")
def _(env: Env) -> Row:
    return score(env, env.eval_store, "negative_tiers has an empty tier name", "--negative-tiers", ",")


@pytest.mark.parametrize("build_row", ROWS)
def test_cli__bad_input_is_one_error_line(build_row: Callable[[Env], Row], shared: dict[str, Path],
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path, monkeypatch=monkeypatch, **shared)
    row = build_row(env)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        row.cli(row.argv)
    _, err = capsys.readouterr()
    errors = error_lines(err)
    assert info.value.code not in (0, None), err
    if row.exit_code is not None:
        assert info.value.code == row.exit_code
    assert len(errors) == 1, err
    assert row.expect in errors[0], errors[0]
    assert row.detail in err, err
    assert "Traceback" not in err
    row.after()
    assert not env.marker.exists(), "pickled code in a checkpoint was executed"


# ---------------------------------------------------------------------------------- static checks


def test_console__python_m_bra_sae_refuses_pickled_code(tmp_path: Path) -> None:
    """The real entry point (`python -m bra.sae`): exit 2, one error line, no traceback, no code run."""
    marker = tmp_path / "pwned"
    evil = write_pickled_code(tmp_path / "evil.pt", marker)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bra.sae", "info", str(evil)], capture_output=True,
                          text=True, timeout=300, env=env)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and "pickled code" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not marker.exists()
