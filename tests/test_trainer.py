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
