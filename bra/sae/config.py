"""Training configuration of `bra-sae fit` (architecture lives in SAEConfig)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from bra.configs import config_fields, flat_values, from_flat

ContrastiveForm = Literal["ntxent", "cosine", "none"]
"""Tier-separation terms (TrainConfig.contrastive)."""
ContrastiveLevel = Literal["token", "doc"]
"""What the tier-separation term contrasts (TrainConfig.contrastive_level)."""
EncoderInit = Literal["fitted", "transpose"]
"""How a fit initialises the encoder (TrainConfig.encoder_init)."""
CONTRASTIVE_FORMS: tuple[str, ...] = typing.get_args(ContrastiveForm)
CONTRASTIVE_LEVELS: tuple[str, ...] = typing.get_args(ContrastiveLevel)


@dataclass(frozen=True)
class StreamConfig:
    """How a fit streams the store (the `bra.cache.reader.ReaderConfig` settings a fit chooses)."""

    buffer_rows: int = 65536
    """Shuffle-buffer capacity in rows."""

    def __post_init__(self) -> None:
        if self.buffer_rows < 1:
            raise ValueError("buffer_rows must be positive")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a fit, given the store. Saved in run.json; --resume must match it."""

    d_sae: int = 6144
    """Number of latents."""
    k: int = 32
    """Active latents per row."""
    lr: float = 3e-4
    """AdamW learning rate."""
    encoder_init: EncoderInit = "fitted"
    """transpose: W_enc = W_dec^T (TopK paper); fitted: that, scaled by the least-squares factor that makes
    the initial reconstruction of a sample of training rows closest (the transpose overshoots when k is a
    sizeable fraction of d_model)."""
    lr_decay_frac: float = 0.2
    """Decay the learning rate linearly to 0 over this final fraction of the steps (0 = constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: SAE training practice)."""
    steps: int = 5000
    """Optimizer steps."""
    batch_size: int = 4096
    """Rows per step."""
    seed: int = 0
    """Seed of initialisation, split-independent data order and everything random."""
    layer: int | None = None
    """Store layer to train on; None = the store's only (or first) layer."""
    recon_coef: float = 1.0
    """Weight of the normalised MSE (FVU) reconstruction term."""
    l1_coef: float = 0.0
    """Weight of the seed's L1 sparsity term on latent activations (0 = off; TopK already bounds L0)."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK dead-latent loss (TopK paper, Appendix A.2: 1/32)."""
    k_aux: int | None = None
    """Latents in the AuxK reconstruction; None = d_model // 2 (TopK paper)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many training tokens counts as dead."""
    contrastive: ContrastiveForm = "ntxent"
    """Tier-separation term: ntxent (supervised NT-Xent), cosine (the seed's form) or none."""
    contrastive_coef: float = 0.1
    """Weight of the tier-separation term."""
    temperature: float = 0.1
    """NT-Xent temperature."""
    contrastive_level: ContrastiveLevel = "token"
    """Profiles contrasted: token rows, or per-document mean latent profiles within the batch."""
    contrastive_rows: int = 512
    """Rows (or documents) per step entering the contrastive term (its cost is quadratic)."""
    balanced: bool = True
    """Draw half of every batch from hazard tiers and half from the others."""
    shuffle_tiers: bool = False
    """Baseline: permute tier labels across documents before training (destroys the tier signal)."""
    heldout_fraction: float = 0.1
    """Fraction of documents (per tier) held out for evaluation; split by document."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """Reader settings (flat in the CLI: --buffer-rows)."""
    checkpoint_every: int = 500
    """Steps between checkpoints (and at the end)."""
    log_every: int = 10
    """Steps between metrics lines."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.d_sae < 1:
            raise ValueError("k and d_sae must be positive")
        if self.k > self.d_sae:
            raise ValueError(f"k ({self.k}) must be <= d_sae ({self.d_sae})")
        if self.contrastive not in CONTRASTIVE_FORMS:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE_FORMS}, got {self.contrastive!r}")
        if self.contrastive_level not in CONTRASTIVE_LEVELS:
            raise ValueError(f"contrastive_level must be one of {CONTRASTIVE_LEVELS}")
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("steps, batch_size and lr must be positive (batch_size >= 2)")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError("lr_decay_frac must be in [0, 1]")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError("heldout_fraction must be in [0, 1)")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be positive")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): constant, then linear decay to 0."""
        decay_steps = int(self.steps * self.lr_decay_frac)
        start = self.steps - decay_steps
        if decay_steps == 0 or step < start:
            return self.lr
        return self.lr * (self.steps - step) / (decay_steps + 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (nested configs as nested dicts)."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """One key per setting: the fields of nested configs at top level (as the CLI flags are)."""
        return flat_values(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """A config from `to_dict`'s nested form, the flat form (`flat_dict`, CLI flags, presets, run.json of
        runs made before the reader settings were nested) or a mix of both."""
        return from_flat(cls, _flatten(data, cls))

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Settings whose values differ from a saved config, nested or flat (ignoring logging/checkpoint
        cadence); named by their flat name (the CLI flag's)."""
        # more steps may extend a run, unless the learning-rate schedule depends on the total
        cosmetic = ({"log_every", "checkpoint_every", "device"}
                    | ({"steps"} if not self.lr_decay_frac else set()))
        saved = {**LEGACY_DEFAULTS, **_flatten(other, TrainConfig)}
        return sorted(k for k, v in self.flat_dict().items() if k not in cosmetic and saved.get(k) != v)


LEGACY_DEFAULTS: dict[str, Any] = {"encoder_init": "transpose"}
"""What runs saved before a setting existed used (their run.json lacks it)."""


def _flatten(data: dict[str, Any], cls: type) -> dict[str, Any]:
    """``data`` with the dicts under ``cls``'s nested-config fields merged in at top level (flat data, such
    as a run.json written before the reader settings were nested, stays as it is)."""
    nested = {leaf.path[0] for leaf in config_fields(cls) if len(leaf.path) > 1}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in nested and isinstance(value, dict):
            out.update(value)
        else:
            out[key] = value
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # A RECONSTRUCTION of the seed recipe, not the recipe itself. Published (model card): d_sae 6144, k 32,
    # AdamW 3e-4, 5,000 steps, reconstruction + L1 + cosine tier separation. Not published: the two
    # coefficients. 0.05 and 0.05 are solved from the two published loss totals, two equations in two
    # unknowns (initial 7.29 + 0.05*1.97 + 0.05*0.567 ≈ 7.42, final 0.066 + 0.05*0.43 + 0.05*0.06 ≈ 0.090),
    # so they fit those totals and nothing else confirms them.
    "seed": {"d_sae": 6144, "k": 32, "lr": 3e-4, "lr_decay_frac": 0.0, "steps": 5000, "l1_coef": 0.05,
             "auxk_coef": 0.0, "contrastive": "cosine", "contrastive_coef": 0.05},
    # Ours: NT-Xent separation plus AuxK to keep latents alive.
    "contrastive": {"contrastive": "ntxent", "contrastive_coef": 0.1, "auxk_coef": 1 / 32},
    # Baseline: the same SAE without the tier term.
    "plain": {"contrastive": "none", "contrastive_coef": 0.0, "balanced": False},
}
"""Named starting points for `bra-sae fit --preset` (flags override them). ``seed`` reconstructs the seed
recipe: its two loss coefficients were solved from two published loss totals, not published themselves."""
