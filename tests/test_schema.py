"""bra/cache/schema.py: StoreAttrs (the typed group attrs) and the progress-key helpers beside it, without a
model: hand-set attrs (helpers.build_like_attrs) with exact expected results; no attr key read elsewhere."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from helpers import build_like_attrs

from bra.cache import schema
from bra.errors import StoreError

BRA = Path(__file__).resolve().parent.parent / "bra"


def test_store_attrs__round_trip_keeps_keys_values_and_order() -> None:
    raw = build_like_attrs()
    meta = schema.StoreAttrs.from_attrs({**raw, "status": "building", "unknown": 1})
    assert meta.layers == (1, 2) and meta.layout == schema.StoreLayout(40, 8, 8, 16)
    assert meta.manifest_model == {"id": "tiny/model", "revision": None}
    out = meta.to_attrs()
    assert out == raw and list(out) == list(raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.n_tokens = 1  # type: ignore[misc]


def test_store_attrs__old_store_without_optional_keys() -> None:
    optional = ("compute_dtype", "hazard_tiers", "codec", "corpus_counts", "dataset_revisions",
                "tokens_digest", "n_docs", "package_version", "manifest")
    raw = {k: v for k, v in build_like_attrs().items() if k not in optional}
    meta = schema.StoreAttrs.from_attrs(raw)
    assert all(getattr(meta, name) is None for name in optional)
    assert meta.to_attrs() == raw  # nothing is added: model_revision (None) was there and stays
    with pytest.raises(StoreError, match="model section"):
        _ = meta.manifest_model


def test_store_attrs__variant_last_and_only_when_given() -> None:
    """A generation variant's store records it after every other key; a store without one never has it."""
    raw = build_like_attrs()
    assert schema.StoreAttrs.from_attrs(raw).variant is None
    assert schema.ATTR_VARIANT not in schema.StoreAttrs.from_attrs(raw).to_attrs()
    variant = {"name": "prefill", "chat_template": True, "system_prompt": None, "prefill": "Sure",
               "max_new_tokens": 8}
    meta = schema.StoreAttrs.from_attrs({**raw, schema.ATTR_VARIANT: variant})
    assert meta.variant == variant
    out = meta.to_attrs()
    assert list(out) == [*raw, schema.ATTR_VARIANT] and out[schema.ATTR_VARIANT] == variant
    with pytest.raises(StoreError, match="attr 'variant' is unusable"):
        schema.StoreAttrs.from_attrs({**raw, schema.ATTR_VARIANT: "prefill"})


@pytest.mark.parametrize("key", ["model_id", "layers", "n_tokens", "bra_schema_version"])
def test_store_attrs__missing_required_key_named(key: str) -> None:
    raw = build_like_attrs()
    del raw[key]
    with pytest.raises(StoreError) as info:
        schema.StoreAttrs.from_attrs(raw, "store x.zarr")
    assert str(info.value) == f"store x.zarr has no {key!r} attr; check it with `bra-cache verify`"


def test_store_attrs__unusable_value_named() -> None:
    with pytest.raises(StoreError, match=r"^store x.zarr: attr 'layers' is unusable \(") as info:
        schema.StoreAttrs.from_attrs({**build_like_attrs(), "layers": ["one"]}, "store x.zarr")
    assert "\n" not in str(info.value)


def test_progress_keys__status_completion_and_digests() -> None:
    raw = {**build_like_attrs(), **schema.status_update(schema.STATUS_BUILDING)}
    assert schema.status_of(raw) == "building" and schema.stats_of(raw) == {}
    assert schema.digest_problems(raw) == ["no 'attrs_digest' record"]
    stats = {"1": {"count": 2, "mean": [0.0], "var": [1.0], "mean_sq_norm": 1.0}}
    done = {**raw, **schema.completion_update(raw, stats)}
    assert schema.status_of(done) == schema.STATUS_COMPLETE and schema.stats_of(done) == stats
    assert schema.digest_problems(done) == [] and schema.missing_attrs(done) == []
    done["model_id"] = "someone/else"
    assert schema.digest_problems(done) == ["'model_id' was changed after the build"]
    del done["d_model"]
    assert schema.missing_attrs(done) == ["d_model"]


def _attrs_reads(path: Path) -> list[str]:
    """``x.attrs[...]`` and ``x.attrs.get(...)`` (or on a variable named attrs) in one module."""
    def is_attrs(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "attrs") or \
            (isinstance(node, ast.Name) and node.id == "attrs")

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and is_attrs(node.value):
            found.append(f"{path.relative_to(BRA.parent)}:{node.lineno}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and is_attrs(node.func.value):
            found.append(f"{path.relative_to(BRA.parent)}:{node.lineno}")
    return found


def test_static__attr_keys_read_only_in_schema() -> None:
    """Outside bra/cache/schema.py nothing indexes store attrs by key: code reads StoreAttrs fields or the
    schema's progress-key helpers, so a renamed key cannot drift between modules."""
    reads = [hit for path in sorted(BRA.rglob("*.py")) if path != BRA / "cache" / "schema.py"
             for hit in _attrs_reads(path)]
    assert not reads, "\n".join(reads)
