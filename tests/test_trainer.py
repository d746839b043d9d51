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
