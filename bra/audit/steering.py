"""The tensor math of residual edits (pure functions and two small callables; `bra.audit.intervene` hooks
them into the model through `bra.pipeline.model.ResidualEdit`).

- `LatentEdit`: encode x with the SAE, change the chosen latents z -> z', add their decoder rows back:
  x' = x + (z' - z) W_dec. Everything the SAE does not reconstruct (its error x - x_hat) is kept, so only
  the edited latents' share of the residual changes (the upstream project's feature ablation; Templeton
  et al. 2024 clamp features the same way, error term kept).
- `DirectionEdit`: project a direction out, scale its component, or add it (Arditi et al. 2024).
- `random_latents`, `random_direction`: the seeded controls.

Both callables take the block output [B, T, D] in any dtype, compute in float32 and return the input's
dtype; an identity edit (scale 1, add 0) returns the input's values exactly. Shape suffixes: B rows,
D d_model, S d_sae, N edited latents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bra.audit.edits import ABLATE, ADD, CLAMP, SCALE
from bra.errors import EditError
from bra.sae.base import SparseAutoencoder, sae_device


def vector_digest(v_D: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of a float32 vector's bytes (recorded, and part of a store's
    fingerprint, so a resume with another direction is refused)."""
    return hashlib.sha256(np.ascontiguousarray(v_D, dtype=np.float32).tobytes()).hexdigest()[:16]


@torch.no_grad()
def decoder_rows(sae: SparseAutoencoder, ids: Sequence[int]) -> torch.Tensor:
    """[N, D] float32: what one unit of each latent adds to the reconstruction, decode(e_i) - decode(0)
    (W_dec's row, divided by the input scale of a TopK SAE; any architecture with a linear decoder)."""
    device = sae_device(sae)
    eye_NS = torch.zeros(len(ids), sae.cfg.d_sae, device=device)
    eye_NS[torch.arange(len(ids)), torch.as_tensor(list(ids), dtype=torch.long)] = 1.0
    return (sae.decode(eye_NS).float() - sae.decode(torch.zeros_like(eye_NS)).float()).detach()


def edit_latents(z_BN: torch.Tensor, op: str, value: float | None) -> torch.Tensor:
    """The edited latents z' [B, N] of z [B, N]: ablate 0, scale value * z, clamp value."""
    if op == ABLATE:
        return torch.zeros_like(z_BN)
    if op == SCALE:
        return z_BN * float(value)  # type: ignore[arg-type]
    if op == CLAMP:
        return torch.full_like(z_BN, float(value))  # type: ignore[arg-type]
    raise EditError(f"latent edits take ablate, scale or clamp, not {op!r}")


class LatentEdit:
    """x -> x + (z' - z) W_dec for the latents ``ids`` of ``sae`` (see the module doc)."""

    def __init__(self, sae: SparseAutoencoder, ids: Sequence[int], op: str, value: float | None) -> None:
        self.sae, self.op, self.value = sae, op, value
        self.ids = torch.as_tensor(list(ids), dtype=torch.long)
        self.rows_ND = decoder_rows(sae, ids)
        edit_latents(torch.zeros(1, len(ids)), op, value)  # refuses an op latents do not take, up front

    def _to(self, device: torch.device) -> None:
        if self.rows_ND.device != device:
            self.sae = self.sae.to(device)  # type: ignore[attr-defined]
            self.rows_ND, self.ids = self.rows_ND.to(device), self.ids.to(device)

    @torch.no_grad()
    def latents(self, x_BD: torch.Tensor) -> torch.Tensor:
        """The edited latents' values z [B, N] at x [B, D] (float32)."""
        self._to(x_BD.device)
        return self.sae.encode(x_BD.float()).float().index_select(-1, self.ids)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x_BD = x.reshape(-1, x.shape[-1]).float()
        z_BN = self.latents(x_BD)
        out_BD = x_BD + (edit_latents(z_BN, self.op, self.value) - z_BN) @ self.rows_ND
        return out_BD.reshape(x.shape).to(x.dtype)


class DirectionEdit:
    """Ablate (project out), scale the component along, or add ``vector_D`` (see the module doc)."""

    def __init__(self, vector_D: np.ndarray | torch.Tensor, op: str, value: float | None) -> None:
        if op not in (ABLATE, SCALE, ADD):
            raise EditError(f"direction edits take ablate, scale or add, not {op!r}")
        self.op, self.value = op, value
        self.r_D = torch.as_tensor(np.asarray(vector_D, dtype=np.float32))
        norm = float(self.r_D.norm())
        if not norm > 0:
            raise EditError("the direction is zero: it has no direction to edit along")
        self.u_D = self.r_D / norm

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.r_D.device != x.device:
            self.r_D, self.u_D = self.r_D.to(x.device), self.u_D.to(x.device)
        x32 = x.float()
        if self.op == ADD:
            out = x32 + float(self.value) * self.r_D  # type: ignore[arg-type]
        else:
            factor = -1.0 if self.op == ABLATE else float(self.value) - 1.0  # type: ignore[arg-type]
            out = x32 + factor * (x32 @ self.u_D)[..., None] * self.u_D
        return out.to(x.dtype)


def random_latents(d_sae: int, n: int, exclude: Sequence[int], seed: int) -> tuple[int, ...]:
    """``n`` distinct latent ids drawn (seeded) from the ``d_sae`` latents outside ``exclude``, ascending."""
    pool = np.setdiff1d(np.arange(d_sae), np.asarray(list(exclude), dtype=np.int64))
    if len(pool) < n:
        raise EditError(f"random control: the SAE has {len(pool)} latents outside the edit, fewer than the "
                        f"{n} to draw")
    return tuple(sorted(int(i) for i in np.random.default_rng(seed).choice(pool, n, replace=False)))


def random_direction(d_model: int, norm: float, seed: int) -> np.ndarray:
    """[d_model] float32: a direction drawn uniformly on the sphere (seeded), scaled to ``norm``."""
    v = np.random.default_rng(seed).standard_normal(d_model)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def describe_vector(v_D: np.ndarray) -> dict[str, Any]:
    """Norm and digest of a direction, as an edit record holds them."""
    return {"norm": float(np.linalg.norm(v_D.astype(np.float64))), "digest": vector_digest(v_D),
            "d_model": int(v_D.shape[0])}


__all__ = ["DirectionEdit", "LatentEdit", "decoder_rows", "describe_vector", "edit_latents",
           "random_direction", "random_latents", "vector_digest"]
