"""The tensor math of residual edits (pure functions and two small callables; `bra.audit.intervene` hooks
them into the model through `bra.pipeline.model.ResidualEdit`).

- `LatentEdit`: encode x with the SAE, change the chosen latents z -> z', add their decoder rows back:
  x' = x + (z' - z) W_dec. Everything the SAE does not reconstruct (its error x - x_hat) is kept, so only
  the edited latents' share of the residual changes (the upstream project's feature ablation; Templeton
  et al. 2024 clamp features the same way, error term kept).
- `DirectionEdit`: project a direction out, scale its component, or add it (Arditi et al. 2024).
- `random_latents`, `random_direction`: the seeded controls; `matched_random_latents`, the latent control
  matched on firing rate (catalog latents fire on most rows, a uniform draw mostly on few: a weak control).

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


MATCH_NEIGHBOURS = 10
"""Candidates per edited latent of a firing-rate-matched draw: its nearest non-edited latents by firing rate
(a quantile window ~10 latents wide), one of which is drawn."""


def matched_random_latents(rates_S: np.ndarray, ids: Sequence[int], seed: int,
                           neighbours: int = MATCH_NEIGHBOURS) -> tuple[tuple[int, ...], dict[str, Any]]:
    """A random latent per edited latent of ``ids``, drawn (seeded) among the ``neighbours`` non-edited,
    not yet drawn latents whose firing rate (``rates_S`` [d_sae], share of rows where the latent is active)
    is nearest its own; ascending ids, and the record of the match (rates of both sets and their means,
    beside the mean of the whole pool, which is what a uniform draw expects).

    Edited latents are matched in a seeded random order, so that none is favoured in the contest for
    scarce neighbours (few latents fire as often as catalog latents do)."""
    rates_S = np.asarray(rates_S, dtype=np.float64)
    ids = [int(i) for i in ids]
    pool = np.setdiff1d(np.arange(rates_S.size), np.asarray(ids, dtype=np.int64))
    if len(pool) < len(ids):
        raise EditError(f"random control: the SAE has {len(pool)} latents outside the edit, fewer than the "
                        f"{len(ids)} to draw")
    rng = np.random.default_rng(seed)
    free = np.ones(len(pool), bool)
    drawn: dict[int, int] = {}
    for i in rng.permutation(ids):
        cand = np.flatnonzero(free)
        near = cand[np.argsort(np.abs(rates_S[pool[cand]] - rates_S[i]), kind="stable")[:neighbours]]
        pick = int(rng.choice(near))
        free[pick] = False
        drawn[int(i)] = int(pool[pick])
    control = [drawn[i] for i in ids]
    record = {"neighbours": neighbours, "edited_rates": [float(rates_S[i]) for i in ids],
              "control_rates": [float(rates_S[j]) for j in control],
              "edited_mean": float(rates_S[ids].mean()), "control_mean": float(rates_S[control].mean()),
              "uniform_mean": float(rates_S[pool].mean()), "pairs": [[i, j] for i, j in zip(ids, control,
                                                                                           strict=True)]}
    return tuple(sorted(control)), record


def random_direction(d_model: int, norm: float, seed: int) -> np.ndarray:
    """[d_model] float32: a direction drawn uniformly on the sphere (seeded), scaled to ``norm``."""
    v = np.random.default_rng(seed).standard_normal(d_model)
    return (v / np.linalg.norm(v) * norm).astype(np.float32)


def describe_vector(v_D: np.ndarray) -> dict[str, Any]:
    """Norm and digest of a direction, as an edit record holds them."""
    return {"norm": float(np.linalg.norm(v_D.astype(np.float64))), "digest": vector_digest(v_D),
            "d_model": int(v_D.shape[0])}


__all__ = ["MATCH_NEIGHBOURS", "DirectionEdit", "LatentEdit", "decoder_rows", "describe_vector",
           "edit_latents", "matched_random_latents", "random_direction", "random_latents", "vector_digest"]
