"""Per-prompt pooling of SAE codes and raw activations over a segment's rows (pure numpy).

Every prompt is one window: prompt-segment rows, then completion-segment rows. For each prompt the SAE
latents are pooled over its prompt rows and, separately, over its completion rows; masked rows (the
attention sink at position 0, BOS) are excluded. ``mean`` (the default) averages the dense latent vector
over the rows, so a latent that fires on a few tokens of a long completion counts in proportion; ``max``
takes each latent's peak, which favours rare, sharp features. The raw residual stream is pooled the same
way (for the raw-activation baselines). SAE codes are kept sparse (the active latents' indices and values
per row: k for TopK, the most active latents of any row for JumpReLU / ReLU), so a store of any size costs
rows x k x 8 bytes, not rows x d_sae.

A pooling group is ``doc * 2 + i`` with i the position of the segment in `POOLED_SEGMENTS`
(`TokenColumns.groups`). Shape suffixes: G groups (2 per prompt), R rows, D d_model.
"""

from __future__ import annotations

import numpy as np

from bra.audit.bundle import SparseCodes, TokenColumns
from bra.audit.config import POOLS
from bra.vocab import POOLED_SEGMENTS


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def by_segment(x_GD: np.ndarray, n_docs: int) -> dict[str, np.ndarray]:
    """segment -> [n_docs, D]: the group rows of ``x_GD`` split by segment."""
    x = x_GD.reshape(n_docs, len(POOLED_SEGMENTS), -1)
    return {s: x[:, i] for i, s in enumerate(POOLED_SEGMENTS)}


def pool_codes(codes: SparseCodes, tokens: TokenColumns, n_docs: int, pool: str) -> dict[str, np.ndarray]:
    """segment -> [n_docs, d_sae] latents pooled over each prompt's rows of that segment (see module doc).

    Exact for any sparse width: padding entries (index < 0) are skipped, and a latent a row does not list
    counts as 0 there (for the max, too: it matters only for signed latents, `--sae none`)."""
    _check_pool(pool)
    groups = tokens.groups()
    keep = groups >= 0
    g = np.repeat(groups[keep], codes.indices.shape[1])
    j = codes.indices[keep].ravel()
    v = codes.values[keep].ravel().astype(np.float64)
    listed = j >= 0  # bra.sae.base.PAD_INDEX is -1
    if not listed.all():
        g, j, v = g[listed], j[listed], v[listed]
    rows_G = np.bincount(groups[keep], minlength=2 * n_docs)
    out = np.zeros((2 * n_docs, codes.d_sae))
    if pool == "mean":
        np.add.at(out, (g, j), v)
        out /= np.maximum(rows_G, 1)[:, None]
    elif (v >= 0).all():  # unlisted latents are 0 and listed ones >= 0: max(0, listed) is the max
        np.maximum.at(out, (g, j), v)
    else:
        out[:] = -np.inf
        np.maximum.at(out, (g, j), v)
        n_listed = np.zeros(out.shape, dtype=np.int64)
        np.add.at(n_listed, (g, j), 1)
        out = np.where(n_listed < rows_G[:, None], np.maximum(out, 0.0), out)  # some row has it at 0
        out[~np.isfinite(out)] = 0.0  # a group without rows
    return by_segment(out, n_docs)


def empty_raw(n_docs: int, d_model: int, pool: str) -> np.ndarray:
    """[G, D] accumulator for `accumulate_raw_`: zeros for a mean, -inf for a max."""
    _check_pool(pool)
    shape = (2 * n_docs, d_model)
    return np.zeros(shape) if pool == "mean" else np.full(shape, -np.inf)


def accumulate_raw_(raw_GD: np.ndarray, x_RD: np.ndarray, g_R: np.ndarray, pool: str) -> None:
    """Add the rows ``x_RD`` (all pooled; ``g_R`` their groups) to the accumulator, in place (float64)."""
    for gid in np.unique(g_R):
        rows = x_RD[g_R == gid].astype(np.float64)
        raw_GD[gid] = raw_GD[gid] + rows.sum(0) if pool == "mean" else np.maximum(raw_GD[gid], rows.max(0))


def finish_raw(raw_GD: np.ndarray, counts_G: np.ndarray, n_docs: int, pool: str) -> dict[str, np.ndarray]:
    """segment -> [n_docs, D] pooled raw activations from the accumulator (0 for a group without rows)."""
    if pool == "mean":
        raw_GD = raw_GD / np.maximum(counts_G.reshape(-1, 1), 1)
    raw_GD = np.where(np.isfinite(raw_GD), raw_GD, 0.0)  # a (doc, segment) with no pooled rows
    return by_segment(raw_GD, n_docs)
