"""Tests for bra.sae.losses: hand-computed values on tiny tensors and a reference AuxK."""

import math

import pytest
import torch

from bra.sae import losses


def test_normalized_mse__hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x_hat = torch.tensor([[1.0, 0.5], [3.0, 0.0]])
    # num = 0.5² = 0.25; mean(x) = [2, 0]; den = 1² + 1² = 2 -> 0.125
    torch.testing.assert_close(losses.normalized_mse(x_hat, x), torch.tensor(0.125))
    # predicting the batch mean explains nothing: FVU 1
    mean_prediction = x.mean(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(losses.normalized_mse(mean_prediction, x), torch.tensor(1.0))


def test_fvu__equals_normalized_mse_and_is_detached():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    x_hat = (x + 0.1).requires_grad_()
    value = losses.fvu(x_hat, x)
    assert not value.requires_grad
    torch.testing.assert_close(value, losses.normalized_mse(x_hat, x).detach())


def test_l1_sparsity__hand_computed():
    z = torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 4.0]])
    # rows: |1| + |-2| = 3, 4 -> mean 3.5
    torch.testing.assert_close(losses.l1_sparsity(z), torch.tensor(3.5))


# --------------------------------------------------------------------------------------------- AuxK

_X = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
_PRE = torch.tensor([[0.5, 3.0, 1.0], [0.2, 0.1, 2.0]])
_W_DEC = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
_DEAD = torch.tensor([True, False, True])


def test_auxk_loss__hand_computed_k_aux_1():
    # x_hat = 0 so e = x = [[2,0],[0,1]]; mean(e) = [1, 0.5]; den = (1 + .25) + (1 + .25) = 2.5
    # dead latents 0 and 2; top-1 among them: row 0 -> latent 2 (1.0 > 0.5), row 1 -> latent 2 (2.0)
    # (latent 1 has the largest value, 3.0, but is alive and must be ignored)
    # e_hat = [1*[1,1], 2*[1,1]] = [[1,1],[2,2]]; e - e_hat = [[1,-1],[-2,-1]] -> 2 + 5 = 7
    # loss = 7 / 2.5 = 2.8
    value = losses.auxk_loss(_X, torch.zeros_like(_X), _PRE, _W_DEC, _DEAD, k_aux=1)
    torch.testing.assert_close(value, torch.tensor(2.8))


def test_auxk_loss__hand_computed_k_aux_2_and_clamped_to_dead_count():
    # row 0: z_aux = [0.5, 0, 1.0] -> e_hat = [1.5, 1]; e - e_hat = [0.5, -1] -> 1.25
    # row 1: z_aux = [0.2, 0, 2.0] -> e_hat = [2.2, 2]; e - e_hat = [-2.2, -1] -> 5.84
    # loss = 7.09 / 2.5 = 2.836
    for k_aux in (2, 5):  # 5 > 2 dead latents: clamped, same answer
        value = losses.auxk_loss(_X, torch.zeros_like(_X), _PRE, _W_DEC, _DEAD, k_aux=k_aux)
        torch.testing.assert_close(value, torch.tensor(2.836))


def _auxk_reference(x, x_hat, pre, W_dec, dead, k_aux):
    """Straightforward per-row loop of Gao et al. App. A.2 with dictionary_learning's normalisation."""
    e = x - x_hat
    dead_idx = [int(i) for i in torch.nonzero(dead).flatten()]
    k = min(k_aux, len(dead_idx))
    num = 0.0
    for b in range(x.shape[0]):
        chosen = sorted(dead_idx, key=lambda i: float(pre[b, i]), reverse=True)[:k]
        e_hat = sum(float(pre[b, i]) * W_dec[i] for i in chosen)
        num += float(((e[b] - e_hat) ** 2).sum())
    den = float(((e - e.mean(dim=0)) ** 2).sum())
    return num / den


def test_auxk_loss__matches_reference_loop():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    x_hat = x + 0.3 * torch.randn(16, 6, generator=gen, dtype=torch.float64)
    pre = torch.relu(torch.randn(16, 20, generator=gen, dtype=torch.float64))
    W_dec = torch.randn(20, 6, generator=gen, dtype=torch.float64)
    dead = torch.rand(20, generator=gen) < 0.4
    assert 3 < int(dead.sum()) < 20
    for k_aux in (1, 3, 50):
        value = losses.auxk_loss(x, x_hat, pre, W_dec, dead, k_aux)
        assert value.item() == pytest.approx(_auxk_reference(x, x_hat, pre, W_dec, dead, k_aux), rel=1e-10)


def test_auxk_loss__gradient_reaches_dead_latents_only():
    x_hat = torch.zeros_like(_X, requires_grad=True)
    pre = _PRE.clone().requires_grad_()
    W_dec = _W_DEC.clone().requires_grad_()
    losses.auxk_loss(_X, x_hat, pre, W_dec, _DEAD, k_aux=2).backward()
    assert x_hat.grad is None  # the residual is detached, as in the references
    assert torch.all(pre.grad[:, 1] == 0) and torch.all(W_dec.grad[1] == 0)
    assert torch.any(pre.grad[:, 2] != 0) and torch.any(W_dec.grad[2] != 0)


def test_auxk_loss__no_dead_latents_gives_zero_that_adds_to_a_loss():
    pre = _PRE.clone().requires_grad_()
    aux = losses.auxk_loss(_X, torch.zeros_like(_X), pre, _W_DEC, torch.zeros(3, dtype=torch.bool), k_aux=4)
    assert aux.item() == 0.0
    (pre.sum() + aux).backward()  # combining with a real loss still backpropagates
    assert torch.equal(pre.grad, torch.ones_like(pre))


# --------------------------------------------------------------------------------------- contrastive


def test_nt_xent_tier_loss__hand_computed_symmetric():
    # unit rows: u = [e1, e1, e2, e2] (rows 1 and 3 are scaled: the loss normalises)
    features = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    tiers = torch.tensor([0, 0, 1, 1])
    # T = 1; anchor 0: s_01 = 1 (positive), s_02 = s_03 = 0
    # l_0 = -(1 - log(e^1 + e^0 + e^0)) = log(e + 2) - 1; by symmetry every anchor has the same loss
    expected = math.log(math.e + 2) - 1
    value = losses.nt_xent_tier_loss(features, tiers, temperature=1.0)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_tier_loss__hand_computed_anchor_without_positive_skipped():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    tiers = torch.tensor([0, 0, 1])
    # T = 0.5 -> s = 2 * cos. anchor 0: s_01 = 2, s_02 = 0 -> l_0 = -(2 - log(e^2 + 1)) = log(1 + e^-2)
    # anchor 1: same; anchor 2 (tier 1) has no positive and is left out of the mean
    value = losses.nt_xent_tier_loss(features, tiers, temperature=0.5)
    assert value.item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_nt_xent_tier_loss__zero_without_positives_or_negatives():
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    assert losses.nt_xent_tier_loss(features, torch.tensor([1, 1, 1, 1])).item() == 0.0  # one tier
    assert losses.nt_xent_tier_loss(features, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no positives


def test_nt_xent_tier_loss__backpropagates_finite_gradients():
    features = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).requires_grad_()
    losses.nt_xent_tier_loss(features, torch.tensor([0, 0, 1, 1, 2, 0])).backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_cosine_tier_separation__hand_computed():
    features = torch.tensor([[1.0, 0.0], [2.0, 2.0], [1.0, 0.0], [9.0, 9.0]])
    tiers = torch.tensor([1, 0, 0, 2])  # the tier-2 row is ignored
    # hazard mean = [1, 0]; benign mean = [1.5, 1]; cos = 1.5 / sqrt(1.5² + 1) = 1.5 / sqrt(3.25)
    value = losses.cosine_tier_separation(features, tiers)
    assert value.item() == pytest.approx(1.5 / math.sqrt(3.25), rel=1e-6)


def test_cosine_tier_separation__zero_when_a_tier_is_missing():
    features = torch.ones(3, 2)
    assert losses.cosine_tier_separation(features, torch.tensor([0, 0, 2])).item() == 0.0
    assert losses.cosine_tier_separation(features, torch.tensor([1, 1, 1])).item() == 0.0


def test_tier_terms_masked_to_zero_pass_no_gradient():
    """The one-tier and no-positive cases are masked on the device, not returned early: still 0, and
    nothing flows back into the features."""
    features = torch.randn(4, 3, generator=torch.Generator().manual_seed(4)).requires_grad_()
    for loss in (losses.nt_xent_tier_loss(features, torch.tensor([1, 1, 1, 1])),
                 losses.nt_xent_tier_loss(features, torch.tensor([0, 1, 2, 3])),
                 losses.cosine_tier_separation(features, torch.tensor([1, 1, 2, 2]))):
        features.grad = None
        loss.backward()
        assert loss.item() == 0.0 and torch.all(features.grad == 0)


@pytest.mark.parametrize("n_dead", [0, 2, 20])
def test_loss_terms_never_read_a_value_back_from_the_device(n_dead):
    """On the meta device any host read (``int(t)``, ``bool(t)``, boolean indexing) raises: the terms a GPU
    step computes must not wait for the device."""
    m = torch.device("meta")
    x, pre, W_dec = torch.randn(8, 6, device=m), torch.randn(8, 20, device=m), torch.randn(20, 6, device=m)
    dead = torch.arange(20, device=m) < n_dead
    tiers = torch.arange(8, device=m) % 2
    with pytest.raises(RuntimeError):
        int(dead.sum())  # the premise: a host read fails here
    for value in (losses.auxk_loss(x, x * 0.5, pre, W_dec, dead, k_aux=3),
                  losses.nt_xent_tier_loss(pre, tiers), losses.cosine_tier_separation(pre, tiers)):
        assert value.device == m and value.shape == ()


# ------------------------------------------------------------------------------------------- metrics


def test_l0__hand_computed():
    z = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])
    assert losses.l0(z).item() == pytest.approx(1.5)  # (2 + 1) / 2


def test_dead_fraction__hand_computed():
    assert losses.dead_fraction(torch.tensor([0, 5, 0, 1])).item() == pytest.approx(0.5)


def test_dense_fraction__strictly_above_threshold():
    freq = torch.tensor([0.6, 0.5, 0.1, 0.9])
    assert losses.dense_fraction(freq).item() == pytest.approx(0.5)  # 0.6 and 0.9; 0.5 is not > 0.5
    assert losses.dense_fraction(freq, threshold=0.05).item() == pytest.approx(1.0)
