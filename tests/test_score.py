"""bra/audit/score.py: the prompt split, an end-to-end `bra-sae score` on the tiny eval store with the model
made unavailable, its guards, and one read of the store (the eval_env / no_model fixtures are in
conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bra.audit.score import ScoreConfig, ScoreError, split_prompts
from bra.cache import schema
from bra.cache.writer import write_table_atomic
from bra.errors import BraError, SAEError

# -------------------------------------------------------------------------------------------- splits


def test_split_prompts__disjoint_stratified_deterministic() -> None:
    tiers = pd.Series(["benign_bio"] * 20 + ["dual_use_bio"] * 12 + ["hazard_adjacent_category"] * 9)
    ids = pd.Series([f"p{i}" for i in range(len(tiers))])
    split = split_prompts(ids, tiers, 0, 0.5, 0.25)
    for tier, n in (("benign_bio", 20), ("dual_use_bio", 12), ("hazard_adjacent_category", 9)):
        counts = pd.Series(split[tiers == tier]).value_counts()
        assert counts["train"] == round(n * 0.5) and counts["calibration"] >= 1 and counts["test"] >= 1
    sets = [set(ids[split == s]) for s in ("train", "calibration", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert (split_prompts(ids, tiers, 0, 0.5, 0.25) == split).all()
    assert not (split_prompts(ids, tiers, 1, 0.5, 0.25) == split).all()
    # a prompt's split does not depend on the order of the table
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = split_prompts(ids[order].reset_index(drop=True), tiers[order].reset_index(drop=True),
                             0, 0.5, 0.25)
    assert dict(zip(ids[order], shuffled, strict=True)) == dict(zip(ids, split, strict=True))


# -------------------------------------------------------------------------------------- end to end


FAST = ["--n-boot", "200", "--n-perm", "200", "--top-n", "4", "--repeats", "2"]


def test_score__end_to_end_without_model_is_deterministic(eval_env, no_model) -> None:
    from bra.cli.sae import main

    tmp, store, sae, base, _ = eval_env
    for out in ("a", "b"):
        with pytest.raises(SystemExit) as exc:
            main(["score", "--store", str(store), "--sae", str(sae), "--out", str(tmp / out),
                  "--baseline", f"plain={base}", *FAST])
        assert exc.value.code == 0
    a, b = tmp / "a", tmp / "b"
    assert (a / "report.json").read_text() == (b / "report.json").read_text()
    assert (a / "catalog.json").read_text() == (b / "catalog.json").read_text()
    assert (a / "scores.parquet").read_bytes() == (b / "scores.parquet").read_bytes()
    for name in ("report.html", "roc.png", "d_by_tier_framing.png", "depth_scores.png", "reliability.png"):
        assert (a / name).stat().st_size > 0

    report = json.loads((a / "report.json").read_text())
    splits = report["splits"]
    train, cal, test_ids = (set(splits[s]) for s in ("train", "calibration", "test"))
    assert not train & test_ids and not cal & test_ids and not train & cal
    assert sum(map(len, splits.values())) == 24
    methods = {r["key"]: r for r in report["auroc"]}
    names = {"sae", "plain", "random_sae", "tfidf_logreg", "raw_logreg", "raw_diff_of_means"}
    assert set(methods) == {f"{m}@{seg}" for m in names for seg in ("prompt", "completion", "both")}
    for r in methods.values():
        assert r["auroc"] is not None and r["ci_low"] <= r["auroc"] <= r["ci_high"]
        assert r["delong_low"] <= r["auroc"] <= r["delong_high"]
        assert 0 < r["p_value"] <= 1 and r["n_dual_use"] >= 1
        # margins only between rows that saw the same input
        same = methods[f"tfidf_logreg@{r['segment']}"]["auroc"]
        assert r["margin_over_tfidf"] == pytest.approx(r["auroc"] - same)
    versus = {(c["segment"], c["versus"]) for c in report["comparisons"]}
    assert versus == {(seg, m) for seg in ("prompt", "completion", "both")
                      for m in ("plain", "random_sae", "tfidf_logreg")}
    holm = [c["p_holm"] for c in report["comparisons"]]
    assert all(h >= c["p_value"] - 1e-12 for h, c in zip(holm, report["comparisons"], strict=True))
    assert report["repeats"]["seeds"] == [0, 1] and "auroc:sae@both" in report["repeats"]["numbers"]
    assert report["settings"]["groups"].startswith("tier+category")  # one category per tier: by id, said
    assert report["depth"]["n_refused_test"] == report["counts"]["test_surface_labels"].get("refuse", 0)
    assert sum(report["depth"]["verdicts"].values()) == report["depth"]["n_refused_test"]
    assert report["tables"]["truncated"]["known"] and report["overlap"] is not None
    assert set(report["empty_categories"]) >= {"bio_content", "deception_correlate"}
    assert "partial" in report["alignment"]["absent_classes"]
    assert "token ids only" in report["contexts"]  # the tokenizer went with the model

    scores = pd.read_parquet(a / "scores.parquet")
    assert len(scores) == 24 and scores["id"].is_unique
    test = scores["split"] == "test"
    assert scores.loc[~test, "D"].isna().all() and scores.loc[~test, "depth_category"].isna().all()
    assert scores.loc[test, "depth_category"].notna().all()
    refused = test & (scores["surface_label"] == "refuse")
    assert scores.loc[refused, "depth_verdict"].isin(["deep", "shallow", "uncertain"]).all()
    assert scores.loc[~refused, "depth_verdict"].isna().all()
    haz = scores[scores["tier"] == "hazard_adjacent_category"]
    assert haz["completion_excerpt"].str.endswith("…[redacted]").all()
    assert sum(report["depth_categories"].values()) == int(test.sum())


def test_score__refuses_bad_inputs(eval_env, no_model, tmp_path: Path) -> None:
    from bra.audit.score import score

    tmp, store, sae, _, other = eval_env
    fast = ScoreConfig(n_boot=10, n_perm=10, repeats=1, n_d_null=10)
    with pytest.raises(SAEError, match="layer"):
        score(store, other, tmp_path / "o1", fast)
    with pytest.raises(ScoreError, match="reserved"):
        score(store, sae, tmp_path / "o2", fast, {"sae": other})
    # a store without prompts.parquet
    bare = shutil.copytree(store, tmp_path / "bare.zarr")
    (bare / schema.PROMPTS_TABLE).unlink()
    with pytest.raises(ScoreError, match="not an eval store: build it from an eval manifest"):
        score(bare, sae, tmp_path / "o3", fast)
    # a calibration split with only unknown labels: nothing to fit, classes named
    unk = shutil.copytree(store, tmp_path / "unk.zarr")
    table = pd.read_parquet(unk / schema.PROMPTS_TABLE)
    table["surface_label"] = "unknown"
    table["surface_probs"] = [[0.0] * 5] * len(table)
    write_table_atomic(table, unk / schema.PROMPTS_TABLE)
    with pytest.raises(ScoreError, match="nothing to fit.*refuse, comply, partial, hedge, evade"):
        score(unk, sae, tmp_path / "o4", fast)
    # an output directory that is not ours is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(BraError, match="not a score output"):
        score(store, sae, tmp_path / "mine", fast)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ------------------------------------------------------------------------------- one read, then no store


def _store_handles(x: object, seen: set[int] | None = None) -> list[str]:
    """Paths (attribute / key chains) inside ``x`` that hold a Store (dataclasses, dicts, lists walked)."""
    import dataclasses

    from bra.cache.store import Store

    seen = set() if seen is None else seen
    if id(x) in seen:
        return []
    seen.add(id(x))
    if isinstance(x, Store):
        return ["<Store>"]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        items = [(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)]
    elif isinstance(x, dict):
        items = [(str(k), v) for k, v in x.items()]
    elif isinstance(x, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(x)]
    else:
        return []
    return [f"{name}.{p}" for name, v in items for p in _store_handles(v, seen)]


def test_score__opens_the_store_once_and_reports_from_the_result_alone(
        eval_env, no_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bra.audit.reader as reader_mod
    import bra.cache.store as store_mod
    from bra.audit.report import write_outputs
    from bra.audit.score import compute_scores

    _, store, sae, base, _ = eval_env
    copy = Path(shutil.copytree(store, tmp_path / "eval.zarr"))
    opened: list[str] = []
    built: list[str] = []
    real_open, real_init = reader_mod.open_store, store_mod.Store.__post_init__

    def counting_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    def counting_init(self) -> None:
        built.append(str(self.path))
        real_init(self)

    monkeypatch.setattr(reader_mod, "open_store", counting_open)
    monkeypatch.setattr(store_mod, "open_store", counting_open)
    monkeypatch.setattr(store_mod.Store, "__post_init__", counting_init)
    cfg = ScoreConfig(n_boot=10, n_perm=10, repeats=1, n_d_null=10, top_n=4, min_effect=0.2)
    result = compute_scores(copy, sae, cfg, {"plain": base})
    assert opened == [str(copy)] and len(built) == 1  # one open, one Store handle, for the SAE and baselines
    assert _store_handles(result) == []

    # The store is gone and any attempt to open one fails: the report is written from the result alone.
    shutil.rmtree(copy)

    def refuse(*_a, **_k):
        raise AssertionError("the report must not open a store")

    monkeypatch.setattr(reader_mod, "open_store", refuse)
    monkeypatch.setattr(store_mod, "open_store", refuse)
    monkeypatch.setattr(store_mod.Store, "__post_init__", refuse)
    report = write_outputs(tmp_path / "out", result, cfg)
    assert report["settings"]["store"] == str(copy) and report["settings"]["model_id"] is not None
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    for name in ("scores.parquet", "catalog.json", "report.html", "roc.png", "d_by_tier_framing.png",
                 "depth_scores.png", "reliability.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list(tmp_path.glob(".out.*"))  # the atomic write left no temp folder


STORE_MODULES = ("reader.py", "intervene.py")


def test_audit__only_the_reader_touches_the_store() -> None:
    """AST check: in bra/audit only reader.py imports the store module or names Store / open_store (and
    intervene.py, which builds edited stores through the pipeline and reads its base store's residuals to
    make a direction: a writer, not a scorer), and the report modules import nothing from bra.pipeline
    (contexts are decoded while scoring)."""
    import ast

    audit = Path(__file__).resolve().parent.parent / "bra" / "audit"
    offenders = []
    for path in sorted(audit.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                touches = node.module == "bra.cache.store" or bool(names & {"Store", "open_store", "store"})
                if touches and path.name not in STORE_MODULES:
                    offenders.append(f"{path.name}:{node.lineno}: from {node.module} import {sorted(names)}")
                if node.module.startswith("bra.pipeline") and path.name in ("report.py", "_report_html.py",
                                                                             "plots.py"):
                    offenders.append(f"{path.name}:{node.lineno}: the report imports {node.module}")
            elif isinstance(node, ast.Name) and node.id in ("Store", "open_store") \
                    and path.name not in STORE_MODULES:
                offenders.append(f"{path.name}:{node.lineno}: uses {node.id}")
    assert not offenders, "\n".join(offenders)


def _judged_copy(store: Path, tmp: Path) -> Path:
    """A copy of ``store`` with judge columns: one judge agreeing with the rules except on every third
    prompt (where it says evade), one abstaining everywhere."""
    import shutil

    from bra.cache import schema
    from bra.pipeline.consensus import Vote
    from bra.pipeline.judgerun import consensus_columns

    copy = Path(shutil.copytree(store, tmp / "judged.zarr"))
    table = pd.read_parquet(copy / schema.PROMPTS_TABLE)
    votes = [[Vote("j", "evade" if i % 3 == 0 or lab == "unknown" else lab), Vote.abstain("k", "HTTP 500")]
             for i, lab in enumerate(table["surface_label"])]
    for name, values in consensus_columns(votes, table["surface_label"].tolist(), {"j": 1.0}).items():
        table[name] = values
    table.to_parquet(copy / schema.PROMPTS_TABLE, index=False)
    return copy


def test_score__labels_source_recorded_with_disagreement(eval_env, no_model, tmp_path: Path, capsys) -> None:
    from bra.audit.score import score
    from bra.cli.sae import main

    tmp, store, sae, _, _ = eval_env
    fast = ScoreConfig(n_boot=10, n_perm=10, repeats=1, n_d_null=10, top_n=4, min_effect=0.2)
    plain = score(store, sae, tmp_path / "plain", fast)
    assert plain["settings"]["labels"] == "rules" and plain["settings"]["label_disagreement"] is None
    judged = _judged_copy(store, tmp_path)
    auto = score(judged, sae, tmp_path / "auto", fast)
    assert auto["settings"]["labels"] == "consensus"
    dis = auto["settings"]["label_disagreement"]
    assert dis["n"] == 24 and 0 < dis["needs_review_share"] < 1 and 0 < dis["mean_disagreement"] < 0.5
    judges = score(judged, sae, tmp_path / "judges", dataclasses.replace(fast, labels="judges"))
    assert judges["settings"]["labels"] == "judges"
    assert judges["settings"]["label_disagreement"]["mean_disagreement"] == 0  # one judge: unanimous
    assert judges["counts"]["surface_labels"].get("evade", 0) >= 8
    rules = score(judged, sae, tmp_path / "rules", dataclasses.replace(fast, labels="rules"))
    assert rules["counts"]["surface_labels"] == plain["counts"]["surface_labels"]
    with pytest.raises(SystemExit) as info:
        main(["score", "--store", str(store), "--sae", str(sae), "--out", str(tmp_path / "x"),
              "--labels", "judges", *FAST])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert info.value.code == 2 and len(err) == 1 and "has no judge votes" in err[0]
    assert not (tmp_path / "x" / "report.json").exists()
