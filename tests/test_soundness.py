"""The audit's soundness by behaviour, on synthetic bundles whose answer is known (`bra.audit.score.analyse`,
no store): nothing fit depends on the test split, depth verdicts follow the completion evidence and not the
tier, and pure-noise latents give an empty catalog and no verdict but "uncertain"."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from bra.audit.bundle import EvalBundle, SparseCodes, StoreFacts, TokenColumns
from bra.audit.config import OURS, RANDOM_SAE, ScoreConfig
from bra.audit.score import analyse
from bra.audit.splits import group_keys, split_prompts
from bra.vocab import SEGMENT_COMPLETION, SEGMENT_PROMPT, SURFACE_CLASSES

N_LATENTS, D_MODEL, SIGNAL = 40, 12, (0, 1, 2)
CFG = ScoreConfig(n_boot=50, n_perm=50, repeats=1, n_d_null=20, n_null=10)


def _table(n_per_tier: int = 24) -> pd.DataFrame:
    rows = []
    for tier, short in (("benign_bio", "ben"), ("dual_use_bio", "dual"), ("hazard_adjacent_category", "haz")):
        for i in range(n_per_tier):
            rows.append({"id": f"{short}-{i}", "tier": tier, "framing": "direct", "category": f"c{i // 2}",
                         "prompt": f"question {short} {i}", "expected_surface": "comply", "finished": True})
    return pd.DataFrame(rows)


def _bundle(table: pd.DataFrame, labels: list[str], prompt_signal: np.ndarray, completion_signal: np.ndarray,
            seed: int = 0) -> EvalBundle:
    """Pooled latents: uniform noise, plus 4.0 on the SIGNAL latents where a segment carries the signal."""
    n = len(table)
    rng = np.random.default_rng(seed)
    pooled = {}
    for name in (OURS, RANDOM_SAE):
        seg = {s: rng.uniform(0, 1, (n, N_LATENTS)) for s in ("prompt", "completion")}
        if name == OURS:
            seg["prompt"][np.ix_(prompt_signal, SIGNAL)] += 4.0
            seg["completion"][np.ix_(completion_signal, SIGNAL)] += 4.0
        pooled[name] = seg
    raw = {s: rng.normal(size=(n, D_MODEL)) for s in ("prompt", "completion")}
    table = table.assign(surface_label=labels,
                         surface_probs=[list(np.eye(len(SURFACE_CLASSES))[SURFACE_CLASSES.index(lab)])
                                        for lab in labels],
                         completion=["an answer" if lab != "refuse" else "I can't help with that"
                                     for lab in labels])
    doc = np.repeat(np.arange(n), 2)
    tokens = TokenColumns(doc_index=doc, segment=np.tile([SEGMENT_PROMPT, SEGMENT_COMPLETION], n),
                          mask=np.zeros(2 * n, bool), token_id=np.arange(2 * n) % 50)
    codes = SparseCodes(indices=np.tile(np.arange(4, dtype=np.int32), (2 * n, 1)),
                        values=rng.uniform(0, 1, (2 * n, 4)).astype(np.float32), d_sae=N_LATENTS)
    facts = StoreFacts(path="synthetic", kind="eval", model_id="m", model=None, tokenizer_fingerprint=None,
                       d_model=D_MODEL, n_tokens=2 * n, hazard_tiers=("hazard_adjacent_category",),
                       benign_tiers=("benign_bio",))
    cfg = {"d_sae": N_LATENTS, "k": 4}
    return EvalBundle(facts=facts, layer=1, table=table, tokens=tokens, pooled=pooled, raw=raw,
                      counts=np.ones((n, 2), int), codes=codes, sae_configs={OURS: cfg, RANDOM_SAE: cfg},
                      sae_paths={OURS: "sae"})


def _split(table: pd.DataFrame) -> np.ndarray:
    groups, _ = group_keys(table)
    return split_prompts(table["id"], table["tier"], CFG.seed, CFG.train_fraction, CFG.calibration_fraction,
                         groups)


def _known_case() -> tuple[EvalBundle, np.ndarray, dict[str, str]]:
    """Hazard prompts carry the signal on the prompt; outside test they comply half the time (with the
    signal in the answer) and refuse otherwise; every test hazard prompt refuses, half with the signal
    still in the completion (shallow by construction), half without (deep). One benign test prompt refuses
    with the signal in its completion: shallow, whatever its tier."""
    table = _table()
    split = _split(table)
    haz = (table["tier"] == "hazard_adjacent_category").to_numpy()
    test = split == "test"
    labels = np.where(table["tier"] == "dual_use_bio", "hedge", "comply").astype(object)
    prompt_signal = np.flatnonzero(haz)
    completion_signal = []
    expected: dict[str, str] = {}
    for k, i in enumerate(np.flatnonzero(haz & ~test)):
        if k % 2:
            labels[i] = "refuse"
        else:
            completion_signal.append(i)
    for k, i in enumerate(np.flatnonzero(haz & test)):
        labels[i] = "refuse"
        if k % 2:
            completion_signal.append(i)
            expected[table["id"][i]] = "shallow"
        else:
            expected[table["id"][i]] = "deep"
    benign_test = np.flatnonzero((table["tier"] == "benign_bio").to_numpy() & test)
    labels[benign_test[0]] = "refuse"
    completion_signal.append(benign_test[0])
    expected[table["id"][benign_test[0]]] = "shallow"
    labels[benign_test[1]] = "refuse"  # a benign refusal without the signal: deep
    expected[table["id"][benign_test[1]]] = "deep"
    bundle = _bundle(table, list(labels), prompt_signal, np.array(completion_signal))
    return bundle, split, expected


def test_soundness__verdicts_follow_the_completion_evidence_not_the_tier() -> None:
    bundle, split, expected = _known_case()
    r = analyse(bundle, CFG)
    assert (r.split == split).all()
    assert set(r.catalog["hazard_adjacent"].latents) == set(SIGNAL)
    assert r.scale.usable and r.scale.reference == "complied_positive_completion"
    got = dict(zip(bundle.table["id"], r.verdicts, strict=True))
    # never the opposite verdict; "uncertain" only for the few a calibration band's tail can hold
    assert all(got[pid] in (want, "uncertain") for pid, want in expected.items()), got
    assert sum(got[pid] == want for pid, want in expected.items()) >= len(expected) - 2
    benign_shallow = next(p for p, v in expected.items() if p.startswith("ben") and v == "shallow")
    assert got[benign_shallow] == "shallow"  # a benign refusal whose answer carries the hazard: shallow
    # the prompt segment carries the hazard for every hazard prompt, deep ones included: it is reported,
    # and it would have called them all shallow
    ids = list(bundle.table["id"])
    deep_hazard = [ids.index(p) for p, v in expected.items() if v == "deep" and p.startswith("haz")]
    assert (r.prompt_depth_score[deep_hazard] >= r.scale.t_shallow).all()


def test_soundness__nothing_fit_depends_on_the_test_split() -> None:
    bundle, split, _ = _known_case()
    test = split == "test"
    rng = np.random.default_rng(9)
    pooled = {name: {s: np.where(test[:, None], rng.uniform(0, 9, a.shape), a) for s, a in seg.items()}
              for name, seg in bundle.pooled.items()}
    raw = {s: np.where(test[:, None], rng.normal(size=a.shape) * 5, a) for s, a in bundle.raw.items()}
    table = bundle.table.copy()
    flipped = [("comply" if lab == "refuse" else "refuse") if t else lab
               for lab, t in zip(table["surface_label"], test, strict=True)]
    table["surface_label"] = flipped
    table["surface_probs"] = [list(np.eye(5)[SURFACE_CLASSES.index(lab)]) for lab in flipped]
    perturbed = dataclasses.replace(bundle, pooled=pooled, raw=raw, table=table)
    a, b = analyse(bundle, CFG), analyse(perturbed, CFG)
    assert a.catalog == b.catalog
    np.testing.assert_array_equal(a.alignment["T"], b.alignment["T"])
    assert a.scale == b.scale
    for key in ("threshold", "magnitude_floor"):
        assert a.d_fit[key] == b.d_fit[key]
    np.testing.assert_array_equal(a.hazard[~test], b.hazard[~test])  # the probe's fit is the same
    assert [r["probe_C"] for r in a.auroc] == [r["probe_C"] for r in b.auroc]
    assert not np.array_equal(a.hazard[test], b.hazard[test])  # and the perturbation did reach the test rows


def test_soundness__noise_latents_give_an_empty_catalog_and_only_uncertain_verdicts() -> None:
    table = _table()
    labels = np.where(table["tier"] == "hazard_adjacent_category", "refuse", "comply")
    labels[::3] = "comply"
    bundle = _bundle(table, list(labels), np.array([], int), np.array([], int))
    r = analyse(bundle, CFG)
    entry = r.catalog["hazard_adjacent"]
    assert entry.latents == [] and "Benjamini" in entry.reason
    assert not r.scale.usable and "hazard_adjacent_category is empty" in r.scale.note
    refused = [v for v, lab, s in zip(r.verdicts, labels, r.split, strict=True)
               if lab == "refuse" and s == "test"]
    assert refused and set(refused) == {"uncertain"}


@pytest.mark.parametrize("repeats", [3])
def test_soundness__repeated_splits_report_every_seed(repeats: int) -> None:
    bundle, _, _ = _known_case()
    r = analyse(bundle, dataclasses.replace(CFG, repeats=repeats))
    assert r.repeats["seeds"] == [0, 1, 2]
    sae = r.repeats["numbers"]["auroc:sae@prompt"]
    assert len(sae["values"]) == 3 and sae["min"] <= sae["mean"] <= sae["max"]
    assert sae["sd"] is not None
