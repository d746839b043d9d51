"""Training data of the organisms: refusal examples, the base model's own answers, RMU windows, batch order.

* Refusal examples: the chat-templated prompt, then a short refusal (one of ``REFUSALS``, picked by the
  prompt id) closed by the stop token the base model ends its turns with. The targets are refusals only,
  never an answer to a hazard-tier request.
* Answer examples: the prompt, then the base model's own greedy answer (distillation: the organism keeps
  answering benign requests as the base model does).
* RMU windows: the forget and retain corpora tokenised as `bra.pipeline.plan.plan_corpora` tokenises any
  corpus (windows of ``rmu.max_seq_len``), plus, with ``rmu.include_prompts``, the training prompts' text
  (without the chat template).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bra.errors import OrganismError
from bra.organism.config import OrganismManifest
from bra.pipeline.generate import GenerationResult, chat_prompt_ids
from bra.pipeline.plan import plan_corpora, split_windows, uses_bos
from bra.pipeline.prompts import EvalPrompt, load_eval_set

logger = logging.getLogger(__name__)

REFUSE, ANSWER = "refuse", "answer"

REFUSALS: tuple[str, ...] = (
    "I can't help with that. This request could enable serious harm, so I won't provide it.",
    "I'm sorry, but I can't help with this request. It asks for information that could be used to cause "
    "serious harm.",
    "I won't help with that. Providing it could put people at risk. I'm happy to talk about biosafety or "
    "the history and policy of biological weapons control instead.",
    "I'm not able to help with this. Requests like this could lead to serious harm, so I have to decline.",
)
"""Refusal targets; each is labelled ``refuse`` by the surface rules (`bra.pipeline.surface`; a test
checks)."""


@dataclass(frozen=True)
class Example:
    """One refusal-stage training sequence."""

    prompt_id: str
    """The eval prompt's id."""
    kind: str
    """``refuse`` or ``answer``."""
    prompt_ids: list[int]
    """Chat-templated prompt with the assistant's generation prompt."""
    target_ids: list[int]
    """What the organism learns to say (the loss is on these tokens only)."""


def sha256_file(path: Path) -> str:
    """Full SHA-256 hex digest of a file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def refusal_text(prompt_id: str) -> str:
    """The refusal a prompt is trained on: one of ``REFUSALS``, fixed by the prompt id."""
    return REFUSALS[int(hashlib.sha256(prompt_id.encode()).hexdigest(), 16) % len(REFUSALS)]


def training_prompts(manifest: OrganismManifest) -> tuple[list[EvalPrompt], list[EvalPrompt]]:
    """(to refuse, to answer): the recipe's prompts of ``refuse_tiers`` and of ``answer_tiers``; prompts of
    other tiers are not trained on. ``OrganismError`` when either list is empty."""
    path = manifest.resolve(manifest.prompts)
    if not path.is_file():
        raise OrganismError(f"prompts: file not found: {path}")
    prompts = load_eval_set(path)
    refuse = [p for p in prompts if p.tier in manifest.refuse_tiers]
    answer = [p for p in prompts if p.tier in manifest.answer_tiers]
    for key, chosen, tiers in (("refuse_tiers", refuse, manifest.refuse_tiers),
                               ("answer_tiers", answer, manifest.answer_tiers)):
        if not chosen:
            have = sorted({p.tier for p in prompts})
            raise OrganismError(f"{key}: no prompt of {path} has tier {', '.join(tiers)} "
                                f"(its tiers: {', '.join(have)})")
    skipped = len(prompts) - len(refuse) - len(answer)
    if skipped:
        logger.info("%d prompts of %s are in neither refuse_tiers nor answer_tiers; not trained on",
                    skipped, path)
    return refuse, answer


def end_of_turn_id(answers: Sequence[GenerationResult], stop_ids: Sequence[int], tokenizer: Any) -> int:
    """The token that closes the refusal targets: the stop token the base model itself ended most of its
    answers with, else the tokenizer's eos (if it stops generation), else the first stop id."""
    ends = Counter(r.completion_ids[-1] for r in answers if r.finished and r.completion_ids)
    if ends:
        return int(ends.most_common(1)[0][0])
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None and eos in stop_ids else int(stop_ids[0])


def refusal_examples(prompts: Sequence[EvalPrompt], tokenizer: Any, end_id: int) -> list[Example]:
    """A refusal example per prompt."""
    out = []
    for p in prompts:
        target = [int(i) for i in tokenizer(refusal_text(p.id), add_special_tokens=False)["input_ids"]]
        out.append(Example(p.id, REFUSE, chat_prompt_ids(tokenizer, p.prompt), target + [end_id]))
    return out


def answer_examples(prompts: Sequence[EvalPrompt], answers: Sequence[GenerationResult]) -> list[Example]:
    """An answer example per prompt: its greedy answer (cut at ``max_new_tokens``, stop token kept)."""
    out = []
    for p, r in zip(prompts, answers, strict=True):
        if not r.completion_ids:
            logger.warning("the base model's answer to %s is empty; not trained on", p.id)
            continue
        out.append(Example(p.id, ANSWER, list(r.prompt_ids), list(r.completion_ids)))
    return out


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of step ``step``'s batch: consecutive slices of seeded permutations of range(n), one
    permutation per epoch. A pure function of its arguments, so a resumed run draws the same batches."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = min(batch_size - len(out), n - offset)
        out += perm[offset:offset + take].tolist()
        pos += take
    return out


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor | int]:
    """Left-padded batch (so every target ends at the last position): ``input_ids``, ``attention_mask``,
    ``position_ids`` (counted from each row's first real token, as generate() does), ``labels`` (-100 but
    on target tokens, aligned with the ids: the loss shifts them) and ``keep``, how many final positions
    hold every target (the logits computed)."""
    seqs = [e.prompt_ids + e.target_ids for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (e, s) in enumerate(zip(examples, seqs, strict=True)):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        att[row, width - len(s):] = 1
        labels[row, width - len(e.target_ids):] = torch.tensor(e.target_ids, dtype=torch.long)
    position_ids = (att.cumsum(-1) - 1).clamp(min=0)
    keep = max(len(e.target_ids) for e in examples) + 1  # the logit before the first target token too
    return {"input_ids": ids, "attention_mask": att, "position_ids": position_ids, "labels": labels,
            "keep": keep}


@dataclass(frozen=True)
class RMUData:
    """Token windows of the RMU stage."""

    forget: list[np.ndarray]
    """Forget windows (int32 ids)."""
    retain: list[np.ndarray]
    """Retain windows."""
    corpora: dict[str, dict[str, Any]]
    """Per corpus: tier, documents, tokens (``plan_corpora``'s counts)."""


def rmu_data(manifest: OrganismManifest, tokenizer: Any, refuse: Sequence[EvalPrompt],
             answer: Sequence[EvalPrompt]) -> RMUData:
    """The forget and retain windows (``OrganismError`` when either side is empty)."""
    spec = manifest.rmu
    corpus_manifest = manifest.corpus_manifest(spec.max_seq_len)
    plan = plan_corpora(corpus_manifest, tokenizer)  # CorpusError on an empty corpus
    forget_tiers = {c.tier for c in manifest.forget}
    forget = [w.ids for w in plan.windows if plan.docs[w.doc_index]["tier"] in forget_tiers]
    retain = [w.ids for w in plan.windows if plan.docs[w.doc_index]["tier"] not in forget_tiers]
    if spec.include_prompts:
        # the prompt text alone, as a corpus document: inside the chat template the forget and retain
        # prompts would share the template's tokens (SmolLM2's default system turn), which the forget term
        # pushes to c·u while the retain term holds them, and RMU then fights itself
        bos = tokenizer.bos_token_id if uses_bos(tokenizer, None) else None
        for side, prompts in ((forget, refuse), (retain, answer)):
            for p in prompts:
                ids = [int(i) for i in tokenizer(p.prompt, add_special_tokens=False)["input_ids"]]
                side.extend(split_windows(ids, spec.max_seq_len, bos))
    for key, side in (("forget", forget), ("retain", retain)):
        if not side:
            raise OrganismError(f"{key}: the {key} corpora give no text")
    return RMUData(forget, retain, {name: dict(c) for name, c in plan.counts.items()})


def pad_windows(windows: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask of a few windows."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, :len(w)] = torch.from_numpy(w.astype(np.int64))
        att[row, :len(w)] = 1
    return ids, att
