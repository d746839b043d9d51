"""`bra-sae fit`: train the contrastive TopK SAE by streaming a store into a run directory (run.json,
split.json, metrics.jsonl, checkpoints, the exported SAE); `--resume` continues a run exactly.

The loop itself is `bra.sae.trainer.Trainer`; this module prepares the run directory and the inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from bra.cache.store import Store, open_store
from bra.dist import SINGLE, Dist
from bra.errors import SAEError
from bra.fsutil import write_text_atomic
from bra.sae.config import TrainConfig
from bra.sae.data import TrainingData, check_finite, rank_shards, train_batches, training_data
from bra.sae.files import RUN_FILE, SAELENS_DIR  # noqa: F401 (re-exported)
from bra.sae.model import SAEConfig, TopKSAE
from bra.sae.trainer import (
    CHECKPOINT_DIR,
    CKPT_STATE,
    CKPT_WEIGHTS,
    METRICS_FILE,
    StoreInputs,
    Trainer,
    find_checkpoint,
)

__all__ = ["CHECKPOINT_DIR", "CKPT_STATE", "CKPT_WEIGHTS", "METRICS_FILE", "RUN_FILE", "SAELENS_DIR",
           "SPLIT_FILE", "fit", "initial_sae", "resolve_device"]

logger = logging.getLogger(__name__)

"""Settings of the run (a --resume with other settings is refused)."""
SPLIT_FILE = "split.json"
"""The held-out documents."""
INIT_ROWS = 4096
"""Training rows the encoder's initial scale is fitted on (``encoder_init`` fitted)."""
INIT_STREAM = 0x696E6974
"""Added to the seed of the stream those rows come from, so that it is a stream of its own."""


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
        if saved.get("world_size", 1) != record.get("world_size", 1):  # each rank has its own data order
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
    write_text_atomic(path, json.dumps(data, indent=2))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so the curve continues without a gap."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if _metrics_step(ln) <= step]
    write_text_atomic(path, "".join(ln + "\n" for ln in lines))  # a kill here must not lose earlier lines


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
    ckpt = dist.on_main(lambda: find_checkpoint(out, promote=True)) if resume else None
    # a checkpoint replaces the weights: its fit needs no sample rows
    sae, scale = initial_sae(store, data, sae_cfg, cfg, device, fit_scale=ckpt is None)
    if ckpt is None:
        logger.info("encoder init %s (scale %.4g)", cfg.encoder_init, scale)
    shards = rank_shards(store.layout.n_shards, dist.rank, dist.world) if dist.active else None
    # on a GPU the cores are free to decode: the step would wait on one reader loop (ReaderConfig.own_loops)
    batches = train_batches(store, data, cfg.batch_size // dist.world, cfg.stream.buffer_rows, cfg.seed,
                            cfg.balanced, shards=shards, own_loops=device.type != "cpu")
    try:
        trainer = Trainer(sae, StoreInputs(batches, device), cfg, dist=dist, out=out)
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
            if dist.is_main:
                _truncate_metrics(out / METRICS_FILE, trainer.state.step)
            logger.info("resuming %s at step %d", out, trainer.state.step)
        elif dist.is_main:
            _start_run(out, data, cfg, resume)
        trainer.fit(stop_at)
    finally:
        batches.close()
    if trainer.state.step >= cfg.steps and dist.is_main:
        _finish(sae, out)
    dist.barrier()  # the run directory is complete when any rank returns
    return sae


def initial_sae(store: Store, data: TrainingData, sae_cfg: SAEConfig, cfg: TrainConfig,
                device: torch.device, fit_scale: bool = True) -> tuple[TopKSAE, float]:
    """The SAE a fit starts from, on ``device``, and its encoder scale: the TopK-paper init
    (`TopKSAE.init_random`), with ``encoder_init`` fitted its encoder scaled by least squares on
    ``INIT_ROWS`` training rows (`TopKSAE.fit_encoder_scale_`; never held-out rows). The rows come from a
    stream of their own over the whole store, so every rank of a distributed fit gets the same SAE and the
    training batches are those of a transpose init. ``fit_scale`` False: the transpose init whatever the
    config says (the weights are about to come from a checkpoint)."""
    torch.manual_seed(cfg.seed)
    sae = TopKSAE.init_random(sae_cfg, cfg.seed, torch.as_tensor(data.mean, dtype=torch.float32)).to(device)
    if cfg.encoder_init == "transpose" or not fit_scale:
        return sae, 1.0
    sample = train_batches(store, data, INIT_ROWS, 2 * INIT_ROWS, cfg.seed + INIT_STREAM, balanced=False)
    try:
        batch, _ = next(sample)
    finally:
        sample.close()
    check_finite(batch)
    return sae, sae.fit_encoder_scale_(torch.from_numpy(batch.acts).to(device))


def _start_run(out: Path, data: TrainingData, cfg: TrainConfig, resume: bool) -> None:
    """Step 0 of a run: record the split (a --resume of a run stopped before its first checkpoint
    starts over in place)."""
    if resume:
        logger.info("%s has no checkpoint yet; starting from step 0", out)
        _truncate_metrics(out / METRICS_FILE, 0)
    _write_json(out / SPLIT_FILE, {"heldout_fraction": cfg.heldout_fraction, "seed": cfg.seed,
                                   "heldout_doc_ids": [d for d, h in zip(data.doc_ids, data.heldout,
                                                                         strict=True) if h]})


def _finish(sae: TopKSAE, out: Path) -> None:
    from bra.sae.formats import save_saelens, save_seed

    cpu = sae.to("cpu")
    save_saelens(cpu, out / SAELENS_DIR, overwrite=True)
    save_seed(cpu, out, overwrite=True)
    logger.info("saved SAE to %s (SAELens format in %s/, seed layout %s)", out, SAELENS_DIR, "sae_weights.pt")

