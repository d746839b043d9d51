"""bra/cache/lifecycle.py: create a store, resume it or refuse it, without a model (hand-set attrs,
helpers.build_like_attrs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from helpers import build_like_attrs

from bra.cache import lifecycle, schema
from bra.cache.store import open_store
from bra.errors import StoreMismatchError


def test_lifecycle__create_resume_refuse_without_a_model(tmp_path: Path) -> None:
    attrs = schema.StoreAttrs.from_attrs(build_like_attrs())
    loc = tmp_path / "s.zarr"
    assert lifecycle.completed_tokens(loc, "mh") is None
    opened = lifecycle.open_for_build(loc, attrs, False, {})
    assert opened == lifecycle.OpenedStore("built", (0, 1, 2))
    store = open_store(loc, require_complete=False)
    assert store.meta == attrs and store.status == schema.STATUS_BUILDING
    assert lifecycle.check_existing(loc, attrs) == "resume"
    assert lifecycle.open_for_build(loc, attrs, False, {}).status == "resumed"
    with pytest.raises(StoreMismatchError, match="different tokens digest"):
        lifecycle.check_existing(loc, dataclasses.replace(attrs, tokens_digest="ffff0000:40"))
    other = dataclasses.replace(attrs, manifest_hash="other",
                                manifest={**(attrs.manifest or {}), "layers": [1]})
    with pytest.raises(StoreMismatchError, match=r"differs in: layers\)"):
        lifecycle.check_existing(loc, other)
    assert lifecycle.completed_tokens(loc, "mh") is None  # not complete yet
