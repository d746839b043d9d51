"""Smoke test of the benchmark entry point at --size tiny: every study runs and has its rows in both result
files. No timing assertions (numbers on shared CI cores mean nothing); bench/results.md is made by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# bench/ sits beside bra/ in the repo but is not installed; `python -m pytest` from the root finds it, a bare
# `pytest` may not
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STUDIES = ("build", "codecs", "fp8", "train", "rescore", "saelens", "scaleout", "resume", "labels", "writer")


def _run_tiny(tmp_path: Path, studies: str | None = None, gemma: Path | None = None,
              out: Path | None = None) -> tuple[Path, dict]:
    """`python -m bench --size tiny` on one torch thread, scratch in ``tmp_path / "work"`` (with the session's
    tiny Gemma2 linked in when ``gemma`` is given, not a new one); (results.md, results.json's contents)."""
    from bench.__main__ import main

    work = tmp_path / "work"
    if gemma is not None:
        work.mkdir()
        (work / "tiny-gemma").symlink_to(gemma)
    out = out or tmp_path
    md, js = out / "results.md", out / "results.json"
    main(["--size", "tiny", *(["--studies", studies] if studies else []), "--out", str(md), "--json-out",
          str(js), "--work", str(work), "--threads", "1"], standalone_mode=False)
    assert md.is_file() and js.is_file()
    return md, json.loads(js.read_text())


def test_bench__tiny_run_writes_every_study_row(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    from bench.config import SIZES

    md, data = _run_tiny(tmp_path, gemma=tiny_gemma_dir, out=tmp_path / "out")
    assert data["size"] == "tiny" and data["command"].startswith("python -m bench")
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch_threads"] == 1
    assert {s: data["studies"][s]["error"] for s in STUDIES} == {s: None for s in STUDIES}
    by_study: dict[str, list[dict]] = {}
    for row in data["rows"]:
        by_study.setdefault(row["study"], []).append(row)
    assert set(by_study) == set(STUDIES)
    has_saelens = importlib.util.find_spec("sae_lens") is not None
    has_s3 = all(importlib.util.find_spec(m) is not None for m in ("moto", "s3fs"))
    for study, rows in by_study.items():
        if study == "saelens" and not has_saelens:
            continue
        if study == "scaleout" and not has_s3:  # the object-store rows need moto's server
            rows = [r for r in rows if "S3" not in r["name"]]
        assert all(r["value"] is not None for r in rows), (study, rows)
    scaleout = {r["name"]: r for r in by_study["scaleout"]}
    assert "token ids identical" in scaleout["2 ÷ 1 processes, wall-clock rate"]["note"]
    n_geometries = len(SIZES["tiny"].scaleout_geometries)
    assert sum(n.startswith("read from moto S3,") for n in scaleout) == n_geometries  # no added latency
    assert sum(n.startswith("read from moto S3 + ") for n in scaleout) == n_geometries  # with it
    assert sum(n.startswith("reader threads ") for n in scaleout) == 1
    assert all(isinstance(r["value"], (int, float)) for r in by_study["scaleout"] if r["value"] is not None)
    targets = {r["study"]: r["target"] for r in data["rows"] if r["target"]}
    want = {"build": "≤ 1.05", "train": "≥ 0.95", "rescore": "≤ 0.05", "resume": "≤ 1.5", "labels": "≥ 0.7",
            "writer": "≥ 1.7"}
    assert targets == ({**want, "saelens": "≥ 1.1"} if has_saelens else want)
    resume = [r for r in by_study["resume"] if r["target"]]
    assert [r["name"].split(" stopped at step ")[1].split(":")[0] for r in resume] == ["3", "12"]

    text = md.read_text()
    assert "| study | measurement | value |" in text
    for heading in (*(f"## {i}." for i in range(1, 10)), "## 10."):
        assert heading in text
    for row in data["rows"]:
        assert row["name"].replace("|", "\\|") in text


def test_bench__tiny_writer_and_fp8_studies_report_every_row(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """Study 10 (writer alone, d_model 2304) and study 3 (fp8 through the store path) at --size tiny."""
    md, data = _run_tiny(tmp_path, "writer,fp8", gemma=tiny_gemma_dir)
    assert {k: v["error"] for k, v in data["studies"].items()} == {"writer": None, "fp8": None}
    rows = {r["name"]: r for r in data["rows"]}
    assert all(r["value"] is not None for r in rows.values()), rows
    assert rows["writer 2 ÷ 1 threads, tokens/s"]["target"] == "≥ 1.7"
    writer = data["studies"]["writer"]["details"]
    assert writer["d_model"] == 2304 and writer["identical_across_threads"] is True
    assert {"threads=1", "threads=2", "raw file writes"} <= set(writer["best_seconds"])
    assert all(v > 0 for v in writer["tokens_per_cpu_second"].values())
    stores = data["studies"]["fp8"]["details"]["stores"]
    assert stores["float8_e4m3"]["lossy"] is True and stores["bfloat16"]["lossy"] is False
    assert stores["float32"]["fvu_vs_exact"] == 0.0 < stores["bfloat16"]["fvu_vs_exact"]
    assert stores["bfloat16"]["fvu_vs_exact"] < stores["float8_e4m3"]["fvu_vs_exact"] < 0.05
    assert stores["float8_e4m3"]["disk_bytes_per_token"] < stores["bfloat16"]["disk_bytes_per_token"]
    assert set(data["studies"]["fp8"]["details"]["sae"]["fvu"]) == {"bfloat16", "float8_e4m3"}
    text = md.read_text()
    assert "## 3." in text and "## 10." in text


@pytest.mark.skipif(importlib.util.find_spec("sae_lens") is None, reason="needs the bench extra (sae-lens)")
def test_bench__tiny_saelens_study_has_the_same_recipe_rows(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    """Study 6's same-recipe comparison at --size tiny: ours (plain and tier term) and SAELens's TopK
    trainer on every seed, scored on held-out rows only, with their rows and table."""
    from bench.config import SIZES

    md, data = _run_tiny(tmp_path, "saelens", gemma=tiny_gemma_dir)
    assert data["studies"]["saelens"]["error"] is None
    recipe = data["studies"]["saelens"]["details"]["tiny-gemma"]["recipe"]
    seeds = recipe["per_seed"]
    assert [s["seed"] for s in seeds] == list(range(SIZES["tiny"].recipe_seeds))
    for s in seeds:
        assert s["heldout_rows"] > 0 and s["heldout_docs"] > 0
        for side in ("ours", "saelens", "ours_tier_term"):
            assert 0 < s[side]["fvu"] < 10 and s[side]["seconds"] > 0, (side, s)
    assert seeds[0]["ours"]["fvu"] != seeds[1]["ours"]["fvu"]  # each seed its own split, init and order
    rows = {r["name"]: r for r in data["rows"]}
    fvu = rows["tiny-gemma: held-out FVU, ours (--preset plain) ÷ SAELens TopK trainer, same recipe"]
    assert fvu["target"] == "≤ 1.00" and fvu["value"] == pytest.approx(recipe["summary"]["fvu_ratio"]["mean"],
                                                                          abs=1e-4)
    steps = rows["tiny-gemma: SAE training steps/s, our Trainer ÷ SAELens's SAETrainer, same batches"]
    assert steps["target"] == "≥ 1.1" and steps["value"] > 0
    assert rows["tiny-gemma: tier term's reconstruction cost, FVU default preset ÷ plain"]["value"] > 0
    assert "| FVU ours (plain) | FVU SAELens |" in md.read_text()


def test_bench_recipe__heldout_rows_come_from_heldout_documents_only(tiny_store: Path) -> None:
    """The rows FVU is scored on belong to held-out documents (never trained on) and are unmasked."""
    import numpy as np

    from bench.saelens_recipe import heldout_rows
    from bra.cache.store import open_store
    from bra.sae.data import training_data

    store = open_store(tiny_store)
    data = training_data(store, None, 0.3, 0, False)
    x, hazard = heldout_rows(store, data)
    doc, mask = store.array("doc_index")[:], store.array("mask")[:]
    want = ~mask & data.heldout[doc]
    assert 0 < len(x) == int(want.sum()) < store.n_tokens
    np.testing.assert_array_equal(x, store.read_acts(data.layer, 0, store.n_tokens)[want])
    np.testing.assert_array_equal(hazard, data.doc_hazard[doc[want]])


def test_gpu_sh__without_cuda_one_line_and_exit_2(tmp_path: Path) -> None:
    """bench/gpu.sh with no CUDA device (hidden from torch, also on a GPU machine): exactly one error line,
    exit 2, no result file."""
    import os
    import subprocess

    out = tmp_path / "results-gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench/gpu.sh needs a CUDA device"), proc.stderr
    assert not out.exists() and proc.stdout == ""


def test_gpu_sh__smoke_run_on_cpu_writes_every_section(tmp_path: Path) -> None:
    """--smoke runs every phase of bench/gpu.py on the CPU at tiny widths (the script itself is tested)."""
    from bench.gpu import main

    out = tmp_path / "gpu.md"
    assert main(["--smoke", "--tokens", "1024", "--seq", "64", "--batch", "8", "--chunk", "64", "--shard",
                 "256", "--writer-shards", "2", "--d-sae", "64", "--k", "4", "--train-batch", "32",
                 "--warmup", "1", "--steps", "1", "--reps", "1", "--out", str(out),
                 "--work", str(tmp_path / "work")]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["finished"] and data["smoke"] and data["n_tokens"] == 1024
    assert data["build"]["build_tok_s"] > 0 and data["training"]["store_steps_s"] > 0
    assert set(data["writer"]["threads"]) >= {"1"}
    has_saelens = importlib.util.find_spec("sae_lens") is not None
    assert ("skipped" in data["saelens"]) != has_saelens
    text = out.read_text()
    assert "these numbers mean nothing" in text and "not reached" not in text


def test_bench__tiny_labels_study_scores_rules_on_both_halves(tmp_path: Path) -> None:
    md, data = _run_tiny(tmp_path, "labels")
    assert data["studies"]["labels"]["error"] is None
    rows = {r["name"]: r for r in data["rows"]}
    heldout = rows["rules vs hand labels, Cohen's κ (split=alternate, heldout half)"]
    assert heldout["target"] == "≥ 0.7" and -1.0 <= heldout["value"] <= 1.0
    for split in ("alternate", "hash"):
        for half in ("tune", "heldout"):
            assert f"rules vs hand labels, Cohen's κ (split={split}, {half} half)" in rows
    details = data["studies"]["labels"]["details"]
    assert "skipped" in details["judges"]  # tiny: no judge rows
    results = details["results"]["rules"]
    for split in ("alternate", "hash"):
        assert results[split]["tune"]["n"] + results[split]["heldout"]["n"] == results["all"]["n"] >= 150
    assert 0 < details["splits"]["hash_heldout_tuned_on"] < details["splits"]["hash_heldout_n"]
    for half in (results["all"], *results["alternate"].values(), *results["hash"].values()):
        lo, hi = half["kappa_ci95"]
        assert lo <= half["kappa"] <= hi and 0.0 <= half["unknown_share"] <= 1.0
        assert set(half["per_class"]) == {"refuse", "comply", "partial", "hedge", "evade"}
    fresh = details["results"]["rules"]["fresh"]
    assert fresh["all"]["n"] == details["splits"]["fresh_n"] >= 150
    assert sum(s["n"] for s in fresh["by_store"].values()) == fresh["all"]["n"]
    assert len(fresh["by_store"]) == 5
    assert "rules vs hand labels, Cohen's κ (fresh held-out organisms set)" in rows
    text = md.read_text()
    assert "| rules | alternate | heldout |" in text and "| rules | hash | heldout |" in text
    assert "| rules | fresh | heldout |" in text


def test_bench_labels__split_keeps_each_prompt_in_one_half_and_is_stratified() -> None:
    from bench.labels import load_label_set

    rows = load_label_set()
    halves: dict[str, set[str]] = {}
    for r in rows:
        halves.setdefault(r["prompt_id"], set()).add(r["half"])
    assert all(len(h) == 1 for h in halves.values())
    for tier in {r["tier"] for r in rows}:
        assert {r["half"] for r in rows if r["tier"] == tier} == {"tune", "heldout"}
    hashed: dict[str, set[str]] = {}
    for r in rows:
        hashed.setdefault(r["prompt_id"], set()).add(r["half_hash"])
    assert all(len(h) == 1 for h in hashed.values())
    assert {r["half_hash"] for r in rows if "prefill" in r["variant"]} == {"tune", "heldout"}


def test_bench_labels__fresh_set_is_disjoint_stratified_and_refuses_overlap(tmp_path: Path) -> None:
    from bench.labels import FRESH_SET, load_fresh_set, load_label_set

    old = load_label_set()
    fresh = load_fresh_set(tuned_on=old)
    assert len(fresh) >= 150 and len({r["id"] for r in fresh}) == len(fresh)
    strata = {(r["store"], r["tier"]) for r in fresh}
    assert len(strata) == 10  # 5 stores x 2 tiers
    assert all(r["completion"].startswith(r["prefill"]) for r in fresh)
    with pytest.raises(ValueError, match="also in the tuned-on set"):
        load_fresh_set(tuned_on=fresh[:3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FRESH_SET.read_text().replace('"label": "comply"', '"label": "yes"', 1))
    with pytest.raises(ValueError, match="hand labels must be in"):
        load_fresh_set(bad)


def test_bench_labels__kappa_ci_brackets_perfect_and_abstaining_labellers() -> None:
    from bench.labels import kappa_ci, score

    truth = ["refuse", "comply", "partial", "hedge", "evade"] * 8
    assert kappa_ci(truth, truth, n_boot=50) == (1.0, 1.0, 1.0)
    abstain = ["unknown" if i % 4 == 0 else t for i, t in enumerate(truth)]
    s = score(truth, abstain, n_boot=50)
    assert s["unknown_share"] == 0.25 and s["accuracy"] == 0.75 and s["kappa"] < 1.0


def test_bench__unknown_size_and_study_refused(tmp_path: Path) -> None:
    import click

    from bench.__main__ import main
    from bench.config import get_config

    with pytest.raises(ValueError, match="unknown size"):
        get_config("huge")
    with pytest.raises(click.BadParameter, match="unknown study"):
        main(["--size", "tiny", "--studies", "nope", "--out", str(tmp_path / "r.md")], standalone_mode=False)
    assert not (tmp_path / "r.md").exists()
