"""`bra-sae fit`: train the contrastive TopK SAE by streaming a store; checkpoints, metrics, resume."""

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
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from bra.cache.store import Store, open_store
from bra.dist import SINGLE, Dist
from bra.errors import SAEError
from bra.sae import losses
from bra.sae.config import TrainConfig
from bra.sae.data import TrainingData, check_finite, rank_shards, train_batches, training_data
from bra.sae.formats import load_safetensors
from bra.sae.model import ForwardOutput, SAEConfig, TopKSAE

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"
CKPT_WEIGHTS = "sae.safetensors"
CKPT_STATE = "trainer_state.pt"
SPLIT_FILE = "split.json"
SAELENS_DIR = "sae"


class StepOutput(NamedTuple):
    """Loss terms and metrics of one optimizer step (floats)."""

    loss: float
    recon: float
    l1: float
    auxk: float
    contrastive: float
    l0: float


@dataclass
class TrainerState:
    """Mutable training state that a checkpoint must carry."""

    step: int
    """Optimizer steps done."""
    tokens_since_fired: torch.Tensor
    """[d_sae] int64 training tokens since each latent last fired."""
    fired_window: torch.Tensor
    """[d_sae] int64 fires since the last metrics line (dense fraction)."""


def _contrastive_features(z: torch.Tensor, hazard: torch.Tensor, doc: torch.Tensor,
                          cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Profiles and binary labels entering the tier term: strided token rows, or per-document means."""
    if cfg.contrastive_level == "token":
        stride = max(1, z.shape[0] // cfg.contrastive_rows)
        return z[::stride][:cfg.contrastive_rows], hazard[::stride][:cfg.contrastive_rows]
    uniq, inv = torch.unique(doc, return_inverse=True)
    sums = torch.zeros(len(uniq), z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, inv, z)
    counts = torch.zeros(len(uniq), dtype=z.dtype, device=z.device).index_add_(
        0, inv, torch.ones_like(inv, dtype=z.dtype))
    labels = torch.zeros(len(uniq), dtype=hazard.dtype, device=z.device).scatter_(0, inv, hazard)
    return (sums / counts[:, None])[:cfg.contrastive_rows], labels[:cfg.contrastive_rows]


def train_step(sae: TopKSAE, opt: torch.optim.Optimizer, x: torch.Tensor, hazard: torch.Tensor,
               doc: torch.Tensor, state: TrainerState, cfg: TrainConfig, k_aux: int,
               forward: Callable[[torch.Tensor], ForwardOutput] | None = None,
               dist: Dist = SINGLE) -> StepOutput:
    """One optimizer step on a batch: losses, backward, decoder-gradient projection, step, renormalise.

    Distributed (``forward`` = the DDP-wrapped ``sae``): ``x`` is this rank's part of the global batch, DDP
    averages the gradients during ``backward``, so the projection, the step and the renormalisation that
    follow are the same arithmetic on the same numbers on every rank and the replicas stay identical. The
    firing counts behind the dead-latent mask are summed over ranks, so every rank uses one mask.
    """
    s = sae.cfg.input_scale
    out = (forward or sae)(x)
    x_s, x_hat_s = x * s, out.x_hat * s
    recon = losses.normalized_mse(x_hat_s, x_s)
    total = cfg.recon_coef * recon
    l1 = losses.l1_sparsity(out.z) if cfg.l1_coef else torch.zeros(())
    total = total + cfg.l1_coef * l1
    auxk = torch.zeros(())
    if cfg.auxk_coef:
        dead = state.tokens_since_fired >= cfg.dead_tokens
        auxk = losses.auxk_loss(x_s, x_hat_s, out.pre_acts, sae.W_dec, dead.to(x.device), k_aux)
        total = total + cfg.auxk_coef * auxk
    con = torch.zeros(())
    if cfg.contrastive != "none" and cfg.contrastive_coef:
        feats, labels = _contrastive_features(out.z, hazard, doc, cfg)
        con = (losses.nt_xent_tier_loss(feats, labels, cfg.temperature) if cfg.contrastive == "ntxent"
               else losses.cosine_tier_separation(feats, labels))
        total = total + cfg.contrastive_coef * con
    opt.zero_grad(set_to_none=True)
    total.backward()
    sae.remove_gradient_parallel_to_decoder_directions_()
    opt.step()
    sae.set_decoder_norm_to_unit_norm_()
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64).index_add_(
        0, out.top_indices[out.top_values > 0].cpu(),
        torch.ones((out.top_values > 0).sum().item(), dtype=torch.int64))
    if dist.active:
        fired = dist.all_sum_(fired.to(x.device)).cpu()
    state.fired_window += fired
    state.tokens_since_fired += x.shape[0] * dist.world
    state.tokens_since_fired[fired > 0] = 0
    state.step += 1
    return StepOutput(*(float(t.detach()) for t in (total, recon, l1, auxk, con, losses.l0(out.z))))


def _save_checkpoint(out: Path, sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainerState) -> None:
    """Write weights + trainer state into a temp dir, then swap it in (never a half checkpoint)."""
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()},
                  str(tmp / CKPT_WEIGHTS))
        torch.save({"step": state.step, "optimizer": opt.state_dict(),
                    "tokens_since_fired": state.tokens_since_fired, "fired_window": state.fired_window},
                   tmp / CKPT_STATE)
    except BaseException:  # e.g. disk full: leave no half checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = out / CHECKPOINT_DIR
    old = out / f".{CHECKPOINT_DIR}.old"
    if final.exists():  # else .old may be the only complete checkpoint (a kill between the renames below)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _checkpoint_dir(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    A kill between the two renames of _save_checkpoint leaves only the previous checkpoint, in .old;
    resuming from it is exact too (the data order is replayed from the seed)."""
    found = [d for d in (out / CHECKPOINT_DIR, out / f".{CHECKPOINT_DIR}.old")
             if (d / CKPT_STATE).is_file() and (d / CKPT_WEIGHTS).is_file()]
    return found[0] if found else None


def _load_checkpoint(out: Path, sae: TopKSAE, opt: torch.optim.Optimizer) -> TrainerState:
    ckpt = _checkpoint_dir(out)
    if ckpt is None:
        raise SAEError(f"--resume: no checkpoint in {out}")
    try:
        sae.load_state_dict(load_safetensors(ckpt / CKPT_WEIGHTS))
        blob = torch.load(ckpt / CKPT_STATE, map_location="cpu", weights_only=True)
        opt.load_state_dict(blob["optimizer"])
        return TrainerState(int(blob["step"]), blob["tokens_since_fired"], blob["fired_window"])
    except pickle.UnpicklingError:
        raise SAEError(f"refusing checkpoint {ckpt / CKPT_STATE}: it contains pickled code "
                       f"(weights_only=True)") from None
    except (RuntimeError, EOFError, KeyError, TypeError, ValueError, OSError) as exc:  # truncated or foreign
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SAEError(f"--resume: checkpoint in {ckpt} is unreadable ({first})") from None


def _run_record(store: Store, data: TrainingData, cfg: TrainConfig, sae_cfg: SAEConfig) -> dict[str, Any]:
    return {"train_config": cfg.to_dict(), "sae_config": sae_cfg.to_dict(), "store": str(store.path),
            "store_manifest_hash": store.meta.manifest_hash, "layer": data.layer,
            "input_scale": data.input_scale}


def _prepare_out(out: Path, record: dict[str, Any], cfg: TrainConfig, resume: bool) -> None:
    run_file = out / RUN_FILE
    if resume:
        if not run_file.is_file():
            raise SAEError(f"--resume: {out} holds no run to resume ({RUN_FILE} missing)")
        try:
            saved = json.loads(run_file.read_text())
            diff = cfg.differences(saved["train_config"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SAEError(f"--resume: {run_file} is unreadable ({type(exc).__name__}: {exc})") from None
        if saved.get("store_manifest_hash") != record["store_manifest_hash"]:
            diff.append("store")
        if saved.get("world_size", 1) != record.get("world_size", 1):  # each rank replays its own data order
            diff.append(f"number of processes ({saved.get('world_size', 1)} before)")
        if diff:
            raise SAEError(f"--resume with different settings than the run in {out}: {', '.join(diff)}")
        return
    if out.exists() and any(out.iterdir()):
        raise SAEError(f"output directory {out} is not empty; pass --resume to continue that run or choose "
                       f"another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(run_file, record)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so the curve continues without a gap."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if _metrics_step(ln) <= step]
    tmp = path.with_name(f".{path.name}.tmp")  # atomic: a kill here must not lose the earlier lines
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def _metrics_step(line: str) -> float:
    """The step of a metrics line; a blank or torn line (a kill mid-write) sorts after every step."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def resolve_device(name: str) -> torch.device:
    """auto → CUDA when present."""
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


def fit(store_path: str | Path, out: str | Path, cfg: TrainConfig, resume: bool = False,
        stop_at: int | None = None, dist: Dist = SINGLE) -> TopKSAE:
    """Train an SAE on ``store_path`` (a folder or a URL) into ``out``; returns the trained SAE (input scale
    not folded).

    ``stop_at`` ends this invocation after that step with a checkpoint and no export, as an interruption
    would (a later ``resume=True`` call continues the same run). Under torchrun every rank calls this with
    its ``dist``: each reads its own shards (``rank_shards``) for its ``batch_size / world`` rows of every
    step, DDP averages the gradients, and rank 0 alone writes ``out`` (which must be one shared folder).
    """
    store = open_store(store_path)
    out = Path(out)
    data = training_data(store, cfg.layer, cfg.heldout_fraction, cfg.seed, cfg.shuffle_tiers)
    device = resolve_device(cfg.device)
    if dist.active:
        if device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        if cfg.batch_size % dist.world or cfg.batch_size // dist.world < 2:
            raise SAEError(f"batch_size {cfg.batch_size} must split into {dist.world} equal per-process "
                           f"batches of at least 2 rows")
    sae_cfg = SAEConfig(d_model=store.d_model, d_sae=cfg.d_sae, k=cfg.k,
                        model_name=store.meta.model_id,
                        hook_name=f"blocks.{data.layer}.hook_resid_post", layer=data.layer,
                        input_scale=data.input_scale,
                        store_fingerprint=store.meta.manifest_hash)
    record = {**_run_record(store, data, cfg, sae_cfg), "world_size": dist.world}
    dist.on_main(lambda: _prepare_out(out, record, cfg, resume))
    torch.manual_seed(cfg.seed)
    sae = TopKSAE.init_random(sae_cfg, cfg.seed, torch.as_tensor(data.mean, dtype=torch.float32)).to(device)
    opt = torch.optim.AdamW(sae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    state = TrainerState(0, torch.zeros(cfg.d_sae, dtype=torch.int64),
                         torch.zeros(cfg.d_sae, dtype=torch.int64))
    if resume and _checkpoint_dir(out) is not None:
        state = _load_checkpoint(out, sae, opt)
        if dist.is_main:
            _truncate_metrics(out / METRICS_FILE, state.step)
        logger.info("resuming %s at step %d", out, state.step)
    elif dist.is_main:
        if resume:  # stopped before its first checkpoint: nothing to keep, start over in place
            logger.info("%s has no checkpoint yet; starting from step 0", out)
            _truncate_metrics(out / METRICS_FILE, 0)
        _write_json(out / SPLIT_FILE, {"heldout_fraction": cfg.heldout_fraction, "seed": cfg.seed,
                                       "heldout_doc_ids": [d for d, h in zip(data.doc_ids, data.heldout,
                                                                             strict=True) if h]})
    _train_loop(sae, opt, state, store, data, cfg, out, device, stop_at, dist)
    if state.step >= cfg.steps and dist.is_main:
        _finish(sae, out)
    dist.barrier()  # the run directory is complete when any rank returns
    return sae


def _train_loop(sae: TopKSAE, opt: torch.optim.Optimizer, state: TrainerState, store: Store,
                data: TrainingData, cfg: TrainConfig, out: Path, device: torch.device,
                stop_at: int | None = None, dist: Dist = SINGLE) -> None:
    if state.step >= min(cfg.steps, stop_at or cfg.steps):
        return  # a finished run: nothing to replay
    k_aux = cfg.k_aux or max(1, store.d_model // 2)
    shards = rank_shards(store.layout.n_shards, dist.rank, dist.world) if dist.active else None
    batches = train_batches(store, data, cfg.batch_size // dist.world, cfg.buffer_rows, cfg.seed,
                            cfg.balanced, shards=shards)
    forward = None
    if dist.active:  # DDP all-reduces (averages) the gradients inside backward()
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(sae, device_ids=[device.index] if device.type == "cuda" else None)
    for _ in range(state.step):  # the data order is a pure function of the seed: replay it to resume
        next(batches)
    t0, tokens0 = time.perf_counter(), 0
    with (open(out / METRICS_FILE, "a", encoding="utf-8") if dist.is_main else nullcontext()) as log, \
            tqdm(total=cfg.steps, initial=state.step, desc="fit", unit="step", dynamic_ncols=True,
                 disable=True if not dist.is_main else None) as bar:
        while state.step < min(cfg.steps, stop_at or cfg.steps):
            batch, hazard = next(batches)
            check_finite(batch)
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(state.step)
            x = torch.from_numpy(batch.acts).to(device)
            res = train_step(sae, opt, x, torch.from_numpy(hazard.astype(np.int64)).to(device),
                             torch.from_numpy(batch.doc_index.astype(np.int64)).to(device), state, cfg, k_aux,
                             forward, dist)
            if not np.isfinite(res.loss):
                raise SAEError(f"loss became {res.loss} at step {state.step}; lower --lr")
            tokens0 += x.shape[0] * dist.world
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                if dist.active:  # the logged terms are the means over ranks (the loss DDP optimises)
                    terms = dist.all_sum_(torch.tensor(res, dtype=torch.float64, device=device)) / dist.world
                    res = StepOutput(*terms.tolist())
                rate = tokens0 / max(time.perf_counter() - t0, 1e-9)
                line = _metrics_line(res, state, cfg, sae, rate)
                if log is not None:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{res.loss:.4f}", fvu=f"{res.recon:.3f}", l0=f"{res.l0:.0f}",
                                dead=f"{line['dead_frac']:.2f}")
            due = state.step % cfg.checkpoint_every == 0 or state.step in (cfg.steps, stop_at)
            if due and dist.is_main:
                _save_checkpoint(out, sae, opt, state)


def _metrics_line(res: StepOutput, state: TrainerState, cfg: TrainConfig, sae: TopKSAE,
                  tokens_per_s: float) -> dict[str, Any]:
    window_tokens = cfg.batch_size * cfg.log_every
    freq = state.fired_window.double() / window_tokens
    state.fired_window.zero_()
    return {"step": state.step, "tokens": state.step * cfg.batch_size, "loss": res.loss, "recon": res.recon,
            "fvu": res.recon, "l1": res.l1, "auxk": res.auxk, "contrastive": res.contrastive, "l0": res.l0,
            "dead_frac": float(losses.dead_fraction((state.tokens_since_fired < cfg.dead_tokens).long())),
            "dense_frac": float(losses.dense_fraction(freq, threshold=0.1)),
            "tokens_per_s": round(tokens_per_s, 1), "lr": cfg.lr_at(state.step - 1)}


def _finish(sae: TopKSAE, out: Path) -> None:
    from bra.sae.formats import save_saelens, save_seed

    cpu = sae.to("cpu")
    save_saelens(cpu, out / SAELENS_DIR, overwrite=True)
    save_seed(cpu, out, overwrite=True)
    logger.info("saved SAE to %s (SAELens format in %s/, seed layout %s)", out, SAELENS_DIR, "sae_weights.pt")

