"""Tests for bra.sae.model: config validation, hand-set encode/decode, training helpers, folding."""

import dataclasses

import pytest
import torch

from bra.sae.losses import normalized_mse
from bra.sae.model import ForwardOutput, SAEConfig, TopKSAE


def _random_sae(input_scale: float = 1.0, dtype: str = "float32", seed: int = 0) -> TopKSAE:
    """A random SAE with nonzero biases, so tests exercise b_enc and b_dec too."""
    cfg = SAEConfig(d_model=8, d_sae=24, k=4, dtype=dtype, input_scale=input_scale)
    sae = TopKSAE.init_random(cfg, seed=seed, data_mean=torch.linspace(-1, 1, 8))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(24, generator=gen))
    return sae


def _hand_set_sae(input_scale: float = 1.0) -> TopKSAE:
    cfg = SAEConfig(d_model=2, d_sae=3, k=2, input_scale=input_scale)
    return TopKSAE.from_state_dict(
        cfg,
        {
            "W_enc": torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]),
            "b_enc": torch.tensor([0.0, 0.0, 0.5]),
            "W_dec": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
            "b_dec": torch.tensor([0.5, -0.5]),
        },
    )


# ------------------------------------------------------------------------------------------ config


def test_SAEConfig__k_greater_than_d_sae_raises():
    with pytest.raises(ValueError, match=r"k \(5\) must be <= d_sae \(4\)"):
        SAEConfig(d_model=2, d_sae=4, k=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_model": 0, "d_sae": 4, "k": 1},
        {"d_model": 2, "d_sae": -1, "k": 1},
        {"d_model": 2, "d_sae": 4, "k": 0},
        {"d_model": 2, "d_sae": 4, "k": 1, "dtype": "int8"},
        {"d_model": 2, "d_sae": 4, "k": 1, "input_scale": 0.0},
        {"d_model": 2, "d_sae": 4, "k": 1, "input_scale": float("nan")},
    ],
)
def test_SAEConfig__invalid_values_raise(kwargs):
    with pytest.raises(ValueError):
        SAEConfig(**kwargs)


def test_SAEConfig__dict_round_trip_and_unknown_keys_refused():
    cfg = SAEConfig(d_model=4, d_sae=8, k=2, model_name="m", hook_name="blocks.3.hook_resid_post", layer=3,
                    input_scale=2.0, store_fingerprint="abc")
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown SAEConfig keys"):
        SAEConfig.from_dict({**cfg.to_dict(), "lr": 1e-3})


# --------------------------------------------------------------------------------- encode / decode


def test_TopKSAE__encode_matches_hand_set_example():
    sae = _hand_set_sae()
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    # row 0: pre = [2, 1, -2 + 1 + 0.5] = [2, 1, -0.5] -> relu [2, 1, 0] -> top-2 keeps latents 0, 1
    # row 1: pre = [0, 3, 0 + 3 + 0.5] = [0, 3, 3.5] -> top-2 keeps latents 1, 2
    expected_z = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 3.5]])
    torch.testing.assert_close(sae.encode(x), expected_z)
    # decode: row 0: 2*[1,0] + 1*[0,1] + [0.5,-0.5] = [2.5, 0.5]
    #         row 1: 3*[0,1] + 3.5*[1,1] + [0.5,-0.5] = [4.0, 6.0]
    torch.testing.assert_close(sae.decode(expected_z), torch.tensor([[2.5, 0.5], [4.0, 6.0]]))


def test_TopKSAE__input_scale_scales_input_and_divides_output():
    sae = _hand_set_sae(input_scale=2.0)
    x = torch.tensor([[1.0, 0.5]])
    # x * 2 = [2, 1] -> same pre-activations as the unscaled example's row 0
    torch.testing.assert_close(sae.encode(x), torch.tensor([[2.0, 1.0, 0.0]]))
    # decode divides by 2: [2.5, 0.5] / 2
    torch.testing.assert_close(sae.decode(torch.tensor([[2.0, 1.0, 0.0]])), torch.tensor([[1.25, 0.25]]))


def test_TopKSAE__encode_keeps_exactly_k_nonzeros():
    sae = _random_sae()
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive, so top-k never picks a zero
    z = sae.encode(torch.randn(64, 8, generator=torch.Generator().manual_seed(3)))
    assert z.shape == (64, 24)
    assert torch.equal((z != 0).sum(dim=-1), torch.full((64,), 4))


def test_TopKSAE__forward_fields_are_consistent():
    sae = _random_sae(input_scale=1.7)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    assert isinstance(out, ForwardOutput)
    assert out.top_values.shape == out.top_indices.shape == (16, 4)
    torch.testing.assert_close(out.z, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae.decode(out.z))
    torch.testing.assert_close(out.top_values, out.pre_acts.gather(-1, out.top_indices))
    # the kept values are the k largest pre-activations of each row
    expected_top = out.pre_acts.topk(4, dim=-1).values.sort(dim=-1).values
    torch.testing.assert_close(out.top_values.sort(dim=-1).values, expected_top)


def test_TopKSAE__encode_accepts_leading_dims():
    sae = _random_sae()
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sae.encode(x).reshape(6, 24), sae.encode(x.reshape(6, 8)))


# ------------------------------------------------------------------------------------------- init


def test_TopKSAE__init_random_follows_topk_paper_and_is_seeded():
    cfg = SAEConfig(d_model=8, d_sae=24, k=4, input_scale=3.0)
    mean = torch.arange(8.0)
    sae = TopKSAE.init_random(cfg, seed=7, data_mean=mean)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(24))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.equal(sae.b_enc, torch.zeros(24))
    torch.testing.assert_close(sae.b_dec, mean * 3.0)  # b_dec lives in the scaled space
    again = TopKSAE.init_random(cfg, seed=7, data_mean=mean)
    other = TopKSAE.init_random(cfg, seed=8, data_mean=mean)
    assert torch.equal(sae.W_dec, again.W_dec)
    assert not torch.equal(sae.W_dec, other.W_dec)


def test_TopKSAE__fit_encoder_scale_is_the_least_squares_factor():
    """The factor minimises the sample's reconstruction error over a (checked against nearby factors and the
    transpose), keeps the top-k choice, and makes the first reconstruction far closer when k/d_model is
    large; it refuses a trained SAE (b_enc != 0), where the choice would move with the factor."""
    cfg = SAEConfig(d_model=16, d_sae=96, k=8, input_scale=2.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 16, generator=gen) + 0.5

    def err(scale: float) -> float:
        sae = TopKSAE.init_random(cfg, seed=1, data_mean=x.mean(0))
        with torch.no_grad():
            sae.W_enc.mul_(scale)
            return float(((sae(x).x_hat - x) ** 2).sum())

    sae = TopKSAE.init_random(cfg, seed=1, data_mean=x.mean(0))
    before = sae.encode_topk(x)[1].sort(dim=-1).values
    scale = sae.fit_encoder_scale_(x)
    assert 0 < scale < 1  # the transpose overshoots at k/d_model = 1/2
    assert torch.equal(sae.encode_topk(x)[1].sort(dim=-1).values, before)
    with torch.no_grad():
        best = float(((sae(x).x_hat - x) ** 2).sum())
    assert best == pytest.approx(err(scale), rel=1e-5)
    assert best < min(err(0.9 * scale), err(1.1 * scale)) and best < 0.5 * err(1.0)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    with pytest.raises(ValueError, match="b_enc"):
        sae.fit_encoder_scale_(x)


# ------------------------------------------------------------------------------- training helpers


def test_TopKSAE__gradient_projection_leaves_grads_orthogonal_to_rows():
    sae = _random_sae()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1, generator=gen) + 0.5)  # non-unit rows: the projection must normalise
    sae.W_dec.grad = torch.randn(24, 8, generator=gen)
    before = sae.W_dec.grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(dim=-1)
    torch.testing.assert_close(dots, torch.zeros(24), atol=1e-5, rtol=0)
    # only the parallel part is removed: the removed piece is parallel to each row
    removed = before - sae.W_dec.grad
    cos = torch.nn.functional.cosine_similarity(removed, sae.W_dec, dim=-1).abs()
    torch.testing.assert_close(cos, torch.ones(24), atol=1e-4, rtol=0)


def test_TopKSAE__gradient_projection_without_grad_is_noop():
    sae = _random_sae()
    sae.remove_gradient_parallel_to_decoder_directions_()
    assert sae.W_dec.grad is None


def test_TopKSAE__decoder_norms_stay_unit_after_adamw_steps():
    sae = _random_sae(input_scale=2.0)
    W_dec_start = sae.W_dec.detach().clone()
    opt = torch.optim.AdamW(sae.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        x = torch.randn(32, 8, generator=gen)
        loss = normalized_mse(sae(x).x_hat, x)
        opt.zero_grad()
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions_()
        opt.step()
        sae.set_decoder_norm_to_unit_norm_()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(24), atol=1e-6, rtol=0)
    assert not torch.allclose(sae.W_dec, W_dec_start)  # the steps did move the decoder


# ----------------------------------------------------------------------------------------- folding


def test_TopKSAE__folded_gives_identical_encode_and_decode():
    sae = _random_sae(input_scale=3.7, dtype="float64")
    folded = sae.folded()
    assert folded.cfg == dataclasses.replace(sae.cfg, input_scale=1.0)
    x = torch.randn(64, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * 5
    z = sae.encode(x)
    torch.testing.assert_close(folded.encode(x), z, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(folded.decode(z), sae.decode(z), atol=1e-12, rtol=1e-12)


def test_TopKSAE__folded_with_unit_scale_is_an_exact_copy():
    sae = _random_sae()
    folded = sae.folded()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(folded, name), getattr(sae, name))
        assert getattr(folded, name).data_ptr() != getattr(sae, name).data_ptr()


def test_TopKSAE__from_state_dict_rejects_bad_shapes_and_keys():
    cfg = SAEConfig(d_model=2, d_sae=3, k=1)
    good = {"W_enc": torch.zeros(2, 3), "b_enc": torch.zeros(3),
            "W_dec": torch.zeros(3, 2), "b_dec": torch.zeros(2)}
    with pytest.raises(ValueError, match="W_dec has shape"):
        TopKSAE.from_state_dict(cfg, {**good, "W_dec": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="extra"):
        TopKSAE.from_state_dict(cfg, {**good, "threshold": torch.zeros(())})


@pytest.mark.parametrize("input_scale", [1.0, 2.5])
def test_TopKSAE__sparse_decode_matches_dense_decode_and_its_gradients(input_scale: float):
    """forward(x, sparse=True) decodes from the k kept latents only: the same x_hat and the same gradients
    as the dense z @ W_dec, to float rounding, with z not built."""
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))  # leading dims too
    grads = []
    for sparse in (False, True):
        sae = _random_sae(input_scale)
        out = sae(x, sparse=sparse)
        assert (out.z is None) == sparse
        ((out.x_hat - x) ** 2).sum().backward()
        grads.append((out.x_hat.detach(), [p.grad.clone() for p in sae.parameters()]))
    (dense_x_hat, dense_g), (sparse_x_hat, sparse_g) = grads
    torch.testing.assert_close(sparse_x_hat, dense_x_hat, rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse_g, dense_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in sparse_g)
