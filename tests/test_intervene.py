"""Causal checks: the edit grammar and math (bra/audit/edits.py, steering.py), the pipeline's residual-edit
hook, `bra-sae intervene` on the tiny Gemma2 (identity edits reproduce the unedited completions, ablation
and addition land exactly in the stored residual, the store verifies, scores and resumes), every bad input
refused in one line before anything is generated, and `bra-sae effects`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers import error_lines, label_by_tier, sae_main_code, write_eval_set, write_manifest

from bra.audit.edits import EditSpec, InterveneConfig, parse_edit, parse_edits
from bra.audit.steering import DirectionEdit, LatentEdit, random_direction, random_latents
from bra.cache import schema
from bra.cache.store import open_store
from bra.errors import EditError, StoreMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")

D_MODEL, D_SAE, LAYER = 64, 16, 1


# ----------------------------------------------------------------------------------------- fixtures


def orthonormal_sae(model_name: str, layer: int = LAYER, d_model: int = D_MODEL, seed: int = 0):
    """A TopK SAE (k = d_sae) with orthonormal decoder rows and W_enc = W_decᵀ, b_enc = 0: encode(x) is
    relu of x's coordinates along the rows, so an edit of the latents re-encodes exactly."""
    from bra.sae.model import SAEConfig, TopKSAE

    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_model, D_SAE, generator=gen))
    W_dec = q.T.contiguous()
    cfg = SAEConfig(d_model=d_model, d_sae=D_SAE, k=D_SAE, model_name=model_name, layer=layer,
                    hook_name=f"blocks.{layer}.hook_resid_post")
    return TopKSAE.from_state_dict(cfg, {"W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(D_SAE),
                                         "W_dec": W_dec, "b_dec": 0.1 * torch.randn(d_model, generator=gen)})


@pytest.fixture(scope="module")
def env(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 24-prompt eval manifest of the tiny Gemma2 (layer 1 hooked), its base store (labels set by tier:
    hazard refuse, benign comply), an orthonormal SAE, a catalog and a direction file."""
    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest
    from bra.sae.formats import save_saelens

    tmp = tmp_path_factory.mktemp("intervene")
    manifest = write_manifest(tmp / "eval.yaml", {
        "name": "tiny-eval", "model": {"id": str(tiny_gemma_dir), "attn_implementation": "eager"},
        "layers": [LAYER], "max_seq_len": 128, "batch_size": 8,
        "storage": {"dtype": "float32", "chunk_tokens": 64, "shard_tokens": 256},
        "prompt_sets": [str(write_eval_set(tmp / "set.jsonl"))],
        "generation": {"max_new_tokens": 6, "seed": 0, "batch_size": 8}})
    base = build_store(load_manifest(manifest), tmp / "base.zarr").path
    label_by_tier(base)
    sae = save_saelens(orthonormal_sae(str(tiny_gemma_dir)), tmp / "sae")
    catalog = tmp / "catalog.json"
    catalog.write_text(json.dumps({"settings": {"layer": LAYER}, "categories": {
        "hazard_adjacent": {"latents": [2, 5, 7], "reason": None},
        "refusal_circuitry": {"latents": [], "reason": "too few training samples for the contrast"}}}))
    direction = np.random.default_rng(1).standard_normal(D_MODEL).astype(np.float32)
    np.save(tmp / "dir.npy", direction)
    return {"tmp": tmp, "manifest": manifest, "base": Path(base), "sae": sae, "catalog": catalog,
            "direction": direction, "dir_file": tmp / "dir.npy", "model": tiny_gemma_dir}


def run_intervene(env: dict, out: Path, *edits: str, **cfg) -> list:
    from bra.audit.intervene import intervene
    from bra.pipeline.manifest import load_manifest

    config = InterveneConfig(edits=edits, sae=str(env["sae"]), catalog=str(env["catalog"]),
                             base_store=str(env["base"]), **cfg)
    return intervene(load_manifest(env["manifest"]), out, config)


@pytest.fixture(scope="module")
def edited(env: dict) -> dict:
    """Edited stores, built once: identity edits, a latent ablation, a direction addition, a category
    ablation and its random control."""
    specs = {"identity_latents": "scale=1:latents=3",
             "identity_direction": f"add=0:direction={env['dir_file']}",
             "ablate": "ablate:latents=3", "add": f"add=2:direction={env['dir_file']}",
             "category": "ablate:category=hazard_adjacent",
             "control": "ablate:category=hazard_adjacent:random=0"}
    results = run_intervene(env, env["tmp"] / "edits", *specs.values())
    assert [r.status for _, r in results] == ["built"] * len(specs)
    return {key: Path(r.path) for key, (_, r) in zip(specs, results, strict=True)}


def prompt_rows(store: Path) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, layer-1 activation) of every prompt-segment row."""
    s = open_store(store)
    seg = s.read_rows("segment", 0, s.n_tokens)
    rows = np.flatnonzero(seg == schema.SEGMENT_PROMPT)
    return s.read_rows("doc_index", 0, s.n_tokens)[rows], s.read_acts(LAYER, 0, s.n_tokens)[rows]


def generation(store: Path) -> pd.DataFrame:
    return pd.read_parquet(store / schema.GENERATION_TABLE).sort_values("doc_index")


def test_store_attrs__edit_recorded_only_when_given() -> None:
    from helpers import build_like_attrs

    raw = build_like_attrs()
    assert schema.StoreAttrs.from_attrs(raw).edit is None
    record = {"spec": "ablate:latents=3", "layer": 1, "latents": [3]}
    meta = schema.StoreAttrs.from_attrs({**raw, schema.ATTR_EDIT: record})
    assert meta.edit == record and meta.to_attrs()[schema.ATTR_EDIT] == record
    assert schema.ATTR_EDIT not in schema.StoreAttrs.from_attrs(raw).to_attrs()


# ------------------------------------------------------------------------------------------ grammar


@pytest.mark.parametrize("text, want", [
    ("ablate:category=hazard_adjacent",
     dict(op="ablate", value=None, target="category", name="hazard_adjacent")),
    ("scale=0.5:latents=3,17", dict(op="scale", value=0.5, target="latents", ids=(3, 17))),
    ("clamp=-2:latents=4", dict(op="clamp", value=-2.0, ids=(4,))),
    ("add=4:direction=refusal", dict(op="add", value=4.0, target="direction", name="refusal")),
    ("ablate:direction=refusal:random=7", dict(op="ablate", random_seed=7, name="refusal")),
    ("scale=2:direction=some/dir.npy", dict(op="scale", name="some/dir.npy")),
])
def test_parse_edit__grammar(text: str, want: dict) -> None:
    spec = parse_edit(text)
    for key, value in want.items():
        assert getattr(spec, key) == value, key
    assert spec.pair == text.rpartition(":random=")[0] if spec.is_control else spec.pair == text


def test_edit_spec__family_dose_and_slug() -> None:
    a, b = parse_edit("scale=2:latents=1,2"), parse_edit("ablate:latents=1,2")
    assert a.family == b.family and (a.dose, b.dose) == (2.0, 0.0)
    control = parse_edit("ablate:latents=1,2:random=3")
    assert control.family != b.family and control.pair == b.text and control.slug != b.slug
    assert parse_edit("add=4:direction=/x/y/refusal-dir.npy").slug == "add4-direction-refusal-dir"
    with pytest.raises(EditError, match="same store"):
        parse_edits(("ablate:latents=1", "ablate:latents=1"))
    with pytest.raises(EditError, match="no --edit"):
        parse_edits(())


@pytest.mark.parametrize("text, match", [
    ("ablate", "expected OP"),
    ("ablate:", "expected OP"),
    ("zap:latents=1", "not 'zap'"),
    ("add=1:latents=1", "not 'add'"),
    ("clamp=1:direction=refusal", "not 'clamp'"),
    ("ablate=1:latents=1", "takes no value"),
    ("scale:latents=1", "needs a value"),
    ("scale=x:latents=1", "not a number"),
    ("scale=nan:latents=1", "not finite"),
    ("add=inf:direction=refusal", "not finite"),
    ("ablate:latents=a,b", "latent ids"),
    ("ablate:latents=-1", "latent ids"),
    ("ablate:latents=1,1", "twice"),
    ("ablate:neurons=1", "the target must be"),
    ("ablate:latents=1:random=x", "random= takes"),
    ("ablate:direction=mine.txt", "direction= takes"),
])
def test_parse_edit__malformed_is_one_line(text: str, match: str) -> None:
    with pytest.raises(EditError, match=match) as info:
        parse_edit(text)
    assert "\n" not in str(info.value) and repr(text) in str(info.value)


# ----------------------------------------------------------------------------------------------- math


def test_latent_edit__ablation_re_encodes_to_zero_and_keeps_the_error() -> None:
    sae = orthonormal_sae("m")
    x = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(0)) * 3
    flat = x.reshape(-1, D_MODEL)
    assert (sae.encode(flat)[:, 3] > 0).any()
    edited = LatentEdit(sae, [3], "ablate", None)(x)
    z_new = sae.encode(edited.reshape(-1, D_MODEL))
    assert torch.allclose(z_new[:, 3], torch.zeros(len(flat)), atol=1e-5)
    others = [i for i in range(D_SAE) if i != 3]
    assert torch.allclose(z_new[:, others], sae.encode(flat)[:, others], atol=1e-5)
    error_before = flat - sae.decode(sae.encode(flat))
    error_after = edited.reshape(-1, D_MODEL) - sae.decode(z_new)
    assert torch.allclose(error_after, error_before, atol=1e-5)
    # clamp and scale change an active latent to what they say (an inactive one had a negative
    # pre-activation that z = relu(pre) does not record, so x' re-encodes below the clamp value there)
    active = sae.encode(flat)[:, [3, 4]] > 0
    clamped = sae.encode(LatentEdit(sae, [3, 4], "clamp", 2.5)(x).reshape(-1, D_MODEL))[:, [3, 4]]
    assert active.any() and torch.allclose(clamped[active], torch.full_like(clamped[active], 2.5), atol=1e-5)
    doubled = sae.encode(LatentEdit(sae, [3], "scale", 2.0)(x).reshape(-1, D_MODEL))
    assert torch.allclose(doubled[:, 3], 2 * sae.encode(flat)[:, 3], atol=1e-5)


def test_latent_and_direction_edits__identity_is_exact_in_every_dtype() -> None:
    sae = orthonormal_sae("m")
    v = random_direction(D_MODEL, 3.0, 0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 4, D_MODEL, generator=torch.Generator().manual_seed(1)).to(dtype)
        for edit in (LatentEdit(sae, [1, 2], "scale", 1.0), DirectionEdit(v, "add", 0.0),
                     DirectionEdit(v, "scale", 1.0)):
            out = edit(x)
            assert out.dtype == dtype and torch.equal(out, x)


def test_direction_edit__ablate_removes_the_component_and_add_moves_by_the_vector() -> None:
    v = random_direction(D_MODEL, 5.0, 3)
    u = torch.as_tensor(v) / float(np.linalg.norm(v))
    x = torch.randn(4, 7, D_MODEL, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(DirectionEdit(v, "ablate", None)(x) @ u, torch.zeros(4, 7), atol=1e-5)
    moved = DirectionEdit(v, "add", 1.5)(x) - x
    assert torch.allclose(moved, 1.5 * torch.as_tensor(v).expand_as(x), atol=1e-5)
    halved = DirectionEdit(v, "scale", 0.5)(x)
    assert torch.allclose(halved @ u, 0.5 * (x @ u), atol=1e-5)
    with pytest.raises(EditError, match="zero"):
        DirectionEdit(np.zeros(D_MODEL), "add", 1.0)


def test_random_controls__seeded_same_size_outside_the_edit() -> None:
    ids = random_latents(100, 5, [1, 2, 3], seed=0)
    assert len(set(ids)) == 5 and not set(ids) & {1, 2, 3} and ids == random_latents(100, 5, [1, 2, 3], 0)
    assert ids != random_latents(100, 5, [1, 2, 3], 1)
    with pytest.raises(EditError, match="fewer"):
        random_latents(4, 3, [0, 1], 0)
    v = random_direction(D_MODEL, 2.5, 9)
    assert np.isclose(np.linalg.norm(v), 2.5, rtol=1e-5)
    assert np.array_equal(v, random_direction(D_MODEL, 2.5, 9))


# ---------------------------------------------------------------------------------------- pipeline hook


def test_editing_residual__moves_the_hooked_residual_by_the_vector_and_unhooks(tiny_gemma_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from bra.pipeline.model import ResidualEdit, capture_residuals, editing_residual

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, trust_remote_code=False).eval()
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    att = torch.ones_like(ids)
    before = capture_residuals(model, ids, att, [1, 2])
    v = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0))
    with editing_residual(model, ResidualEdit(1, lambda h: h + v.to(h.dtype), {"spec": "test"})):
        after = capture_residuals(model, ids, att, [1, 2])
    assert torch.allclose(after[1] - before[1], v.expand_as(before[1]), atol=1e-5)
    assert not torch.allclose(after[2], before[2])  # the blocks above received the edited stream
    assert torch.equal(capture_residuals(model, ids, att, [1, 2])[1], before[1])  # the hook is gone


# ----------------------------------------------------------------------------------------- intervene


def test_intervene__identity_edits_reproduce_the_unedited_completions(env: dict, edited: dict) -> None:
    base = generation(env["base"])
    for key in ("identity_latents", "identity_direction"):
        got = generation(edited[key])
        assert [list(c) for c in got["completion_ids"]] == [list(c) for c in base["completion_ids"]], key
        assert (got["text"].tolist() == base["text"].tolist())
        doc_b, acts_b = prompt_rows(env["base"])
        doc_e, acts_e = prompt_rows(edited[key])
        assert np.array_equal(doc_b, doc_e) and np.array_equal(acts_e, acts_b)


def test_intervene__ablated_latent_is_zero_in_the_stored_residual_and_the_error_is_kept(
        env: dict, edited: dict) -> None:
    from bra.sae.formats import load_saelens

    sae = load_saelens(env["sae"])
    s = open_store(edited["ablate"])
    acts = torch.from_numpy(s.read_acts(LAYER, 0, s.n_tokens))
    assert torch.allclose(sae.encode(acts)[:, 3], torch.zeros(len(acts)), atol=1e-4)  # every row
    doc_b, base = prompt_rows(env["base"])
    doc_e, new = prompt_rows(edited["ablate"])
    assert np.array_equal(doc_b, doc_e)
    xb, xe = torch.from_numpy(base), torch.from_numpy(new)
    assert (sae.encode(xb)[:, 3] > 0).any()
    assert torch.allclose(xe - sae.decode(sae.encode(xe)), xb - sae.decode(sae.encode(xb)), atol=1e-4)


def test_matched_random_latents__firing_rates_closer_than_uniform_draws() -> None:
    from bra.audit.steering import matched_random_latents

    # 200 latents firing on 0..100% of rows; the edit is the 10 that fire most (as catalog latents do)
    rates = np.linspace(0.0, 1.0, 200)
    ids = list(range(190, 200))
    control, record = matched_random_latents(rates, ids, seed=0)
    assert len(set(control)) == 10 and not set(control) & set(ids) and list(control) == sorted(control)
    assert (control, record) == matched_random_latents(rates, ids, seed=0)
    assert control != matched_random_latents(rates, ids, seed=1)[0]
    edited_mean = rates[ids].mean()
    assert record["edited_mean"] == pytest.approx(edited_mean)
    assert record["control_mean"] == pytest.approx(rates[list(control)].mean())
    assert record["uniform_mean"] == pytest.approx(np.delete(rates, ids).mean())
    matched_gap = abs(record["control_mean"] - edited_mean)
    uniform_gaps = [abs(rates[list(random_latents(200, 10, ids, s))].mean() - edited_mean) for s in range(20)]
    assert matched_gap < 0.1 and matched_gap < min(uniform_gaps)
    assert [i for i, _ in record["pairs"]] == ids
    assert all(abs(rates[i] - rates[j]) <= 0.2 for i, j in record["pairs"])  # 20 neighbours at most
    with pytest.raises(EditError, match="fewer"):
        matched_random_latents(rates[:12], ids[:0] + list(range(7)), seed=0)


def test_intervene__added_direction_moves_the_stored_residual_by_that_vector(env: dict, edited: dict) -> None:
    _, base = prompt_rows(env["base"])
    _, new = prompt_rows(edited["add"])
    assert np.allclose(new - base, 2 * env["direction"][None, :], atol=1e-4)
    record = open_store(edited["add"]).meta.edit
    assert record["op"] == "add" and record["layer"] == LAYER
    assert np.isclose(record["direction"]["norm"], np.linalg.norm(env["direction"]), rtol=1e-5)


def test_intervene__category_edit_and_its_random_control_record_their_latents(env: dict,
                                                                             edited: dict) -> None:
    real, control = (open_store(edited[k]).meta.edit for k in ("category", "control"))
    assert real["latents"] == [2, 5, 7] and not real["control"]
    assert control["control"] and control["pair"] == real["spec"] and len(control["latents"]) == 3
    assert not set(control["latents"]) & {2, 5, 7} and control["control_of_latents"] == [2, 5, 7]
    # the control is matched on firing rate on the base store, read through the audit's reader
    from bra.audit.reader import latent_firing_rates
    from bra.sae.registry import load_sae_source

    rates, n_rows = latent_firing_rates(env["base"], load_sae_source(str(env["sae"])), LAYER)
    match = control["matched_firing"]
    assert match["base_store"] == str(open_store(env["base"]).path) and match["n_rows"] == n_rows > 0
    assert match["edited_rates"] == pytest.approx(rates[[2, 5, 7]].tolist())
    assert sorted(j for _, j in match["pairs"]) == control["latents"]
    assert match["control_rates"] == pytest.approx(rates[[j for _, j in match["pairs"]]].tolist())
    assert "matched_firing" not in real


def test_intervene__latent_control_needs_a_base_store(env: dict, tmp_path: Path) -> None:
    from bra.audit.intervene import prepare_edits
    from bra.pipeline.manifest import load_manifest

    cfg = InterveneConfig(edits=("ablate:latents=3:random=0",), sae=str(env["sae"]))
    with pytest.raises(EditError, match="matched on firing rate.*give --base-store"):
        prepare_edits(load_manifest(env["manifest"]), cfg, tmp_path)


def test_intervene__stores_verify_score_and_are_left_alone(env: dict, edited: dict, tmp_path: Path) -> None:
    from bra.audit.score import ScoreConfig, compute_scores
    from bra.cache.verify import verify_store
    from bra.pipeline.relabel import relabel_store

    for path in edited.values():
        assert verify_store(path) == [], path
    copy = Path(shutil.copytree(edited["category"], tmp_path / "scored.zarr"))
    relabel_store(copy)
    assert verify_store(copy) == []
    label_by_tier(copy)  # the random model's completions are gibberish: labels by tier, as eval_env does
    result = compute_scores(copy, env["sae"], ScoreConfig(n_boot=20, n_perm=20, top_n=4, repeats=1))
    # a random SAE's latents are noise: the catalog may be empty and D undefined, but every prompt is scored
    assert len(result.D) == len(result.depth_score) == 24
    refused = (result.table["surface_label"] == "refuse").to_numpy() & (result.split == "test")
    assert all(v in ("deep", "shallow", "uncertain") for v in np.asarray(result.verdicts, object)[refused])
    again = run_intervene(env, env["tmp"] / "edits", "ablate:category=hazard_adjacent")
    assert [r.status for _, r in again] == ["already-complete"]


def test_cli_intervene__reports_each_store(env: dict, edited: dict,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import sae_main_code

    code = sae_main_code(["intervene", str(env["manifest"]), "--out", str(env["tmp"] / "edits"),
                          "--edit", "ablate:latents=3", "--edit", "scale=1:latents=3",
                          "--sae", str(env["sae"])])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{edited['ablate']}: already-complete (ablate:latents=3)" in err
    assert f"{edited['identity_latents']}: already-complete (scale=1:latents=3)" in err


def test_intervene__resumes_after_a_kill_without_generating_again(
        env: dict, edited: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import assert_same_store, snapshot

    import bra.pipeline.evalbuild as evalbuild

    out = tmp_path / "edits"
    out.mkdir()
    store = Path(shutil.copytree(edited["add"], out / edited["add"].name))
    want = snapshot(store)
    group = zarr.open_group(str(store), mode="r+")
    done = group[schema.DONE_ARRAY]
    done[-1] = 0  # as a build killed before its last shard leaves it
    group.attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING

    def refuse(*_a, **_k):
        raise AssertionError("a resume must reuse the saved completions")

    monkeypatch.setattr(evalbuild, "generate_completions", refuse)
    results = run_intervene(env, out, f"add=2:direction={env['dir_file']}")
    assert [r.status for _, r in results] == ["resumed"] and 0 < results[0][1].computed_tokens
    assert_same_store(store, want)


def test_build_store__refuses_a_store_of_another_edit(env: dict, edited: dict, tmp_path: Path) -> None:
    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest
    from bra.pipeline.model import ResidualEdit

    store = Path(shutil.copytree(edited["ablate"], tmp_path / "s.zarr"))
    zarr.open_group(str(store), mode="r+").attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING
    other = ResidualEdit(LAYER, lambda h: h, {"spec": "scale=1:latents=4"})
    with pytest.raises(StoreMismatchError, match="another residual edit"):
        build_store(load_manifest(env["manifest"]), store, edit=other)


def test_contrast_direction__is_the_train_difference_of_means_at_the_last_prompt_token(
        env: dict, tmp_path: Path) -> None:
    from bra.audit.intervene import ModelFacts, contrast_direction
    from bra.audit.splits import group_keys, split_prompts

    cfg = InterveneConfig()
    facts = ModelFacts(str(env["model"]), 4, D_MODEL)
    vector, record = contrast_direction(env["base"], "refusal", LAYER, facts, cfg)
    s = open_store(env["base"])
    table = s.read_table(schema.PROMPTS_TABLE).sort_values("doc_index").reset_index(drop=True)
    train = split_prompts(table["id"], table["tier"], 0, 0.5, 0.25, group_keys(table)[0]) == "train"
    seg, doc = s.read_rows("segment", 0, s.n_tokens), s.read_rows("doc_index", 0, s.n_tokens)
    last = [int(np.flatnonzero((doc == d) & (seg == schema.SEGMENT_PROMPT))[-1]) for d in range(len(table))]
    acts = s.read_acts(LAYER, 0, s.n_tokens)[last]
    labels = table["surface_label"]
    refused, complied = train & (labels == "refuse"), train & (labels == "comply")
    assert np.allclose(vector, acts[refused].mean(0) - acts[complied].mean(0), atol=1e-5)
    assert (record["n_positive"], record["n_negative"]) == (int(refused.sum()), int(complied.sum()))
    hazard, _ = contrast_direction(env["base"], "hazard", LAYER, facts, cfg)
    assert not np.allclose(hazard, vector)


def test_intervene__named_direction_edit_and_its_control_save_the_direction(env: dict, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from bra.audit import intervene as mod
    from bra.pipeline.manifest import load_manifest

    cfg = InterveneConfig(edits=("add=1:direction=refusal", "add=1:direction=refusal:random=0"),
                          base_store=str(env["base"]))
    prepared = mod.prepare_edits(load_manifest(env["manifest"]), cfg, tmp_path)
    real, control = (p.edit.record["direction"] for p in prepared)
    assert np.isclose(real["norm"], control["norm"], rtol=1e-5) and real["digest"] != control["digest"]
    assert control["control_of"]["digest"] == real["digest"]
    saved = np.load(tmp_path / f"direction-refusal-layer{LAYER}.npy")
    assert mod.describe_vector(saved)["digest"] == real["digest"]


# ---------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model's weights or generating fail the test: bad input must be refused first."""
    import bra.audit.intervene as intervene_mod
    import bra.pipeline.evalbuild as evalbuild

    def refuse(*_a, **_k):
        raise AssertionError("bad input must be refused before anything is generated")

    monkeypatch.setattr(evalbuild, "generate_completions", refuse)
    monkeypatch.setattr(intervene_mod, "load_build_model", refuse)


def bad_inputs(env: dict) -> list[tuple[list[str], str]]:
    tmp = env["tmp"]
    np.save(tmp / "short.npy", np.ones(D_MODEL - 1, np.float32))
    from bra.sae.formats import save_saelens

    if not (tmp / "sae-layer2").exists():
        save_saelens(orthonormal_sae(str(env["model"]), layer=2), tmp / "sae-layer2")
        save_saelens(orthonormal_sae(str(env["model"]), d_model=32), tmp / "sae-narrow")
    sae, cat = ["--sae", str(env["sae"])], ["--catalog", str(env["catalog"])]
    return [
        (["--edit", "ablate:category=bio_stuff", *sae, *cat], "unknown category 'bio_stuff'"),
        (["--edit", "ablate:category=refusal_circuitry", *sae, *cat],
         "category 'refusal_circuitry' is empty in the catalog (too few"),
        (["--edit", "ablate:latents=3,16", *sae], "latent 16 is out of range: the SAE has 16 latents"),
        (["--edit", "ablate:latents=3", "--sae", str(tmp / "sae-layer2")], "--layer 2: the manifest hooks"),
        (["--edit", "ablate:latents=3", "--sae", str(tmp / "sae-layer2"), "--layer", "1"],
         "it reads layer 2, but the edit is at layer 1"),
        (["--edit", "ablate:latents=3", "--sae", str(tmp / "sae-narrow")], "it reads d_model 32"),
        (["--edit", "ablate:latents"], "the target must be"),
        (["--edit", "oops"], "expected OP"),
        (["--edit", "scale=inf:latents=3", *sae], "not finite"),
        (["--edit", f"add=1:direction={tmp / 'short.npy'}"],
         "shape (63,), but the model's residual width is 64"),
        (["--edit", f"add=1:direction={tmp / 'missing.npy'}"], "not found"),
        (["--edit", "ablate:latents=3"], "latent edits need --sae"),
        (["--edit", "ablate:category=hazard_adjacent", *sae], "category edits need --catalog"),
        (["--edit", "add=1:direction=refusal"], "give --base-store"),
        (["--edit", "ablate:latents=3", *sae, "--layer", "2"], "--layer 2: the manifest hooks layers [1]"),
    ]


def test_cli_intervene__bad_input_is_one_line_before_generation(env: dict, no_generation, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import sae_main_code

    for args, message in bad_inputs(env):
        code = sae_main_code(["intervene", str(env["manifest"]), "--out", str(tmp_path / "out"), *args])
        lines = error_lines(capsys.readouterr().err)
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
        assert not list((tmp_path / "out").glob("*.zarr"))


def test_prepare_edits__base_store_of_another_model_or_an_edited_one_is_refused(
        env: dict, edited: dict, tmp_path: Path) -> None:
    from bra.audit.intervene import prepare_edits
    from bra.pipeline.manifest import load_manifest

    cfg = InterveneConfig(edits=("add=1:direction=refusal",), base_store=str(edited["add"]))
    with pytest.raises(EditError, match="generated under an edit"):
        prepare_edits(load_manifest(env["manifest"]), cfg, tmp_path)


# ------------------------------------------------------------------------------------------- effects


def test_effects__table_controls_and_outputs(env: dict, edited: dict, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import sae_main_code

    out = tmp_path / "effects"
    stores = [edited[k] for k in ("control", "category", "ablate", "identity_latents")]
    code = sae_main_code(["effects", str(env["base"]), *map(str, stores), "--out", str(out),
                          "--n-boot", "200"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "effects.json").read_text())
    assert (out / "effects.md").is_file() and (out / "effects.png").stat().st_size > 0
    names = [r["name"] for r in doc["runs"]]  # each control right after its edit
    assert names.index(edited["control"].name.removesuffix(".zarr")) == \
        names.index(edited["category"].name.removesuffix(".zarr")) + 1
    before = open_store(env["base"]).read_table(schema.PROMPTS_TABLE).set_index("id")
    for run, path in ((r, Path(r["store"])) for r in doc["runs"]):
        after = open_store(path).read_table(schema.PROMPTS_TABLE).set_index("id").loc[before.index]
        for row in run["rows"]:
            sel = np.ones(len(before), bool) if row["tier"] == "all" \
                else (before["tier"] == row["tier"]).to_numpy()
            b = (before["surface_label"].to_numpy()[sel] == "refuse")
            a = (after["surface_label"].to_numpy()[sel] == "refuse")
            assert np.isclose(row["delta"], a.mean() - b.mean())
            assert row["ci"][0] <= row["delta"] <= row["ci"][1]
            assert row["to_refuse"] == int((~b & a).sum()) and row["from_refuse"] == int((b & ~a).sum())
    assert [r["tier"] for r in doc["runs"][0]["rows"]] == ["benign_bio", "dual_use_bio",
                                                           "hazard_adjacent_category", "all"]
    assert len(doc["prompts"]) == 24 and set(doc["prompts"][0]["after"]) == set(names)
    assert doc["audit"] is None and "no --sae was given" in doc["not_reported"]
    control = next(r for r in doc["runs"] if r["control"])
    assert control["matched_firing"]["edited_rates"] and "matched on firing rate" in \
        (out / "effects.md").read_text()
    assert "no --sae was given" in (out / "effects.md").read_text()
    assert all("audit_rows" not in r for r in doc["runs"])


def _loose(seed: int = 0):
    from bra.audit.config import ScoreConfig

    # 24 prompts of a random model: no latent passes the default BH level and a calibration tier holds 2
    # prompts, so the fit is loosened until it gives numbers (a "no change" of nothing would prove nothing)
    return ScoreConfig(seed=seed, fdr=0.99, min_effect=0.0, min_reference=1, n_null=2)


LOOSE = _loose()


@pytest.fixture(scope="module")
def usable_fit(env: dict):
    """The first split seed whose loosened fit on the base store has a usable depth scale (on a random
    model the hazard latents mark nothing, so on some splits the scale is rightly unusable)."""
    from bra.audit.effects_audit import FixedAudit

    for seed in range(20):
        cfg = _loose(seed)
        if FixedAudit(env["base"], str(env["sae"]), cfg).fit.scale.usable:
            return cfg
    pytest.fail("no split seed gives a usable depth scale on the tiny store")


@pytest.fixture(scope="module")
def labelled_identity(env: dict, edited: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The identity-latent store with the base store's labels (the base was relabelled by tier after its
    build), so that an identity edit changes nothing the audit reads."""
    out = tmp_path_factory.mktemp("identity") / "scale1-latents-3.zarr"
    shutil.copytree(edited["identity_latents"], out)
    label_by_tier(out)
    return out


def test_effects_audit__identity_edit_changes_no_depth_and_no_d(env: dict, edited: dict,
                                                                 labelled_identity: Path, usable_fit) -> None:
    from bra.audit.edits import EffectsConfig
    from bra.audit.effects import compute_effects, effects_markdown

    doc = compute_effects(env["base"], [labelled_identity, edited["ablate"]],
                          EffectsConfig(sae=str(env["sae"]), n_boot=100), usable_fit)
    assert doc["not_reported"] is None and doc["audit"]["sae"] == str(env["sae"])
    identity, ablate = doc["runs"]
    rows = {r["tier"]: r for r in identity["audit_rows"]}
    assert set(rows) == {"benign_bio", "dual_use_bio", "hazard_adjacent_category", "all", "all (test split)"}
    # a fit that gives numbers at all: otherwise "no change" would be vacuous
    assert rows["all"]["D"]["n_paired"] > 0 and rows["all"]["depth_score"]["n_paired"] > 0
    for r in identity["audit_rows"]:
        for m in ("depth_score", "D"):
            if r[m]["n_paired"]:
                assert r[m]["delta"] == 0.0 and (r[m]["n_paired"] == 1 or r[m]["ci"] == [0.0, 0.0])
                assert r[m]["before"] == r[m]["after"]
        assert r["category_transitions"] == {} and r["d_verdict_transitions"] == {}
    # the ablation store keeps its own (rule) labels: the audit reads them, so something moves
    moved = {r["tier"]: r for r in ablate["audit_rows"]}["all"]
    assert moved["category_transitions"] or moved["D"]["delta"] != 0.0
    text = effects_markdown(doc)
    assert "D and depth score under the base store's fit" in text and "Not reported" not in text


def test_effects_audit__the_fit_is_the_base_stores_only(env: dict, edited: dict) -> None:
    """Every edited store is read under the base store's fit: the fit JSON is one, whatever is compared."""
    from bra.audit.edits import EffectsConfig
    from bra.audit.effects import compute_effects

    cfg = EffectsConfig(sae=str(env["sae"]), n_boot=20)
    one = compute_effects(env["base"], [edited["ablate"]], cfg, LOOSE)["audit"]
    two = compute_effects(env["base"], [edited["add"], edited["category"]], cfg, LOOSE)["audit"]
    assert one == two


def test_effects_audit__bad_sae_is_one_line_before_any_output(env: dict, edited: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from bra.sae.formats import save_saelens

    narrow = save_saelens(orthonormal_sae(str(env["model"]), d_model=32), tmp_path / "sae-narrow")
    out = tmp_path / "effects"
    code = sae_main_code(["effects", str(env["base"]), str(edited["ablate"]), "--out", str(out),
                          "--sae", str(narrow), "--n-boot", "20"])
    lines = error_lines(capsys.readouterr().err)
    assert code != 0 and len(lines) == 1 and "d_model 32" in lines[0], lines
    assert not out.exists()


def test_effects__refuses_unedited_edited_and_foreign_stores(env: dict, edited: dict, tmp_path: Path) -> None:
    from bra.audit.effects import compute_effects, effects, paired_bootstrap

    with pytest.raises(EditError, match="not an edited store"):
        compute_effects(env["base"], [env["base"]])
    with pytest.raises(EditError, match="generated under an edit"):
        compute_effects(edited["add"], [edited["ablate"]])
    with pytest.raises(EditError, match="at least one"):
        compute_effects(env["base"], [])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(EditError, match="not an effects output"):
        effects(env["base"], [edited["add"]], tmp_path / "busy")
    same = np.array([1, 0, 1, 0])
    assert paired_bootstrap(same, same, np.zeros(4), 50, np.random.default_rng(0)) == (0.0, 0.0, 0.0)


def test_effects_spec__is_the_edit_record(env: dict, edited: dict) -> None:
    record = open_store(edited["category"]).meta.edit
    spec = parse_edit(record["spec"])
    assert isinstance(spec, EditSpec) and record["family"] == spec.family and record["dose"] == spec.dose
