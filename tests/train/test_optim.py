import subprocess
import sys

import pytest
import torch

from lmforge.base.config import TrainConfig
from lmforge.train.optim import AdamW, lr_at, parameter_groups


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


def _three_steps(optimizer_class, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    optimizer = optimizer_class(parameter_groups(model, 0.1), lr=1e-2, **kwargs)
    for step in range(3):
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


@pytest.mark.parametrize("kind", [{"fused": True}, {"foreach": True}])
def test_lean_adamw_updates_exactly_like_torch(kind):
    ours, our_opt = _three_steps(AdamW, **kind)
    theirs, their_opt = _three_steps(torch.optim.AdamW, **kind)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)
    ours_state, their_state = our_opt.state_dict(), their_opt.state_dict()
    assert ours_state["param_groups"] == their_state["param_groups"]
    for key in their_state["state"]:
        for name, value in their_state["state"][key].items():
            assert torch.equal(ours_state["state"][key][name], value)
    our_opt.load_state_dict(their_state)  # and it loads torch's state dict
    assert all(p.grad is None for p in ours.parameters())


def test_training_never_imports_torch_dynamo():
    """torch._dynamo costs 0.8 s of start-up; only torch.compile should pay for it."""
    code = ("import sys, torch\n"
            "from lmforge.base.config import TrainConfig\n"
            "from lmforge.train.optim import build_optimizer\n"
            "model = torch.nn.Linear(3, 2)\n"
            "opt = build_optimizer(model, TrainConfig(), torch.device('cpu'))\n"
            "model(torch.randn(2, 3)).sum().backward()\n"
            "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)\n"
            "opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
