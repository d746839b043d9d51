"""bra/cache/verify.py: `bra-cache verify` passes a good store and names every kind of damage, one line each
(on copies of conftest's ``fp32_store``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from helpers import flip_chunk, run_cli, truncate

from bra.cache import schema

pytestmark = pytest.mark.usefixtures("one_thread")


def test_verify__good_store_ok(fp32_store, capsys) -> None:
    code, out, _ = run_cli(["verify", str(fp32_store[1])], capsys)
    assert code == 0 and out.strip().endswith(": OK")


def _flip_bytes(path: Path) -> None:
    flip_chunk(path, layer=2, shard=1)


def _delete_shard(path: Path) -> None:
    (path / "token_id" / "c" / "2").unlink()


def _truncate_docs(path: Path) -> None:
    truncate(path / schema.DOCS_TABLE)


def _remove_docs(path: Path) -> None:
    (path / schema.DOCS_TABLE).unlink()


def _edit_attr(path: Path) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][schema.ATTR_MODEL_ID] = "someone/else"
    (path / "zarr.json").write_text(json.dumps(meta))


def _edit_stats(path: Path) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][schema.ATTR_STATS]["1"]["mean"][0] += 1.0
    (path / "zarr.json").write_text(json.dumps(meta))


def _edit_geometry(path: Path) -> None:
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][schema.ATTR_SHARD_TOKENS] = 0
    (path / "zarr.json").write_text(json.dumps(meta))


def _remove_done_flags(path: Path) -> None:
    shutil.rmtree(path / schema.DONE_ARRAY)


def _garble_array_metadata(path: Path) -> None:
    (path / "mask" / "zarr.json").write_text("{not json")


def _incomplete(path: Path) -> None:
    g = zarr.open_group(str(path), mode="r+")
    g[schema.DONE_ARRAY][1] = 0
    g.attrs[schema.ATTR_STATUS] = schema.STATUS_BUILDING


def _delete_acts_shard(path: Path) -> None:
    (path / "acts" / "layer_1" / "c" / "2" / "0").unlink()


@pytest.mark.parametrize("corrupt, expected", [
    (_flip_bytes, ["shard 1: acts/layer_2: unreadable chunk, rows "]),
    (_delete_shard, ["shard 2: token_id: checksum mismatch: shard file token_id/c/2 is missing"]),
    (_delete_acts_shard, ["shard 2: acts/layer_1: checksum mismatch: shard file acts/layer_1/c/2/0 is"]),
    (_truncate_docs, ["docs.parquet: unreadable"]),
    (_remove_docs, ["docs.parquet: missing"]),
    (_edit_attr, ["'model_id' was changed after the build"]),
    (_edit_stats, ["'stats' was changed after the build",
                   "stats: layer 1 does not match the stored activations"]),
    (_incomplete, ["status is 'building', not complete", "shard 1: not written"]),
    (_edit_geometry, ["'shard_tokens' was changed after the build", "layers/sizes unusable"]),
    (_remove_done_flags, ["array 'shards/done' is missing"]),
    (_garble_array_metadata, ["array 'mask' is unreadable"]),
])
def test_verify__corruption_named(fp32_store, tmp_path: Path, capsys, corrupt, expected: list[str]) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(fp32_store[1], path)
    corrupt(path)
    code, out, err = run_cli(["verify", str(path)], capsys)
    assert code == 1 and "OK" not in out
    problems = [line for line in err.splitlines() if line.startswith(f"{path}: ")]
    assert len(problems) == len(expected), err
    for line, fragment in zip(problems, expected, strict=True):
        assert fragment in line, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{len(expected)} problem(s)" in errors[0]
