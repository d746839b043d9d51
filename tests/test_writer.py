"""The build's write path (bra/cache/parallel.py, bra/pipeline/sink.py, bra/pipeline/staging.py) and the
opt-in fp8 store dtype end to end: writer threads never change a store, fp8 rows read back as codes x scales
everywhere (verify, info, fit, eval, score), and the bad inputs of issue 18 are refused by name."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import zarr
from helpers import label_by_tier, sae_main_code, snapshot, tiny_manifest, write_eval_set, write_manifest

from bra.cache import schema
from bra.cache.info import format_info, store_info
from bra.cache.parallel import ShardWriterPool, default_writer_threads, thread_loop
from bra.cache.reader import ReaderConfig, RowStream
from bra.cache.store import open_store
from bra.cache.verify import verify_store
from bra.dist import cpu_cores
from bra.errors import ManifestError, StoreMismatchError
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest, manifest_hash

pytestmark = pytest.mark.usefixtures("one_thread")

FP8 = {"dtype": "float8_e4m3", "chunk_tokens": 16, "shard_tokens": 64}
SMALL_FIT = ["--d-sae", "64", "--k", "4", "--steps", "4", "--batch-size", "16", "--buffer-rows", "64",
             "--checkpoint-every", "2", "--dead-tokens", "64", "--contrastive-rows", "8", "--device", "cpu"]
FAST_SCORE = ["--n-boot", "10", "--n-perm", "10"]


def _build(tmp: Path, model_dir: Path, name: str, threads: int | None = None, **storage: object) -> Path:
    manifest = load_manifest(tiny_manifest(tmp / name, model_dir, storage=storage))
    return build_store(manifest, tmp / f"{name}.zarr", writer_threads=threads).path


# ---------------------------------------------------------------------------------------- writer threads


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3"])
def test_build__stores_equal_for_any_writer_thread_count(tmp_path: Path, tiny_gemma_dir: Path,
                                                         dtype: str) -> None:
    """1, 2 and 4 writer threads write the same arrays, attrs and document table (the done flags and
    statistics included): a thread count changes speed only."""
    manifest = load_manifest(tiny_manifest(tmp_path, tiny_gemma_dir, storage={"dtype": dtype}))
    stores = {n: build_store(manifest, tmp_path / f"t{n}.zarr", writer_threads=n).path for n in (1, 2, 4)}
    want = snapshot(stores[1])
    assert open_store(stores[1]).layout.n_shards > 4  # several shards in flight at once
    for n in (2, 4):
        got = snapshot(stores[n])
        assert sorted(got["arrays"]) == sorted(want["arrays"])
        for name, arr in want["arrays"].items():
            assert np.array_equal(got["arrays"][name], arr), (n, name)
        assert got["attrs"] == want["attrs"] and got["docs"] == want["docs"]
        assert verify_store(stores[n]) == []


def test_manifest__writer_threads_is_a_speed_knob_not_part_of_the_fingerprint(tmp_path: Path,
                                                                             tiny_gemma_dir: Path) -> None:
    plain = load_manifest(tiny_manifest(tmp_path, tiny_gemma_dir))
    knob = load_manifest(tiny_manifest(tmp_path, tiny_gemma_dir, storage={"writer_threads": 3}))
    assert knob.storage.writer_threads == 3 and plain.storage.writer_threads is None
    assert knob.content_dict() == plain.content_dict()
    digests = {"x": "0"}
    assert manifest_hash(knob, digests) == manifest_hash(plain, digests)
    with pytest.raises(ManifestError, match=r"storage\.writer_threads: must be at least 1, got 0"):
        load_manifest(tiny_manifest(tmp_path, tiny_gemma_dir, storage={"writer_threads": 0}))
    assert 1 <= default_writer_threads() <= 4 and default_writer_threads(10**6) == 1
    assert default_writer_threads(accelerator=True) == max(1, cpu_cores() - 1)


def test_shard_writer_pool__runs_on_own_loops_and_reraises_the_first_error() -> None:
    seen: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def write(i: int) -> None:
        with lock:
            seen.append((i, thread_loop() is not None))
        if i == 3:
            raise KeyboardInterrupt("killed")  # any BaseException keeps its type

    with pytest.raises(KeyboardInterrupt, match="killed"):
        with ShardWriterPool(2, queued=1) as pool:
            for i in range(50):
                pool.submit(write, i)
    assert all(on_loop for _, on_loop in seen) and thread_loop() is None
    assert 3 in {i for i, _ in seen} and len(seen) < 50  # the writes after the failure were dropped
    with ShardWriterPool(3) as pool:
        for i in range(10):
            pool.submit(lambda j: seen.append((100 + j, True)), i)
    assert {i for i, _ in seen if i >= 100} == set(range(100, 110))
    with pytest.raises(ValueError, match="at least 1"):
        ShardWriterPool(0)


# ----------------------------------------------------------------------------------------------- fp8


@pytest.fixture(scope="module")
def fp8_pair(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fp32 store, fp8 store) of the same tiny manifest, differing in storage.dtype only."""
    tmp = tmp_path_factory.mktemp("fp8")
    return (_build(tmp, tiny_gemma_dir, "f32", dtype="float32", chunk_tokens=16, shard_tokens=64),
            _build(tmp, tiny_gemma_dir, "fp8", **FP8))


def test_encode_rows__fp8_round_trip_is_codes_times_scale() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((40, 24)) * np.exp(rng.normal(0, 2, (40, 1)))).astype(np.float32)
    x[3] = 0.0
    raw, scale = schema.encode_rows(x, "float8_e4m3")
    assert raw.dtype == np.uint8 and scale is not None and scale.dtype == np.float32
    np.testing.assert_array_equal(scale[[0, 1]], np.abs(x[[0, 1]]).max(axis=1) / np.float32(448))
    assert scale[3] == 1.0 and not raw[3].any()
    back = schema.decode_rows(raw, "float8_e4m3", scale)
    np.testing.assert_array_equal(back, raw.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale[:, None])
    np.testing.assert_allclose(np.abs(back).max(axis=1), np.abs(x).max(axis=1), rtol=1e-6)  # absmax kept
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormals below 2^-6 (absolute <= scale x 2^-10)
    assert (np.abs(back - x) <= np.abs(x) / 16 + scale[:, None] * 2.0**-10 + 1e-30).all()
    bad = x.copy()
    bad[5, 2], bad[6, 0] = np.nan, np.inf
    _, s = schema.encode_rows(bad, "float8_e4m3")
    assert np.isnan(s[5]) and np.isinf(s[6]) and np.isfinite(np.delete(s, [5, 6])).all()
    with pytest.raises(ValueError, match="need their scales"):
        schema.to_storage(x, "float8_e4m3")
    with pytest.raises(ValueError, match="one scale each"):
        schema.decode_rows(raw, "float8_e4m3")
    assert schema.canonical_storage_dtype("fp8") == "float8_e4m3"
    with pytest.raises(ValueError, match="unknown dtype"):
        schema.canonical_dtype("fp8")  # a storage dtype only, never a compute dtype


def test_build__fp8_store_reads_back_codes_times_scales(fp8_pair: tuple[Path, Path]) -> None:
    f32_path, fp8_path = fp8_pair
    exact, fp8 = open_store(f32_path), open_store(fp8_path)
    assert fp8.dtype == "float8_e4m3" and fp8.acts(1).dtype == np.uint8
    for layer in (1, 2):
        x = exact.read_acts(layer, 0, exact.n_tokens)
        got = fp8.read_acts(layer, 0, fp8.n_tokens)
        raw, scale = schema.encode_rows(x, "float8_e4m3")
        np.testing.assert_array_equal(fp8.array(schema.acts_path(layer))[:], raw)
        np.testing.assert_array_equal(fp8.array(schema.scales_path(layer))[:], scale)
        np.testing.assert_array_equal(got, schema.decode_rows(raw, "float8_e4m3", scale))
        keep = ~fp8.array("mask")[:]
        stats = fp8.stats(layer)
        np.testing.assert_allclose(stats["mean"], got[keep].astype(np.float64).mean(axis=0), rtol=1e-6,
                                   atol=1e-6)
        fvu = ((got[keep] - x[keep]) ** 2).sum() / ((x[keep] - x[keep].mean(axis=0)) ** 2).sum()
        assert 0 < fvu < 0.01
    stream = RowStream(fp8, ReaderConfig(layer=1, batch_size=32, buffer_rows=64, seed=0))
    rows = {int(r): a for b in stream.epoch(0) for r, a in zip(b.row, b.acts, strict=True)}
    full = fp8.read_acts(1, 0, fp8.n_tokens)
    assert rows and all(np.array_equal(a, full[r]) for r, a in rows.items())


def test_verify_info__fp8_store_sound_lossy_and_smaller(fp8_pair: tuple[Path, Path]) -> None:
    f32_path, fp8_path = fp8_pair
    assert verify_store(fp8_path) == []
    info = store_info(fp8_path)
    assert info["lossy"] is True and store_info(f32_path)["lossy"] is False
    assert info["dtype"] == "float8_e4m3"
    n, d = info["tokens_written"], info["d_model"]
    assert info["activation_bytes_raw"] == n * (d + 4) * 2  # two layers: codes + a float32 scale per row
    assert info["activation_bytes_bf16_raw"] == n * d * 2 * 2
    assert 0.3 < info["bytes_saved_vs_bf16_raw"] < 1
    assert "lossy" in format_info(info)


@pytest.mark.parametrize("value, word", [(0.0, "0.0"), (np.nan, "nan"), (np.inf, "inf")])
def test_verify__fp8_scale_zero_or_not_finite_names_the_row(fp8_pair: tuple[Path, Path], tmp_path: Path,
                                                            value: float, word: str) -> None:
    store = Path(shutil.copytree(fp8_pair[1], tmp_path / "bad.zarr"))
    arr = zarr.open_array(str(store / schema.scales_path(2)), mode="r+")
    arr[70] = value  # row 70: shard 1 (64-row shards)
    problems = verify_store(store)
    named = f"shard 1: {schema.scales_path(2)}: row 70 has scale {word}"
    assert any(p.startswith(named) for p in problems), problems
    assert any("checksum mismatch" in p for p in problems)


def test_build__fp8_requested_on_a_bf16_store_refused_naming_both(tmp_path: Path,
                                                                  tiny_gemma_dir: Path) -> None:
    bf16 = load_manifest(tiny_manifest(tmp_path / "a", tiny_gemma_dir, storage={"dtype": "bf16"}))
    path = build_store(bf16, tmp_path / "s.zarr").path
    # interrupted: the store stays `building` with some shards done, so the fp8 build would resume it
    zarr.open_group(str(path), mode="r+").attrs.update(schema.status_update(schema.STATUS_BUILDING))
    fp8 = load_manifest(tiny_manifest(tmp_path / "b", tiny_gemma_dir, storage={"dtype": "fp8"}))
    with pytest.raises(StoreMismatchError) as info:
        build_store(fp8, path)
    msg = str(info.value)
    assert "bfloat16" in msg and "float8_e4m3" in msg and "--overwrite" in msg and "\n" not in msg
    assert open_store(path, require_complete=False).dtype == "bfloat16"


def test_fp8__fit_eval_score_end_to_end(fp8_pair: tuple[Path, Path], tiny_gemma_dir: Path,
                                        tmp_path: Path) -> None:
    _, store = fp8_pair
    run = tmp_path / "run"
    assert sae_main_code(["fit", "--store", str(store), "--out", str(run), *SMALL_FIT]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(np.isfinite(m["fvu"]) for m in metrics if "fvu" in m)
    assert sae_main_code(["eval", "--sae", str(run), "--store", str(store), "--out",
                          str(tmp_path / "eval.json")]) == 0
    assert np.isfinite(json.loads((tmp_path / "eval.json").read_text())["fvu"])
    manifest = write_manifest(tmp_path / "eval.yaml", {
        "name": "tiny-eval", "model": {"id": str(tiny_gemma_dir), "attn_implementation": "eager"},
        "layers": [1], "max_seq_len": 128, "batch_size": 8,
        "storage": {"dtype": "fp8", "chunk_tokens": 64, "shard_tokens": 256},
        "prompt_sets": [str(write_eval_set(tmp_path / "set.jsonl"))],
        "generation": {"max_new_tokens": 4, "seed": 0, "batch_size": 8}})
    eval_store = build_store(load_manifest(manifest), tmp_path / "eval.zarr").path
    label_by_tier(eval_store)
    assert verify_store(eval_store) == [] and store_info(eval_store)["lossy"] is True
    out = tmp_path / "report"
    assert sae_main_code(["score", "--store", str(eval_store), "--sae", str(run / "sae"), "--out", str(out),
                          *FAST_SCORE]) == 0
    assert (out / "report.json").is_file()
