"""bra/cache/store.py: checked reads name a corrupt chunk or a missing shard file (on a copy of conftest's
``fp32_store``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import flip_chunk

from bra.cache.store import open_store
from bra.errors import StoreError

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip_bytes(path: Path) -> None:
    flip_chunk(path, layer=2, shard=1)


def _delete_acts_shard(path: Path) -> None:
    (path / "acts" / "layer_1" / "c" / "2" / "0").unlink()


def test_read_rows__corrupt_chunk_and_missing_shard_named(fp32_store, tmp_path: Path) -> None:
    """What fit, eval and score read goes through Store.read_rows: a chunk failing its CRC32C, or a missing
    activation shard file (zarr would read zeros), is a one-line StoreError naming array, rows and shard;
    intact chunks still read."""
    path = Path(shutil.copytree(fp32_store[1], tmp_path / "s.zarr"))
    _flip_bytes(path)
    _delete_acts_shard(path)
    store = open_store(path)
    with pytest.raises(StoreError) as info:
        store.read_acts(2, 0, store.n_tokens)
    lo, hi = store.first_bad_chunk("acts/layer_2", 64, 128) or (0, 0)
    assert store.first_bad_chunk("acts/layer_2", 0, 64) is None
    assert 64 <= lo < hi <= 128 and hi - lo == 16
    assert str(info.value) == (f"corrupt chunk in acts/layer_2 rows {lo}..{hi - 1} (shard 1) of {path}; "
                               f"run `bra-cache verify {path}`")
    with pytest.raises(StoreError, match=r"^missing shard file acts/layer_1/c/2/0 \(rows 128\.\.191\) of "):
        store.read_acts(1, 100, 140)
    assert store.read_acts(2, 0, 64).shape == (64, 64) and store.read_acts(1, 0, 128).shape == (128, 64)
    assert store.read_rows("token_id", 0, store.n_tokens).shape == (store.n_tokens,)
