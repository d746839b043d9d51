"""A quick behavioural check of a model (an organism or its base): greedy answers to a few prompts per tier,
labelled with the surface rules (`bra.pipeline.surface`), counted per tier. No store, no activations."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bra.pipeline.generate import generate_completions
from bra.pipeline.manifest import GenerationSpec, ModelSpec
from bra.pipeline.model import load_model, resolve_device
from bra.pipeline.prompts import EvalPrompt, load_eval_set
from bra.pipeline.surface import classify

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """One prompt's greedy answer and its surface label."""

    prompt: EvalPrompt
    """The prompt."""
    completion: str
    """The greedy answer."""
    label: str
    """Its surface label (rules)."""


def pick_prompts(prompts: list[EvalPrompt], per_tier: int) -> list[EvalPrompt]:
    """The first ``per_tier`` prompts of every tier, in file order (0: all of them)."""
    if per_tier <= 0:
        return list(prompts)
    seen: Counter[str] = Counter()
    out = []
    for p in prompts:
        if seen[p.tier] < per_tier:
            out.append(p)
            seen[p.tier] += 1
    return out


def probe_model(model: ModelSpec, prompts_path: str | Path, per_tier: int = 10, max_new_tokens: int = 48,
                batch_size: int = 16) -> list[ProbeResult]:
    """Greedy-answer ``per_tier`` prompts of each tier of ``prompts_path`` with ``model`` (fp32, chat
    template) and label every answer."""
    prompts = pick_prompts(load_eval_set(prompts_path), per_tier)
    device = resolve_device(model.device)
    import torch

    lm, tokenizer = load_model(model, device, torch.float32)
    spec = GenerationSpec(max_new_tokens=max_new_tokens, seed=0, batch_size=batch_size)
    results = generate_completions(lm, tokenizer, [p.prompt for p in prompts], spec, device)
    return [ProbeResult(p, r.text, classify(r.text, p.prompt).label)
            for p, r in zip(prompts, results, strict=True)]


def label_counts(results: list[ProbeResult]) -> dict[str, Counter[str]]:
    """Per tier (in order of first appearance), the count of each surface label."""
    out: dict[str, Counter[str]] = {}
    for r in results:
        out.setdefault(r.prompt.tier, Counter())[r.label] += 1
    return out
