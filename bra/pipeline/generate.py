"""Greedy chat completions for eval prompts: chat-templated, left-padded batches, stop at end of turn.

A generation variant (``bra.pipeline.manifest.VariantSpec``) changes how a prompt is put to the model: a
system turn, no chat template (the raw tokenised prompt), or a prefill (the assistant turn's opening, whose
ids follow the prompt's and which the model continues; the result's completion is prefill + continuation,
so the surface label judges the answer as a reader sees it).

Greedy decoding (``do_sample=False``) is deterministic for a fixed batch composition, which is what
surface labels need (field notes: "greedy decoding is deterministic enough for surface labels;
sampling is not"). Batches are fixed groups of ``batch_size`` prompts in input order, so the same
prompts and settings always give the same completions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from bra.errors import ManifestError, ModelLoadError
from bra.pipeline.manifest import CANONICAL_FORMAT, GenerationSpec, VariantSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationResult:
    """One prompt's chat-templated ids and its greedy completion."""

    prompt_ids: list[int]
    """Chat-templated prompt ids (generation prompt included, no padding); the raw tokenised prompt for a
    variant without chat template."""
    completion_ids: list[int]
    """The prefill's ids (if any), then the generated ids, up to and including the stop token when one was
    produced; never padding."""
    text: str
    """Decoded completion, special tokens skipped; starts with the prefill (as written) when there is one."""
    finished: bool
    """True when the model produced a stop token within ``max_new_tokens``."""
    n_prefill_tokens: int = 0
    """Leading ids of ``completion_ids`` that were the prefill, not generated."""


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt`` as a single user turn followed by the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                             f"eval prompts need a chat (instruction-tuned) model")
    out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # older/newer transformers return an encoding
        out = out["input_ids"]
    return [int(i) for i in out]


def _name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "?"))


def _messages(prompt: str, fmt: VariantSpec) -> list[dict[str, str]]:
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt is not None else []
    return [*system, {"role": "user", "content": prompt}]


def format_prompt_ids(tokenizer: Any, prompt: str, fmt: VariantSpec = CANONICAL_FORMAT) -> list[int]:
    """Token ids of ``prompt`` as ``fmt`` puts it: chat-templated (with the system turn, if any, and the
    assistant's generation prompt), or the raw tokenised prompt when ``fmt.chat_template`` is false. The
    prefill is not included (``prefill_ids``)."""
    if not fmt.chat_template:
        return [int(i) for i in tokenizer(prompt)["input_ids"]]
    if fmt.system_prompt is None:
        return chat_prompt_ids(tokenizer, prompt)
    out = tokenizer.apply_chat_template(_messages(prompt, fmt), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return [int(i) for i in out]


def prefill_ids(tokenizer: Any, fmt: VariantSpec) -> list[int]:
    """The prefill's ids, tokenised on its own without special tokens (empty without a prefill)."""
    if fmt.prefill is None:
        return []
    return [int(i) for i in tokenizer(fmt.prefill, add_special_tokens=False)["input_ids"]]


def check_prompt_format(tokenizer: Any, fmt: VariantSpec, key: str) -> None:
    """Raise a one-line ``ManifestError`` naming ``key`` (e.g. ``generation.variants[1]``) when the
    tokenizer cannot put prompts as ``fmt`` asks: a chat template it lacks, or a system turn its template
    refuses (raises, as Gemma's does) or drops."""
    if not fmt.chat_template:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise ManifestError(f"{key}.chat_template: tokenizer {_name(tokenizer)!r} has no chat template; "
                            f"set chat_template: false for raw prompts")
    if fmt.system_prompt is None:
        return
    try:
        text = tokenizer.apply_chat_template(_messages("hello", fmt), add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:  # jinja's TemplateError, or whatever the template raises
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ManifestError(f"{key}.system_prompt: the chat template of {_name(tokenizer)!r} refuses a "
                            f"system turn ({reason})") from None
    if fmt.system_prompt not in str(text):
        raise ManifestError(f"{key}.system_prompt: the chat template of {_name(tokenizer)!r} drops the "
                            f"system turn (the rendered prompt lacks its text)")


def stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the model's generation-config eos ids plus the tokenizer's eos.

    Chat models often end a turn with a token other than the tokenizer's eos (gemma-2-it stops at
    ``<end_of_turn>``, listed only in its generation config), so both sources count.
    """
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    configured = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    for value in ([configured] if isinstance(configured, int) else list(configured or [])):
        ids.append(int(value))
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer and model define no eos token; cannot tell when a completion ends")
    return sorted(set(ids))


def _pad_id(tokenizer: Any, stop_ids: list[int]) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else stop_ids[0]


def _left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids):] = 1
    return input_ids, attention


def _completion_text(tokenizer: Any, fmt: VariantSpec, opening: list[int], generated: list[int]) -> str:
    """The completion's text: the decoded ids; with a prefill, the prefill as written followed by the
    continuation (decoded together with the prefill's ids, so a word split across the two decodes whole)."""
    if fmt.prefill is None:
        return str(tokenizer.decode(generated, skip_special_tokens=True))
    whole = str(tokenizer.decode(opening + generated, skip_special_tokens=True))
    head = str(tokenizer.decode(opening, skip_special_tokens=True))
    rest = whole[len(head):] if whole.startswith(head) else str(tokenizer.decode(generated,
                                                                                  skip_special_tokens=True))
    return fmt.prefill + rest


def _cut_at_stop(generated: list[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """Keep ids up to and including the first stop id; generate() pads only after a row has stopped."""
    for i, tok in enumerate(generated):
        if tok in stop_ids:
            return generated[:i + 1], True
    return generated, False


@torch.inference_mode()
def generate_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], spec: GenerationSpec,
                         device: torch.device, fmt: VariantSpec = CANONICAL_FORMAT) -> list[GenerationResult]:
    """Greedy-decode a completion for each prompt, put as ``fmt`` says, in input order (see the module
    docstring)."""
    torch.manual_seed(spec.seed)
    stop_ids = stop_token_ids(model, tokenizer)
    stop_set = set(stop_ids)
    pad_id = _pad_id(tokenizer, stop_ids)
    encoded = [format_prompt_ids(tokenizer, p, fmt) for p in prompts]
    opening = prefill_ids(tokenizer, fmt)
    results: list[GenerationResult] = []
    with tqdm(total=len(prompts), unit="prompt", desc="generate", dynamic_ncols=True) as bar:
        for start in range(0, len(encoded), spec.batch_size):
            batch = encoded[start:start + spec.batch_size]
            input_ids, attention = _left_pad([ids + opening for ids in batch], pad_id)
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
                num_beams=1, max_new_tokens=spec.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
            )
            new_tokens = out[:, input_ids.shape[1]:].cpu().tolist()
            for ids, generated in zip(batch, new_tokens, strict=True):
                completion, finished = _cut_at_stop([int(t) for t in generated], stop_set)
                text = _completion_text(tokenizer, fmt, opening, completion)
                results.append(GenerationResult(list(ids), opening + completion, text, finished,
                                                len(opening)))
            bar.update(len(batch))
    n_finished = sum(r.finished for r in results)
    logger.info("generated %d completions (%d stopped at eos, %d hit max_new_tokens=%d)", len(results),
                n_finished, len(results) - n_finished, spec.max_new_tokens)
    return results
