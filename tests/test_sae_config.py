"""bra/sae/config.py: TrainConfig's learning-rate schedule, differences, nested stream settings, presets."""

from __future__ import annotations

import pytest

from bra.sae.config import PRESETS, TrainConfig


def test_train_config__lr_schedule_constant_then_linear_decay() -> None:
    cfg = TrainConfig(steps=10, lr=1.0, lr_decay_frac=0.4)
    assert [round(cfg.lr_at(i), 3) for i in range(10)] == [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    assert TrainConfig(steps=10, lr=1.0, lr_decay_frac=0.0).lr_at(9) == 1.0
    assert "steps" in cfg.differences({**cfg.to_dict(), "steps": 20})
    assert "steps" not in TrainConfig(lr_decay_frac=0.0).differences(
        {**TrainConfig(lr_decay_frac=0.0).to_dict(), "steps": 1})


def test_presets__seed_recipe() -> None:
    cfg = TrainConfig(**PRESETS["seed"])
    assert (cfg.d_sae, cfg.k, cfg.lr, cfg.steps, cfg.contrastive) == (6144, 32, 3e-4, 5000, "cosine")
    assert cfg.l1_coef > 0


def test_train_config__nested_stream_settings_flat_or_nested() -> None:
    from bra.sae.config import StreamConfig

    cfg = TrainConfig.from_dict({"buffer_rows": 64, "k": 4, "d_sae": 8})
    assert cfg.stream == StreamConfig(buffer_rows=64)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg == TrainConfig.from_dict(cfg.flat_dict())
    assert cfg.differences(cfg.to_dict()) == cfg.differences(cfg.flat_dict()) == []
    assert cfg.differences({**cfg.flat_dict(), "buffer_rows": 1}) == ["buffer_rows"]
    assert cfg.differences({**cfg.to_dict(), "stream": {"buffer_rows": 1}}) == ["buffer_rows"]
    assert cfg.differences({**cfg.to_dict(), "stream": {}}) == ["buffer_rows"]
    with pytest.raises(ValueError, match="buffer_rows"):
        TrainConfig.from_dict({"buffer_rows": 0})
    with pytest.raises(TypeError):
        TrainConfig.from_dict({"buffer_rowz": 1})


def test_differences__a_run_saved_before_encoder_init_used_the_transpose():
    """run.json of a run made before the setting existed lacks it: that run used the transpose init, so a
    resume with the new default is refused and one that says transpose is not."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "encoder_init"}
    assert TrainConfig().differences(old) == ["encoder_init"]
    assert TrainConfig(encoder_init="transpose").differences(old) == []
