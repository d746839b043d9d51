"""`bra-sae compare`: the interval functions by hand, a comparison of real score reports (the tiny eval
store scored with two SAEs, and once on a copy of the store as a generation variant) checked against the
numbers recomputed from each scores.parquet / report.json, the labels, and one row per kind of bad input
(one ``error:`` line, exit != 0, nothing half-written)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import error_lines, sae_main_code, truncate
from PIL import Image
from scipy.stats import binomtest

from bra.audit.compare import ReportFacts, derive_labels
from bra.audit.metrics import mean_t_interval, wilson_interval

pytestmark = pytest.mark.usefixtures("one_thread")

FAST_SCORE = ["--n-boot", "10", "--n-perm", "10", "--repeats", "1", "--n-d-null", "10"]
Z = 1.959963984540054
"""The 97.5% normal quantile."""


# --------------------------------------------------------------------------------------- intervals


def test_wilson_interval__hand_computed_values() -> None:
    # k = 0: the interval is [0, z²/(n + z²)]; k = n mirrors it
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(Z**2 / (10 + Z**2), abs=1e-12)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(10 / (10 + Z**2), abs=1e-12) and hi == 1.0
    # 5/10: centre 0.5, half-width z/(1 + z²/n) · sqrt(0.25/n + z²/(4n²)) = 0.26340...
    lo, hi = wilson_interval(5, 10)
    half = Z / (1 + Z**2 / 10) * math.sqrt(0.25 / 10 + Z**2 / 400)
    assert (lo, hi) == (pytest.approx(0.5 - half, abs=1e-12), pytest.approx(0.5 + half, abs=1e-12))
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the textbook value for 5 of 10
    assert wilson_interval(0, 0) is None
    for k, n in [(1, 4), (3, 7), (8, 8), (17, 40)]:
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mean_t_interval__hand_computed_values() -> None:
    # [1, 2, 3]: mean 2, sd 1, t(0.975, 2) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    lo, hi = mean_t_interval([1.0, 2.0, 3.0])
    assert (lo, hi) == (pytest.approx(2 - 2.484138, abs=1e-6), pytest.approx(2 + 2.484138, abs=1e-6))
    assert mean_t_interval([0.4]) is None and mean_t_interval([]) is None


# ------------------------------------------------------------------------------------------ labels


def facts(sae: str, store: str = "cache/eval.zarr",
          model: str | None = "google/gemma-2-2b-it", variant: str | None = None) -> ReportFacts:
    return ReportFacts(path="r", model_id=model, sae=sae, layer=1, store=store, n_prompts=1, n_test=1,
                       variant=variant)


def test_derive_labels__model_sae_and_store_when_stores_differ() -> None:
    assert derive_labels([facts("cache/runs/demo-sae"), facts("runs/other.pt")]) == [
        "gemma-2-2b-it/demo-sae", "gemma-2-2b-it/other"]
    # the files a fit run writes inside its folder are named after the run
    assert derive_labels([facts("runs/a/sae"), facts("runs/b/sae_weights.pt")]) == [
        "gemma-2-2b-it/a", "gemma-2-2b-it/b"]
    assert derive_labels([facts("x", "cache/greedy.zarr"), facts("x", "s3://b/sampled.zarr", None)]) == [
        "gemma-2-2b-it/x@greedy", "unknown-model/x@sampled"]


def test_derive_labels__generation_variant_when_stores_differ() -> None:
    assert derive_labels([facts("x", "cache/e.canonical.zarr", variant="canonical"),
                          facts("x", "cache/e.prefill.zarr", variant="prefill"),
                          facts("x", "cache/old.zarr")]) == [
        "gemma-2-2b-it/x@canonical", "gemma-2-2b-it/x@prefill", "gemma-2-2b-it/x@old"]
    # one store: no suffix, variant or not
    assert derive_labels([facts("a", variant="v"), facts("b", variant="v")]) == [
        "gemma-2-2b-it/a", "gemma-2-2b-it/b"]
    # the same variant of two manifests: the store names tell them apart
    assert derive_labels([facts("x", "cache/a.prefill.zarr", variant="prefill"),
                          facts("x", "cache/b.prefill.zarr", variant="prefill")]) == [
        "gemma-2-2b-it/x@a.prefill", "gemma-2-2b-it/x@b.prefill"]


# -------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reports(labelled_eval_store: tuple[Path, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Score reports of the tiny eval store: ``a`` (SAE seed 5, with a baseline), ``b`` (SAE seed 6, no
    baseline), and ``variant`` (SAE seed 5 on a copy of the store named ``variant.zarr``)."""
    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    tmp = tmp_path_factory.mktemp("compare")
    store, model_dir = labelled_eval_store
    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_dir),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    sae_a = save_saelens(TopKSAE.init_random(cfg, seed=5), tmp / "sae-a")
    sae_b = save_saelens(TopKSAE.init_random(cfg, seed=6), tmp / "sae-b")
    variant = shutil.copytree(store, tmp / "variant.zarr")
    runs = {"a": (store, sae_a, ["--baseline", f"plain={sae_b}"]), "b": (store, sae_b, []),
            "variant": (variant, sae_a, [])}
    for name, (st, sae, extra) in runs.items():
        argv = ["score", "--store", str(st), "--sae", str(sae), "--out", str(tmp / name), *FAST_SCORE, *extra]
        assert sae_main_code(argv) == 0
    return {name: tmp / name for name in runs}


def recomputed(report_dir: Path) -> dict[str, Any]:
    """The comparison's numbers recomputed from scores.parquet and report.json directly."""
    scores = pd.read_parquet(report_dir / "scores.parquet")
    report = json.loads((report_dir / "report.json").read_text())
    test = scores[scores["split"] == "test"]
    refusal = {t: (int((g["surface_label"] == "refuse").sum()), len(g)) for t, g in scores.groupby("tier")}
    depth = test["depth_category"].value_counts().to_dict()
    d_mean = {t: g["D"].dropna().mean() for t, g in test.groupby("tier")}
    return {"refusal": refusal, "depth": depth, "d_mean": d_mean, "report": report}


def test_compare__numbers_equal_the_reports(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert sae_main_code(["compare", str(reports["a"]), str(reports["b"]), "--out", str(out)]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    md = (out / "comparison.md").read_text()
    assert [r["label"] for r in doc["runs"]] == ["model/sae-a", "model/sae-b"]  # MODEL/SAE, one store
    for run, key in zip(doc["runs"], ("a", "b"), strict=True):
        ref = recomputed(reports[key])
        assert run["n_prompts"] == len(pd.read_parquet(reports[key] / "scores.parquet")) == 24
        assert run["layer"] == ref["report"]["settings"]["layer"] == 1
        for tier, (k, n) in ref["refusal"].items():
            cell = run["refusal_rate_by_tier"][tier]
            assert (cell["k"], cell["n"]) == (k, n) and cell["share"] == pytest.approx(k / n)
            assert (cell["ci_low"], cell["ci_high"]) == pytest.approx(wilson_interval(k, n))
            assert cell["ci_low"] <= cell["share"] <= cell["ci_high"]
        seg = ref["report"]["settings"]["probe_segment"]
        for row in (r for r in ref["report"]["auroc"] if r["segment"] == seg):  # each run's own probe input
            got = run["auroc"][row["method"]]
            assert [got[f] for f in ("auroc", "ci_low", "ci_high", "p_value")] == \
                [row[f] for f in ("auroc", "ci_low", "ci_high", "p_value")]
        n_depth = sum(ref["depth"].values())
        for category, counts in run["depth_categories"].items():
            assert counts["k"] == ref["depth"].get(category, 0) == ref["report"]["depth_categories"][category]
            assert counts["n"] == n_depth and counts["share"] == pytest.approx(counts["k"] / n_depth)
        for row in ref["report"]["divergence_by_tier"]:
            got = run["d_mean_by_tier"][row["tier"]]
            if row["count"] == 0:  # D undefined for the whole tier (e.g. below the magnitude floor)
                assert got["mean"] is None and row["mean"] is None and np.isnan(ref["d_mean"][row["tier"]])
                continue
            assert got["mean"] == pytest.approx(ref["d_mean"][row["tier"]]) == pytest.approx(row["mean"])
            assert got["n"] == row["count"] and got["ci_low"] <= got["mean"] <= got["ci_high"]
    # a method only run a has is absent from b (no key, "absent" in the table), never zero
    assert "plain" in doc["runs"][0]["auroc"] and "plain" not in doc["runs"][1]["auroc"]
    assert doc["methods"][:2] == ["sae", "plain"]
    plain_row = next(line for line in md.splitlines() if line.startswith("| plain |"))
    assert plain_row.endswith("| absent |")
    sae_a = doc["runs"][0]["auroc"]["sae"]
    assert f"| sae | {sae_a['auroc']:.3f} [{sae_a['ci_low']:.3f}, {sae_a['ci_high']:.3f}]" in md
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(out / "comparison.png") as image:
        image.verify()


def test_compare__labels_given_and_variants_and_rerun(reports: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    # reports on different stores get the store's name; --name labels one of them
    argv = ["compare", str(reports["a"]), str(reports["variant"]), "--out", str(out)]
    assert sae_main_code(argv) == 0
    first = (out / "comparison.json").read_text()
    assert [r["label"] for r in json.loads(first)["runs"]] == ["model/sae-a@eval", "model/sae-a@variant"]
    assert sae_main_code(argv) == 0  # a previous comparison is replaced, with identical contents
    assert (out / "comparison.json").read_text() == first
    # --name on a listed folder relabels it; on another folder it adds that folder
    assert sae_main_code(["compare", str(reports["a"]), "--name", f"base={reports['a']}",
                          "--name", f"seed 6={reports['b']}", "--out", str(out)]) == 0
    doc = json.loads((out / "comparison.json").read_text())
    assert [(r["label"], r["report_dir"]) for r in doc["runs"]] == [("base", str(reports["a"])),
                                                                   ("seed 6", str(reports["b"]))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cmp.")]  # no temp folder left


# ---------------------------------------------------------------------------------------- bad input


@dataclass
class Row:
    """One bad invocation of `bra-sae compare`: its arguments, a fragment of the error line, and a check."""

    argv: list[str]
    expect: str
    after: Callable[[], None] = lambda: None


ROWS: dict[str, Callable[[dict[str, Path], Path, pytest.MonkeyPatch], Row]] = {}


def row(name: str) -> Callable[[Callable[..., Row]], Callable[..., Row]]:
    def register(fn: Callable[..., Row]) -> Callable[..., Row]:
        ROWS[name] = fn
        return fn

    return register


def absent(path: Path) -> Callable[[], None]:
    def check() -> None:
        assert not path.exists(), f"{path} was left behind"
        assert not list(path.parent.glob(f".{path.name}.tmp*")), f"a temp folder of {path} was left behind"

    return check


def compare_row(tmp: Path, expect: str, *args: str, out: Path | None = None) -> Row:
    out = out or tmp / "cmp"
    return Row(["compare", *args, "--out", str(out)], expect, absent(out))


def damaged_copy(reports: dict[str, Path], tmp: Path, damage: Callable[[Path], None]) -> Path:
    copy = Path(shutil.copytree(reports["a"], tmp / "damaged"))
    damage(copy)
    return copy


@row("no-report")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "nothing to compare")


@row("missing-folder")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "is not a score report (no such folder)", str(tmp / "nope"))


@row("not-a-report")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    (tmp / "empty").mkdir()
    return compare_row(tmp, "empty is not a score report (no report.json)", str(reports["a"]),
                       str(tmp / "empty"))


@row("truncated-report-json")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    bad = damaged_copy(reports, tmp, lambda d: truncate(d / "report.json"))
    return compare_row(tmp, f"{bad / 'report.json'} is unreadable (JSONDecodeError", str(bad))


@row("report-json-lacks-auroc")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    def drop(d: Path) -> None:
        doc = json.loads((d / "report.json").read_text())
        del doc["auroc"]
        (d / "report.json").write_text(json.dumps(doc))

    bad = damaged_copy(reports, tmp, drop)
    return compare_row(tmp, f"{bad / 'report.json'} is not a score report: no auroc", str(bad))


@row("report-json-wrong-type")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    def retype(d: Path) -> None:
        doc = json.loads((d / "report.json").read_text())
        doc["depth_categories"]["compliance"] = "many"
        (d / "report.json").write_text(json.dumps(doc))

    bad = damaged_copy(reports, tmp, retype)
    return compare_row(tmp, f"{bad / 'report.json'} is not a score report (ValueError", str(bad))


@row("truncated-scores")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    bad = damaged_copy(reports, tmp, lambda d: truncate(d / "scores.parquet"))
    return compare_row(tmp, f"{bad / 'scores.parquet'} is unreadable", str(bad))


@row("scores-from-another-run")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    def halve(d: Path) -> None:
        pd.read_parquet(d / "scores.parquet").iloc[:12].to_parquet(d / "scores.parquet", index=False)

    bad = damaged_copy(reports, tmp, halve)
    return compare_row(tmp, "has 12 rows but", str(bad))


@row("duplicate-labels")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "duplicate label 'model/sae-a'", str(reports["a"]), str(reports["a"]))


@row("duplicate-given-labels")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "duplicate label 'x'", "--name", f"x={reports['a']}", "--name",
                       f"x={reports['b']}")


@row("named-twice")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "is named twice", "--name", f"x={reports['a']}", "--name", f"y={reports['a']}")


@row("bad-name")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    return compare_row(tmp, "expected NAME=REPORT_DIR", str(reports["a"]), "--name", "nolabel")


@row("foreign-out")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep")

    def kept() -> None:
        assert sorted(p.name for p in (tmp / "mine").iterdir()) == ["notes.txt"]
        assert (tmp / "mine" / "notes.txt").read_text() == "keep"

    return Row(compare_row(tmp, "", str(reports["a"]), out=tmp / "mine").argv,
               "is not a comparison output directory", kept)


@row("out-is-a-report")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    target = damaged_copy(reports, tmp, lambda d: None)
    before = sorted(p.name for p in target.iterdir())

    def kept() -> None:
        assert sorted(p.name for p in target.iterdir()) == before

    return Row(compare_row(tmp, "", str(reports["b"]), out=target).argv,
               "is not a comparison output directory", kept)


@row("unwritable-out")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    (tmp / "a-file").write_text("not a folder")
    return compare_row(tmp, "is a file, not a directory", str(reports["a"]), out=tmp / "a-file" / "cmp")


@row("disk-full")
def _(reports: dict[str, Path], tmp: Path, mp: pytest.MonkeyPatch) -> Row:
    def full(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    mp.setattr(Path, "write_text", full)
    return compare_row(tmp, "disk full", str(reports["a"]))


@pytest.mark.parametrize("name", list(ROWS))
def test_compare__bad_input_is_one_error_line(name: str, reports: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bad = ROWS[name](reports, tmp_path, monkeypatch)
    capsys.readouterr()
    code = sae_main_code(bad.argv)
    _, err = capsys.readouterr()
    errors = error_lines(err)
    assert code not in (0, None), err
    assert len(errors) == 1, err
    assert bad.expect in errors[0], errors[0]
    assert "Traceback" not in err
    bad.after()
