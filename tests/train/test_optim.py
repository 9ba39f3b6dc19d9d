import pytest
import torch

from lmforge.config import TrainConfig
from lmforge.train.optim import lr_at, parameter_groups


def test_linear_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # first warmup step
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)  # peak at the end of warmup
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55e-3)  # halfway: mean of peak and floor
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)  # floor


def test_linear_decay_and_constant():
    cfg = TrainConfig(lr=2e-3, warmup_steps=0, schedule="linear", min_lr_ratio=0.0)
    assert lr_at(0, cfg, 100) == pytest.approx(2e-3)
    assert lr_at(50, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(100, cfg, 100) == pytest.approx(0.0)
    const = TrainConfig(lr=5e-4, warmup_steps=4, schedule="constant")
    assert [lr_at(s, const, 50) for s in (0, 3, 40)] == pytest.approx([1.25e-4, 5e-4, 5e-4])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(10, 4), (4, 4)]
    assert sorted(p.numel() for p in no_decay["params"]) == [4, 4, 4]  # linear bias, norm weight and bias
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
