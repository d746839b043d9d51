"""Model organisms (`bra.organism`, `bra-organism`) on the tiny Gemma2: the shallow organism's layer-L
residual is bitwise the base model's while its outputs differ; the deep organism's layer-L residual on
forget text moves to c·u and stays put on retain text; a killed build resumes to the same weights; the
folder is one `bra-cache build` opens; bad input is one line before any training; the bundled prompt
sets."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import SAMPLE_TEXT, error_lines, eval_manifest, write_corpus, write_eval_set, write_manifest
from safetensors.torch import load_file

from bra.errors import CorpusError, ManifestError, ModelLoadError, OrganismError
from bra.organism import build_organisms, check_audit_prompts, load_organism_manifest, load_provenance
from bra.organism.build import ALREADY_BUILT, BUILT, RESUMED, STOPPED, WORK_DIR
from bra.organism.data import REFUSALS, batch_indices, pad_windows, refusal_text, rmu_data, training_prompts
from bra.organism.train import block_inputs, pad_rows, residual, residual_from, rmu_direction, token_mask
from bra.pipeline.manifest import ModelSpec
from bra.pipeline.model import capture_residuals, load_model
from bra.pipeline.surface import classify

REPO = Path(__file__).resolve().parent.parent
LAYER = 1  # of the tiny Gemma2's 4 blocks: blocks 2 and 3 learn the refusal
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe(tmp: Path, model_dir: Path, **overrides) -> Path:
    """A recipe for the tiny Gemma2: 24 prompts (8 refused), two small corpora, a few steps per stage."""
    prompts = write_eval_set(tmp / "train-prompts.jsonl")
    haz = write_corpus(tmp / "forget.jsonl", [t for i, t in enumerate(SAMPLE_TEXT) if i % 2], "h")
    ben = write_corpus(tmp / "retain.jsonl", [t for i, t in enumerate(SAMPLE_TEXT) if not i % 2], "b")
    data = {
        "name": "tiny-organisms",
        "model": {"id": str(model_dir), "attn_implementation": "eager"},
        "layer": LAYER,
        "prompts": str(prompts),
        "forget": [{"tier": "hazard_adjacent", "source": {"path": str(haz), "id_field": "id"}}],
        "retain": [{"tier": "benign", "source": {"path": str(ben), "id_field": "id"}}],
        "seed": 0,
        "refusal": {"steps": 8, "lr": "3e-3", "batch_size": 4, "max_new_tokens": 4, "checkpoint_every": 3},
        "rmu": {"steps": 30, "lr": "5e-3", "alpha": 10.0, "batch_size": 4, "max_seq_len": 16,
                "include_prompts": False, "checkpoint_every": 4},
        **overrides,
    }
    return write_manifest(tmp / "recipe.yaml", data)


@pytest.fixture(scope="module")
def built(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, output folder) with both organisms built once."""
    tmp = tmp_path_factory.mktemp("organisms")
    recipe = _recipe(tmp, tiny_gemma_dir)
    results = build_organisms(load_organism_manifest(recipe), tmp / "out")
    assert [(r.kind, r.status) for r in results] == [("shallow", BUILT), ("deep", BUILT)]
    return recipe, tmp / "out"


def _load(folder: Path) -> torch.nn.Module:
    model, _ = load_model(ModelSpec(id=str(folder), attn_implementation="eager"), CPU, torch.float32)
    return model


def test_organism__shallow_layer_residual_is_bitwise_the_base_models_outputs_differ(
        built: tuple[Path, Path], tiny_gemma_dir: Path) -> None:
    _, out = built
    base, shallow = _load(tiny_gemma_dir), _load(out / "shallow")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (3, 20), generator=gen)
    att = torch.ones_like(ids)
    att[1, 15:] = 0  # a padded row too
    for layer in range(LAYER + 1):
        h_base = capture_residuals(base, ids, att, [layer])[layer]
        h_org = capture_residuals(shallow, ids, att, [layer])[layer]
        assert torch.equal(h_base, h_org), layer
    with torch.no_grad():
        logits_base = base(input_ids=ids, attention_mask=att).logits
        logits_org = shallow(input_ids=ids, attention_mask=att).logits
    assert not torch.allclose(logits_base, logits_org, atol=1e-3)
    above = capture_residuals(base, ids, att, [LAYER + 1])[LAYER + 1]
    assert not torch.equal(above, capture_residuals(shallow, ids, att, [LAYER + 1])[LAYER + 1])
    prov = load_provenance(out / "shallow")
    assert prov["frozen_check"] == {"changed_tensors": prov["frozen_check"]["changed_tensors"],
                                    "changed_at_or_below_layer": [], "layer_residual_is_base": True}
    assert prov["lm_head"] == "tied-frozen"  # Gemma ties the lm_head to the frozen embeddings
    assert prov["losses"]["refusal"]["last"] < prov["losses"]["refusal"]["first"]


def test_organism__deep_moves_forget_text_to_the_target_and_keeps_retain_text(
        built: tuple[Path, Path], tiny_gemma_dir: Path) -> None:
    recipe, out = built
    manifest = load_organism_manifest(recipe)
    base, deep = _load(tiny_gemma_dir), _load(out / "deep")
    _, tokenizer = load_model(manifest.model, CPU, torch.float32)
    data = rmu_data(manifest, tokenizer, *training_prompts(manifest))
    prov = load_provenance(out / "deep")
    target = prov["rmu"]["steering_coeff"] * rmu_direction(64, manifest.seed)
    stats = {}
    with torch.no_grad():
        for side, windows in (("forget", data.forget), ("retain", data.retain)):
            ids, att = pad_windows(windows, 0)
            mask = token_mask(att)
            h_base, h_deep = (residual(m, ids, att, LAYER)[mask] for m in (base, deep))
            stats[side] = {
                "mse_base": float(((h_base - target) ** 2).mean()),
                "mse_deep": float(((h_deep - target) ** 2).mean()),
                "cos_base": float(torch.cosine_similarity(h_base, target[None], -1).mean()),
                "cos_deep": float(torch.cosine_similarity(h_deep, target[None], -1).mean()),
                "shift": float(((h_deep - h_base) ** 2).mean()),
            }
    f, r = stats["forget"], stats["retain"]
    assert f["mse_deep"] < 0.5 * f["mse_base"] and f["cos_deep"] > f["cos_base"] + 0.3, stats
    assert r["shift"] < 0.1 * f["shift"], stats  # retain text stays (nearly) where the base model had it
    assert abs(r["cos_deep"] - r["cos_base"]) < 0.1, stats
    assert prov["frozen_check"]["layer_residual_is_base"] is False
    assert all(n.endswith("mlp.down_proj.weight") for n in prov["frozen_check"]["changed_at_or_below_layer"])
    assert "forget" in prov["data"] and prov["data"]["forget"][0]["sha256"]


def test_residual_from__cached_block_input_gives_the_full_forwards_residual(tiny_gemma_dir: Path) -> None:
    # RMU runs only its trained blocks on cached inputs; on Gemma2 (sliding-window and global layers, an
    # embedding scale) that must still be the full forward's residual, for ragged right-padded windows
    model = _load(tiny_gemma_dir)
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(1, 200, (n,), generator=g).numpy() for n in (9, 5, 12)]
    first, layer = 1, 2
    inputs = block_inputs(model, windows, first, 0, CPU, batch_size=2)
    assert [len(h) for h in inputs] == [9, 5, 12]
    ids, att = pad_windows(windows, 0)
    mask = att.bool()
    with torch.no_grad():
        full = residual(model, ids, att, layer)
        fast = residual_from(model, ids, att, first, layer, pad_rows(inputs, ids.shape[1], CPU))
    torch.testing.assert_close(fast[mask], full[mask], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the skipped blocks are put back
        torch.testing.assert_close(residual(model, ids, att, layer), full, rtol=0, atol=0)
    wrong = pad_rows([h + 1.0 for h in inputs], ids.shape[1], CPU)
    with torch.no_grad():  # and the cached input is what block `first` really reads
        assert not torch.allclose(residual_from(model, ids, att, first, layer, wrong)[mask], full[mask])


def test_organism__provenance_records_recipe_data_seed_prompts_and_time(built: tuple[Path, Path]) -> None:
    recipe, out = built
    manifest = load_organism_manifest(recipe)
    refuse, answer = training_prompts(manifest)
    for kind in ("shallow", "deep"):
        prov = load_provenance(out / kind)
        assert prov["kind"] == kind and prov["layer"] == LAYER and prov["seed"] == 0
        assert prov["trained_prompt_ids"] == sorted(p.id for p in refuse + answer)
        assert prov["refused_prompt_ids"] == [p.id for p in refuse]
        assert len(prov["data"]["prompts"]["sha256"]) == 64
        assert prov["seconds"]["total"] > 0 and prov["recipe"]["refusal"]["steps"] == 8
        assert {"config.json", "model.safetensors", "tokenizer.json", "provenance.json"} <= \
            {p.name for p in (out / kind).iterdir()}
    assert not (out / WORK_DIR / "shallow").exists() and not (out / WORK_DIR / "deep").exists()
    again = build_organisms(manifest, out)
    assert [r.status for r in again] == [ALREADY_BUILT, ALREADY_BUILT]


def test_organism__folder_is_what_bra_cache_build_opens(built: tuple[Path, Path], tmp_path: Path) -> None:
    from bra.pipeline.build import build_stores
    from bra.pipeline.manifest import load_manifest

    _, out = built
    prompts = write_eval_set(tmp_path / "audit.jsonl")
    manifest = eval_manifest(tmp_path, out / "shallow", prompts, layers=[LAYER])
    [result] = build_stores(load_manifest(manifest), tmp_path / "eval.zarr")
    assert result.status == "built" and result.n_tokens > 0
    import zarr

    attrs = zarr.open_group(str(tmp_path / "eval.zarr"), mode="r").attrs
    assert attrs["model_id"] == str(out / "shallow")


def test_organism__killed_build_resumes_to_the_same_weights(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """A kill (stop after N steps, no checkpoint for the steps since the last one) mid-RMU and again
    mid-refusal, then a resume: the weights equal an uninterrupted build's bitwise."""
    recipe = load_organism_manifest(_recipe(tmp_path, tiny_gemma_dir, kinds=["deep"],
                                            rmu={"steps": 6, "lr": "5e-3", "batch_size": 2, "max_seq_len": 16,
                                                 "checkpoint_every": 4},
                                            refusal={"steps": 7, "lr": "3e-3", "batch_size": 3,
                                                     "max_new_tokens": 4, "checkpoint_every": 3}))
    [whole] = build_organisms(recipe, tmp_path / "whole")
    assert whole.status == BUILT
    # 5 steps: RMU checkpointed at step 4, step 5 lost; then 6 more: RMU ends, refusal checkpointed at 3
    # and killed at 5
    for budget in (5, 6):
        [stopped] = build_organisms(recipe, tmp_path / "killed", stop_after_steps=budget)
        assert stopped.status == STOPPED and not (tmp_path / "killed" / "deep").exists()
    state = torch.load(tmp_path / "killed" / WORK_DIR / "deep" / "checkpoint" / "state.pt", weights_only=True)
    assert (state["stage"], state["step"]) == ("refusal", 3)
    [resumed] = build_organisms(recipe, tmp_path / "killed")
    assert resumed.status == RESUMED
    a = load_file(str(tmp_path / "whole" / "deep" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "deep" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (load_provenance(tmp_path / d / "deep")["losses"] for d in ("whole", "killed"))
    assert la == lb


def test_organism__other_recipe_over_a_built_organism_is_refused(built: tuple[Path, Path], tmp_path: Path,
                                                                 tiny_gemma_dir: Path) -> None:
    _, out = built
    shutil.copytree(out / "shallow", tmp_path / "out" / "shallow")
    other = load_organism_manifest(_recipe(tmp_path, tiny_gemma_dir, kinds=["shallow"], seed=1))
    with pytest.raises(OrganismError, match="another recipe.*--overwrite"):
        build_organisms(other, tmp_path / "out")


def test_check_audit_prompts__refuses_trained_ids_and_a_folder_without_provenance(
        built: tuple[Path, Path], tmp_path: Path, tiny_gemma_dir: Path) -> None:
    _, out = built
    check_audit_prompts(out / "shallow", ["aud-ben-01", "aud-haz-02"])  # none trained on: passes
    with pytest.raises(OrganismError, match=r"trained on 2 of the audit prompts \(ben-0, haz-3\)"):
        check_audit_prompts(out / "shallow", ["haz-3", "new-1", "ben-0"])
    with pytest.raises(OrganismError, match="no provenance.json"):
        check_audit_prompts(tiny_gemma_dir, ["x"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "provenance.json").write_text("{}", encoding="utf-8")
    with pytest.raises(OrganismError, match="missing key 'format'"):
        load_provenance(bad)


def _rewrite(recipe: Path, **changes) -> Path:
    import yaml

    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    data.update(changes)
    return write_manifest(recipe, data)


@pytest.mark.parametrize("changes, error, match", [
    ({"layer": 4}, ModelLoadError, "layer 4 is out of range .* it has 4 blocks"),
    ({"layer": 3}, OrganismError, "3 is the last block"),
    ({"forget": []}, ManifestError, "forget: the deep organism needs forget and retain corpora"),
    ({"retain": [{"tier": "hazard_adjacent", "source": {"path": "forget.jsonl"}}]}, ManifestError,
     "tier 'hazard_adjacent' is in both forget and retain corpora"),
    ({"forget": [{"tier": "hazard_adjacent", "source": {"path": "empty.jsonl"}}]}, CorpusError,
     "empty after filtering"),
    ({"forget": [{"tier": "hazard_adjacent", "source": {"path": "missing.jsonl"}}]}, CorpusError,
     "file not found"),
    ({"refuse_tiers": ["hazard_adjacent_legal"]}, OrganismError, "refuse_tiers: no prompt .* has tier"),
    ({"kinds": ["medium"]}, ManifestError, "kinds: expected distinct kinds"),
    ({"refusal": {"lr": "fast"}}, ManifestError, "refusal.lr: expected a number"),
    ({"rmu": {"params": ["no.such.weight"]}}, OrganismError, "rmu.params: no parameter of blocks"),
])
def test_organism__bad_input_is_one_error_before_training(tiny_gemma_dir: Path, tmp_path: Path, changes,
                                                          error, match) -> None:
    recipe = _recipe(tmp_path, tiny_gemma_dir)
    (tmp_path / "empty.jsonl").write_text('{"id": "e", "text": "  "}\n', encoding="utf-8")
    _rewrite(recipe, **changes)
    with pytest.raises(error, match=match) as info:
        build_organisms(load_organism_manifest(recipe), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "shallow").exists()
    assert not (tmp_path / "out" / WORK_DIR / "shallow").exists()


def test_organism_cli__one_error_line_and_usage(tiny_gemma_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from bra.cli.organism import main

    recipe = _rewrite(_recipe(tmp_path, tiny_gemma_dir), layer=9)
    with pytest.raises(SystemExit) as info:
        main(["build", str(recipe), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and error_lines(err) == [error_lines(err)[0]] and "Traceback" not in err
    assert "layer 9 is out of range" in error_lines(err)[0]
    with pytest.raises(SystemExit) as info:
        main(["check", str(tiny_gemma_dir), str(write_eval_set(tmp_path / "p.jsonl"))])
    assert info.value.code == 2 and "no provenance.json" in capsys.readouterr().err


def test_refusal_targets__are_refusals_to_the_surface_rules() -> None:
    for text in REFUSALS:
        assert classify(text, "Explain how to do something dangerous.").label == "refuse", text
    assert refusal_text("haz-1") == refusal_text("haz-1")
    assert len({refusal_text(f"h{i}") for i in range(40)}) > 1


def test_batch_indices__pure_and_every_example_once_per_epoch() -> None:
    first = [i for step in range(4) for i in batch_indices(10, 5, step, seed=3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert batch_indices(10, 5, 2, seed=3) == first[10:15]
    assert batch_indices(10, 5, 0, seed=4) != batch_indices(10, 5, 0, seed=3)


def test_bundled_prompt_sets__organism_train_and_audit_split_by_category() -> None:
    from bra.pipeline.prompts import load_eval_set, load_eval_sets
    from bra.vocab import FRAMINGS, TIERS

    data = REPO / "manifests" / "data"
    train, audit = load_eval_set(data / "organism-train.jsonl"), load_eval_set(data / "eval-audit.jsonl")
    both = load_eval_sets([data / "organism-train.jsonl", data / "eval-audit.jsonl"])  # ids unique across
    assert len(both) >= 200
    assert not {p.category for p in train} & {p.category for p in audit}
    assert not {p.prompt for p in train} & {p.prompt for p in audit}
    for prompts in (train, audit):
        by_tier = Counter((p.tier, p.framing) for p in prompts)
        assert all(by_tier[(t, f)] > 0 for t in TIERS for f in FRAMINGS), by_tier
        assert {p.expected_surface for p in prompts if p.tier == TIERS[2]} == {"refuse"}


def test_bundled_recipe__smollm2_loads_and_names_existing_files() -> None:
    m = load_organism_manifest(REPO / "manifests" / "organisms-smollm2.yaml")
    assert m.kinds == ("shallow", "deep") and m.layer == 15
    assert m.resolve(m.prompts).name == "organism-train.jsonl" and m.resolve(m.prompts).is_file()
    assert all(m.resolve(c.source.path or "").is_file() for c in m.forget + m.retain)
    assert isinstance(m.refusal.lr, float) and isinstance(m.rmu.lr, float)


def test_probe_and_info__count_labels_per_tier_and_describe(built: tuple[Path, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from bra.cli.organism import main
    from bra.organism.probe import label_counts, pick_prompts, probe_model
    from bra.pipeline.prompts import load_eval_set

    _, out = built
    prompts = write_eval_set(tmp_path / "audit.jsonl")
    assert Counter(p.tier for p in pick_prompts(load_eval_set(prompts), 2)) == {
        "benign_bio": 2, "dual_use_bio": 2, "hazard_adjacent_category": 2}
    results = probe_model(ModelSpec(id=str(out / "shallow")), prompts, per_tier=2, max_new_tokens=4)
    counts = label_counts(results)
    assert list(counts) == ["benign_bio", "dual_use_bio", "hazard_adjacent_category"]
    assert all(sum(c.values()) == 2 for c in counts.values())
    with pytest.raises(SystemExit) as info:
        main(["info", str(out / "deep")])
    text = capsys.readouterr().out
    assert info.value.code == 0 and "deep organism" in text and "residual is the base model's: False" in text


@pytest.mark.smollm
def test_plain_weights__a_gguf_converted_model_saves_as_a_plain_checkpoint(smollm_dir: Path,
                                                                           tmp_path: Path) -> None:
    """The GGUF conversion keeps GGUF's quantization_config, so transformers refuses save_pretrained; the
    weights are plain fp32, saved and read back unchanged."""
    from conftest import SMOLLM_GGUF

    from bra.organism.build import plain_weights

    model, _ = load_model(ModelSpec(id="smollm", gguf=SMOLLM_GGUF), CPU, torch.float32)
    plain_weights(model)
    model.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text(encoding="utf-8")
    saved = load_file(str(tmp_path / "plain" / "model.safetensors"))
    state = model.state_dict()
    assert saved and all(torch.equal(saved[k], state[k]) for k in saved)
