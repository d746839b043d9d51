"""Eval stores: greedy completions, one prompt+completion window per prompt, prompts.parquet, relabelling."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers import LAYERS, MAX_NEW, PROMPTS, eval_manifest, write_prompts

from bra.cache import schema
from bra.cache.store import open_store
from bra.cache.verify import verify_store
from bra.cache.writer import StoreWriter
from bra.cli.cache import main as cache_main
from bra.errors import ManifestError, ModelLoadError, StoreError
from bra.pipeline.build import build_store
from bra.pipeline.generate import chat_prompt_ids, generate_completions
from bra.pipeline.manifest import GenerationSpec, load_manifest
from bra.pipeline.relabel import relabel_store
from bra.pipeline.surface import SURFACE_CLASSES, UNKNOWN


@pytest.fixture(scope="module")
def built(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same eval manifest built into two stores (for the determinism check)."""
    tmp = tmp_path_factory.mktemp("evalbuild")
    manifest = load_manifest(eval_manifest(tmp, tiny_gemma_dir, write_prompts(tmp / "set.jsonl")))
    first = build_store(manifest, tmp / "a.zarr")
    second = build_store(manifest, tmp / "b.zarr")
    return manifest, first.path, second.path


@pytest.fixture(scope="module")
def tiny_model(tiny_gemma_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_gemma_dir))


def test_evalbuild__store_is_complete_with_prompts_table(built) -> None:
    _, path, _ = built
    assert verify_store(path) == []
    store = open_store(path)
    assert store.attrs[schema.ATTR_KIND] == "eval"
    assert store.tier_names == ["benign_bio", "dual_use_bio", "hazard_adjacent_category"]
    table = pd.read_parquet(path / schema.PROMPTS_TABLE)
    assert list(table.columns) == list(schema.PROMPT_COLUMNS)
    assert table["id"].tolist() == [p[0] for p in PROMPTS]
    assert (table["n_completion_tokens"] >= 1).all() and (table["n_completion_tokens"] <= MAX_NEW).all()
    assert table["completion"].map(lambda c: isinstance(c, str)).all()
    # not finished means the cap was hit
    assert (table.loc[~table["finished"], "n_completion_tokens"] == MAX_NEW).all()
    assert set(table["surface_label"]) <= set(SURFACE_CLASSES) | {UNKNOWN}
    assert all(len(p) == len(SURFACE_CLASSES) for p in table["surface_probs"])
    gen = store.attrs[schema.ATTR_CORPUS_COUNTS]["generation"]
    assert gen["max_new_tokens"] == MAX_NEW and gen["decoding"] == "greedy" and gen["prompts"] == len(PROMPTS)
    docs = store.docs()
    assert docs["doc_id"].tolist() == table["id"].tolist()
    assert docs["tier_code"].tolist() == [0, 0, 1, 2, 2]
    assert (docs["n_windows"] == 1).all()


def test_evalbuild__segments_mark_prompt_then_completion(built, tiny_model) -> None:
    _, path, _ = built
    _, tokenizer = tiny_model
    store = open_store(path)
    table = pd.read_parquet(path / schema.PROMPTS_TABLE)
    docs = store.docs()
    segment, token_id = store.array("segment")[:], store.array("token_id")[:]
    for row, doc in zip(table.itertuples(), docs.itertuples(), strict=True):
        p, c = row.n_prompt_tokens, row.n_completion_tokens
        assert doc.n_tokens == p + c
        rows = slice(doc.token_offset, doc.token_offset + doc.n_tokens)
        expected = [schema.SEGMENT_PROMPT] * p + [schema.SEGMENT_COMPLETION] * c
        assert segment[rows].tolist() == expected
        assert token_id[rows][:p].tolist() == chat_prompt_ids(tokenizer, row.prompt)
        # the stored completion ids decode to the stored completion text
        assert tokenizer.decode(token_id[rows][p:].tolist(), skip_special_tokens=True) == row.completion


def test_evalbuild__activations_equal_fresh_forward(built, tiny_model) -> None:
    _, path, _ = built
    model, _ = tiny_model
    store = open_store(path)
    token_id, segment = store.array("token_id")[:], store.array("segment")[:]
    for doc in store.docs().itertuples():
        start, stop = doc.token_offset, doc.token_offset + doc.n_tokens
        ids = torch.from_numpy(token_id[start:stop].astype(np.int64))[None]
        with torch.inference_mode():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        completion = segment[start:stop] == schema.SEGMENT_COMPLETION
        assert completion.any()
        for layer in LAYERS:
            stored = store.read_acts(layer, start, stop)
            np.testing.assert_allclose(stored, hidden[layer + 1][0].numpy(), atol=1e-4, rtol=0)


def test_evalbuild__generation_is_deterministic(built) -> None:
    _, a, b = built
    ta, tb = pd.read_parquet(a / schema.PROMPTS_TABLE), pd.read_parquet(b / schema.PROMPTS_TABLE)
    pd.testing.assert_frame_equal(ta, tb)
    sa, sb = open_store(a), open_store(b)
    assert np.array_equal(sa.array("token_id")[:], sb.array("token_id")[:])
    for layer in LAYERS:
        assert np.array_equal(sa.acts(layer)[:], sb.acts(layer)[:])


def test_generate_completions__same_output_twice_and_no_padding(tiny_model) -> None:
    model, tokenizer = tiny_model
    spec = GenerationSpec(max_new_tokens=6, seed=0, batch_size=3)
    prompts = [p[4] for p in PROMPTS]
    first = generate_completions(model, tokenizer, prompts, spec, torch.device("cpu"))
    assert first == generate_completions(model, tokenizer, prompts, spec, torch.device("cpu"))
    for text, res in zip(prompts, first, strict=True):
        assert res.prompt_ids == chat_prompt_ids(tokenizer, text)  # left padding stripped
        assert 1 <= len(res.completion_ids) <= 6
        assert res.finished == (res.completion_ids[-1] == tokenizer.eos_token_id)


def test_relabel__needs_no_model_and_restores_labels(built, tmp_path: Path, monkeypatch) -> None:
    _, path, _ = built
    store = tmp_path / "copy.zarr"
    shutil.copytree(path, store)
    original = pd.read_parquet(store / schema.PROMPTS_TABLE)

    def no_model(*_args, **_kwargs):
        raise AssertionError("relabelling must not load a model")

    monkeypatch.setattr("bra.pipeline.model.load_model", no_model)
    monkeypatch.setattr("bra.pipeline.build.load_model", no_model)
    stale = original.copy()
    stale["surface_label"] = "evade"
    stale["surface_probs"] = [[0.0, 0.0, 0.0, 0.0, 1.0]] * len(stale)
    stale.to_parquet(store / schema.PROMPTS_TABLE, index=False)
    relabelled = relabel_store(store)
    pd.testing.assert_frame_equal(relabelled, original)
    pd.testing.assert_frame_equal(pd.read_parquet(store / schema.PROMPTS_TABLE), original)
    with pytest.raises(SystemExit) as exit_info:
        cache_main(["relabel", str(store)])
    assert exit_info.value.code == 0
    assert verify_store(store) == []


def test_relabel__refuses_a_store_without_prompts(built, tmp_path: Path) -> None:
    _, path, _ = built
    store = tmp_path / "copy.zarr"
    shutil.copytree(path, store)
    (store / schema.PROMPTS_TABLE).unlink()
    with pytest.raises(StoreError, match="only eval stores"):
        relabel_store(store)


def test_evalbuild__complete_store_is_not_regenerated(built, monkeypatch) -> None:
    manifest, path, _ = built

    def no_model(*_args, **_kwargs):
        raise AssertionError("a complete store must not load the model")

    monkeypatch.setattr("bra.pipeline.build.load_model", no_model)
    assert build_store(manifest, path).status == "already-complete"


def test_evalbuild__interrupted_build_resumes_identically(built, tmp_path: Path) -> None:
    manifest, path, _ = built
    store = tmp_path / "resume.zarr"
    shutil.copytree(path, store)
    group = zarr.open_group(str(store), mode="r+")
    group[schema.DONE_ARRAY][0] = 0  # as if killed while writing the first shard
    group[schema.acts_path(LAYERS[0])][:4] = 0
    group.attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING
    result = build_store(manifest, store)
    assert result.status == "resumed"
    assert verify_store(store) == []
    assert np.array_equal(open_store(store).acts(LAYERS[0])[:], open_store(path).acts(LAYERS[0])[:])


def test_evalbuild__resume_reuses_the_saved_completions(built, tmp_path: Path, monkeypatch) -> None:
    """generation.parquet is written when the store is created, before any shard: a build killed after
    its first shard resumes without generating again (on a GPU a second generation could differ)."""
    manifest, path, _ = built
    store = tmp_path / "killed.zarr"
    real_write = StoreWriter.write_shard

    def die_after_first_shard(self, shard, *args, **kwargs):
        real_write(self, shard, *args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(StoreWriter, "write_shard", die_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        build_store(manifest, store)
    monkeypatch.undo()
    assert (store / schema.GENERATION_TABLE).exists() and not (store / schema.PROMPTS_TABLE).exists()

    def no_generation(*_args, **_kwargs):
        raise AssertionError("a resumed eval build must reuse the saved completions")

    monkeypatch.setattr("bra.pipeline.evalbuild.generate_completions", no_generation)
    assert build_store(manifest, store).status == "resumed"
    assert verify_store(store) == []
    for table in (schema.PROMPTS_TABLE, schema.GENERATION_TABLE):
        pd.testing.assert_frame_equal(pd.read_parquet(store / table), pd.read_parquet(path / table))
    assert np.array_equal(open_store(store).acts(LAYERS[0])[:], open_store(path).acts(LAYERS[0])[:])


def test_evalbuild__saved_completions_of_other_prompts_are_not_reused(built, tiny_model) -> None:
    """A generation table that does not match the prompts (count or templated ids) is ignored."""
    from bra.pipeline.evalbuild import _load_sets, _saved_results, generation_table, results_from_table

    manifest, path, _ = built
    table = pd.read_parquet(path / schema.GENERATION_TABLE)
    prompts = [p for _, _, ps in _load_sets(manifest) for p in ps]
    _, tokenizer = tiny_model
    assert generation_table(results_from_table(table)).equals(table)  # round trip
    assert _saved_results(table, prompts, tokenizer) is not None
    assert _saved_results(table.iloc[:-1], prompts, tokenizer) is None
    swapped = table.copy()
    swapped.loc[0, "prompt_ids"], swapped.loc[1, "prompt_ids"] = (table.loc[1, "prompt_ids"],
                                                                  table.loc[0, "prompt_ids"])
    assert _saved_results(swapped, prompts, tokenizer) is None


def test_evalbuild__window_longer_than_max_seq_len_fails_before_generating(
        tiny_gemma_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def no_generation(*_args, **_kwargs):
        raise AssertionError("must fail before generating")

    monkeypatch.setattr("bra.pipeline.evalbuild.generate_completions", no_generation)
    manifest = load_manifest(eval_manifest(tmp_path, tiny_gemma_dir, write_prompts(tmp_path / "set.jsonl"),
                                           max_seq_len=16))
    expected = r"max_seq_len: 16 is too short .* raise max_seq_len to at least \d+"
    with pytest.raises(ManifestError, match=expected):
        build_store(manifest, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


UPSTREAM_SHAPES = Path(__file__).resolve().parent / "data" / "upstream-shapes.jsonl"
GATED_KEYS = ["descriptor_original", "generation_model", "generation_source_label", "dataset_version",
              "provenance_note", "needs_review", "generation_pass"]


def test_evalbuild__upstream_shapes_code_control_tiers_and_keep_metadata(tiny_gemma_dir: Path,
                                                                         tmp_path: Path) -> None:
    """Every upstream tier gets a code after TIERS, the class tiers named in the manifest are recorded, and
    the records' unknown fields follow the schema's columns in prompts.parquet."""
    from bra.vocab import EVAL_TIERS

    manifest = load_manifest(eval_manifest(tmp_path, tiny_gemma_dir, UPSTREAM_SHAPES,
                                           hazard_tiers=["hazard_adjacent_legal"],
                                           benign_tiers=["benign_legal", "psilocybin_control"],
                                           generation={"max_new_tokens": 4, "seed": 0, "batch_size": 4}))
    path = build_store(manifest, tmp_path / "s.zarr").path
    assert verify_store(path) == []
    store = open_store(path)
    assert store.tier_names == list(EVAL_TIERS)
    assert store.attrs[schema.ATTR_HAZARD_TIERS] == ["hazard_adjacent_legal"]
    assert store.attrs[schema.ATTR_BENIGN_TIERS] == ["benign_legal", "psilocybin_control"]
    docs = store.docs()
    assert [store.tier_names[c] for c in docs["tier_code"]] == docs["tier"].tolist()
    table = pd.read_parquet(path / schema.PROMPTS_TABLE)
    assert list(table.columns) == list(schema.PROMPT_COLUMNS) + GATED_KEYS
    gated = table.set_index("id").loc["shape-gated-hazard"]
    assert gated["dataset_version"] == "v0-fixture" and not gated["needs_review"]
    assert gated["generation_pass"] == 2
    assert table.loc[table["id"] != "shape-gated-hazard", "dataset_version"].isna().all()


def test_evalbuild__default_classes_are_recorded(built) -> None:
    _, path, _ = built
    attrs = open_store(path).attrs
    assert attrs[schema.ATTR_HAZARD_TIERS] == ["hazard_adjacent_category"]
    assert attrs[schema.ATTR_BENIGN_TIERS] == ["benign_bio"]


def test_evalbuild__class_tier_no_prompt_has_is_an_error(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    manifest = load_manifest(eval_manifest(tmp_path, tiny_gemma_dir, write_prompts(tmp_path / "set.jsonl"),
                                           benign_tiers=["benign_legal"]))
    expected = (r"^benign_tiers: no prompt has tier 'benign_legal' "
                r"\(the prompt sets have benign_bio, dual_use_bio, hazard_adjacent_category\)$")
    with pytest.raises(ManifestError, match=expected):
        build_store(manifest, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_chat_prompt_ids__refuses_a_tokenizer_without_chat_template(tiny_model) -> None:
    _, tokenizer = tiny_model
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ModelLoadError, match="no chat template"):
        chat_prompt_ids(plain, "hello")


def test_manifest__generation_batch_size_must_be_positive(tmp_path: Path) -> None:
    path = eval_manifest(tmp_path, tmp_path, write_prompts(tmp_path / "set.jsonl"),
                         generation={"max_new_tokens": 4, "batch_size": 0})
    with pytest.raises(ManifestError, match="generation.batch_size: must be at least 1"):
        load_manifest(path)


@pytest.mark.smollm
def test_evalbuild__smollm_smoke(smollm_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 answers three bundled prompts (one per tier); the refusal-tier completion is non-empty."""
    bundled = Path(__file__).resolve().parents[1] / "manifests" / "data" / "eval-demo.jsonl"
    rows = [json.loads(line) for line in bundled.read_text(encoding="utf-8").splitlines() if line.strip()]
    picked = [next(r for r in rows if r["tier"] == tier)
              for tier in ("benign_bio", "dual_use_bio", "hazard_adjacent_category")]
    prompts_path = tmp_path / "three.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in picked), encoding="utf-8")
    path = eval_manifest(tmp_path, smollm_dir, prompts_path, name="smol-eval", layers=[15], max_seq_len=128,
                         batch_size=3, storage={"dtype": "bfloat16", "chunk_tokens": 64, "shard_tokens": 256},
                         generation={"max_new_tokens": 16, "seed": 0, "batch_size": 3},
                         model={"id": str(smollm_dir)})
    result = build_store(load_manifest(path), tmp_path / "smol.zarr")
    assert verify_store(result.path) == []
    table = pd.read_parquet(result.path / schema.PROMPTS_TABLE)
    hazard = table[table["tier"] == "hazard_adjacent_category"].iloc[0]
    assert hazard["completion"].strip() and hazard["n_completion_tokens"] > 0
    assert set(table["surface_label"]) <= set(SURFACE_CLASSES) | {UNKNOWN}
