"""bra/sae/trainer.py: the Trainer on hand-made batches, without a store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bra.errors import SAEError
from bra.sae.config import TrainConfig
from bra.sae.model import SAEConfig, TopKSAE


def test_trainer__non_finite_loss_refused_before_it_is_logged_or_saved(tmp_path: Path) -> None:
    """The step does not sync to check the loss; the first NaN/inf loss is still named, with its step,
    before any metrics line or checkpoint after it is written."""
    from bra.sae.trainer import Trainer, TrainInput

    cfg = TrainConfig(d_sae=16, k=2, steps=10, batch_size=8, log_every=5, checkpoint_every=5,
                      contrastive="none", device="cpu")
    sae = TopKSAE.init_random(SAEConfig(d_model=4, d_sae=16, k=2), 0)

    def data():
        gen = torch.Generator().manual_seed(0)
        for i in range(10):
            x = torch.randn(8, 4, generator=gen)
            if i == 2:
                x[0, 0] = torch.inf
            yield TrainInput(x, torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64))

    with pytest.raises(SAEError, match=r"loss became (nan|inf) at step 3; lower --lr"):
        Trainer(sae, data(), cfg, out=tmp_path).fit()
    assert not (tmp_path / "metrics.jsonl").read_text() and not (tmp_path / "checkpoint").exists()


def _doc_batch(n_hazard_docs: int, n_other_docs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows per document, documents tier-contiguous as a store numbers them (the others first); latent
    0 of each row holds its document index, so a document's mean profile names it."""
    n_docs = n_hazard_docs + n_other_docs
    doc = torch.arange(n_docs).repeat_interleave(2)
    hazard = (doc >= n_other_docs).long()
    z = torch.zeros(2 * n_docs, 8)
    z[:, 0] = doc.float()
    return z, hazard, doc


def test_contrastive_features__doc_subset_keeps_both_tiers_and_is_seeded() -> None:
    from bra.sae.trainer import contrastive_features

    cfg = TrainConfig(contrastive_level="doc", contrastive_rows=512, seed=3)
    z, hazard, doc = _doc_batch(600, 600)  # 1,200 documents: the first 512 would all be of one tier
    feats, labels = contrastive_features(z, hazard, doc, cfg, step=7)
    assert feats.shape == (512, 8) and int(labels.sum()) == 256
    ids = feats[:, 0].long()
    assert len(set(ids.tolist())) == 512  # distinct documents
    assert torch.equal(labels, (ids >= 600).long())  # each profile carries its own document's label
    again = contrastive_features(z, hazard, doc, cfg, step=7)
    assert torch.equal(again[0], feats) and torch.equal(again[1], labels)  # a resume draws the same
    assert not torch.equal(contrastive_features(z, hazard, doc, cfg, step=8)[0], feats)
    other_seed = TrainConfig(contrastive_level="doc", contrastive_rows=512, seed=4)
    assert not torch.equal(contrastive_features(z, hazard, doc, other_seed, step=7)[0], feats)


def test_contrastive_features__short_tier_is_kept_whole_and_few_docs_all_kept() -> None:
    from bra.sae.trainer import balanced_subset, contrastive_features, subset_generator

    cfg = TrainConfig(contrastive_level="doc", contrastive_rows=512)
    z, hazard, doc = _doc_batch(100, 900)
    _, labels = contrastive_features(z, hazard, doc, cfg, step=0)
    assert labels.numel() == 512 and int(labels.sum()) == 100  # every hazard doc, 412 others
    z, hazard, doc = _doc_batch(3, 5)
    feats, labels = contrastive_features(z, hazard, doc, cfg, step=0)
    assert feats[:, 0].tolist() == list(range(8))  # under the cap: every document, in order
    one = torch.tensor([0] * 9 + [1])
    picked = one[balanced_subset(one, 2, subset_generator(0, 0))]
    assert sorted(picked.tolist()) == [0, 1]  # each label present keeps one


def _reference_step(sae, opt, x, hazard, doc, cfg, dead):
    """The train step as it was before the sparse decode: dense z, losses on the scaled space."""
    from bra.sae import losses
    from bra.sae.trainer import contrastive_features

    s = sae.cfg.input_scale
    out = sae(x)
    x_s, x_hat_s = x * s, out.x_hat * s
    total = cfg.recon_coef * losses.normalized_mse(x_hat_s, x_s) + cfg.l1_coef * losses.l1_sparsity(out.z)
    total = total + cfg.auxk_coef * losses.auxk_loss(x_s, x_hat_s, out.pre_acts, sae.W_dec, dead, 4)
    feats, labels = contrastive_features(out.z, hazard, doc, cfg, 0)
    total = total + cfg.contrastive_coef * losses.nt_xent_tier_loss(feats, labels, cfg.temperature)
    opt.zero_grad(set_to_none=True)
    total.backward()
    sae.remove_gradient_parallel_to_decoder_directions_()
    opt.step()
    sae.set_decoder_norm_to_unit_norm_()
    return float(total.detach())


@pytest.mark.parametrize("dead_tokens", [1, 10**9])
def test_trainer__step_matches_the_dense_reference_step(dead_tokens: int) -> None:
    """Every loss term on (L1, AuxK, NT-Xent): the step's sparse decode, its L1/L0 from the kept values
    and its skipping of AuxK before any latent can be dead give the dense step's loss and weights (to float
    rounding); AuxK runs once latents can be dead (dead_tokens 1: those that did not fire last step)."""
    from bra.sae.trainer import Trainer, TrainInput

    cfg = TrainConfig(d_sae=32, k=4, steps=3, batch_size=16, l1_coef=0.01, auxk_coef=0.5, k_aux=4,
                      dead_tokens=dead_tokens, contrastive="ntxent", contrastive_coef=0.1,
                      contrastive_level="token", contrastive_rows=16, lr_decay_frac=0.0, device="cpu")
    scfg = SAEConfig(d_model=8, d_sae=32, k=4, input_scale=1.7)
    gen = torch.Generator().manual_seed(0)
    batches = [TrainInput(torch.randn(16, 8, generator=gen), torch.arange(16) % 2, torch.arange(16) // 4)
               for _ in range(3)]
    ours = TopKSAE.init_random(scfg, 0, torch.full((8,), 0.3))
    trainer = Trainer(ours, iter(batches), cfg, progress=False)
    ref = TopKSAE.init_random(scfg, 0, torch.full((8,), 0.3))
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.999))
    for i, b in enumerate(batches):
        dead = trainer.state.tokens_since_fired >= dead_tokens  # the trainer's mask before its step
        out = trainer._train_step(b)
        want = _reference_step(ref, opt, b.x, b.hazard, b.doc, cfg, dead)
        assert float(out.loss) == pytest.approx(want, rel=1e-5)
        assert (float(out.auxk) > 0) == (i > 0 and dead_tokens == 1)
        assert float(out.l0) == 4.0
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("contrastive", ["ntxent", "cosine", "none"])
def test_trainer__step_never_waits_for_the_device(contrastive: str) -> None:
    """The module's promise, checked on the meta device (where any read of a value raises): a whole step
    with every default-level term on, AuxK included once latents can be dead, reads nothing back."""
    from bra.sae.trainer import Trainer, TrainInput

    cfg = TrainConfig(d_sae=32, k=4, steps=3, batch_size=16, l1_coef=0.01, auxk_coef=0.5, k_aux=4,
                      dead_tokens=1, contrastive=contrastive, contrastive_coef=0.1, contrastive_level="token",
                      contrastive_rows=16, device="cpu")
    m = torch.device("meta")
    sae = TopKSAE.init_random(SAEConfig(d_model=8, d_sae=32, k=4, input_scale=1.7), 0,
                              torch.full((8,), 0.3)).to(m)
    batches = [TrainInput(torch.randn(16, 8, device=m), torch.arange(16, device=m) % 2,
                          torch.arange(16, device=m) // 4) for _ in range(3)]
    trainer = Trainer(sae, iter(batches), cfg, progress=False)
    for b in batches:  # the 2nd and 3rd steps run AuxK (dead_tokens 1)
        out = trainer._train_step(b)
    assert out.loss.device == m and trainer.state.step == 3
