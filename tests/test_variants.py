"""Generation variants: one eval store per variant (system prompt, no chat template, prefill, shorter
completions), each an ordinary eval store that `score` reads; a manifest without variants builds what it
always built; a killed multi-variant build resumes, skipping the variants already complete."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from helpers import label_by_tier, write_eval_set
from test_evalbuild import LAYERS, MAX_NEW, eval_manifest, write_prompts
from test_resume import KilledBuild, after_shards, assert_same_store, run_and_kill, snapshot

from bra.cache import schema
from bra.cache.store import open_store
from bra.cache.verify import verify_store
from bra.cache.writer import StoreWriter
from bra.cli.sae import main as sae_main
from bra.errors import ManifestError
from bra.pipeline.build import build_store, build_stores, store_targets, variant_store_path
from bra.pipeline.generate import chat_prompt_ids, check_prompt_format, format_prompt_ids, prefill_ids
from bra.pipeline.manifest import VariantSpec, load_manifest
from bra.pipeline.relabel import relabel_store
from bra.pipeline.surface import classify

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "Answer briefly."
PREFILL = "I can't help with that."  # the surface rules read "I can't help" as a refusal (unless forced)
VARIANTS = [
    {"name": "canonical"},
    {"name": "raw", "chat_template": False},
    {"name": "system", "system_prompt": SYSTEM},
    {"name": "refusing", "prefill": PREFILL},
    {"name": "short", "max_new_tokens": 2},
]
NAMES = [v["name"] for v in VARIANTS]


def variant_manifest(tmp: Path, model_dir: Path, prompts: Path, variants: list[dict] = VARIANTS,
                     max_new_tokens: int = MAX_NEW, **overrides) -> Path:
    """test_evalbuild's eval manifest with ``variants`` (room for the system turn's tokens)."""
    generation = {"max_new_tokens": max_new_tokens, "seed": 0, "batch_size": 2, "variants": variants}
    return eval_manifest(tmp, model_dir, prompts, max_seq_len=192, generation=generation, **overrides)


@pytest.fixture(scope="module")
def built(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(manifest path, name -> variant store, the store of the same manifest without variants)."""
    tmp = tmp_path_factory.mktemp("variants")
    prompts = write_prompts(tmp / "set.jsonl")
    path = variant_manifest(tmp, tiny_gemma_dir, prompts)
    results = build_stores(load_manifest(path), tmp / "v.zarr")
    plain = eval_manifest(tmp, tiny_gemma_dir, prompts, name="plain", max_seq_len=192)
    plain_store = build_store(load_manifest(plain), tmp / "plain.zarr").path
    assert [r.status for r in results] == ["built"] * len(VARIANTS)
    return path, {n: r.path for n, r in zip(NAMES, results, strict=True)}, plain_store


@pytest.fixture(scope="module")
def tokenizer(tiny_gemma_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_gemma_dir))


def rows_of(store_path: Path) -> list[tuple[pd.Series, np.ndarray, np.ndarray]]:
    """(prompts.parquet row, token ids, segments) per document."""
    store = open_store(store_path)
    table = pd.read_parquet(store_path / schema.PROMPTS_TABLE)
    token_id, segment = store.array("token_id")[:], store.array("segment")[:]
    out = []
    for (_, row), doc in zip(table.iterrows(), store.docs().itertuples(), strict=True):
        rows = slice(doc.token_offset, doc.token_offset + doc.n_tokens)
        out.append((row, token_id[rows], segment[rows]))
    return out


def test_variant_store_path__prefix_of_path_or_url() -> None:
    assert variant_store_path(Path("cache/x.zarr"), "pre") == Path("cache/x.pre.zarr")
    assert variant_store_path(Path("cache/x"), "pre") == Path("cache/x.pre.zarr")
    assert variant_store_path("s3://b/x.zarr/", "pre") == "s3://b/x.pre.zarr"
    assert variant_store_path("memory://x", "pre") == "memory://x.pre.zarr"


def test_store_targets__default_paths(built) -> None:
    path, _, _ = built
    manifest = load_manifest(path)
    assert [str(p) for _, p in store_targets(manifest)] == [f"cache/tiny-eval.{n}.zarr" for n in NAMES]
    plain = dataclasses.replace(manifest, generation=dataclasses.replace(manifest.generation, variants=()))
    assert store_targets(plain) == [(plain, Path("cache/tiny-eval.zarr"))]  # as without variants, always


def test_build_stores__one_verified_store_per_variant(built) -> None:
    path, stores, _ = built
    assert [p.name for p in stores.values()] == [f"v.{n}.zarr" for n in NAMES]
    assert not (path.parent / "v.zarr").exists()
    for spec in VARIANTS:
        store_path = stores[spec["name"]]
        assert verify_store(store_path) == []
        store = open_store(store_path)
        expected = {**dataclasses.asdict(VariantSpec(name="x")), "max_new_tokens": MAX_NEW, **spec}
        assert store.meta.variant == expected == store.attrs[schema.ATTR_VARIANT]
        assert store.meta.kind == "eval" and store.meta.manifest["variant"] == expected
        record = store.attrs[schema.ATTR_CORPUS_COUNTS]["generation"]
        assert record["variant"] == spec["name"] and record["max_new_tokens"] == expected["max_new_tokens"]
        assert record["chat_template"] == expected["chat_template"]
        for table in (schema.PROMPTS_TABLE, schema.GENERATION_TABLE):
            columns = pd.read_parquet(store_path / table).columns.tolist()
            own = schema.PROMPT_COLUMNS if table == schema.PROMPTS_TABLE else schema.GENERATION_COLUMNS
            assert columns == list(own) + list(schema.VARIANT_COLUMNS)
    assert len({open_store(p).meta.manifest_hash for p in stores.values()}) == len(VARIANTS)


def test_variants__canonical_is_the_store_without_variants(built) -> None:
    """The canonical variant puts the prompts as a manifest without variants does: same rows, same
    completions; only the variant's columns and attrs are added."""
    _, stores, plain = built
    for table in (schema.PROMPTS_TABLE, schema.GENERATION_TABLE):
        got = pd.read_parquet(stores["canonical"] / table).drop(columns=list(schema.VARIANT_COLUMNS))
        pd.testing.assert_frame_equal(got, pd.read_parquet(plain / table))
    a, b = open_store(stores["canonical"]), open_store(plain)
    assert np.array_equal(a.array("token_id")[:], b.array("token_id")[:])
    assert np.array_equal(a.acts(LAYERS[0])[:], b.acts(LAYERS[0])[:])
    assert schema.ATTR_VARIANT not in b.attrs and "variant" not in b.meta.manifest


def test_variants__no_template_ids_are_the_raw_tokenised_prompt(built, tokenizer) -> None:
    _, stores, _ = built
    generation = pd.read_parquet(stores["raw"] / schema.GENERATION_TABLE)
    for (row, ids, segment), saved in zip(rows_of(stores["raw"]), generation["prompt_ids"], strict=True):
        p = row.n_prompt_tokens
        raw = tokenizer(row.prompt)["input_ids"]
        assert ids[:p].tolist() == raw == saved.tolist() != chat_prompt_ids(tokenizer, row.prompt)
        assert (segment[:p] == schema.SEGMENT_PROMPT).all()
        assert (segment[p:] == schema.SEGMENT_COMPLETION).all()


def test_variants__system_prompt_is_in_the_prompt_ids(built, tokenizer) -> None:
    _, stores, _ = built
    fmt = load_manifest(built[0]).variant_manifests()[NAMES.index("system")].prompt_format
    for row, ids, _ in rows_of(stores["system"]):
        prompt_ids = ids[:row.n_prompt_tokens].tolist()
        assert prompt_ids == format_prompt_ids(tokenizer, row.prompt, fmt)
        assert prompt_ids != chat_prompt_ids(tokenizer, row.prompt)
        text = tokenizer.decode(prompt_ids)
        assert SYSTEM in text and text.index(SYSTEM) < text.index(row.prompt)


def test_variants__prefill_opens_the_completion_and_is_recorded(built, tokenizer) -> None:
    _, stores, _ = built
    store = stores["refusing"]
    opening = prefill_ids(tokenizer, VariantSpec(name="x", prefill=PREFILL))
    generation = pd.read_parquet(store / schema.GENERATION_TABLE)
    assert (generation["prefill"] == PREFILL).all() and (generation["n_prefill_tokens"] == len(opening)).all()
    for (row, ids, segment), gen in zip(rows_of(store), generation.itertuples(), strict=True):
        p = row.n_prompt_tokens
        assert row.prefill == PREFILL and row.n_prefill_tokens == len(opening)
        assert ids[:p].tolist() == chat_prompt_ids(tokenizer, row.prompt)  # the prefill is not the prompt's
        assert ids[p:p + len(opening)].tolist() == opening == gen.completion_ids[:len(opening)].tolist()
        assert (segment[p:] == schema.SEGMENT_COMPLETION).all()  # the prefill is the assistant's turn
        assert len(opening) < row.n_completion_tokens <= len(opening) + MAX_NEW
        assert row.completion.startswith(PREFILL) and gen.text == row.completion
        # the surface label judges what the model did: the forced refusal is the audit's words, not evidence
        assert classify(row.completion, row.prompt).label == "refuse"
        ruled = classify(row.completion, row.prompt, PREFILL)
        assert (row.surface_label, list(row.surface_matched)) == (ruled.label, list(ruled.matched))
    labels = pd.read_parquet(store / schema.PROMPTS_TABLE)["surface_label"].tolist()
    copied = shutil.copytree(store, store.parent / "relabel" / store.name)
    assert relabel_store(copied)["surface_label"].tolist() == labels


def test_variants__max_new_tokens_per_variant(built) -> None:
    _, stores, _ = built
    table = pd.read_parquet(stores["short"] / schema.PROMPTS_TABLE)
    assert (table["n_completion_tokens"] <= 2).all() and (table["n_prefill_tokens"] == 0).all()
    assert (table["prefill"] == "").all()
    assert open_store(stores["short"]).meta.variant["max_new_tokens"] == 2


def test_build_stores__complete_variants_load_no_model(built, monkeypatch) -> None:
    path, stores, _ = built

    def no_model(*_args, **_kwargs):
        raise AssertionError("complete variant stores must not load the model")

    monkeypatch.setattr("bra.pipeline.build.load_model", no_model)
    results = build_stores(load_manifest(path), path.parent / "v.zarr")
    assert [(r.status, r.path) for r in results] == [("already-complete", p) for p in stores.values()]


def test_build_store__refuses_a_manifest_with_variants(built) -> None:
    with pytest.raises(ManifestError, match="call build_stores"):
        build_store(load_manifest(built[0]), built[0].parent / "x.zarr")


def test_build_stores__interrupted_build_resumes_variant_by_variant(built, tiny_gemma_dir: Path,
                                                                    tmp_path: Path, monkeypatch) -> None:
    """Killed at the first shard of the second variant: the first is left alone, the second resumes from
    its saved completions, the third is built; each equals the uninterrupted build's store. The manifest
    names three of the five variants: a variant's store does not depend on its siblings."""
    path, stores, _ = built
    subset = [v for v in VARIANTS if v["name"] in ("canonical", "raw", "refusing")]
    manifest = load_manifest(variant_manifest(tmp_path, tiny_gemma_dir, path.parent / "set.jsonl", subset))
    real_write = StoreWriter.write_shard

    def die_in_raw(self, shard, *args, **kwargs):
        real_write(self, shard, *args, **kwargs)
        if self.meta.variant and self.meta.variant["name"] == "raw":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(StoreWriter, "write_shard", die_in_raw)
    with pytest.raises(KeyboardInterrupt):
        build_stores(manifest, tmp_path / "k.zarr")
    monkeypatch.undo()
    assert verify_store(tmp_path / "k.canonical.zarr") == [] and not (tmp_path / "k.refusing.zarr").exists()
    generated: list[str] = []
    from bra.pipeline import evalbuild

    real_generate = evalbuild.generate_completions

    def recording(*args, **kwargs):
        generated.append(args[-1].name)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(evalbuild, "generate_completions", recording)
    results = build_stores(manifest, tmp_path / "k.zarr")
    assert [r.status for r in results] == ["already-complete", "resumed", "built"]
    assert generated == ["refusing"]  # the raw variant reused the completions its store saved
    for name in ("canonical", "raw", "refusing"):
        assert_same_store(tmp_path / f"k.{name}.zarr", snapshot(stores[name]))


def test_build_cli__killed_multi_variant_build_resumes(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """A real `bra-cache build` SIGKILLed inside its second variant's store; the rerun skips the first
    variant, resumes the second and builds the third, and every store equals an uninterrupted build's."""
    variants = [{"name": "canonical"}, {"name": "system", "system_prompt": SYSTEM},
                {"name": "refusing", "prefill": PREFILL}]
    # one window per forward pass and 16-token shards: the second store (the longest prompts) takes ~40
    # shard writes, so the kill lands inside it
    storage = {"dtype": "float32", "chunk_tokens": 16, "shard_tokens": 16}
    manifest = variant_manifest(tmp_path, tiny_gemma_dir, write_prompts(tmp_path / "set.jsonl"), variants,
                                batch_size=1, storage=storage)
    (tmp_path / "killed").mkdir()
    prefix = tmp_path / "killed" / "s.zarr"
    build = KilledBuild(prefix.with_name("s.system.zarr"), after_shards(1),
                        argv=["build", str(manifest), "--store", str(prefix)])
    run_and_kill(manifest, [build])
    assert build.killed, "the build finished before its trigger fired"
    assert verify_store(prefix.with_name("s.canonical.zarr")) == []
    assert zarr.open_group(str(build.store), mode="r").attrs[schema.ATTR_STATUS] == schema.STATUS_BUILDING
    results = build_stores(load_manifest(manifest), prefix)
    assert [r.status for r in results] == ["already-complete", "resumed", "built"]
    assert verify_store(results[2].path) == []
    reference = build_store(load_manifest(manifest).variant_manifests()[1], tmp_path / "ref.zarr")
    assert_same_store(build.store, snapshot(reference.path))
    assert sorted(p.name for p in prefix.parent.iterdir()) == [f"s.{v['name']}.zarr" for v in
                                                                sorted(variants, key=lambda v: v["name"])]


def test_score__reads_a_variant_store_and_reports_the_variant(tiny_gemma_dir: Path, tmp_path: Path) -> None:
    """`bra-sae score` reads variant stores unchanged; report.json says which variant, and `compare` labels
    the runs by it."""
    variants = [{"name": "canonical"}, {"name": "refusing", "prefill": PREFILL}]
    manifest = variant_manifest(tmp_path, tiny_gemma_dir, write_eval_set(tmp_path / "set.jsonl"), variants,
                                max_new_tokens=4, batch_size=8)
    reports = []
    for result in build_stores(load_manifest(manifest), tmp_path / "eval.zarr"):
        label_by_tier(result.path)  # the random model's own labels are mostly unknown: nothing to fit
        out = tmp_path / f"report-{result.path.name}"
        with pytest.raises(SystemExit) as info:
            sae_main(["score", "--store", str(result.path), "--sae", "none", "--out", str(out),
                      "--n-boot", "10", "--n-perm", "10"])
        assert info.value.code == 0
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["variant"] == open_store(result.path).meta.variant
        reports.append(out)
    with pytest.raises(SystemExit) as info:
        sae_main(["compare", *map(str, reports), "--out", str(tmp_path / "cmp")])
    assert info.value.code == 0
    doc = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [(r["label"].split("@")[1], r["variant"]) for r in doc["runs"]] == [("canonical", "canonical"),
                                                                               ("refusing", "refusing")]


def test_check_prompt_format__templates_that_cannot(tokenizer) -> None:
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    check_prompt_format(plain, VariantSpec(name="raw", chat_template=False), "generation.variants[0]")
    with pytest.raises(ManifestError, match=r"^generation.variants\[1\].chat_template: tokenizer .* has no "
                                            r"chat template; set chat_template: false"):
        check_prompt_format(plain, VariantSpec(name="chat"), "generation.variants[1]")
    refusing = copy.copy(tokenizer)
    refusing.chat_template = ("{% if messages[0]['role'] == 'system' %}"
                              "{{ raise_exception('System role not supported') }}{% endif %}"
                              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    system = VariantSpec(name="s", system_prompt=SYSTEM)
    with pytest.raises(ManifestError, match=r"^generation.variants\[2\].system_prompt: the chat template of "
                                            r".* refuses a system turn \(System role not supported\)$"):
        check_prompt_format(refusing, system, "generation.variants[2]")
    dropping = copy.copy(tokenizer)
    dropping.chat_template = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ManifestError, match="drops the system turn"):
        check_prompt_format(dropping, system, "generation.variants[2]")
    check_prompt_format(tokenizer, system, "generation.variants[2]")  # the tiny template takes system turns
