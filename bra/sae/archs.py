"""Pretrained SAE architectures we read but do not train: JumpReLU, standard (ReLU), and the identity.

- standard (SAELens `StandardSAE`): z = relu(pre).
- jumprelu (SAELens `JumpReLUSAE`, Gemma Scope; Rajamanoharan et al. 2024, eq. 2):
  z = relu(pre) * (pre > threshold), which is pre * (pre > threshold) since thresholds are >= 0.
- Both: pre = (x - b_dec if apply_b_dec_to_input else x) @ W_enc + b_enc; x_hat = z @ W_dec + b_dec.
  `apply_b_dec_to_input` is kept as a flag (not folded into b_enc as the TopK loader does) so that the
  threshold comparisons see exactly SAELens's pre-activations.
- none (upstream's "NullSAE"): the identity, latents = the d_model residual dimensions (signed), so
  scoring can audit raw activations; with a `rotation_seed` it is a random orthonormal basis instead (the
  identity's random baseline).

Parameter names and shapes are SAELens's and Gemma Scope's: W_enc [d_model, d_sae], b_enc [d_sae],
W_dec [d_sae, d_model], b_dec [d_model], threshold [d_sae]. Shape suffixes: B batch, D d_model, S d_sae.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from bra.sae.base import Reconstruction, dense_to_sparse
from bra.sae.model import DTYPES
from bra.vocab import NULL_SAE

logger = logging.getLogger(__name__)

JUMPRELU, STANDARD = "jumprelu", "standard"
"""Architecture names (SAELens's `architecture` strings)."""
NULL = NULL_SAE
"""Architecture name of the identity (ours; also what `--sae` takes)."""
LinearArchitecture = Literal["jumprelu", "standard"]
"""Architectures of `LinearSAEConfig`."""


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    """``cls(**data)``, refusing unknown keys so a mismatched file is not half-read."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
    return cls(**data)


@dataclass(frozen=True)
class LinearSAEConfig:
    """Architecture and provenance of one JumpReLU or standard SAE."""

    architecture: LinearArchitecture
    """`jumprelu` or `standard`."""

    d_model: int
    """Width of the residual stream the SAE reads (SAELens's `d_in`)."""

    d_sae: int
    """Number of latents."""

    apply_b_dec_to_input: bool = False
    """Subtract b_dec from the input before encoding (SAELens's default is true; Gemma Scope's false)."""

    model_name: str = ""
    """Model whose activations the SAE was trained on; empty when the file does not say."""

    hook_name: str = ""
    """TransformerLens-style hook, e.g. `blocks.12.hook_resid_post`."""

    layer: int = -1
    """Decoder block index of the hook; -1 when unknown."""

    dtype: str = "float32"
    """Parameter dtype, one of `bra.sae.model.DTYPES`."""

    weights_format: str = ""
    """Format the weights were read from (`saelens`, `gemma_scope`); provenance only."""

    def __post_init__(self) -> None:
        if self.architecture not in typing.get_args(LinearArchitecture):
            raise ValueError(f"architecture must be one of {typing.get_args(LinearArchitecture)}, got "
                             f"{self.architecture!r}")
        _positive_int("d_model", self.d_model)
        _positive_int("d_sae", self.d_sae)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinearSAEConfig:
        """Inverse of `to_dict`; unknown keys are refused."""
        return _from_dict(cls, data)


class LinearSAE(nn.Module):
    """Shared body of the JumpReLU and standard SAEs: linear encoder, an activation, linear decoder."""

    PARAMS: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec")
    """Parameter names, in the order we copy them."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def __init__(self, cfg: LinearSAEConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        kw: dict[str, Any] = {"dtype": DTYPES[cfg.dtype], "device": device}
        for name, shape in self.shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, **kw)))

    @classmethod
    def shapes(cls, cfg: LinearSAEConfig) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape for ``cfg``, in `PARAMS` order."""
        shapes = {"W_enc": (cfg.d_model, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_model),
                  "b_dec": (cfg.d_model,), "threshold": (cfg.d_sae,)}
        return {name: shapes[name] for name in cls.PARAMS}

    @classmethod
    def check_state_dict(cls, cfg: LinearSAEConfig, state_dict: dict[str, torch.Tensor]) -> None:
        """Raise ValueError unless ``state_dict`` holds exactly `PARAMS`, shaped for ``cfg`` and finite."""
        expected = cls.shapes(cfg)
        missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or extra:
            raise ValueError(f"{cfg.architecture} weights need {list(cls.PARAMS)}: missing {missing}, "
                             f"extra {extra}")
        for name, shape in expected.items():
            if tuple(state_dict[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(state_dict[name].shape)}, config expects {shape}")
            if not torch.isfinite(state_dict[name]).all():
                raise ValueError(f"{name} holds NaN/inf")

    @classmethod
    def from_state_dict(cls, cfg: LinearSAEConfig, state_dict: dict[str, torch.Tensor]) -> LinearSAE:
        """Build from a checked state dict (`check_state_dict`), cast to `cfg.dtype`."""
        cls.check_state_dict(cfg, state_dict)
        sae = cls(cfg)
        with torch.no_grad():
            for name in cls.PARAMS:
                getattr(sae, name).copy_(state_dict[name].to(DTYPES[cfg.dtype]))
        return sae

    # ------------------------------------------------------------------------------------------- math

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [B, d_sae], as SAELens's `hook_sae_acts_pre` sees them."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def activation(self, pre_BS: torch.Tensor) -> torch.Tensor:
        """Latents [B, d_sae] from pre-activations (the architecture's non-linearity)."""
        raise NotImplementedError

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, d_sae] (non-negative)."""
        return self.activation(self.pre_acts(x_BD))

    def decode(self, z_BS: torch.Tensor) -> torch.Tensor:
        """Reconstruction z @ W_dec + b_dec, [B, d_model]."""
        return z_BS.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every active latent of each row, padded to the batch's largest count (`dense_to_sparse`)."""
        return dense_to_sparse(self.encode(x_BD))

    def forward(self, x_BD: torch.Tensor) -> Reconstruction:  # type: ignore[override]
        """Encode and decode x [B, d_model]."""
        z_BS = self.encode(x_BD)
        return Reconstruction(self.decode(z_BS), z_BS)

    # ----------------------------------------------------------------------------------------- baseline

    @torch.no_grad()
    def random_like(self, seed: int) -> LinearSAE:
        """The same architecture and size with random directions: every encoder column and decoder row is
        a random unit direction (W_enc = W_decᵀ up to scale, TopK-paper init) scaled to the norm of the
        one it replaces; b_enc, b_dec and thresholds are kept. So the per-latent scales, biases and
        thresholds that set the sparsity stay, and only the learned directions are gone. float32, drawn on
        the CPU from a private generator: the result depends only on (the weights, seed)."""
        gen = torch.Generator().manual_seed(seed)
        dirs_SD = torch.randn(self.cfg.d_sae, self.cfg.d_model, generator=gen, dtype=torch.float32)
        dirs_SD = dirs_SD / dirs_SD.norm(dim=-1, keepdim=True)
        out = type(self)(dataclasses.replace(self.cfg, dtype="float32"))
        enc_norms_S = self.W_enc.detach().float().cpu().norm(dim=0)
        dec_norms_S1 = self.W_dec.detach().float().cpu().norm(dim=1, keepdim=True)
        out.W_enc.copy_(dirs_SD.T * enc_norms_S)
        out.W_dec.copy_(dirs_SD * dec_norms_S1)
        for name in self.PARAMS:
            if name not in ("W_enc", "W_dec"):
                getattr(out, name).copy_(getattr(self, name).detach().float().cpu())
        return out.eval()


class StandardSAE(LinearSAE):
    """Standard ReLU SAE (SAELens `standard`): z = relu(pre)."""

    def activation(self, pre_BS: torch.Tensor) -> torch.Tensor:
        """relu(pre)."""
        return torch.relu(pre_BS)


class JumpReLUSAE(LinearSAE):
    """JumpReLU SAE (SAELens `jumprelu`, Gemma Scope): z = relu(pre) * (pre > threshold)."""

    PARAMS: ClassVar[tuple[str, ...]] = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    threshold: nn.Parameter

    @classmethod
    def check_state_dict(cls, cfg: LinearSAEConfig, state_dict: dict[str, torch.Tensor]) -> None:
        """As for every linear SAE, and thresholds must be >= 0 (the JumpReLU paper's θ > 0; with a
        negative one, SAELens's relu and the paper's pre * (pre > θ) would disagree)."""
        super().check_state_dict(cfg, state_dict)
        negative = state_dict["threshold"] < 0
        if negative.any():
            raise ValueError(f"threshold has {int(negative.sum())} negative entries (min "
                             f"{float(state_dict['threshold'].min()):.4g}); JumpReLU thresholds must be >= 0")

    def activation(self, pre_BS: torch.Tensor) -> torch.Tensor:
        """relu(pre) * (pre > threshold), SAELens's order of operations."""
        return torch.relu(pre_BS) * (pre_BS > self.threshold).to(pre_BS.dtype)


LINEAR_SAES: dict[str, type[LinearSAE]] = {JUMPRELU: JumpReLUSAE, STANDARD: StandardSAE}
"""Architecture name -> class, for `build_linear`."""


def build_linear(cfg: LinearSAEConfig, state_dict: dict[str, torch.Tensor]) -> LinearSAE:
    """The SAE of ``cfg.architecture`` with ``state_dict``'s weights (ValueError on a mismatch)."""
    return LINEAR_SAES[cfg.architecture].from_state_dict(cfg, state_dict)


# ---------------------------------------------------------------------------------------- the identity


@dataclass(frozen=True)
class NullSAEConfig:
    """The identity "SAE" on one store layer (or a random rotation of it)."""

    d_model: int
    """Residual width; also the number of latents."""

    layer: int = -1
    """Store layer it reads; -1 when unknown."""

    hook_name: str = ""
    """Hook of that layer."""

    model_name: str = ""
    """Empty: the identity fits any model."""

    rotation_seed: int | None = None
    """None: the identity. Else the seed of a random orthonormal basis (the random baseline)."""

    def __post_init__(self) -> None:
        _positive_int("d_model", self.d_model)

    @property
    def architecture(self) -> str:
        """`none`."""
        return NULL

    @property
    def d_sae(self) -> int:
        """One latent per residual dimension."""
        return self.d_model

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, plus the architecture and d_sae so reports say what the latents were."""
        return {"architecture": NULL, "d_sae": self.d_model, **dataclasses.asdict(self)}


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [d, d] matrix (QR of a Gaussian, signs fixed by R's diagonal), float32."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


class NullSAE(nn.Module):
    """Latents = the residual dimensions (x itself), or x @ Q for a random orthonormal Q; decode inverts it
    exactly, so reconstruction is perfect (FVU 0, CE-loss score 1) by construction."""

    basis: torch.Tensor | None

    def __init__(self, cfg: NullSAEConfig):
        super().__init__()
        self.cfg = cfg
        seed = cfg.rotation_seed
        self.register_buffer("basis", None if seed is None else random_orthogonal(cfg.d_model, seed))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """x (float32), or x @ Q."""
        x_BD = x_BD.to(torch.float32)
        return x_BD if self.basis is None else x_BD @ self.basis

    def decode(self, z_BS: torch.Tensor) -> torch.Tensor:
        """z, or z @ Qᵀ."""
        z_BS = z_BS.to(torch.float32)
        return z_BS if self.basis is None else z_BS @ self.basis.T

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every latent of every row (dense, signed): values [B, d_model], indices 0..d_model-1."""
        z_BS = self.encode(x_BD)
        return z_BS, torch.arange(z_BS.shape[-1], device=z_BS.device).expand_as(z_BS)

    def forward(self, x_BD: torch.Tensor) -> Reconstruction:  # type: ignore[override]
        """Encode and decode x [B, d_model]."""
        z_BS = self.encode(x_BD)
        return Reconstruction(self.decode(z_BS), z_BS)

    def random_like(self, seed: int) -> NullSAE:
        """The identity's random counterpart: a random orthonormal basis of the same residual stream."""
        return NullSAE(dataclasses.replace(self.cfg, rotation_seed=seed)).eval()


__all__ = ["JUMPRELU", "LINEAR_SAES", "NULL", "STANDARD", "JumpReLUSAE", "LinearSAE", "LinearSAEConfig",
           "NullSAE", "NullSAEConfig", "StandardSAE", "build_linear", "random_orthogonal"]
