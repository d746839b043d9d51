"""bra/cache/info.py: `bra-cache info` (text and --json) on conftest's ``fp32_store``, on an unfinished copy
and on a damaged one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from helpers import run_cli, truncate

from bra.cache import schema
from bra.cache.store import open_store

pytestmark = pytest.mark.usefixtures("one_thread")


def _truncate_docs(path: Path) -> None:
    truncate(path / schema.DOCS_TABLE)


def test_info__json(fp32_store, capsys) -> None:
    code, out, _ = run_cli(["info", "--json", str(fp32_store[1])], capsys)
    assert code == 0
    info = json.loads(out)
    store = open_store(fp32_store[1])
    docs = store.docs()
    assert info["status"] == "complete" and info["n_tokens"] == store.n_tokens
    assert info["hook_names"] == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert set(info["tiers"]) == {"hazard_adjacent", "benign"}
    for tier, t in info["tiers"].items():
        rows = docs[docs["tier"] == tier]
        assert t["docs"] == len(rows) and t["tokens"] == rows["n_tokens"].sum()
    assert isinstance(info["compression_ratio"], float) and info["compression_ratio"] > 0
    assert info["shards_done"] == info["shards"]
    assert info["bytes_on_disk"] > info["activation_bytes_on_disk"] > 0
    code, out, _ = run_cli(["info", str(fp32_store[1])], capsys)
    assert code == 0 and "hazard_adjacent (hazard class)" in out


def test_info__unfinished_store_counts_written_rows(fp32_store, tmp_path: Path, capsys) -> None:
    """A store interrupted half-way holds half its rows: sizes, B/token and the ratio describe those rows
    (not all planned rows against half the bytes, which doubled the ratio)."""
    full = json.loads(run_cli(["info", "--json", str(fp32_store[1])], capsys)[1])
    path = tmp_path / "half.zarr"
    shutil.copytree(fp32_store[1], path)
    group = zarr.open_group(str(path), mode="r+")
    layout = open_store(path).layout
    undone = list(range(layout.n_shards // 2, layout.n_shards))
    for shard in undone:
        group[schema.DONE_ARRAY][shard] = 0
        for layer in (1, 2):
            (path / schema.acts_path(layer) / "c" / str(shard) / "0").unlink()
    group.attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING
    code, out, _ = run_cli(["info", "--json", str(path)], capsys)
    info = json.loads(out)
    written = sum(hi - lo for lo, hi in (layout.shard_bounds(s) for s in range(layout.n_shards // 2)))
    assert code == 0 and info["status"] == "building" and info["tokens_written"] == written < info["n_tokens"]
    assert info["activation_bytes_raw"] == written * 64 * 4 * 2
    assert abs(info["compression_ratio"] - full["compression_ratio"]) < 0.25 * full["compression_ratio"]
    assert "tokens written so far" in run_cli(["info", str(path)], capsys)[1]


def test_info__damaged_store_is_one_error_line(fp32_store, tmp_path: Path, capsys) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(fp32_store[1], path)
    _truncate_docs(path)
    code, _, err = run_cli(["info", str(path)], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "docs.parquet is unreadable" in errors[0]
