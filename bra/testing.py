"""Builders for tests and the bench: a tiny random Gemma2 with a locally trained tokenizer (no download).

Above every other layer: nothing in bra imports this module.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_TEXT", "make_tiny_gemma"]

SAMPLE_TEXT = [
    "Cells divide by mitosis, copying their chromosomes before splitting in two.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "The smallpox eradication campaign ended in 1980 after decades of vaccination.",
    "Biosafety level four laboratories are used for the most dangerous pathogens.",
    "Ribosomes read messenger RNA and assemble proteins from amino acids.",
    "The Biological Weapons Convention entered into force in 1975.",
    "Forests store carbon in wood, roots and soil over long periods of time.",
    "Epidemiologists estimate the basic reproduction number of an outbreak.",
]


def make_tiny_gemma(path: Path, vocab_size: int = 512, layers: int = 4) -> Path:
    """Save a random Gemma2ForCausalLM (hidden 64) and a BPE tokenizer trained on SAMPLE_TEXT to ``path``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer)
    from tokenizers import decoders, processors

    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       sliding_window=32, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
                       bos_token_id=2)
    model = Gemma2ForCausalLM(cfg)
    model.save_pretrained(path)
    return path
