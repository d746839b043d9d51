"""Tests for bra.pipeline.model on tiny random models of each supported architecture.

For every architecture the stop-after-layer capture must equal ``output_hidden_states=True``
``hidden_states[L + 1]`` and the blocks after the deepest hooked one must never run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_tiny_gemma, tiny_manifest
from torch import nn

from bra.cache.store import open_store
from bra.errors import ModelLoadError
from bra.pipeline.build import build_store
from bra.pipeline.manifest import load_manifest
from bra.pipeline.model import capture_residuals, config_int, decoder_layers

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
N_LAYERS = 3
TEXT = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
"""Keyword arguments of a tiny Llama-style text config (d_model 32, 3 blocks)."""
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": N_LAYERS, "num_attention_heads": 4}
"""A tiny vision tower with as many blocks as the text model, so a length match alone is ambiguous."""


def _cls(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def _llama() -> nn.Module:
    return _cls("LlamaForCausalLM")(_cls("LlamaConfig")(**TEXT))


def _qwen2() -> nn.Module:
    return _cls("Qwen2ForCausalLM")(_cls("Qwen2Config")(**TEXT))


def _qwen3() -> nn.Module:
    return _cls("Qwen3ForCausalLM")(_cls("Qwen3Config")(**TEXT, head_dim=8))


def _phi3() -> nn.Module:
    return _cls("Phi3ForCausalLM")(_cls("Phi3Config")(**TEXT))


def _gemma2() -> nn.Module:
    return _cls("Gemma2ForCausalLM")(_cls("Gemma2Config")(**TEXT, head_dim=8, sliding_window=4))


def _gemma3_text() -> nn.Module:
    return _cls("Gemma3ForCausalLM")(_cls("Gemma3TextConfig")(**TEXT, head_dim=8, sliding_window=4))


def _gemma3_multimodal() -> nn.Module:
    config = _cls("Gemma3Config")(text_config={**TEXT, "head_dim": 8, "sliding_window": 4},
                                  vision_config={**VISION, "image_size": 28, "patch_size": 14},
                                  mm_tokens_per_image=4)
    return _cls("Gemma3ForConditionalGeneration")(config)


def _gemma4_multimodal() -> nn.Module:
    text = {**TEXT, "head_dim": 8, "sliding_window": 4, "vocab_size_per_layer_input": VOCAB,
            "hidden_size_per_layer_input": 8}
    config = _cls("Gemma4Config")(text_config=text,
                                  vision_config={**VISION, "num_key_value_heads": 4, "head_dim": 8},
                                  audio_config=None)
    return _cls("Gemma4ForConditionalGeneration")(config)


def _gpt_neox() -> nn.Module:
    config = _cls("GPTNeoXConfig")(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, max_position_embeddings=64)
    return _cls("GPTNeoXForCausalLM")(config)


def _gpt2() -> nn.Module:
    config = _cls("GPT2Config")(vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64)
    return _cls("GPT2LMHeadModel")(config)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "phi3": _phi3, "gemma2": _gemma2,
    "gemma3-text": _gemma3_text, "gemma3-multimodal": _gemma3_multimodal,
    "gemma4-multimodal": _gemma4_multimodal, "gpt-neox": _gpt_neox, "gpt2": _gpt2,
}


def _tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of ids that avoid the special tokens 0..2."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_decoder_layers__finds_the_text_blocks(arch: str) -> None:
    model = _tiny(arch)
    blocks = decoder_layers(model)
    assert len(blocks) == N_LAYERS
    assert not any(t in type(blocks[0]).__name__.lower() for t in ("vision", "siglip", "audio"))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("layers", [[0], [1, 0]])
def test_capture_residuals__equals_hidden_states_and_stops(arch: str, layers: list[int]) -> None:
    model = _tiny(arch)
    ids, mask = _batch()
    blocks = decoder_layers(model)
    ran: list[int] = []
    handles = [block.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, block in enumerate(blocks)]
    try:
        captured = capture_residuals(model, ids, mask, layers)
        assert sorted(set(ran)) == list(range(max(layers) + 1)), f"blocks after {max(layers)} ran: {ran}"
        ran.clear()
        with torch.inference_mode():
            reference = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(N_LAYERS))  # the reference forward ran every block, each once
    assert sorted(captured) == sorted(layers)
    valid = mask.bool()
    for layer in layers:
        expected = reference.hidden_states[layer + 1].float()
        assert captured[layer].shape == expected.shape
        torch.testing.assert_close(captured[layer][valid], expected[valid], rtol=0, atol=1e-6)


class _Backbone(nn.Module):
    def __init__(self, n_blocks: int, extra: int = 0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n_blocks))
        self.vision_tower = nn.ModuleList(nn.Linear(4, 4) for _ in range(n_blocks))
        if extra:
            self.other = nn.ModuleList(nn.Linear(4, 4) for _ in range(extra))


class _Wrapper(nn.Module):
    """A model whose blocks sit at a path no architecture uses."""

    def __init__(self, n_layers: int | None, n_blocks: int, extra: int = 0) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        if n_layers is not None:
            self.config.num_hidden_layers = n_layers
        self.backbone = _Backbone(n_blocks, extra)


def test_decoder_layers__unknown_path_found_by_block_count() -> None:
    model = _Wrapper(n_layers=3, n_blocks=3)
    assert decoder_layers(model) is model.backbone.blocks


@pytest.mark.parametrize(("model", "fragment"), [
    (_Wrapper(n_layers=5, n_blocks=3), "cannot find the decoder blocks of _Wrapper: no list of 5 blocks"),
    (_Wrapper(n_layers=None, n_blocks=3), "cannot find the decoder blocks of _Wrapper: no list of blocks"),
    (_Wrapper(n_layers=3, n_blocks=3, extra=3), "several lists of 3 blocks (backbone.blocks, backbone.other"),
])
def test_decoder_layers__none_or_several_is_a_one_line_error(model: nn.Module, fragment: str) -> None:
    with pytest.raises(ModelLoadError) as info:
        decoder_layers(model)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_config_int__reads_the_text_config_when_the_top_level_lacks_it() -> None:
    text = {**TEXT, "hidden_size": 48, "head_dim": 8}
    config = _cls("Gemma3Config")(text_config=text, vision_config=VISION)
    assert getattr(config, "hidden_size", None) is None  # the reason for the fallback
    assert config_int(config, "num_hidden_layers", "m") == N_LAYERS
    assert config_int(config, "hidden_size", "m") == 48
    assert config_int(_cls("GPT2Config")(n_layer=2, n_embd=16), "num_hidden_layers", "m") == 2
    with pytest.raises(ModelLoadError, match=r"^model m: its config has no n_blocks \(nor text_config"):
        config_int(config, "n_blocks", "m")


def test_build__gemma3_multimodal_store_rows_equal_hidden_states(tmp_path: Path) -> None:
    """End to end: a Gemma 3 checkpoint (layers and d_model only in text_config, blocks under
    model.language_model) builds a store whose rows are hidden_states[L + 1]."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_gemma(tmp_path / "tok", layers=1)  # for its tokenizer (vocab 512)
    torch.manual_seed(0)
    config = _cls("Gemma3Config")(
        text_config={**TEXT, "vocab_size": 512, "head_dim": 8, "sliding_window": 4, "bos_token_id": 2,
                     "eos_token_id": 1},
        vision_config={**VISION, "image_size": 28, "patch_size": 14}, mm_tokens_per_image=4)
    gemma3 = _cls("Gemma3ForConditionalGeneration")(config)
    for f in model_dir.glob("model*.safetensors"):
        f.unlink()
    gemma3.save_pretrained(model_dir)
    manifest = load_manifest(tiny_manifest(tmp_path, model_dir, layers=[1]))
    store = open_store(build_store(manifest, tmp_path / "s.zarr").path)
    assert store.d_model == 32 and store.n_tokens > 0
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    pos = store.array("position")[:]
    start, stop = 0, int(np.flatnonzero(pos == 0)[1])
    ids = torch.from_numpy(store.array("token_id")[start:stop].astype(np.int64))[None]
    with torch.inference_mode():
        expected = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0].float().numpy()
    np.testing.assert_allclose(store.read_acts(1, start, stop), expected, rtol=1e-5, atol=1e-5)
