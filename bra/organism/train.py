"""The two training stages and their loop: checkpointed every few steps, resumed to the same weights.

A stage owns its loss; `run_stage` owns the loop (AdamW over the stage's parameters only, progress bar,
checkpoints). Every batch is a pure function of (seed, step) (`bra.organism.data.batch_indices`) and
nothing else in a step is random, so a run resumed from a checkpoint computes the same steps as an
uninterrupted one: on the same machine and thread count its final weights are equal bitwise.

RMU (Li et al. 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With Unlearning", §5.2):
with h(x) the residual after block L and u a fixed random unit vector (uniform in [0, 1)^d, normalised, as
the paper's code draws it), minimise
``mean ||h_θ(forget) - c·u||² + α · mean ||h_θ(retain) - h_frozen(retain)||²`` over a few blocks'
parameters at and below L (the paper: the MLP output projections of layers ℓ-2..ℓ).
The means here are over tokens and dimensions (``F.mse_loss``), skipping padding and each window's first
token (the attention sink, whose norm is far larger than the others').
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from bra.errors import OrganismError
from bra.fsutil import atomic_dir
from bra.organism.config import RefusalSpec, RMUSpec
from bra.organism.data import Example, RMUData, batch_indices, collate, pad_windows
from bra.organism.params import StageParams, set_trainable
from bra.pipeline.model import decoder_layers

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "params.safetensors"
CHECKPOINT_STATE = "state.pt"
MAX_GRAD_NORM = 1.0
"""Gradient-norm clip of the refusal stage (a few hundred steps at lr 1e-4 on a small model; the clip keeps an
early large gradient from wrecking the benign answers)."""
DONE = "done"


@dataclass
class TrainState:
    """Where training stands; what a checkpoint holds besides the weights."""

    stage: str
    """The stage running (``rmu``, ``refusal``) or ``done``."""
    step: int = 0
    """Steps of that stage done."""
    optimizer: dict[str, Any] | None = None
    """The stage's AdamW state at ``step`` (None at step 0)."""
    losses: dict[str, list[float]] = field(default_factory=dict)
    """Per stage, the loss of every step done."""
    metrics: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """Per stage, the metrics of every step done (RMU: forget and retain terms, cosine to u)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Per stage, training time spent on the checkpointed steps (summed over resumes)."""
    fingerprint: str = ""
    """The recipe's fingerprint: a checkpoint of another recipe is never resumed."""
    steering_coeff: float | None = None
    """RMU's c once computed."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``torch.save`` (loaded back with ``weights_only=True``)."""
        return {"stage": self.stage, "step": self.step, "optimizer": self.optimizer, "losses": self.losses,
                "metrics": self.metrics, "seconds": self.seconds, "fingerprint": self.fingerprint,
                "steering_coeff": self.steering_coeff}


class Checkpoint:
    """A checkpoint folder: the parameters changed so far (safetensors) and `TrainState` (torch.save),
    replaced whole (`bra.fsutil.atomic_dir`), so a kill leaves the previous checkpoint or the new one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def save(self, model: nn.Module, names: set[str], state: TrainState) -> None:
        """Write the parameters ``names`` and ``state``."""
        params = dict(model.named_parameters())
        tensors = {n: params[n].detach().contiguous().cpu() for n in sorted(names)}
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.folder) as tmp:
            save_file(tensors, str(tmp / CHECKPOINT_WEIGHTS))
            torch.save(state.to_dict(), tmp / CHECKPOINT_STATE)
        logger.debug("checkpoint %s: %s step %d", self.folder, state.stage, state.step)

    def load(self, model: nn.Module) -> TrainState | None:
        """Copy the saved parameters into ``model`` and return the state; None when there is none."""
        if not (self.folder / CHECKPOINT_STATE).is_file():
            return None
        try:
            raw = torch.load(self.folder / CHECKPOINT_STATE, weights_only=True)
            tensors = load_file(str(self.folder / CHECKPOINT_WEIGHTS))
        except Exception as exc:  # pickle, safetensors and OS errors
            raise OrganismError(f"{self.folder}: unreadable checkpoint ({str(exc).splitlines()[0]}); "
                                f"pass --overwrite to start again") from None
        params = dict(model.named_parameters())
        unknown = sorted(set(tensors) - set(params))
        if unknown:
            raise OrganismError(f"{self.folder}: checkpoint holds {unknown[0]!r}, which the model lacks")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        return TrainState(**raw)


class Stage(Protocol):
    """One training stage: its parameters, length and loss."""

    name: str
    params: StageParams
    steps: int
    lr: float
    weight_decay: float
    checkpoint_every: int
    max_grad_norm: float | None

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of step ``step`` (with grad) and metrics to log."""
        ...


def residual(model: nn.Module, ids: torch.Tensor, att: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual after block ``layer`` [B, T, d], with grad where parameters train; the blocks above are
    not run."""

    class _Stop(Exception):
        pass

    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        box["h"] = out[0] if isinstance(out, tuple) else out
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(input_ids=ids, attention_mask=att, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"]


class _Skip(nn.Module):
    """Stands in for a frozen block whose output is already known: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def block_inputs(model: nn.Module, windows: list[Any], first: int, pad_id: int, device: torch.device,
                 batch_size: int = 16) -> list[torch.Tensor]:
    """Per window, the hidden states entering block ``first`` [T_w, d] (on the CPU), computed once: RMU
    trains blocks ``first``..L only, so what enters block ``first`` never changes during the stage."""

    class _Stop(Exception):
        pass

    box: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        box["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    out: list[torch.Tensor] = []
    handle = decoder_layers(model)[first].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size]
            ids, att = pad_windows(chunk, pad_id)
            try:
                model(input_ids=ids.to(device), attention_mask=att.to(device), use_cache=False)
            except _Stop:
                pass
            out.extend(box["h"][row, :len(w)].detach().cpu() for row, w in enumerate(chunk))
    finally:
        handle.remove()
    return out


def residual_from(model: nn.Module, ids: torch.Tensor, att: torch.Tensor, first: int, layer: int,
                  h_in: torch.Tensor) -> torch.Tensor:
    """The residual after block ``layer`` [B, T, d] when block ``first`` is fed ``h_in`` [B, T, d] (its known
    input, `block_inputs`): blocks below ``first`` are skipped, while the model still builds its own
    attention masks and position embeddings from ``ids`` and ``att``, so the result is the full forward's."""
    layers = decoder_layers(model)
    saved = [layers[j] for j in range(first)]

    def feed(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...],
                                                                                     dict[str, Any]]:
        if args:
            return (h_in, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h_in}

    handle = layers[first].register_forward_pre_hook(feed, with_kwargs=True)
    try:
        for j in range(first):
            layers[j] = _Skip()
        return residual(model, ids, att, layer)
    finally:
        handle.remove()
        for j, block in enumerate(saved):
            layers[j] = block


def pad_rows(rows: list[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Right-pad per-window hidden states [T_w, d] with zeros into one [B, width, d] batch (padding is
    masked out of every loss, and a causal model's real tokens never attend to it)."""
    out = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out.to(device)


def token_mask(att: torch.Tensor) -> torch.Tensor:
    """Tokens a representation loss counts: real (not padding) and not a window's first (the sink)."""
    mask = att.bool().clone()
    mask[:, 0] = False
    return mask


class RefusalStage:
    """Cross-entropy on the target tokens of refusal and answer examples (each sequence's mean, then the
    batch's, so short refusals weigh as much as long answers)."""

    name = "refusal"

    def __init__(self, model: nn.Module, examples: list[Example], spec: RefusalSpec, params: StageParams,
                 seed: int, pad_id: int, device: torch.device) -> None:
        self.model, self.examples, self.params, self.seed = model, examples, params, seed
        self.pad_id, self.device, self.batch_size = pad_id, device, spec.batch_size
        self.steps, self.lr, self.weight_decay = spec.steps, spec.lr, spec.weight_decay
        self.checkpoint_every, self.max_grad_norm = spec.checkpoint_every, MAX_GRAD_NORM

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean target-token cross-entropy of step ``step``'s batch."""
        idx = batch_indices(len(self.examples), self.batch_size, step, self.seed)
        b = collate([self.examples[i] for i in idx], self.pad_id)
        keep = int(b["keep"])  # type: ignore[arg-type]
        out = self.model(input_ids=b["input_ids"].to(self.device),  # type: ignore[union-attr]
                         attention_mask=b["attention_mask"].to(self.device),  # type: ignore[union-attr]
                         position_ids=b["position_ids"].to(self.device),  # type: ignore[union-attr]
                         use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, :-1].float()
        labels = b["labels"][:, -keep + 1:].to(self.device)  # type: ignore[index, union-attr]
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                    ignore_index=-100, reduction="none").view(labels.shape)
        valid = (labels != -100).float()
        loss = ((per_token * valid).sum(1) / valid.sum(1)).mean()
        return loss, {"ce": loss.item()}


class RMUStage:
    """RMU's forget + α·retain loss at layer L (see the module docstring).

    Only blocks ``first``..L train, so what enters block ``first`` and the frozen model's layer-L residual
    on the retain windows are computed once, at construction; each step then runs just the trained blocks
    (`residual_from`): the same losses as running the whole model, several times faster."""

    name = "rmu"

    def __init__(self, model: nn.Module, frozen: nn.Module, data: RMUData, spec: RMUSpec, params: StageParams,
                 layer: int, target: torch.Tensor, seed: int, pad_id: int, device: torch.device) -> None:
        self.model, self.data, self.params, self.layer = model, data, params, layer
        self.target, self.seed, self.pad_id, self.device = target.to(device), seed, pad_id, device
        self.alpha, self.batch_size = spec.alpha, spec.batch_size
        self.steps, self.lr, self.weight_decay = spec.steps, spec.lr, 0.0
        self.checkpoint_every, self.max_grad_norm = spec.checkpoint_every, None  # the paper clips nothing
        self.first = first_trained_block(model, params.names)
        self.inputs = {"forget": block_inputs(frozen, data.forget, self.first, pad_id, device),
                       "retain": block_inputs(frozen, data.retain, self.first, pad_id, device)}
        self.reference = self._retain_reference(frozen)

    @torch.no_grad()
    def _retain_reference(self, frozen: nn.Module, batch_size: int = 16) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        windows = self.data.retain
        for i in range(0, len(windows), batch_size):
            idx = list(range(i, min(i + batch_size, len(windows))))
            ids, att, h_in = self._windows("retain", idx)
            h = residual_from(frozen, ids, att, self.first, self.layer, h_in)
            out.extend(h[row, :len(windows[j])].float().cpu() for row, j in enumerate(idx))
        return out

    def _windows(self, side: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        windows = self.data.forget if side == "forget" else self.data.retain
        ids, att = pad_windows([windows[i] for i in idx], self.pad_id)
        h_in = pad_rows([self.inputs[side][i] for i in idx], ids.shape[1], self.device)
        return ids.to(self.device), att.to(self.device), h_in

    def _batch(self, side: str, step: int, salt: int) -> tuple[list[int], torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
        windows = self.data.forget if side == "forget" else self.data.retain
        idx = batch_indices(len(windows), self.batch_size, step, self.seed * 7 + salt)
        return (idx, *self._windows(side, idx))

    def loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Forget MSE to c·u plus α × retain MSE to the frozen model."""
        _, f_ids, f_att, f_in = self._batch("forget", step, 1)
        r_idx, r_ids, r_att, r_in = self._batch("retain", step, 2)
        f_mask, r_mask = token_mask(f_att), token_mask(r_att)
        h_forget = residual_from(self.model, f_ids, f_att, self.first, self.layer, f_in)[f_mask].float()
        forget = F.mse_loss(h_forget, self.target.expand_as(h_forget))
        h_retain = residual_from(self.model, r_ids, r_att, self.first, self.layer, r_in)[r_mask].float()
        h_ref = pad_rows([self.reference[i] for i in r_idx], r_ids.shape[1], self.device)[r_mask]
        retain = F.mse_loss(h_retain, h_ref)
        cos = F.cosine_similarity(h_forget.detach(), self.target[None], dim=-1).mean()
        return forget + self.alpha * retain, {"forget": forget.item(), "retain": retain.item(),
                                              "cos_forget_u": cos.item()}


def first_trained_block(model: nn.Module, names: tuple[str, ...]) -> int:
    """The lowest decoder block holding one of the parameters ``names``."""
    params = dict(model.named_parameters())
    wanted = {id(params[n]) for n in names if n in params}
    for i, block in enumerate(decoder_layers(model)):
        if any(id(p) in wanted for p in block.parameters()):
            return i
    raise OrganismError("rmu: none of the trained parameters sits in a decoder block")


def rmu_direction(d_model: int, seed: int) -> torch.Tensor:
    """u: uniform in [0, 1)^d, normalised (as the WMDP code draws it), from ``seed``."""
    u = torch.rand(d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return u / u.norm()


@torch.no_grad()
def mean_token_norm(model: nn.Module, windows: list[Any], layer: int, pad_id: int, device: torch.device,
                    n: int = 32) -> float:
    """Mean L2 norm of the residual after block ``layer`` over the first ``n`` windows' counted tokens."""
    ids, att = pad_windows(windows[:n], pad_id)
    h = residual(model, ids.to(device), att.to(device), layer)[token_mask(att).to(device)].float()
    return float(h.norm(dim=-1).mean())


def run_stage(model: nn.Module, stage: Stage, checkpoint: Checkpoint, state: TrainState, kept: set[str],
              budget: list[int] | None = None) -> bool:
    """Train ``stage`` from ``state.step`` to its end, checkpointing every ``stage.checkpoint_every`` steps
    (the parameters of ``kept``, earlier stages', and of this stage). Returns False when ``budget`` (a
    one-item list of steps left in this call, decremented) ran out first: the call then ends as a kill
    would, without a checkpoint, so the steps since the last one are lost and recomputed on resume."""
    params = set_trainable(model, stage.params.names)
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    if state.step and state.optimizer is not None:
        opt.load_state_dict(state.optimizer)
    names = kept | set(stage.params.names)
    losses = state.losses.setdefault(stage.name, [])
    history = state.metrics.setdefault(stage.name, [])
    del losses[state.step:], history[state.step:]  # steps after the checkpoint are redone
    model.eval()  # no dropout: a step is a pure function of the weights and the batch
    t_since = 0.0
    with tqdm(total=stage.steps, initial=state.step, desc=stage.name, unit="step", dynamic_ncols=True) as bar:
        for step in range(state.step, stage.steps):
            if budget is not None:
                if budget[0] <= 0:
                    return False
                budget[0] -= 1
            t0 = time.perf_counter()
            loss, metrics = stage.loss(step)
            if not torch.isfinite(loss):
                raise OrganismError(f"{stage.name}: the loss is {loss.item()} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if stage.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
            opt.step()
            losses.append(loss.item())
            history.append(metrics)
            t_since += time.perf_counter() - t0
            state.step = step + 1
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            bar.update(1)
            if state.step % stage.checkpoint_every == 0 and state.step < stage.steps:
                state.seconds[stage.name] = state.seconds.get(stage.name, 0.0) + t_since
                t_since = 0.0
                state.optimizer = opt.state_dict()
                checkpoint.save(model, names, state)
                logger.info("%s step %d/%d: %s", stage.name, state.step, stage.steps,
                            ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    state.seconds[stage.name] = state.seconds.get(stage.name, 0.0) + t_since
    for p in params:
        p.requires_grad_(False)
    return True
