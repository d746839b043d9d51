"""Refusal-depth scoring: the seed formula, T, metrics vs scikit-learn, splits, depth categories, catalog,
and an end-to-end `bra-sae score` on a tiny eval store with the model made unavailable."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from bra.audit.catalog import NO_CONTRAST, build_catalog, cohens_d, feature_profile
from bra.audit.divergence import (
    DepthThresholds,
    divergence,
    fit_alignment,
    refusal_depth_category,
)
from bra.audit.metrics import auroc_ci, permutation_pvalue, rank_auroc, roc_band, roc_points
from bra.audit.score import ScoreConfig, ScoreError, split_prompts
from bra.cache import schema
from bra.cache.writer import write_table_atomic
from bra.errors import BraError, SAEError
from bra.vocab import FEATURE_CATEGORIES

# ------------------------------------------------------------------------------------------- formula


def test_divergence__seed_formula_by_hand() -> None:
    s = np.array([1.0, 0, 0, 0, 0])
    T = np.zeros((5, 5))
    T[0] = [0, 1, 1, 0, 0]  # refusal predicts hazard + refusal features equally
    # f along the prediction: cos = 1, D = 0
    assert divergence(s, np.array([0, 0.5, 0.5, 0, 0]), T) == pytest.approx(0.0)
    # f orthogonal: D = 1
    assert divergence(s, np.array([1.0, 0, 0, 0, 0]), T) == pytest.approx(1.0)
    # f = (0, 1, 0, 0, 0): cos = 1/sqrt(2), D = 1 - 1/sqrt(2)
    assert divergence(s, np.array([0, 1.0, 0, 0, 0]), T) == pytest.approx(1 - 1 / math.sqrt(2))
    # mixed s: Tᵀs = 0.5*(0,1,1,0,0) + 0.5*(2,0,0,0,0) = (1, .5, .5, 0, 0); f = (1,0,0,0,0): cos = 1/sqrt(1.5)
    T[1] = [2, 0, 0, 0, 0]
    s2 = np.array([0.5, 0.5, 0, 0, 0])
    assert divergence(s2, np.array([1.0, 0, 0, 0, 0]), T) == pytest.approx(1 - 1 / math.sqrt(1.5))


def test_divergence__vectorised_and_nan_on_zero_norm() -> None:
    T = np.eye(5)
    S = np.array([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0]])
    F = np.array([[1.0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    D = divergence(S, F, T)
    assert D[0] == pytest.approx(0.0)
    assert np.isnan(D[1]) and np.isnan(D[2])  # unknown surface (s = 0); no active feature (f = 0)


def test_fit_alignment__recovers_known_matrix() -> None:
    rng = np.random.default_rng(0)
    T_true = rng.uniform(0, 1, (5, 5))
    S = rng.dirichlet(np.ones(5), size=200)
    T = fit_alignment(S, S @ T_true, ridge=1e-10)
    np.testing.assert_allclose(T, T_true, atol=1e-6)


def test_fit_alignment__absent_class_rows_zero() -> None:
    rng = np.random.default_rng(1)
    T_true = rng.uniform(0, 1, (5, 5))
    S = rng.dirichlet(np.ones(5), size=100)
    S[:, 4] = 0  # evade never seen
    S /= S.sum(1, keepdims=True)
    T = fit_alignment(S, S @ T_true, ridge=1e-10)
    assert np.all(T[4] == 0)
    np.testing.assert_allclose(T[:4], T_true[:4], atol=1e-6)
    T2 = fit_alignment(S, S @ T_true, ridge=1e-10, present_classes=["refuse", "comply", "partial", "hedge"])
    np.testing.assert_allclose(T2, T, atol=1e-9)
    with pytest.raises(ValueError):
        fit_alignment(np.zeros((3, 5)), np.zeros((3, 5)))


@pytest.mark.parametrize("label,D,h,expected", [
    ("refuse", 0.1, 0.1, "deep_refusal"),
    ("refuse", 0.9, 0.1, "shallow_refusal"),
    ("refuse", 0.1, 0.9, "shallow_refusal"),  # hazard features active despite the refusal
    ("refuse", float("nan"), 0.9, "shallow_refusal"),
    ("refuse", float("nan"), 0.1, "unknown"),
    ("comply", 0.9, 0.1, "compliance"),
    ("comply", 0.1, 0.9, "hazardous_compliance"),
    ("partial", 0.1, 0.9, "hazardous_compliance"),
    ("partial", 0.1, 0.1, "compliance"),
    ("hedge", 0.9, 0.9, "hedge"),
    ("evade", 0.1, 0.1, "evade"),
    ("unknown", 0.1, 0.9, "unknown"),
])
def test_refusal_depth_category__table(label: str, D: float, h: float, expected: str) -> None:
    assert refusal_depth_category(label, D, h, DepthThresholds(0.5, 0.5)) == expected


# ------------------------------------------------------------------------------------------- metrics


def _fixed_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    y = np.array([1] * 15 + [0] * 20)
    return y, y * 0.8 + rng.normal(0, 0.7, y.size)


def test_rank_auroc__equals_sklearn_with_ties() -> None:
    y, s = _fixed_data()
    assert rank_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    tied = np.round(s, 1)  # many ties
    assert rank_auroc(y, tied) == pytest.approx(roc_auc_score(y, tied), abs=1e-12)


def test_auroc_ci__matches_sklearn_point_and_bootstrap() -> None:
    y, s = _fixed_data()
    auc, lo, hi = auroc_ci(y, s, n_boot=100, seed=3)
    assert auc == pytest.approx(roc_auc_score(y, s))
    # reference: the same stratified resamples, scored by scikit-learn
    rng = np.random.default_rng(3)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    ref = [roc_auc_score(y[i], s[i]) for i in
           (np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)]) for _ in range(100))]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])))
    assert lo < auc < hi


def test_roc_points__match_sklearn_roc_curve() -> None:
    y, s = _fixed_data()
    for scores in (s, np.round(s, 1)):  # with and without ties
        fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
        top = np.r_[fpr[1:] != fpr[:-1], True]
        ours = roc_points(y, scores)
        np.testing.assert_allclose(ours[0], fpr[top])
        np.testing.assert_allclose(ours[1], tpr[top])


def test_roc_band__observed_curve_matches_sklearn() -> None:
    y, s = _fixed_data()
    band = roc_band(y, s, n_boot=50, seed=0)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    top = np.r_[fpr[1:] != fpr[:-1], True]
    np.testing.assert_allclose(band["tpr"], np.interp(band["fpr"], fpr[top], tpr[top]))
    assert all(lo <= hi for lo, hi in zip(band["lo"], band["hi"], strict=True))


def test_permutation_pvalue__small_when_separable_large_when_random() -> None:
    y = np.array([1] * 12 + [0] * 12)
    separable = y + np.linspace(0, 0.1, y.size)
    assert permutation_pvalue(y, separable, n_perm=500, seed=0) == pytest.approx(1 / 501)
    rng = np.random.default_rng(7)
    p_random = permutation_pvalue(rng.permutation(y), rng.normal(size=y.size), n_perm=500, seed=0)
    assert p_random > 0.05
    # against the definition with scikit-learn, same permutations
    ys, ss = rng.permutation(y), rng.normal(size=y.size) + 0.5 * y
    perm = np.random.default_rng(4)
    observed = roc_auc_score(ys, ss)  # permutations that tie it count (float rounding aside)
    ref = sum(roc_auc_score(perm.permutation(ys), ss) >= observed - 1e-12 for _ in range(100))
    assert permutation_pvalue(ys, ss, n_perm=100, seed=4) == pytest.approx((ref + 1) / 101)


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


# ------------------------------------------------------------------------------------------- catalog


def test_cohens_d__by_hand() -> None:
    pos = np.array([[2.0, 1.0], [4.0, 1.0]])
    neg = np.array([[0.0, 1.0], [2.0, 1.0]])
    d = cohens_d(pos, neg)
    assert d[0] == pytest.approx(2 / math.sqrt(2)) and d[1] == 0.0


def test_build_catalog__empty_with_reasons_when_contrasts_missing() -> None:
    rng = np.random.default_rng(0)
    n, d_sae = 12, 20
    pooled = {"prompt": rng.uniform(0, 1, (n, d_sae)), "completion": rng.uniform(0, 1, (n, d_sae))}
    pooled["prompt"][:6, 3] += 5.0  # latent 3 marks the hazard tier
    table = pd.DataFrame({"tier": ["hazard_adjacent_category"] * 6 + ["benign_bio"] * 6,
                          "surface_label": ["refuse"] * 6 + ["comply"] * 5 + ["hedge"]})
    catalog = build_catalog(pooled, table, np.ones(n, bool), top_n=4, min_effect=0.5)
    assert catalog["hazard_adjacent"].latents[0] == 3
    for name in ("bio_content", "deception_correlate"):
        assert catalog[name].latents == [] and catalog[name].reason == NO_CONTRAST[name]
    assert catalog["hedging"].latents == [] and "too few" in catalog["hedging"].reason  # one hedge sample
    f = feature_profile(pooled["completion"], catalog)
    assert f.shape == (n, len(FEATURE_CATEGORIES))
    np.testing.assert_allclose(f.sum(1), 1.0)
    assert (f[:, [0, 3, 4]] == 0).all()  # empty categories contribute nothing


# -------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def eval_env(labelled_eval_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A 24-prompt eval store from a copy of the tiny Gemma2 (removed after the build), and a random SAE.

    The random model's completions are gibberish, so the rule labels are mostly "unknown": the surface
    columns of prompts.parquet are rewritten with labels derived from the tier (hazard refuse, benign
    comply, dual-use hedge, with two benign prompts relabelled unknown) so that every code path runs.
    """
    import torch

    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    tmp = tmp_path_factory.mktemp("score")
    store, model_dir = labelled_eval_store

    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_dir),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    sae = save_saelens(TopKSAE.init_random(cfg, seed=5), tmp / "sae")
    base = save_saelens(TopKSAE.init_random(cfg, seed=6), tmp / "plain")
    other = save_saelens(TopKSAE.init_random(SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_dir),
                                                       layer=2), seed=5), tmp / "layer2")
    torch.manual_seed(0)
    return tmp, store, sae, base, other


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import bra.pipeline.model as model_mod

    def refuse(*_a, **_k):
        raise AssertionError("scoring must not load the model")

    monkeypatch.setattr(model_mod, "load_model", refuse)
    monkeypatch.setattr(model_mod, "load_config", refuse)


FAST = ["--n-boot", "200", "--n-perm", "200", "--top-n", "4", "--min-effect", "0.2"]


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
    for name in ("report.html", "roc.png", "d_by_tier_framing.png", "surface_hazard.png"):
        assert (a / name).stat().st_size > 0

    report = json.loads((a / "report.json").read_text())
    splits = report["splits"]
    train, cal, test_ids = (set(splits[s]) for s in ("train", "calibration", "test"))
    assert not train & test_ids and not cal & test_ids and not train & cal
    assert sum(map(len, splits.values())) == 24
    methods = {r["method"]: r for r in report["auroc"]}
    assert set(methods) == {"sae", "plain", "random_sae", "tfidf_logreg", "raw_logreg", "raw_diff_of_means"}
    for r in methods.values():
        assert r["auroc"] is not None and r["ci_low"] <= r["auroc"] <= r["ci_high"]
        assert 0 < r["p_value"] <= 1 and r["n_dual_use"] >= 1
        assert r["margin_over_tfidf"] == pytest.approx(r["auroc"] - methods["tfidf_logreg"]["auroc"])
    assert set(report["empty_categories"]) >= {"bio_content", "deception_correlate"}
    assert "partial" in report["alignment"]["absent_classes"]
    assert "token ids only" in report["contexts"]  # the tokenizer went with the model

    scores = pd.read_parquet(a / "scores.parquet")
    assert len(scores) == 24 and scores["id"].is_unique
    test = scores["split"] == "test"
    assert scores.loc[~test, "D"].isna().all() and scores.loc[~test, "depth_category"].isna().all()
    assert scores.loc[test, "depth_category"].notna().all()
    haz = scores[scores["tier"] == "hazard_adjacent_category"]
    assert haz["completion_excerpt"].str.endswith("…[redacted]").all()
    assert sum(report["depth_categories"].values()) == int(test.sum())


def test_score__refuses_bad_inputs(eval_env, no_model, tmp_path: Path) -> None:
    from bra.audit.score import score

    tmp, store, sae, _, other = eval_env
    fast = ScoreConfig(n_boot=10, n_perm=10)
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


def test_load_tokenizer__decodes_when_local_and_falls_back(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from bra.audit.bundle import StoreFacts
    from bra.audit.contexts import load_tokenizer
    from bra.pipeline.model import tokenizer_fingerprint

    fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(tiny_gemma_dir)))

    def facts(model_id: str, fingerprint: str) -> StoreFacts:
        return StoreFacts(path="store", kind="eval", model_id=model_id, model={"id": model_id},
                          tokenizer_fingerprint=fingerprint, d_model=64, n_tokens=0)

    tok, status = load_tokenizer(facts(str(tiny_gemma_dir), fp))
    assert tok is not None and status.startswith("decoded")
    tok, status = load_tokenizer(facts(str(tiny_gemma_dir), "0" * 16))
    assert tok is None and "differs" in status
    tok, status = load_tokenizer(facts(str(tmp_path / "gone"), fp))
    assert tok is None and "gone" in status


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
    cfg = ScoreConfig(n_boot=10, n_perm=10, top_n=4, min_effect=0.2)
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
                 "surface_hazard.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert not list(tmp_path.glob(".out.*"))  # the atomic write left no temp folder


def test_audit__only_the_reader_touches_the_store() -> None:
    """AST check: in bra/audit only reader.py imports the store module or names Store / open_store, and the
    report modules import nothing from bra.pipeline (contexts are decoded while scoring)."""
    import ast

    audit = Path(__file__).resolve().parent.parent / "bra" / "audit"
    offenders = []
    for path in sorted(audit.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                touches = node.module == "bra.cache.store" or bool(names & {"Store", "open_store", "store"})
                if touches and path.name != "reader.py":
                    offenders.append(f"{path.name}:{node.lineno}: from {node.module} import {sorted(names)}")
                if node.module.startswith("bra.pipeline") and path.name in ("report.py", "_report_html.py",
                                                                             "plots.py"):
                    offenders.append(f"{path.name}:{node.lineno}: the report imports {node.module}")
            elif isinstance(node, ast.Name) and node.id in ("Store", "open_store") \
                    and path.name != "reader.py":
                offenders.append(f"{path.name}:{node.lineno}: uses {node.id}")
    assert not offenders, "\n".join(offenders)


def test_report__escapes_html_in_completions(eval_env, no_model, tmp_path: Path) -> None:
    """A completion holding markup shows as text in report.html (jinja2 autoescape), unchanged in the
    scores table."""
    from bra.audit.score import score

    _, store, sae, _, _ = eval_env
    copy = Path(shutil.copytree(store, tmp_path / "eval.zarr"))
    evil = '<script>alert("x")</script> & <b>bold</b>'
    table = pd.read_parquet(copy / schema.PROMPTS_TABLE)
    table["completion"] = evil
    write_table_atomic(table, copy / schema.PROMPTS_TABLE)
    score(copy, sae, tmp_path / "out", ScoreConfig(n_boot=10, n_perm=10, top_n=4, min_effect=0.2))
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert (scores["depth_category"].isin(["shallow_refusal", "hazardous_compliance"])).any()  # rows shown
    assert scores["completion_excerpt"].str.startswith(evil).all()
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page


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
    fast = ScoreConfig(n_boot=10, n_perm=10, top_n=4, min_effect=0.2)
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
