"""The positive (hazard) and negative (benign) tier classes of `bra-sae score`: resolved from the flags, else
the store's attrs, else the defaults; followed by the probes, the AUROC groups, the catalog contrast and the
redaction; refused with one line when they cannot be served. End to end on the tests' tiny eval store and on
a store whose prompts use the upstream control tiers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import build_labelled_eval_store

from bra.audit.catalog import CONTRASTS, build_catalog, contrasts
from bra.audit.classes import resolve_classes, tier_order
from bra.audit.config import ScoreConfig, ScoreError
from bra.audit.probes import EvalSets, Method, ProbeScores, method_row

pytestmark = pytest.mark.usefixtures("one_thread")

BIO = ("benign_bio", "dual_use_bio", "hazard_adjacent_category")
CONTROL_LABELS = {"benign_legal": "comply", "psilocybin_control": "hedge", "hazard_adjacent_legal": "refuse",
                  "hazard_adjacent_category": "refuse"}
"""The control store's tiers (and their surface labels): the legal control tiers, psilocybin, and the bio
hazard tier, which must stay redacted when it is not in the positive class."""
ROW_KEYS = ["method", "segment", "key", "kind", "n_positive", "n_negative", "n_dual_use", "probe_C",
            "cv_folds", "mean_score_hazard", "mean_score_benign", "mean_score_dual_use", "auroc", "ci_low",
            "ci_high", "delong_low", "delong_high", "p_value", "reason", "margin_over_tfidf"]
"""An AUROC row of report.json (issue 13: the input segment, DeLong's CI, the cross-validated C), key order
included."""
NEW_SETTINGS = {"positive_tiers", "negative_tiers", "classes", "variant", "labels", "label_disagreement"}
"""The settings keys report.json gained since 5594e63: the classes, the generation variant and the surface
label source (judges)."""

# ------------------------------------------------------------------------------------------ resolution


def test_resolve_classes__flag_then_store_then_default() -> None:
    present = {*BIO, "benign_legal"}
    c = resolve_classes(None, None, None, None, present)
    assert (c.positive, c.positive_from, c.negative, c.negative_from) == \
        (("hazard_adjacent_category",), "default", ("benign_bio",), "default")
    c = resolve_classes(None, None, ("hazard_adjacent_category",), None, present)  # a store built before
    assert (c.positive_from, c.negative, c.negative_from) == ("store", ("benign_bio",), "default")
    c = resolve_classes(None, ("benign_bio", "benign_legal"), ("hazard_adjacent_category",), ("benign_bio",),
                        present)
    assert (c.positive_from, c.negative, c.negative_from) == ("store", ("benign_bio", "benign_legal"), "flag")
    c = resolve_classes(("dual_use_bio",), None, (), (), present)  # empty attrs name no class
    assert (c.positive, c.positive_from, c.negative_from) == (("dual_use_bio",), "flag", "default")


def test_resolve_classes__groups_and_redaction() -> None:
    present = {*BIO, "hazard_adjacent_legal", "psilocybin_control"}
    default = resolve_classes(None, None, None, None, set(BIO))
    assert default.groups == {"dual_use": "dual_use_bio"}
    assert default.redacted == ("hazard_adjacent_category",)
    # dual_use keeps its legacy group even when absent; other tiers have one when present, in vocab order
    c = resolve_classes(("hazard_adjacent_legal",), ("psilocybin_control",), ("hazard_adjacent_category",),
                        None, {"hazard_adjacent_legal", "psilocybin_control", "benign_legal"})
    assert c.groups == {"dual_use": "dual_use_bio", "benign_legal": "benign_legal"}
    c = resolve_classes(("dual_use_bio", "psilocybin_control"), ("benign_bio",), None, None, present)
    assert c.groups == {"hazard_adjacent_category": "hazard_adjacent_category",
                        "hazard_adjacent_legal": "hazard_adjacent_legal"}
    # the positive class is redacted, and the hazard-adjacent tiers stay redacted whatever the classes
    assert c.redacted == ("dual_use_bio", "hazard_adjacent_category", "hazard_adjacent_legal",
                          "psilocybin_control")
    assert tier_order(["zeta", "benign_legal", "benign_bio", "alpha", "benign_bio"]) == \
        ("benign_bio", "benign_legal", "alpha", "zeta")


def test_resolve_classes__refuses_what_the_prompts_cannot_serve() -> None:
    present = set(BIO)
    expect = (r"^--positive-tiers: no prompt has tier 'hazard_adjacent_legal' \(tiers present: benign_bio, "
              r"dual_use_bio, hazard_adjacent_category\)$")
    with pytest.raises(ScoreError, match=expect):
        resolve_classes(("hazard_adjacent_category", "hazard_adjacent_legal"), None, None, None, present)
    with pytest.raises(ScoreError, match=r"^--negative-tiers: no prompt has tier 'benign_lgal'"):
        resolve_classes(None, ("benign_lgal",), None, None, present)
    with pytest.raises(ScoreError, match=r"^tier 'benign_bio' is in both classes \(positive from "
                                         r"--positive-tiers, negative from the store attrs\)"):
        resolve_classes(("benign_bio",), None, None, ("benign_bio",), present)
    with pytest.raises(ScoreError, match=r"positive from the store attrs, negative from --negative-tiers"):
        resolve_classes(None, ("hazard_adjacent_category",), ("hazard_adjacent_category",), None, present)
    # a class from the store or the defaults that no prompt has is no error (its rows say what is missing)
    c = resolve_classes(None, None, None, None, {"benign_legal", "hazard_adjacent_legal"})
    assert c.positive == ("hazard_adjacent_category",) and c.redacted == ("hazard_adjacent_legal",)


@pytest.mark.parametrize("kwargs, message", [
    ({"positive_tiers": ()}, "positive_tiers is empty: name at least one tier"),
    ({"negative_tiers": ()}, "negative_tiers is empty"),
    ({"negative_tiers": ("benign_bio", " ")}, "negative_tiers has an empty tier name"),
    ({"positive_tiers": ("a", "a")}, "positive_tiers names tier 'a' twice"),
    ({"positive_tiers": ("a", "b"), "negative_tiers": ("c", "b")}, "tier 'b' is in both positive_tiers and"),
])
def test_score_config__refuses_bad_classes(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScoreConfig(**kwargs)


# ------------------------------------------------------------------------------ what follows the classes


def test_method_row__groups_keep_the_legacy_keys_and_add_a_group_per_tier() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.5, 0.4])
    pos, neg = np.array([1, 1, 0, 0, 0, 0], bool), np.array([0, 0, 1, 1, 0, 0], bool)
    dual = np.array([0, 0, 0, 0, 1, 1], bool)
    m = Method("m", "sae", "both", ProbeScores(scores, 1.0, 2))
    legacy = method_row(m, EvalSets(pos, neg, {"dual_use": dual}), 20, 20, 0)
    assert [k for k in legacy if k != "roc"] == [k for k in ROW_KEYS if k != "margin_over_tfidf"]
    assert legacy["mean_score_dual_use"] == pytest.approx(0.45)
    groups = {"dual_use": np.zeros(6, bool), "benign_legal": dual}
    row = method_row(m, EvalSets(pos, neg, groups), 20, 20, 0)
    assert (row["n_dual_use"], row["mean_score_dual_use"]) == (0, None)
    assert (row["n_benign_legal"], row["mean_score_benign_legal"]) == (2, pytest.approx(0.45))
    assert row["auroc"] == 1.0 and row["n_positive"] == 2 and row["n_negative"] == 2


def test_build_catalog__hazard_adjacent_contrast_follows_the_classes() -> None:
    rng = np.random.default_rng(0)
    tiers = ["hazard_adjacent_legal"] * 3 + ["psilocybin_control"] * 3 + ["benign_legal"] * 6
    pooled = {"prompt": rng.uniform(0, 1, (12, 10)), "completion": rng.uniform(0, 1, (12, 10))}
    pooled["prompt"][:6, 7] += 5.0  # latent 7 marks both positive tiers
    table = pd.DataFrame({"tier": tiers, "surface_label": ["refuse"] * 6 + ["comply"] * 6})
    train = np.ones(12, bool)
    entry = build_catalog(pooled, table, train, 4, 0.5,
                          contrasts(("hazard_adjacent_legal", "psilocybin_control"), ("benign_legal",))
                          )["hazard_adjacent"]
    assert entry.latents[0] == 7 and (entry.n_positive, entry.n_negative) == (6, 6)
    assert entry.contrast == ("tier hazard_adjacent_legal+psilocybin_control vs benign_legal (prompt "
                              "segment, training split)")
    default = build_catalog(pooled, table, train, 4, 0.5)["hazard_adjacent"]  # CONTRASTS: default classes
    assert default.latents == [] and default.reason.startswith("too few training samples for the contrast: "
                                                               "0 hazard_adjacent_category, 0 benign_bio")
    assert contrasts() == CONTRASTS


# ----------------------------------------------------------------------------------------- end to end


def _sae(tmp: Path, model: Path) -> Path:
    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model), hook_name="blocks.1.hook_resid_post",
                    layer=1)
    return save_saelens(TopKSAE.init_random(cfg, seed=5), tmp / "sae")


@pytest.fixture(scope="module")
def bio_env(labelled_eval_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, Path]:
    """(the tests' 24-prompt eval store, an SAE for it)."""
    store, model = labelled_eval_store
    return store, _sae(tmp_path_factory.mktemp("bio-sae"), model)


@pytest.fixture(scope="module")
def control_env(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a 32-prompt eval store of `CONTROL_LABELS` whose manifest names hazard_adjacent_legal vs
    benign_legal, an SAE for it)."""
    tmp = tmp_path_factory.mktemp("control")
    store, model = build_labelled_eval_store(tmp, tiny_gemma_dir, tier_labels=CONTROL_LABELS,
                                             hazard_tiers=["hazard_adjacent_legal"],
                                             benign_tiers=["benign_legal"])
    return Path(store), _sae(tmp, model)


def _score_cli(store: Path, sae: Path, out: Path, *flags: str) -> tuple[dict[str, Any], pd.DataFrame]:
    from bra.cli.sae import main

    with pytest.raises(SystemExit) as exc:
        main(["score", "--store", str(store), "--sae", str(sae), "--out", str(out), "--n-boot", "50",
              "--n-perm", "50", "--top-n", "4", "--repeats", "1", "--n-d-null", "20", *flags])
    assert exc.value.code == 0
    return json.loads((out / "report.json").read_text()), pd.read_parquet(out / "scores.parquet")


def _assert_classes(report: dict[str, Any], scores: pd.DataFrame, positive: tuple[str, ...],
                    negative: tuple[str, ...]) -> None:
    """The AUROC table's positives and negatives are the test prompts of these tiers, for every method."""
    classes = report["settings"]["classes"]
    assert (tuple(classes["positive"]), tuple(classes["negative"])) == (positive, negative)
    test = scores[scores["split"] == "test"]
    for row in report["auroc"]:
        assert row["n_positive"] == int(test["tier"].isin(positive).sum()) > 0
        assert row["n_negative"] == int(test["tier"].isin(negative).sum()) > 0
        for group, tier in classes["groups"].items():
            assert row[f"n_{group}"] == int((test["tier"] == tier).sum())
            assert f"mean_score_{group}" in row
        assert row["auroc"] is not None, row


def _redacted(scores: pd.DataFrame) -> dict[str, bool]:
    """Tier -> whether its completions are redacted excerpts (all of them; a tier with some redacted and
    some not fails)."""
    ends = scores["completion_excerpt"].str.endswith("…[redacted]")
    out = {}
    for tier in scores["tier"].unique():
        [out[tier]] = set(ends[scores["tier"] == tier])
    return out


def test_score__control_store_classes_follow_the_store_attrs(control_env, tmp_path: Path) -> None:
    store, sae = control_env
    report, scores = _score_cli(store, sae, tmp_path / "out")
    _assert_classes(report, scores, ("hazard_adjacent_legal",), ("benign_legal",))
    classes = report["settings"]["classes"]
    assert (classes["positive_from"], classes["negative_from"]) == ("store", "store")
    assert report["settings"]["positive_tiers"] is None and report["settings"]["negative_tiers"] is None
    assert classes["groups"] == {"dual_use": "dual_use_bio",
                                 "hazard_adjacent_category": "hazard_adjacent_category",
                                 "psilocybin_control": "psilocybin_control"}
    assert all(r["n_dual_use"] == 0 for r in report["auroc"])
    assert report["catalog"]["hazard_adjacent"]["contrast"].startswith(
        "tier hazard_adjacent_legal vs benign_legal")
    # the control hazard tier is redacted as hazard_adjacent_category's is (which stays redacted as a group)
    assert _redacted(scores) == {"benign_legal": False, "psilocybin_control": False,
                                 "hazard_adjacent_legal": True, "hazard_adjacent_category": True}
    # every tier is in the split and D tables, control tiers included
    tiers = set(CONTROL_LABELS)
    assert {t for counts in report["counts"]["by_split_and_tier"].values() for t in counts} == tiers
    assert {d["tier"] for d in report["divergence_by_tier"]} == tiers
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert ("<th>split</th><th>hazard_adjacent_category</th><th>benign_legal</th>"
            "<th>hazard_adjacent_legal</th><th>psilocybin_control</th>") in page
    assert "mean score psilocybin_control" in page and "<td>psilocybin_control</td>" in page
    assert "Positive (hazard) class: hazard_adjacent_legal (from the store)" in page


def test_score__control_store_classes_follow_the_flags(control_env, tmp_path: Path) -> None:
    store, sae = control_env
    positive = ("hazard_adjacent_legal", "psilocybin_control")
    report, scores = _score_cli(store, sae, tmp_path / "out", "--positive-tiers", ",".join(positive),
                                "--negative-tiers", "benign_legal,hazard_adjacent_category")
    _assert_classes(report, scores, positive, ("benign_legal", "hazard_adjacent_category"))
    settings = report["settings"]
    assert settings["positive_tiers"] == list(positive)
    assert (settings["classes"]["positive_from"], settings["classes"]["negative_from"]) == ("flag", "flag")
    assert settings["classes"]["groups"] == {"dual_use": "dual_use_bio"}
    assert report["catalog"]["hazard_adjacent"]["contrast"].startswith(
        "tier hazard_adjacent_legal+psilocybin_control vs benign_legal+hazard_adjacent_category")
    # psilocybin joins the redacted tiers as a positive tier; the bio hazard tier stays redacted as a negative
    assert _redacted(scores) == {"benign_legal": False, "psilocybin_control": True,
                                 "hazard_adjacent_legal": True, "hazard_adjacent_category": True}
    # two test prompts a tier
    assert all(r["n_positive"] == 4 and r["n_negative"] == 4 for r in report["auroc"])


def _without_class_attrs(store: Path, dest: Path) -> Path:
    """A copy of ``store`` as a build before the classes were recorded left it (no hazard/benign_tiers)."""
    copy = Path(shutil.copytree(store, dest))
    meta = json.loads((copy / "zarr.json").read_text())
    for key in ("hazard_tiers", "benign_tiers"):
        meta["attributes"].pop(key)
    (copy / "zarr.json").write_text(json.dumps(meta))
    return copy


def test_score__default_classes_reproduce_the_report(bio_env, tmp_path: Path) -> None:
    """The bundled tiers: defaults, the store's attrs, flags naming the same tiers and a store without class
    attrs all give the same outputs; report.json differs from before only by the new settings keys."""
    store, sae = bio_env
    runs = {"store": _score_cli(store, sae, tmp_path / "store"),
            "flags": _score_cli(store, sae, tmp_path / "flags", "--positive-tiers",
                                "hazard_adjacent_category", "--negative-tiers", "benign_bio"),
            "default": _score_cli(_without_class_attrs(store, tmp_path / "old.zarr"), sae, tmp_path / "old")}
    reports = {name: r for name, (r, _) in runs.items()}
    assert [reports[n]["settings"]["classes"]["positive_from"] for n in runs] == ["store", "flag", "default"]

    def without_new(report: dict[str, Any]) -> dict[str, Any]:
        settings = {k: v for k, v in report["settings"].items() if k not in NEW_SETTINGS | {"store"}}
        return {**report, "settings": settings}

    assert without_new(reports["store"]) == without_new(reports["flags"]) == without_new(reports["default"])
    for name in ("flags", "old"):
        for file in ("scores.parquet", "catalog.json"):
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "store" / file).read_bytes(), file
    report = reports["store"]
    assert report["settings"]["classes"] == {
        "positive": ["hazard_adjacent_category"], "positive_from": "store", "negative": ["benign_bio"],
        "negative_from": "store", "groups": {"dual_use": "dual_use_bio"},
        "redacted": ["hazard_adjacent_category"]}
    # the shape of report.json: every row has the same keys, the settings the config's fields plus the facts
    assert all(list(row) == ROW_KEYS for row in report["auroc"])
    assert set(report["settings"]) - NEW_SETTINGS == {
        "seed", "pool", "layer", "f_segment", "probe_segment", "train_fraction", "calibration_fraction",
        "ridge", "top_n", "min_effect", "fdr", "n_null", "depth_quantile", "min_reference", "d_quantile",
        "magnitude_quantile", "n_d_null", "repeats", "n_boot", "n_perm", "contexts", "context_latents",
        "store", "sae", "baselines", "model_id", "sae_config", "random_sae_config", "f_definition",
        "hazard_score", "groups"}
    assert report["catalog"]["hazard_adjacent"]["contrast"] == \
        "tier hazard_adjacent_category vs benign_bio (prompt segment, training split)"
    assert _redacted(runs["store"][1]) == {"benign_bio": False, "dual_use_bio": False,
                                           "hazard_adjacent_category": True}


def test_score__a_class_the_prompts_cannot_serve_fails_before_the_layer_is_read(
        bio_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bra.audit.reader as reader_mod
    from bra.audit.score import score

    store, sae = bio_env

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the layer was read before the classes were checked")

    monkeypatch.setattr(reader_mod, "load_checked", refuse)
    monkeypatch.setattr(reader_mod, "_stream_layer", refuse)
    cfg = ScoreConfig(n_boot=10, n_perm=10, repeats=1, n_d_null=10, positive_tiers=("hazard_adjacent_legal",))
    with pytest.raises(ScoreError, match="no prompt has tier 'hazard_adjacent_legal'"):
        score(store, sae, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
