"""Which parameters each training stage may change, and the check that the others did not change.

The shallow organism's promise is exact: every parameter that takes part in computing block L's output
(the input embeddings, every block up to and including L, learned position embeddings) is the base model's,
so its layer-L residual on any input is bitwise the base model's. The refusal stage therefore trains only
what runs after block L: blocks L+1.., the final norm, and the lm_head when it is a separate matrix. When
the lm_head is tied to the input embeddings (SmolLM2, Gemma: ``tie_word_embeddings``) it stays frozen,
since training it would change the embeddings below L.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from bra.errors import OrganismError
from bra.pipeline.model import decoder_layers

logger = logging.getLogger(__name__)

FINAL_NORM_PATHS: tuple[str, ...] = (
    "model.norm", "model.language_model.norm", "language_model.model.norm", "model.decoder.final_layer_norm",
    "transformer.ln_f", "gpt_neox.final_layer_norm", "transformer.norm_f",
)
"""Where transformers keeps the norm after the last block (the families of
`bra.pipeline.model.BLOCK_PATHS`)."""

LM_HEAD_TIED, LM_HEAD_TRAINED, LM_HEAD_ABSENT = "tied-frozen", "untied-trained", "absent"


@dataclass(frozen=True)
class StageParams:
    """The parameters one stage trains."""

    names: tuple[str, ...]
    """Parameter names (``model.named_parameters()``), in model order."""
    lm_head: str
    """The refusal stage's lm_head: ``tied-frozen`` (tied to the input embeddings, left as it is),
    ``untied-trained`` or ``absent``; ``absent`` for RMU too, which never reaches it."""
    summary: str
    """One line saying what trains (for logs and provenance)."""


def _block_of(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> index of the decoder block holding it."""
    return {id(p): i for i, block in enumerate(decoder_layers(model)) for p in block.parameters()}


def _final_norm(model: nn.Module) -> nn.Module | None:
    for path in FINAL_NORM_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module) and any(True for _ in obj.parameters()):
            return obj
    return None


def lm_head_state(model: nn.Module) -> str:
    """``tied-frozen`` when the output embeddings share their weight with the input embeddings, else
    ``untied-trained`` (or ``absent`` when the model has no output embeddings)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()  # type: ignore[operator]
    if out is None:
        return LM_HEAD_ABSENT
    return LM_HEAD_TIED if out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr() \
        else LM_HEAD_TRAINED


def refusal_params(model: nn.Module, layer: int) -> StageParams:
    """Everything after block ``layer``: blocks > layer, the final norm, the lm_head if untied."""
    n_blocks = len(decoder_layers(model))
    if layer >= n_blocks - 1:
        raise OrganismError(f"layer {layer} is the model's last block (it has {n_blocks}, "
                            f"0..{n_blocks - 1}): nothing above it to train the refusal into; hook a lower "
                            f"layer")
    block_of = _block_of(model)
    wanted = {id(p) for p in model.parameters() if block_of.get(id(p), -1) > layer}
    norm = _final_norm(model)
    if norm is not None:
        wanted |= {id(p) for p in norm.parameters()}
    else:
        logger.warning("no final norm found at %s; it stays frozen", ", ".join(FINAL_NORM_PATHS))
    head = lm_head_state(model)
    if head == LM_HEAD_TRAINED:
        wanted.add(id(model.get_output_embeddings().weight))  # type: ignore[operator, union-attr]
    names = tuple(n for n, p in model.named_parameters() if id(p) in wanted)
    what = {LM_HEAD_TIED: "the lm_head stays frozen (tied to the input embeddings)",
            LM_HEAD_TRAINED: "the lm_head trains (untied)", LM_HEAD_ABSENT: "no lm_head"}[head]
    summary = (f"blocks {layer + 1}..{n_blocks - 1}" + (", the final norm" if norm is not None else "")
               + f"; {what}; the embeddings and blocks 0..{layer} stay frozen")
    return StageParams(names, head, summary)


def rmu_params(model: nn.Module, layer: int, n_blocks: int, suffixes: Iterable[str]) -> StageParams:
    """The parameters of blocks ``layer - n_blocks + 1 .. layer`` whose names end with one of ``suffixes``
    (the WMDP paper trains the MLP output projections of layers ℓ-2..ℓ)."""
    suffixes = tuple(suffixes)
    first = max(0, layer - n_blocks + 1)
    block_of = _block_of(model)
    names = tuple(n for n, p in model.named_parameters()
                  if first <= block_of.get(id(p), -1) <= layer and n.endswith(suffixes))
    if not names:
        block = decoder_layers(model)[layer]
        examples = ", ".join(n for n, _ in list(block.named_parameters())[:6])
        raise OrganismError(f"rmu.params: no parameter of blocks {first}..{layer} ends with "
                            f"{', '.join(suffixes)} (block {layer} has {examples}, ...)")
    return StageParams(names, LM_HEAD_ABSENT,
                       f"blocks {first}..{layer}: {', '.join(suffixes)} ({len(names)} tensors)")


def set_trainable(model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """Freeze every parameter but ``names``; return those, in model order."""
    wanted = set(names)
    out = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            out.append(p)
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise OrganismError(f"the model has no parameter {sorted(missing)[0]!r}")
    return out


def changed_params(model: nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters that differ (in any bit) from ``reference`` (name -> tensor)."""
    return [n for n, p in model.named_parameters()
            if n in reference and not torch.equal(p.detach(), reference[n])]
