"""State the studies share within one bench run: config, work folder, models, the study-1 store and the
exact fp32 activations of its tokens (studies 2 and 3 compress and quantise those, not bf16-rounded rows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench._inputs import ModelRef, demo_slice_manifest, model_ref
from bench.config import BenchConfig
from bra.pipeline.manifest import Manifest

logger = logging.getLogger(__name__)


@dataclass
class Activations:
    """Exact (fp32) activations of the study-1 tokens, in store row order."""

    acts: np.ndarray
    """[n, d_model] float32."""
    mask: np.ndarray
    """[n] bool, True for rows the store masks (first position of each window, BOS)."""
    doc_index: np.ndarray
    """[n] int32 document of each row."""
    hazard: np.ndarray
    """[n] bool, row from a hazard-tier document."""


@dataclass
class BenchContext:
    """Shared state of a run."""

    cfg: BenchConfig
    work: Path
    threads: int
    _refs: dict[str, ModelRef] = field(default_factory=dict)
    manifest: Manifest | None = None
    """Study 1's corpus manifest."""
    store: Path | None = None
    """Study 1's store (bf16, the repo's default codec)."""
    activations: Activations | None = None
    """Exact activations of the same tokens (from the bare forward loop)."""
    extras: dict[str, Any] = field(default_factory=dict)

    def ref(self, name: str | None = None) -> ModelRef:
        """A model by name (default: the config's)."""
        name = name or self.cfg.model
        if name not in self._refs:
            self._refs[name] = model_ref(name, self.work)
        return self._refs[name]

    def build_manifest(self) -> Manifest:
        """Study 1's manifest (written once)."""
        if self.manifest is None:
            self.manifest = demo_slice_manifest(self.work, self.ref(), self.cfg)
        return self.manifest

    def ensure_store(self) -> tuple[Path, Activations]:
        """Study 1's store and exact activations; built here when study 1 did not run."""
        if self.store is None or self.activations is None:
            from bench.build_ratio import bare_forward, build_once, load_for_bare

            manifest = self.build_manifest()
            self.store = self.work / "build.zarr"
            build_once(manifest, self.store)
            _, self.activations = bare_forward(load_for_bare(manifest), keep=True)
        return self.store, self.activations


def set_threads(n: int) -> None:
    """Same torch thread count on both sides of every ratio."""
    torch.set_num_threads(n)
