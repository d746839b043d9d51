"""Losses and metrics for TopK SAE training, as pure tensor functions.

Shape suffixes: B batch rows, D d_model, S d_sae, K k, N profiles, F profile width.
Losses return 0-dim tensors that backpropagate; metrics return detached 0-dim tensors.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def _sum_sq(t_BD: torch.Tensor) -> torch.Tensor:
    """Sum of squares in at least float32, so bf16 inputs do not lose the ratio's precision."""
    return t_BD.to(torch.promote_types(t_BD.dtype, torch.float32)).pow(2).sum()


def normalized_mse(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """Reconstruction loss sum_b ||x_b - x_hat_b||² / sum_b ||x_b - mean_b(x)||².

    This is the fraction of variance unexplained (FVU) of the batch: 0 is perfect, 1 is no better than
    predicting the batch mean. It is invariant to a common scale of x and x_hat, so it does not matter
    whether both are passed raw or multiplied by `input_scale`.

    Args:
        x_hat_BD: reconstruction [B, D].
        x_BD: target [B, D].
    Returns:
        0-dim tensor.
    """
    num = _sum_sq(x_BD - x_hat_BD)
    den = _sum_sq(x_BD - x_BD.mean(dim=0, keepdim=True))
    return num / den


@torch.no_grad()
def fvu(x_hat_BD: torch.Tensor, x_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, the detached metric form of `normalized_mse` (same formula)."""
    return normalized_mse(x_hat_BD, x_BD)


def l1_sparsity(z_BS: torch.Tensor) -> torch.Tensor:
    """Seed's optional L1 term: mean_b sum_s |z_bs|.

    Args:
        z_BS: latents [B, S].
    Returns:
        0-dim tensor.
    """
    return z_BS.abs().sum(dim=-1).mean()


def auxk_loss(
    x_BD: torch.Tensor,
    x_hat_BD: torch.Tensor,
    pre_acts_BS: torch.Tensor,
    W_dec_SD: torch.Tensor,
    dead_mask_S: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK loss (Gao et al. 2024, Appendix A.2): make dead latents model the reconstruction error.

    e = (x - x_hat), detached; z_aux keeps, per row, the top min(k_aux, n_dead) entries of `pre_acts`
    among dead latents only; e_hat = z_aux @ W_dec (no bias, the residual has none);
    loss = sum_b ||e_b - e_hat_b||² / sum_b ||e_b - mean_b(e)||².

    We follow dictionary_learning `TopKTrainer.get_auxiliary_loss`, which normalises like
    openai/sparse_autoencoder (`normalized_mse` over the residual, kernels.py); sparsify divides by the
    total variance of x instead and SAELens does not normalise. e is detached as in both references, so
    only the dead latents' encoder and decoder rows receive gradient.

    x, x_hat and W_dec must share one space: with input_scale s != 1 pass x * s and x_hat * s (the space
    `pre_acts` and W_dec live in), or equivalently raw x, x_hat and W_dec / s.

    Never reads a value back to the host (a GPU step then never waits on it): the top-k is always
    min(k_aux, S) wide, picks among live latents (fewer dead ones than that) are zeroed, and the loss is
    masked to 0 when no latent is dead; the same value as clamping k to the dead count. e_hat is summed
    from the k picked rows of W_dec (one ``embedding_bag``), not from a dense [B, S] z_aux.

    Args:
        x_BD: SAE input [B, D].
        x_hat_BD: SAE reconstruction [B, D].
        pre_acts_BS: post-ReLU, pre-top-k activations [B, S].
        W_dec_SD: decoder [S, D].
        dead_mask_S: bool [S], True for latents counted dead by the trainer.
        k_aux: latents per row in the auxiliary reconstruction (paper heuristic: d_model / 2).
    Returns:
        0-dim tensor; 0 when no latent is dead (with zero gradients).
    """
    if k_aux < 1:
        raise ValueError(f"k_aux must be >= 1, got {k_aux}")
    e_BD = (x_BD - x_hat_BD).detach()
    masked_BS = torch.where(dead_mask_S[None, :], pre_acts_BS, torch.full_like(pre_acts_BS, -torch.inf))
    aux_values_BK, aux_indices_BK = masked_BS.topk(min(k_aux, pre_acts_BS.shape[-1]), dim=-1, sorted=False)
    aux_values_BK = torch.where(torch.isfinite(aux_values_BK), aux_values_BK, torch.zeros_like(aux_values_BK))
    e_hat_BD = F.embedding_bag(aux_indices_BK, W_dec_SD, per_sample_weights=aux_values_BK.to(W_dec_SD.dtype),
                               mode="sum")
    # A batch whose residual has no variance gives 0/0; the references map that NaN to 0.
    loss = normalized_mse(e_hat_BD, e_BD).nan_to_num(0.0)
    return torch.where(dead_mask_S.any(), loss, torch.zeros_like(loss))


def nt_xent_tier_loss(
    features_NF: torch.Tensor, tiers_N: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised NT-Xent over tier labels (Khosla et al. 2020, SupCon L_out).

    Rows are L2-normalised to u_i; s_ij = u_i·u_j / temperature. For anchor i with positives
    P(i) = {p != i : tier_p = tier_i}:
        l_i = -1/|P(i)| sum_{p in P(i)} [s_ip - log sum_{a != i} exp(s_ia)]
    and the loss is the mean of l_i over anchors with |P(i)| >= 1. Rows of other tiers are the
    negatives. Returns 0 when no anchor has a positive or only one tier is present (no negatives, so
    nothing to contrast).

    Args:
        features_NF: one feature profile per row [N, F] (e.g. mean latent activation per prompt).
        tiers_N: integer tier label per row [N].
        temperature: softmax temperature; SupCon uses 0.1.
    Returns:
        0-dim tensor.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = features_NF.shape[0]
    if n < 2:
        return features_NF.new_zeros(())
    # no host reads (the step must not wait on a GPU): "one tier only" and "no anchor has a positive" are
    # masks on the device, not early returns
    u_NF = F.normalize(features_NF.to(torch.promote_types(features_NF.dtype, torch.float32)), dim=-1)
    sim_NN = u_NF @ u_NF.T / temperature
    self_NN = torch.eye(n, dtype=torch.bool, device=features_NF.device)
    positive_NN = (tiers_N[:, None] == tiers_N[None, :]) & ~self_NN
    n_pos_N = positive_NN.sum(dim=1)
    has_pos_N = n_pos_N > 0
    log_denom_N1 = torch.logsumexp(sim_NN.masked_fill(self_NN, -torch.inf), dim=1, keepdim=True)
    # where(), not multiplication by the mask: the diagonal would be -inf and -inf * 0 is NaN.
    log_prob_NN = torch.where(positive_NN, sim_NN - log_denom_N1, torch.zeros_like(sim_NN))
    loss_N = -log_prob_NN.sum(dim=1) / n_pos_N.clamp_min(1)
    loss = (loss_N * has_pos_N).sum() / has_pos_N.sum().clamp_min(1)
    contrasts = (tiers_N != tiers_N[0]).any() & has_pos_N.any()
    return torch.where(contrasts, loss, torch.zeros_like(loss))


def cosine_tier_separation(features_NF: torch.Tensor, tiers_N: torch.Tensor) -> torch.Tensor:
    """Seed's contrastive term: cos(mean_{tier=1} f, mean_{tier=0} f), to be minimised.

    Tier 1 is hazard, tier 0 benign; rows with other labels are ignored. Returns 0 when either tier
    is missing.

    Args:
        features_NF: feature profiles [N, F].
        tiers_N: integer tier labels [N].
    Returns:
        0-dim tensor in [-1, 1].
    """
    hazard_N = tiers_N == 1
    benign_N = tiers_N == 0
    # masked means instead of boolean indexing and early returns: no host read
    f = features_NF.to(torch.promote_types(features_NF.dtype, torch.float32))
    mean_hazard_F = (f * hazard_N[:, None]).sum(dim=0) / hazard_N.sum().clamp_min(1)
    mean_benign_F = (f * benign_N[:, None]).sum(dim=0) / benign_N.sum().clamp_min(1)
    cos = F.cosine_similarity(mean_hazard_F, mean_benign_F, dim=0)
    return torch.where(hazard_N.any() & benign_N.any(), cos, torch.zeros_like(cos))


@torch.no_grad()
def l0(z_BS: torch.Tensor) -> torch.Tensor:
    """Mean number of nonzero latents per row of z [B, S] (k for a TopK SAE unless acts tie at 0)."""
    return (z_BS != 0).sum(dim=-1).float().mean()


@torch.no_grad()
def dead_fraction(fired_counts_S: torch.Tensor) -> torch.Tensor:
    """Fraction of latents that never fired, given per-latent fire counts [S] over some window."""
    return (fired_counts_S == 0).float().mean()


@torch.no_grad()
def dense_fraction(fire_freq_S: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Fraction of latents firing on more than `threshold` of rows, given per-latent frequencies [S]."""
    return (fire_freq_S > threshold).float().mean()
