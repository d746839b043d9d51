"""Which SAEs we can read, and from where: the registry of architectures (`ARCHITECTURES`, keyed by
SAELens's `architecture` names, plus `none`) and of on-disk formats (`FORMATS`, tried in order), and
`load_sae_source`, which every command uses to turn `--sae` into an SAE.

Dispatch is by lookup (SAELens `registry.py`), never by if/elif on class names: a new architecture is a
new `Architecture` entry (its SAELens reader and its random baseline), a new format a new `SAEFormat`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bra.errors import SAEError
from bra.sae.archs import JUMPRELU, NULL, STANDARD, NullSAE, NullSAEConfig
from bra.sae.base import SparseAutoencoder
from bra.sae.formats import (
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SEED_WEIGHTS,
    SAEFormatError,
    load_saelens,
    load_seed,
    read_json,
)
from bra.sae.model import ARCHITECTURE as TOPK
from bra.sae.model import TopKSAE
from bra.sae.pretrained import GEMMA_SCOPE_PARAMS, load_gemma_scope, load_saelens_linear
from bra.vocab import NULL_SAE

logger = logging.getLogger(__name__)

RUN_SAE_DIR = "sae"
"""Folder of a fit run holding its SAELens export."""


def random_topk(like: TopKSAE, stats: Mapping[str, Any], seed: int) -> TopKSAE:
    """A random TopK SAE of the same size (TopK-paper init, `TopKSAE.init_random`). Its input scale is
    sqrt(d_model / mean squared norm) of the store layer's statistics ``stats``, as training would set it,
    so the same k latents are chosen whatever the activation scale; b_dec is the store mean (decode only)."""
    msn = float(stats.get("mean_sq_norm") or 0.0)
    scale = math.sqrt(like.cfg.d_model / msn) if msn > 0 else 1.0
    cfg = dataclasses.replace(like.cfg, input_scale=scale, dtype="float32", store_fingerprint="")
    mean = torch.tensor(stats["mean"], dtype=torch.float32) if "mean" in stats else None
    return TopKSAE.init_random(cfg, seed, data_mean=mean).eval()


def _random_of_own_kind(like: Any, stats: Mapping[str, Any], seed: int) -> SparseAutoencoder:
    """The SAE's own `random_like(seed)` (JumpReLU, standard: random directions with its norms, biases
    and thresholds; the identity: a random orthonormal basis). The store statistics are not needed."""
    return like.random_like(seed)


@dataclass(frozen=True)
class Architecture:
    """One SAE architecture: how a SAELens folder of it is read, and its random baseline."""

    name: str
    """Registry key (SAELens's `architecture` string, or `none`)."""

    summary: str
    """One line saying what the latents are (help texts, errors)."""

    load_saelens: Callable[[Path], SparseAutoencoder] | None
    """Reader of a SAELens 6.x folder of this architecture; None when SAELens has none."""

    random_like: Callable[[Any, Mapping[str, Any], int], SparseAutoencoder]
    """(audited SAE, store-layer statistics, seed) -> the random SAE `score` adds as a baseline."""

    eval_note: str | None = None
    """What `bra-sae eval` reports beside metrics that hold by construction; None for a real SAE."""


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(TOPK, "TopK: the k largest of relu(x @ W_enc + b_enc)", load_saelens, random_topk),
    Architecture(JUMPRELU, "JumpReLU: relu(pre) * (pre > threshold), as Gemma Scope",
                 load_saelens_linear, _random_of_own_kind),
    Architecture(STANDARD, "standard: relu(pre)", load_saelens_linear, _random_of_own_kind),
    Architecture(NULL, "none: the raw residual dimensions (the identity)", None, _random_of_own_kind,
                 eval_note="--sae none is the identity: FVU 0, L0 = the non-zero residual dimensions and "
                           "CE-loss score 1 hold by construction"),
)}
"""Architecture name -> entry."""


def architecture_of(sae: SparseAutoencoder) -> Architecture:
    """The registry entry of a loaded SAE (by its config's `architecture`)."""
    return ARCHITECTURES[sae.cfg.architecture]


# ------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class LoadHints:
    """What a source may lack and the caller (a store) knows."""

    d_model: int | None = None
    """Residual width of the store (`none` is built for it)."""

    layer: int | None = None
    """Layer to assume when the source does not say (`none`; Gemma Scope without `layer_<N>` in its path)."""


def _load_saelens_folder(directory: Path, hints: LoadHints) -> SparseAutoencoder:
    """A SAELens folder, read by its architecture's entry."""
    arch = read_json(directory / SAELENS_CFG).get("architecture")
    entry = ARCHITECTURES.get(arch) if isinstance(arch, str) else None
    if entry is None or entry.load_saelens is None:
        readable = sorted(n for n, a in ARCHITECTURES.items() if a.load_saelens is not None)
        raise SAEFormatError(f"{directory}: SAELens architecture {arch!r} is not supported "
                             f"(supported: {', '.join(readable)})")
    return entry.load_saelens(directory)


def _in_dir_or_named(name: str, *suffixes: str) -> Callable[[Path], Path | None]:
    """Finder: ``path/name`` for a folder holding it, ``path`` for a file with one of ``suffixes``."""
    def find(path: Path) -> Path | None:
        if path.is_dir():
            return path / name if (path / name).is_file() else None
        return path if path.suffix in suffixes else None
    return find


def _saelens_folder(path: Path) -> Path | None:
    """A fit run's `sae/` export, a SAELens folder, or the folder of its cfg.json / weights file."""
    if path.is_dir():
        for folder in (path / RUN_SAE_DIR, path):
            if (folder / SAELENS_CFG).is_file():
                return folder
        return None
    return path.parent if path.name in (SAELENS_CFG, SAELENS_WEIGHTS) else None


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk layout: where its weights are given a path, and how they load."""

    name: str
    """Format name (help texts)."""

    find: Callable[[Path], Path | None]
    """The path to load for a user's path, or None when the path is not in this format."""

    load: Callable[[Path, LoadHints], SparseAutoencoder]
    """Reader of what `find` returned."""


FORMATS: tuple[SAEFormat, ...] = (
    SAEFormat("saelens", _saelens_folder, _load_saelens_folder),
    SAEFormat("gemma_scope", _in_dir_or_named(GEMMA_SCOPE_PARAMS, ".npz"),
              lambda p, hints: load_gemma_scope(p, hints.layer)),
    SAEFormat("seed", _in_dir_or_named(SEED_WEIGHTS, ".pt", ".pth"), lambda p, _hints: load_seed(p)),
)
"""Formats in the order they are tried (a fit run holds both a SAELens export and a seed file: the SAELens
one wins, as before)."""


def null_sae(hints: LoadHints) -> NullSAE:
    """`--sae none` for a store of width ``hints.d_model`` (required), on ``hints.layer``."""
    if hints.d_model is None:
        raise SAEError(f"--sae {NULL_SAE} takes its width from a store; it only works with score and eval")
    layer = -1 if hints.layer is None else hints.layer
    return NullSAE(NullSAEConfig(d_model=hints.d_model, layer=layer,
                                 hook_name=f"blocks.{layer}.hook_resid_post" if layer >= 0 else ""))


def is_null_source(source: str | os.PathLike[str]) -> bool:
    """True for the string `none` (`--sae none`); a Path named "none" is a path."""
    return isinstance(source, str) and source == NULL_SAE


def load_sae_source(source: str | os.PathLike[str], hints: LoadHints | None = None) -> SparseAutoencoder:
    """The SAE at ``source``: a fit run folder, a SAELens folder (topk, jumprelu, standard), a Gemma Scope
    params.npz or its folder, a seed .pt (or its folder), or the string `none` (`null_sae`)."""
    hints = hints or LoadHints()
    if is_null_source(source):
        return null_sae(hints)
    path = Path(source)
    if not path.exists():
        raise SAEError(f"no SAE at {path}")
    for fmt in FORMATS:
        found = fmt.find(path)
        if found is not None:
            logger.debug("%s: reading as %s (%s)", path, fmt.name, found)
            return fmt.load(found, hints)
    raise SAEFormatError(f"{path}: not an SAE we read (a fit run, a SAELens folder, a Gemma Scope "
                         f"{GEMMA_SCOPE_PARAMS} or a seed .pt)")


__all__ = ["ARCHITECTURES", "FORMATS", "Architecture", "LoadHints", "SAEFormat", "architecture_of",
           "is_null_source", "load_sae_source", "null_sae", "random_topk"]
