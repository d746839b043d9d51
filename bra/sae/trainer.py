"""The training loop of `bra-sae fit`, in the shape of SAELens `SAETrainer`: a `Trainer` built from an SAE,
a data provider and the config, whose short `fit` calls `_train_step`, `_log_train_step` and
`_checkpoint_if_needed`; checkpoints are one paired `save_checkpoint` / `load_checkpoint`.

The step never waits for the device: loss terms, the dead-latent counters and the non-finite-loss flag stay
on it and are copied to the host only at log and checkpoint steps (a test runs steps on the meta device,
where any read raises). One exception: the document-level tier term (``contrastive_level="document"``)
groups rows with ``torch.unique``, whose output size the host must learn.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bra.dist import SINGLE, Dist
from bra.errors import SAEError
from bra.fsutil import atomic_dir, sweep_leftovers
from bra.sae import losses
from bra.sae.config import TrainConfig
from bra.sae.data import TrainBatches, check_finite
from bra.sae.formats import load_safetensors
from bra.sae.model import ForwardOutput, TopKSAE

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""One JSON line per log step, in the run directory."""
CHECKPOINT_DIR = "checkpoint"
"""The newest complete checkpoint, in the run directory."""
CKPT_WEIGHTS = "sae.safetensors"
"""SAE weights inside a checkpoint (input scale not folded)."""
CKPT_STATE = "trainer_state.pt"
"""Optimizer, step, dead-latent counters and data position inside a checkpoint (``weights_only`` load)."""
LEGACY_TMP, LEGACY_OLD = f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old"
"""Temp and previous checkpoint folders of runs made before `bra.fsutil.atomic_dir` wrote checkpoints."""


class TrainInput(NamedTuple):
    """One step's batch, as tensors on the training device."""

    x: torch.Tensor
    """[B, d_model] float32 activations."""
    hazard: torch.Tensor
    """[B] int64 1 for rows of hazard documents, else 0."""
    doc: torch.Tensor
    """[B] int64 document index of each row."""


class DataProvider(Protocol):
    """What a `Trainer` reads batches from; `StoreInputs` also has ``position`` and ``seek``."""

    def __next__(self) -> TrainInput: ...


class TrainStepOutput(NamedTuple):
    """Loss terms and metrics of one optimizer step: 0-d tensors on the device, not yet synced."""

    loss: torch.Tensor
    """Weighted total."""
    recon: torch.Tensor
    """Normalised MSE (FVU) of the reconstruction."""
    l1: torch.Tensor
    """L1 sparsity term (0 when off)."""
    auxk: torch.Tensor
    """AuxK dead-latent term (0 when off or no latent is dead)."""
    contrastive: torch.Tensor
    """Tier-separation term (0 when off)."""
    l0: torch.Tensor
    """Mean active latents per row."""


@dataclass
class TrainerState:
    """Mutable training state that a checkpoint must carry (counters on the training device)."""

    step: int
    """Optimizer steps done."""
    tokens_since_fired: torch.Tensor
    """[d_sae] int64 training tokens since each latent last fired."""
    fired_window: torch.Tensor
    """[d_sae] int64 fires since the last metrics line (dense fraction)."""

    @classmethod
    def fresh(cls, d_sae: int, device: torch.device | str = "cpu") -> TrainerState:
        """Step 0, every counter 0."""
        return cls(0, torch.zeros(d_sae, dtype=torch.int64, device=device),
                   torch.zeros(d_sae, dtype=torch.int64, device=device))


class StoreInputs:
    """`TrainBatches` as `TrainInput`s on ``device``, refusing NaN/inf rows; its position is the batches'."""

    def __init__(self, batches: TrainBatches, device: torch.device):
        self.batches = batches
        self.device = device

    def __iter__(self) -> StoreInputs:
        return self

    def __next__(self) -> TrainInput:
        batch, hazard = next(self.batches)
        check_finite(batch)
        return TrainInput(torch.from_numpy(batch.acts).to(self.device),
                          torch.from_numpy(hazard.astype(np.int64)).to(self.device),
                          torch.from_numpy(batch.doc_index.astype(np.int64)).to(self.device))

    def position(self) -> dict[str, Any]:
        """See `TrainBatches.position`."""
        return self.batches.position()

    def seek(self, position: dict[str, Any]) -> None:
        """See `TrainBatches.seek`."""
        self.batches.seek(position)


def contrastive_features(z: torch.Tensor, hazard: torch.Tensor, doc: torch.Tensor, cfg: TrainConfig,
                         step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Profiles and binary labels entering the tier term: strided token rows, or per-document means.

    With more documents in the batch than ``cfg.contrastive_rows``, the documents kept are a random subset
    balanced between the two labels (`balanced_subset`), drawn from ``cfg.seed`` and ``step`` so that a
    resumed run draws what an uninterrupted one did. Keeping the first ones would keep the lowest document
    indices, which are tier-contiguous in a store: one label only, and NT-Xent returns 0."""
    if cfg.contrastive_level == "token":
        stride = max(1, z.shape[0] // cfg.contrastive_rows)
        return z[::stride][:cfg.contrastive_rows], hazard[::stride][:cfg.contrastive_rows]
    uniq, inv = torch.unique(doc, return_inverse=True)
    sums = torch.zeros(len(uniq), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, inv, z)
    counts = torch.zeros(len(uniq), dtype=z.dtype, device=z.device).index_add_(
        0, inv, torch.ones_like(inv, dtype=z.dtype))
    labels = torch.zeros(len(uniq), dtype=hazard.dtype, device=z.device).scatter_(0, inv, hazard)
    means = sums / counts[:, None]
    if len(uniq) <= cfg.contrastive_rows:
        return means, labels
    pick = balanced_subset(labels, cfg.contrastive_rows, subset_generator(cfg.seed, step))
    return means[pick], labels[pick]


CONTRASTIVE_STREAM = 0x636F6E74
"""Mixed into the seed of the contrastive document subset, so that it is a stream of its own."""


def subset_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for step ``step`` of a run seeded ``seed`` (the same on every device and resume)."""
    state = np.random.SeedSequence([seed % 2**32, step, CONTRASTIVE_STREAM]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def balanced_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n] indices into ``labels`` (0/1, n <= len): n // 2 drawn at random among the 1s and the rest among
    the 0s, the short side's shortfall filled from the other (each label present keeps >= 1 when n >= 2).

    Computed on the labels' device with no host sync: random keys sort each label's entries, a quota per
    label says how many of its first entries to keep."""
    lab = labels.long()
    keys = torch.rand(len(lab), generator=generator).to(lab.device)
    order = torch.argsort(lab.to(keys.dtype) * 2 + keys)  # the 0s first, each label in random order
    lab_sorted = lab[order]
    c1 = lab.sum()
    c0 = len(lab) - c1
    rank = torch.arange(len(lab), device=lab.device) - lab_sorted * c0  # position within its label
    q1 = torch.minimum(c1, torch.clamp(n - c0, min=n // 2))  # max(n // 2, n - c0), at most c1
    chosen = rank < torch.where(lab_sorted == 1, q1, n - q1)
    return order[torch.argsort((~chosen).to(torch.int8), stable=True)[:n]]


class Trainer:
    """Trains ``sae`` on batches from ``data``; logs to and checkpoints into ``out`` (rank 0; None: neither).
    ``fit`` may be called again with a later ``stop_at`` to continue (the bench times steps that way).

    Distributed (``dist.active``): every rank builds one with its own data; DDP averages the gradients in
    ``backward``, so the projection, the step and the renormalisation that follow are the same arithmetic
    on the same numbers on every rank and the replicas stay identical. Firing counts behind the dead-latent
    mask are summed over ranks, so every rank uses one mask.
    """

    def __init__(self, sae: TopKSAE, data: DataProvider, cfg: TrainConfig,
                 optimizer: torch.optim.Optimizer | None = None, dist: Dist = SINGLE,
                 out: Path | None = None, progress: bool = True):
        self.sae, self.data, self.cfg, self.dist, self.out = sae, data, cfg, dist, out
        self.progress = progress and dist.is_main  # a tqdm bar (on a terminal)
        self.device = sae.W_dec.device
        # fused: one kernel per parameter instead of a dozen elementwise passes (on 2 CPU cores the
        # for-loop AdamW step cost more than the SAE's forward and backward at d_model 64); the same update
        # to float rounding
        fused = self.device.type in ("cpu", "cuda") and sae.W_dec.dtype in (torch.float32, torch.float16,
                                                                             torch.bfloat16, torch.float64)
        self.opt = optimizer or torch.optim.AdamW(sae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                  betas=(0.9, 0.999), fused=fused or None)
        self.state = TrainerState.fresh(sae.cfg.d_sae, self.device)
        self.k_aux = cfg.k_aux or max(1, sae.cfg.d_model // 2)
        self.forward: Callable[[torch.Tensor], ForwardOutput] = sae
        if dist.active:  # DDP all-reduces (averages) the gradients inside backward()
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward = DistributedDataParallel(sae, device_ids=ids)
        self._replay = 0  # batches to skip before the next step (a checkpoint without a data position)
        # host-side upper bound of tokens_since_fired (tokens trained since step 0): no latent is dead below
        # dead_tokens, so AuxK needs no look at the counters until then
        self._since_fired_bound = 0
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)  # step of a non-finite
        self._bad_loss = torch.zeros((), device=self.device)  # loss, and that loss (checked when syncing)

    def fit(self, stop_at: int | None = None) -> TopKSAE:
        """Train to ``cfg.steps`` (or to ``stop_at``, then checkpoint, as an interruption would)."""
        cfg, state, dist = self.cfg, self.state, self.dist
        end = min(cfg.steps, stop_at or cfg.steps)
        if state.step >= end:
            return self.sae  # a finished run: nothing to replay
        for _ in range(self._replay):  # an old checkpoint: the data order is a function of the seed
            next(self.data)
        self._replay = 0
        log_to = self.out / METRICS_FILE if self.out is not None and dist.is_main else None
        t0, tokens = time.perf_counter(), 0
        with (open(log_to, "a", encoding="utf-8") if log_to is not None else nullcontext()) as log, \
                tqdm(total=cfg.steps, initial=state.step, desc="fit", unit="step", dynamic_ncols=True,
                     disable=True if not self.progress else None) as bar:
            while state.step < end:
                batch = next(self.data)
                for group in self.opt.param_groups:
                    group["lr"] = cfg.lr_at(state.step)
                output = self._train_step(batch)
                tokens += batch.x.shape[0] * dist.world
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    self._log_train_step(output, tokens / max(time.perf_counter() - t0, 1e-9), log, bar)
                self._checkpoint_if_needed(stop_at)
        self._raise_if_not_finite()
        return self.sae

    def _train_step(self, batch: TrainInput) -> TrainStepOutput:
        """One optimizer step: losses, backward, decoder-gradient projection, step, renormalise, counters.

        The reconstruction comes from the k kept latents (`TopKSAE.decode_sparse`); the dense [B, d_sae]
        latents are built only for the tier term, which profiles them. L1 and L0 read the kept values
        (z's only nonzero entries). AuxK is skipped while no latent can be dead yet (fewer training tokens
        so far than ``dead_tokens``); after that it never syncs with an accelerator (`losses.auxk_loss`)."""
        sae, cfg, state = self.sae, self.cfg, self.state
        x = batch.x
        out = self.forward(x, sparse=True)
        values, indices = out.top_values, out.top_indices
        zero = torch.zeros((), device=x.device)
        recon = losses.normalized_mse(out.x_hat, x)  # scale-invariant: the same in the scaled space
        total = cfg.recon_coef * recon
        l1 = values.abs().sum(dim=-1).mean() if cfg.l1_coef else zero  # = losses.l1_sparsity(z)
        total = total + cfg.l1_coef * l1
        auxk = zero
        if cfg.auxk_coef and self._since_fired_bound >= cfg.dead_tokens:
            s = sae.cfg.input_scale
            dead = state.tokens_since_fired >= cfg.dead_tokens
            # on the CPU reading the count is free and spares the aux top-k while nothing is dead; on an
            # accelerator it would stall the step, and auxk_loss masks itself to 0 instead
            if self.device.type != "cpu" or bool(dead.any()):
                auxk = losses.auxk_loss(x * s, out.x_hat * s, out.pre_acts, sae.W_dec, dead, self.k_aux)
                total = total + cfg.auxk_coef * auxk
        con = zero
        if cfg.contrastive != "none" and cfg.contrastive_coef:
            z = torch.zeros_like(out.pre_acts).scatter(-1, indices, values)
            feats, labels = contrastive_features(z, batch.hazard, batch.doc, cfg, state.step)
            con = (losses.nt_xent_tier_loss(feats, labels, cfg.temperature) if cfg.contrastive == "ntxent"
                   else losses.cosine_tier_separation(feats, labels))
            total = total + cfg.contrastive_coef * con
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        sae.remove_gradient_parallel_to_decoder_directions_()
        self.opt.step()
        sae.set_decoder_norm_to_unit_norm_()
        with torch.no_grad():
            kept = values > 0
            fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=x.device).index_add_(
                0, indices.reshape(-1), kept.reshape(-1).long())
            self.dist.all_sum_(fired)
            state.fired_window += fired
            state.tokens_since_fired += x.shape[0] * self.dist.world
            state.tokens_since_fired.masked_fill_(fired > 0, 0)
            self._since_fired_bound += x.shape[0] * self.dist.world
            state.step += 1
            bad = ~torch.isfinite(total.detach()) & (self._first_bad < 0)
            self._bad_loss = torch.where(bad, total.detach().float(), self._bad_loss)
            self._first_bad = torch.where(bad, state.step, self._first_bad)
            l0 = (values != 0).sum(dim=-1).float().mean()  # = losses.l0(z)
        return TrainStepOutput(total.detach(), recon.detach(), l1.detach(), auxk.detach(), con.detach(), l0)

    def _raise_if_not_finite(self) -> None:
        """Refuse to log or checkpoint after a NaN/inf loss (synced here, not in every step)."""
        step = int(self._first_bad)
        if step >= 0:
            raise SAEError(f"loss became {float(self._bad_loss)} at step {step}; lower --lr")

    def _log_train_step(self, output: TrainStepOutput, tokens_per_s: float, log: IO[str] | None,
                        bar: Any) -> None:
        """Sync the step's terms and the counters (once each) and write a metrics line."""
        self._raise_if_not_finite()
        cfg, state = self.cfg, self.state
        terms = torch.stack([t.to(torch.float64) for t in output])
        if self.dist.active:  # the logged terms are the means over ranks (the loss DDP optimises)
            terms = self.dist.all_sum_(terms) / self.dist.world
        res = dict(zip(TrainStepOutput._fields, terms.tolist(), strict=True))
        since_fired, window = torch.stack([state.tokens_since_fired, state.fired_window]).cpu()
        state.fired_window.zero_()
        freq = window.double() / (cfg.batch_size * cfg.log_every)
        line = {"step": state.step, "tokens": state.step * cfg.batch_size, "loss": res["loss"],
                "recon": res["recon"], "fvu": res["recon"], "l1": res["l1"], "auxk": res["auxk"],
                "contrastive": res["contrastive"], "l0": res["l0"],
                "dead_frac": float(losses.dead_fraction((since_fired < cfg.dead_tokens).long())),
                "dense_frac": float(losses.dense_fraction(freq, threshold=0.1)),
                "tokens_per_s": round(tokens_per_s, 1), "lr": cfg.lr_at(state.step - 1)}
        if log is not None:
            log.write(json.dumps(line) + "\n")
            log.flush()
        bar.set_postfix(loss=f"{res['loss']:.4f}", fvu=f"{res['recon']:.3f}", l0=f"{res['l0']:.0f}",
                        dead=f"{line['dead_frac']:.2f}")

    def _checkpoint_if_needed(self, stop_at: int | None) -> None:
        """Every ``checkpoint_every`` steps, at the end and at ``stop_at``: every rank's data position to rank
        0, which writes the checkpoint."""
        step = self.state.step
        due = step % self.cfg.checkpoint_every == 0 or step in (self.cfg.steps, stop_at)
        if self.out is None or not due:
            return
        self._raise_if_not_finite()
        position = getattr(self.data, "position", None)
        positions = self.dist.gather(position()) if position is not None else None
        if self.dist.is_main:
            self.save_checkpoint(self.out / CHECKPOINT_DIR, positions)

    def save_checkpoint(self, directory: Path, data_positions: list[dict[str, Any]] | None = None) -> None:
        """Weights (safetensors) and trainer state (``torch.save``: optimizer, step, counters, each rank's
        data position) into a temp folder, swapped in whole (`bra.fsutil.atomic_dir`: never half a
        checkpoint; a kill between its renames leaves the previous one, which `find_checkpoint` finds)."""
        state = {"step": self.state.step, "optimizer": self.opt.state_dict(),
                 "tokens_since_fired": self.state.tokens_since_fired.cpu(),
                 "fired_window": self.state.fired_window.cpu()}
        if data_positions is not None:
            state["data_position"] = data_positions
        with atomic_dir(directory) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.sae.state_dict().items()},
                      str(tmp / CKPT_WEIGHTS))
            torch.save(state, tmp / CKPT_STATE)

    def load_checkpoint(self, directory: Path) -> None:
        """Restore what `save_checkpoint` wrote, and the data position: a seek when the checkpoint has one
        for this rank, else (checkpoints from before data positions were saved) a replay of every batch."""
        try:
            self.sae.load_state_dict(load_safetensors(directory / CKPT_WEIGHTS))
            blob = torch.load(directory / CKPT_STATE, map_location="cpu", weights_only=True)
            self.opt.load_state_dict(blob["optimizer"])
            self.state = TrainerState(int(blob["step"]), blob["tokens_since_fired"].to(self.device),
                                      blob["fired_window"].to(self.device))
            self._since_fired_bound = int(self.state.tokens_since_fired.max())
            positions = blob.get("data_position")
        except pickle.UnpicklingError:
            raise SAEError(f"refusing checkpoint {directory / CKPT_STATE}: it contains pickled code "
                           f"(weights_only=True)") from None
        except (RuntimeError, EOFError, KeyError, TypeError, ValueError, OSError) as exc:  # truncated/foreign
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise SAEError(f"--resume: checkpoint in {directory} is unreadable ({first})") from None
        seek = getattr(self.data, "seek", None)
        if positions is not None and seek is not None and len(positions) == self.dist.world:
            seek(positions[self.dist.rank])
        else:
            self._replay = self.state.step


def find_checkpoint(out: Path, promote: bool = False) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    A kill between the two renames of a checkpoint swap leaves only the previous checkpoint, beside the
    run's ``checkpoint`` folder under a temp name (``.checkpoint.old-PID-…``, or ``.checkpoint.old`` in runs
    made before); resuming from it is exact too (its data position is that step's). ``promote`` renames it
    back to ``checkpoint``, so that the next checkpoint's sweep of dead processes' leftovers cannot remove
    the only complete one, and then removes those leftovers (and the old-style temp folders)."""
    final = out / CHECKPOINT_DIR
    previous = sorted(out.glob(f"{LEGACY_OLD}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    found = [d for d in (final, out / LEGACY_OLD, *previous)
             if (d / CKPT_STATE).is_file() and (d / CKPT_WEIGHTS).is_file()]
    if not found:
        return None
    if promote:
        if found[0] != final and not final.exists():
            logger.info("%s: the last checkpoint swap was interrupted; resuming from %s", out, found[0].name)
            os.replace(found[0], final)
            found[0] = final
        if found[0] == final:  # the other copies are leftovers of dead writers now
            sweep_leftovers(final)
            for legacy in (out / LEGACY_TMP, out / LEGACY_OLD):
                shutil.rmtree(legacy, ignore_errors=True)
    return found[0]
