"""Library calls behind the `bra-sae` commands: fit in a process group, load, describe, evaluate."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from bra.cache.store import Store, open_store
from bra.dist import process_group
from bra.errors import SAEError
from bra.fsutil import write_text_atomic
from bra.sae.config import TrainConfig
from bra.sae.evaluate import ce_loss_score, check_compatible, heldout_docs, reconstruction_metrics
from bra.sae.formats import SAELENS_CFG, SEED_WEIGHTS, load_sae
from bra.sae.model import TopKSAE
from bra.sae.train import fit, resolve_device

__all__ = ["describe", "evaluate", "load_any", "load_checked", "write_text_atomic"]

logger = logging.getLogger(__name__)


def fit_in_process_group(store_path: str | os.PathLike[str], out: str | os.PathLike[str], cfg: TrainConfig,
                         resume: bool = False) -> bool:
    """`bra-sae fit`: join the torchrun group the environment describes (none: one process; NCCL when
    training on CUDA, else gloo) and train; True in the main process (the one that reports)."""
    with process_group("nccl" if resolve_device(cfg.device).type == "cuda" else "gloo") as dist:
        fit(store_path, out, cfg, resume=resume, dist=dist)
    return dist.is_main


def load_any(path: str | os.PathLike[str]) -> TopKSAE:
    """Load an SAE from a fit run dir (its sae/ export), a SAELens dir, or a seed .pt file."""
    p = Path(path)
    if not p.exists():
        raise SAEError(f"no SAE at {p}")
    if p.is_dir() and (p / "sae" / SAELENS_CFG).is_file():
        p = p / "sae"
    elif p.is_dir() and not (p / SAELENS_CFG).is_file() and (p / SEED_WEIGHTS).is_file():
        p = p / SEED_WEIGHTS
    return load_sae(p)


def load_checked(path: str | os.PathLike[str], store: Store, layer: int | None,
                 what: str = "SAE") -> tuple[TopKSAE, int]:
    """Load an SAE and the store layer it reads (its own unless given); refuse a mismatched one."""
    sae = load_any(path)
    if layer is None:
        layer = sae.cfg.layer if sae.cfg.layer >= 0 else store.layers[0]
    if layer not in store.layers:
        raise SAEError(f"{what} {path}: layer {layer} is not in store {store.path} (it has {store.layers})")
    check_compatible(sae, store, layer)
    return sae.eval(), layer


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of an SAE."""
    sae = load_any(path)
    cfg = sae.cfg
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=-1)
    return {**cfg.to_dict(), "params": sum(p.numel() for p in sae.parameters()),
            "decoder_row_norm_mean": float(norms.mean()), "path": str(path)}


def evaluate(sae_path: str | os.PathLike[str], store_path: str | os.PathLike[str], layer: int | None = None,
             split: str = "heldout", with_model: bool = False) -> dict[str, Any]:
    """Evaluate an SAE on a store: held-out (run's recorded split when available) or all documents."""
    store = open_store(store_path)
    sae, layer = load_checked(sae_path, store, layer)
    if split == "all":
        selected = heldout_docs(store, None, 0.0, 0) | True
    else:
        run_dir = Path(sae_path) if Path(sae_path).is_dir() else Path(sae_path).parent
        selected = heldout_docs(store, run_dir / "split.json", 0.1, 0)
    result = reconstruction_metrics(sae, store, layer, selected)
    result.update({"split": split, "layer": layer, "store": str(store.path), "sae": str(sae_path)})
    if with_model:
        from bra.pipeline.manifest import ModelSpec
        from bra.pipeline.model import load_model, resolve_device

        manifest = store.meta.manifest_model
        spec = ModelSpec(**{k: v for k, v in manifest.items() if k in ModelSpec.__dataclass_fields__})
        model, _ = load_model(spec, resolve_device("auto"), torch.float32)
        result.update(ce_loss_score(sae, store, layer, model, selected))
    return result
