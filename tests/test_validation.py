"""bra/audit/validation.py and `bra-sae validate`: the known-depth study end to end at toy size (the tiny
eval store scored as three runs, one with a prefilled copy whose labels say which refusals broke), and its
bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from bra.cache import schema
from bra.cache.writer import write_table_atomic


def _sae_cli(argv: list[str]) -> int:
    from bra.cli.sae import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return int(exc.value.code or 0)


def _prefilled(store: Path, tmp: Path, broken: list[str]) -> Path:
    """A copy of ``store`` whose prompts ``broken`` are labelled comply (the prefill broke their refusal)."""
    copy = Path(shutil.copytree(store, tmp / "prefill.zarr"))
    table = pd.read_parquet(copy / schema.PROMPTS_TABLE)
    hit = table["id"].isin(broken)
    table.loc[hit, "surface_label"] = "comply"
    table["surface_probs"] = [[0.0, 1.0, 0.0, 0.0, 0.0] if h else list(p)
                              for h, p in zip(hit, table["surface_probs"], strict=True)]
    write_table_atomic(table, copy / schema.PROMPTS_TABLE)
    return copy


def _toy_runs(eval_env, tmp: Path) -> tuple[Path, Path, list[str], Path, Path]:
    """(the eval store, its SAE, its hazard-tier prompt ids, a prefilled copy in which every other hazard
    prompt's refusal broke, the report folder to write)."""
    _, store, sae, _, _ = eval_env
    table = pd.read_parquet(store / schema.PROMPTS_TABLE)
    hazard = table.loc[table["tier"] == "hazard_adjacent_category", "id"].tolist()
    return store, sae, hazard, _prefilled(store, tmp, hazard[::2]), tmp / "validation"


def test_validate__toy_study_end_to_end(eval_env, no_model, tmp_path: Path) -> None:
    store, sae, hazard, prefill, out = _toy_runs(eval_env, tmp_path)
    argv = ["validate", "--run", f"base={store}", "--run", f"shallow={store},{prefill}",
            "--run", f"deep={store}", "--sae", str(sae), "--out", str(out), "--n-boot", "50"]
    assert _sae_cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    for name in ("refusal_rates.png", "depth_scores.png"):
        assert (out / name).stat().st_size > 0
    assert set(report["organisms"]) == {"base", "shallow", "deep"}
    shallow = report["organisms"]["shallow"]
    plain = shallow["refusal"]["plain"]["hazard_adjacent_category"]
    assert plain["k"] == plain["n"] == len(hazard)  # the store labels every hazard prompt refuse
    assert shallow["refusal"]["prefill"]["hazard_adjacent_category"]["k"] == len(hazard) - len(hazard[::2])
    # prefill success counts the test split's refusals that the prefilled copy broke
    success = shallow["prefill_success"]
    assert 0 < success["n"] <= len(hazard) and 0 <= success["k"] <= success["n"]
    assert "prefill_success" not in report["organisms"]["base"]
    same = report["shallow_vs_deep"]["depth_score"]  # the same store twice: no separation either way
    assert same["auroc"] is None or same["auroc"] == pytest.approx(0.5)
    assert "## Shallow vs deep organism" in md and "Command: `bra-sae validate" in md
    assert report["meta"]["machine"] and report["meta"]["date"]


def test_validate__reference_fit_is_the_base_runs_applied_to_every_store(eval_env, no_model,
                                                                        tmp_path: Path) -> None:
    store, sae, _, prefill, out = _toy_runs(eval_env, tmp_path)
    argv = ["validate", "--run", f"base={store}", "--run", f"shallow={store},{prefill}",
            "--run", f"deep={prefill}", "--sae", str(sae), "--out", str(out), "--n-boot", "50",
            "--reference", "base"]
    assert _sae_cli(argv) == 0
    report = json.loads((out / "report.json").read_text())
    fit, own = report["reference_fit"], report["own_fit"]
    assert fit["run"] == "base" and fit["store"] == str(store) and "raw_scale" in fit
    # the base run on its own fit and on the reference fit (its own) are the same numbers
    for key in ("verdicts", "n_refused_test", "depth_score_mean", "scale"):
        assert report["organisms"]["base"][key] == own["organisms"]["base"][key], key
    # the deep store relabelled differently: under one fit its scale is the base run's, not its own
    assert report["organisms"]["deep"]["scale"] == report["organisms"]["base"]["scale"]
    assert report["organisms"]["deep"]["catalog_hazard_latents"] == len(fit["hazard_latents"])
    md = (out / "report.md").read_text()
    assert "**Reference fit**" in md and "# The same stores, each on its own fit" in md
    assert "--reference base" in report["meta"]["command"]


def test_validate__unknown_reference_is_one_line_error(eval_env, tmp_path: Path, capsys) -> None:
    _, store, sae, _, _ = eval_env
    code = _sae_cli(["validate", "--run", f"base={store}", "--sae", str(sae), "--out", str(tmp_path / "o"),
                     "--reference", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "--reference nope: no run of that name" in err[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("run,message", [("nostore", "expected NAME=PLAIN_STORE"),
                                         ("a=x,y,z", "expected NAME=PLAIN_STORE"),
                                         ("a=x,", "expected NAME=PLAIN_STORE")])
def test_validate__bad_runs_are_one_line_errors(run: str, message: str, tmp_path: Path, capsys) -> None:
    code = _sae_cli(["validate", "--run", run, "--sae", "none", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and not (tmp_path / "o").exists()


def test_organism_base__lets_the_base_models_sae_read_its_organisms(tmp_path: Path) -> None:
    from bra.sae.evaluate import organism_base

    folder = tmp_path / "shallow"
    folder.mkdir()
    assert organism_base(str(folder)) is None  # a folder without provenance is not an organism
    (folder / "provenance.json").write_text(json.dumps({
        "format": "bra-organism/1", "kind": "shallow", "layer": 1, "fingerprint": "f",
        "trained_prompt_ids": ["t-1"], "base_model": {"id": "org/base-model"}}))
    assert organism_base(str(folder)) == "org/base-model"
    assert organism_base("org/base-model") is None
