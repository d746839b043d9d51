"""What every SAE architecture offers the rest of the package: the `SparseAutoencoder` protocol, its
config protocol `SAEInfo`, and the pure helpers that turn dense latents into sparse codes.

`TopKSAE` (`bra.sae.model`, the one we train) and the pretrained architectures of `bra.sae.archs`
(JumpReLU, standard ReLU, the identity) all satisfy it structurally; `bra.sae.registry` maps the
architecture names to their loaders and random baselines.

Sparse codes: `encode_sparse` returns (values [B, C], indices [B, C]) holding every non-zero latent of
each row. C is k for TopK (its zero-valued picks kept, as before) and, for architectures whose number of
active latents varies by row, the largest count in the batch; shorter rows are padded with index
`PAD_INDEX` and value 0, so nothing active is ever dropped and pooled latents are exact.

Shape suffixes: B batch, D d_model, S d_sae, C sparse width.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch

PAD_INDEX = -1
"""Latent index of a padding entry of a sparse code (its value is 0)."""


class SAEInfo(Protocol):
    """The config every SAE carries (architecture + provenance), as `check_compatible` and reports read it."""

    @property
    def architecture(self) -> str:
        """Registry name of the architecture (`bra.sae.registry.ARCHITECTURES`)."""
        ...

    @property
    def d_model(self) -> int:
        """Residual width the SAE reads."""
        ...

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        ...

    @property
    def layer(self) -> int:
        """Decoder block index of the hook; -1 when unknown."""
        ...

    @property
    def hook_name(self) -> str:
        """TransformerLens-style hook name, or empty."""
        ...

    @property
    def model_name(self) -> str:
        """Model the SAE was trained on, or empty when unknown."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the config."""
        ...


class SparseAutoencoder(Protocol):
    """An SAE as scoring and evaluation use it (inference only)."""

    @property
    def cfg(self) -> SAEInfo:
        """Architecture and provenance (each class has its own frozen dataclass)."""
        ...

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Dense latents [B, d_sae]."""
        ...

    def decode(self, z_BS: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, d_model] of latents [B, d_sae]."""
        ...

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, C], indices [B, C]) of every non-zero latent of each row (see the module doc)."""
        ...

    def __call__(self, x_BD: torch.Tensor) -> Any:
        """Forward pass: a NamedTuple with at least ``x_hat`` [B, d_model] and ``z`` [B, d_sae]."""
        ...

    def parameters(self) -> Any:
        """The module's parameters (torch.nn.Module)."""
        ...

    def eval(self) -> Any:
        """Inference mode (torch.nn.Module); returns the module."""
        ...


class Reconstruction(NamedTuple):
    """What the forward pass of an architecture without training outputs returns."""

    x_hat: torch.Tensor
    """Reconstruction, [B, d_model]."""

    z: torch.Tensor
    """Dense latents, [B, d_sae]."""


def dense_to_sparse(z_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, C], indices [B, C]) of every non-zero entry of each row, C = the most in any row.

    Entries are chosen by magnitude, so signed latents work too; a row with fewer than C non-zeros is
    padded with (0, `PAD_INDEX`). C is 0 when ``z_BS`` is all zeros.
    """
    width = int((z_BS != 0).sum(-1).max()) if z_BS.numel() else 0
    _, indices_BC = z_BS.abs().topk(width, dim=-1, sorted=False)
    values_BC = z_BS.gather(-1, indices_BC)
    indices_BC = torch.where(values_BC != 0, indices_BC, torch.full_like(indices_BC, PAD_INDEX))
    return values_BC, indices_BC


def sae_device(sae: Any) -> torch.device:
    """Device of an SAE's first parameter or buffer; the CPU for one with neither (the identity)."""
    for tensor in (*sae.parameters(), *sae.buffers()):
        return tensor.device
    return torch.device("cpu")


__all__ = ["PAD_INDEX", "Reconstruction", "SAEInfo", "SparseAutoencoder", "dense_to_sparse", "sae_device"]
