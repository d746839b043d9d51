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
from bra.sae.base import SparseAutoencoder
from bra.sae.config import TrainConfig
from bra.sae.evaluate import ce_loss_score, check_compatible, heldout_docs, reconstruction_metrics
from bra.sae.formats import save_saelens, save_seed
from bra.sae.model import TopKSAE
from bra.sae.registry import LoadHints, architecture_of, is_null_source, load_sae_source
from bra.sae.train import fit, resolve_device

__all__ = ["describe", "evaluate", "export", "fit_in_process_group", "load_any", "load_checked"]

logger = logging.getLogger(__name__)


def fit_in_process_group(store_path: str | os.PathLike[str], out: str | os.PathLike[str], cfg: TrainConfig,
                         resume: bool = False) -> bool:
    """`bra-sae fit`: join the torchrun group the environment describes (none: one process; NCCL when
    training on CUDA, else gloo) and train; True in the main process (the one that reports)."""
    with process_group("nccl" if resolve_device(cfg.device).type == "cuda" else "gloo") as dist:
        fit(store_path, out, cfg, resume=resume, dist=dist)
    return dist.is_main


def load_any(path: str | os.PathLike[str], hints: LoadHints | None = None) -> SparseAutoencoder:
    """Load an SAE of any architecture (`bra.sae.registry.load_sae_source`): a fit run dir (its sae/
    export), a SAELens dir, a Gemma Scope params.npz, a seed .pt, or `none` (needs ``hints.d_model``)."""
    return load_sae_source(path, hints)


def load_checked(path: str | os.PathLike[str], store: Store, layer: int | None,
                 what: str = "SAE") -> tuple[SparseAutoencoder, int]:
    """Load an SAE and the store layer it reads (its own unless given); refuse a mismatched one.

    A source that does not name its layer (`none`, a Gemma Scope file outside a `layer_<N>` folder) reads
    ``layer``, else the store's first."""
    hints = LoadHints(d_model=store.d_model, layer=layer if layer is not None else store.layers[0])
    sae = load_any(path, hints)
    if layer is None:
        layer = sae.cfg.layer if sae.cfg.layer >= 0 else store.layers[0]
    if layer not in store.layers:
        raise SAEError(f"{what} {path}: layer {layer} is not in store {store.path} (it has {store.layers})")
    check_compatible(sae, store, layer)
    return sae.eval(), layer


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready description of an SAE."""
    sae = load_any(path)
    out: dict[str, Any] = {**sae.cfg.to_dict(), "architecture": sae.cfg.architecture}
    out["params"] = sum(p.numel() for p in sae.parameters())
    W_dec = getattr(sae, "W_dec", None)
    if isinstance(W_dec, torch.Tensor):
        with torch.no_grad():
            out["decoder_row_norm_mean"] = float(W_dec.norm(dim=-1).mean())
    return {**out, "path": str(path)}


def export(sae_path: str | os.PathLike[str], out: str | os.PathLike[str], fmt: str,
           overwrite: bool = False) -> Path:
    """`bra-sae export`: write a TopK SAE in SAELens format (``fmt`` saelens) or the seed layout (seed).
    Other architectures are read-only here (they were trained elsewhere)."""
    sae = load_any(sae_path)
    if not isinstance(sae, TopKSAE):
        raise SAEError(f"{sae_path} is a {sae.cfg.architecture} SAE; export writes TopK SAEs only (read "
                       f"{sae.cfg.architecture} SAEs where they are)")
    return save_saelens(sae, out, overwrite=overwrite) if fmt == "saelens" else \
        save_seed(sae, out, overwrite=overwrite)


def _split_file(sae_path: str | os.PathLike[str]) -> Path | None:
    """The fit run's split.json beside an SAE path (None for `none`, which has no run)."""
    if is_null_source(sae_path):
        return None
    run_dir = Path(sae_path) if Path(sae_path).is_dir() else Path(sae_path).parent
    return run_dir / "split.json"


def evaluate(sae_path: str | os.PathLike[str], store_path: str | os.PathLike[str], layer: int | None = None,
             split: str = "heldout", with_model: bool = False) -> dict[str, Any]:
    """Evaluate an SAE on a store: held-out (run's recorded split when available) or all documents."""
    store = open_store(store_path)
    sae, layer = load_checked(sae_path, store, layer)
    if split == "all":
        selected = heldout_docs(store, None, 0.0, 0) | True
    else:
        selected = heldout_docs(store, _split_file(sae_path), 0.1, 0)
    result = reconstruction_metrics(sae, store, layer, selected)
    result.update({"split": split, "layer": layer, "store": str(store.path), "sae": str(sae_path)})
    note = architecture_of(sae).eval_note
    if note:
        logger.info("%s", note)
        result["note"] = note
    if with_model:
        from bra.pipeline.manifest import ModelSpec
        from bra.pipeline.model import load_model, resolve_device

        manifest = store.meta.manifest_model
        spec = ModelSpec(**{k: v for k, v in manifest.items() if k in ModelSpec.__dataclass_fields__})
        model, _ = load_model(spec, resolve_device("auto"), torch.float32)
        result.update(ce_loss_score(sae, store, layer, model, selected))
    return result
