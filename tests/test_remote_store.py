"""Stores at URLs through fsspec: ``memory://`` in-process, and an S3 round trip (build, verify, info, fit,
score) against a moto S3 server the test starts on 127.0.0.1, with credentials and the endpoint taken from
the usual AWS environment variables."""

from __future__ import annotations

import importlib.util
import json
import logging
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import SAMPLE_TEXT, build_labelled_eval_store, snapshot, tiny_manifest, write_corpus

from bra.cache import schema
from bra.cache.info import store_info
from bra.cache.location import StoreLocation
from bra.cache.store import open_store
from bra.cache.verify import verify_store
from bra.cli.cache import cli as cache_cli
from bra.cli.common import run_cli
from bra.cli.sae import cli as sae_cli
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest
from bra.sae.config import TrainConfig
from bra.sae.train import fit

SMALL_FIT = {"d_sae": 64, "k": 4, "steps": 4, "batch_size": 16, "buffer_rows": 64, "log_every": 2,
             "checkpoint_every": 2, "dead_tokens": 64, "contrastive_rows": 8}


def url_arrays(url: str) -> dict[str, np.ndarray]:
    group = StoreLocation(url).open_group(mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # docs.parquet is not a Zarr node
        members = group.members(max_depth=None)
    return {name: node[...] for name, node in members if isinstance(node, zarr.Array)}


@pytest.fixture(scope="module")
def local_build(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> tuple[Path, Path]:
    """(manifest, its store built in a local folder): ~200 tokens, 4 shards, so object-store requests stay
    few."""
    tmp = tmp_path_factory.mktemp("remote")
    manifest = tiny_manifest(tmp, tiny_gemma_dir, layers=[1])
    write_corpus(tmp / "haz.jsonl", SAMPLE_TEXT[1::2] + SAMPLE_TEXT[:2], "h")
    write_corpus(tmp / "ben.jsonl", SAMPLE_TEXT[0::2] + SAMPLE_TEXT[1:3], "b")
    return manifest, build_store(load_manifest(manifest), tmp / "local.zarr").path


def test_location__paths_and_urls(tmp_path: Path) -> None:
    assert StoreLocation(tmp_path / "a.zarr").handle == tmp_path / "a.zarr"
    assert StoreLocation(f"file://{tmp_path}/a.zarr").handle == tmp_path / "a.zarr"
    assert StoreLocation(str(tmp_path / "a.zarr")).is_local
    remote = StoreLocation("memory://bucket/a.zarr/")
    assert not remote.is_local and remote.handle == "memory://bucket/a.zarr"
    assert remote.child("docs.parquet") == "memory://bucket/a.zarr/docs.parquet"
    assert remote.is_empty() and not remote.is_store()


def test_memory_store__build_verify_info_fit_equal_local(local_build, tmp_path: Path,
                                                         one_thread: None) -> None:
    manifest, local = local_build
    url = f"memory://bra-{uuid.uuid4().hex[:8]}/tiny.zarr"
    result = build_store(load_manifest(manifest), url)
    assert result.status == "built" and result.path == url
    want = snapshot(local)
    got = url_arrays(url)
    assert sorted(got) == sorted(want["arrays"])
    for name, arr in want["arrays"].items():
        assert np.array_equal(got[name], arr), name
    store = open_store(url)
    assert store.attrs == want["attrs"]
    assert StoreLocation(url).read_bytes(schema.DOCS_TABLE) == want["docs"]
    assert verify_store(url) == []
    info = store_info(url)
    assert info["status"] == "complete" and info["bytes_on_disk"] > info["activation_bytes_on_disk"] > 0
    assert build_store(load_manifest(manifest), url).status == "already-complete"
    sae = fit(url, tmp_path / "run", TrainConfig.from_dict(SMALL_FIT))
    assert sae.cfg.d_model == store.d_model and (tmp_path / "run" / "sae" / "cfg.json").is_file()


def test_memory_store__interrupted_creation_is_made_again(local_build) -> None:
    """Object stores cannot rename a finished skeleton into place: a store left in status `creating` (killed
    while its arrays were being made) is made again by the next build, not refused or resumed."""
    manifest, local = local_build
    url = f"memory://bra-{uuid.uuid4().hex[:8]}/tiny.zarr"
    build_store(load_manifest(manifest), url)
    group = StoreLocation(url).open_group(mode="r+")
    group.attrs.update({schema.ATTR_STATUS: schema.STATUS_CREATING})
    del group[schema.DONE_ARRAY]
    result = build_store(load_manifest(manifest), url)
    assert result.status == "built" and result.computed_tokens == result.n_tokens
    assert verify_store(url) == []


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with a fresh bucket; yields the bucket name. AWS_* variables point the
    code under test at it exactly as they would at any S3-compatible endpoint."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("s3fs") is None:
        pytest.skip("moto[server] and s3fs are not installed (pip install -e '.[s3]')")
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_DEFAULT_REGION": "us-east-1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # filesystems read the environment when they are made
    bucket = f"bra-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem().mkdir(bucket)
    try:
        yield bucket
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_store__build_verify_info_fit_score_from_urls(s3_server: str, local_build, tiny_gemma_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         one_thread: None) -> None:
    manifest, local = local_build
    url = f"s3://{s3_server}/stores/tiny.zarr"
    assert run_cli(cache_cli, ["build", str(manifest), "--store", url]) == 0
    got, want = url_arrays(url), snapshot(local)
    for name, arr in want["arrays"].items():
        assert np.array_equal(got[name], arr), name
    assert run_cli(cache_cli, ["verify", url]) == 0
    capsys.readouterr()
    assert run_cli(cache_cli, ["info", "--json", url]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == url and info["shards_done"] == info["shards"] and info["status"] == "complete"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL_FIT.items()]
    assert run_cli(sae_cli, ["fit", "--store", url, "--out", str(tmp_path / "run"), *flags]) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["store"] == url

    # an eval store built straight into S3 (completions, prompts table and all), then scored from there
    eval_url = f"s3://{s3_server}/stores/eval.zarr"
    (tmp_path / "eval").mkdir()
    assert build_labelled_eval_store(tmp_path / "eval", tiny_gemma_dir, eval_url)[0] == eval_url
    assert not (tmp_path / "eval" / "eval.zarr").exists()
    assert verify_store(eval_url) == []
    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    store = open_store(eval_url)
    cfg = SAEConfig(d_model=store.d_model, d_sae=48, k=4, model_name=str(store.attrs["model_id"]),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    sae_dir = save_saelens(TopKSAE.init_random(cfg, seed=5), tmp_path / "sae")
    assert run_cli(sae_cli, ["score", "--store", eval_url, "--sae", str(sae_dir), "--out",
                             str(tmp_path / "score"), "--n-boot", "50", "--n-perm", "50", "--top-n", "4",
                             "--repeats", "1"]) == 0
    report = json.loads((tmp_path / "score" / "report.json").read_text())
    assert report["settings"]["store"] == eval_url


def test_s3_store__two_process_build(s3_server: str, local_build) -> None:
    """`bra-cache build --nproc 2` into s3://: each rank PUTs its own whole-shard objects; the store verifies
    and holds the one-process build's rows (activations to float tolerance: the ranks run 1 thread each)."""
    import os
    import subprocess
    import sys

    manifest, local = local_build
    url = f"s3://{s3_server}/stores/two.zarr"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "bra.cache", "build", str(manifest), "--store", url,
                           "--nproc", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_store(url) == []
    got, want = url_arrays(url), snapshot(local)["arrays"]
    assert set(got[schema.RANK_ARRAY].tolist()) == {0, 1}
    for name, arr in want.items():
        if name.startswith(schema.ACTS_GROUP):
            assert np.allclose(got[name], arr, atol=1e-5), name
        elif name not in (schema.RANK_ARRAY, schema.CRC_ARRAY) and not name.startswith(schema.STATS_GROUP):
            assert np.array_equal(got[name], arr), name  # token columns and done flags exactly
