"""A checkpoint saved before the first optimizer step (train.eval_at_start's `best` at step 0)
changes nothing: the optimizer state is saved as it is (empty), never initialised for the save,
and a resume from it trains the same; a resumed parameter that had no state has none."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_run
from lmforge.base.config import TrainConfig, load_config
from lmforge.checkpoint import save_checkpoint
from lmforge.train.loop import train
from lmforge.train.optim import build_optimizer
from lmforge.train.parallel import NamedOptimizerState


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    return model, build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1), torch.device("cpu"))


def _train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3, seed: int = 1,
                 head: bool = True) -> list[torch.Tensor]:
    """`steps` AdamW steps on random inputs; head=False leaves the last layer out (no gradient)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=generator)
        (model if head else model[:2])(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_saving_the_untouched_optimizer_leaves_it_untouched():
    model, optimizer = _model_and_optimizer()
    expected = _train_steps(model, optimizer)

    model, optimizer = _model_and_optimizer()
    saved = NamedOptimizerState(model, optimizer).state_dict()
    assert saved["state"] == {} and not optimizer.state  # nothing initialised for the save
    assert all(p.grad is None for p in model.parameters())
    names = [name for group in saved["param_groups"] for name in group["params"]]
    assert names == ["0.weight", "2.weight", "0.bias", "1.weight", "1.bias", "2.bias"]  # decay group first
    assert [g["weight_decay"] for g in saved["param_groups"]] == [0.1, 0.0]
    for a, b in zip(_train_steps(model, optimizer), expected):
        assert torch.equal(a, b)

    # and a fresh optimizer loading the empty state trains as if it had never been saved
    model, optimizer = _model_and_optimizer()
    for group in optimizer.param_groups:
        group["lr"] = 0.5  # the saved hyperparameters replace these
    NamedOptimizerState(model, optimizer).load_state_dict(saved)
    assert not optimizer.state and [g["lr"] for g in optimizer.param_groups] == [1e-2, 1e-2]
    for a, b in zip(_train_steps(model, optimizer), expected):
        assert torch.equal(a, b)


def test_an_empty_optimizer_state_naming_a_parameter_the_model_lacks_is_refused():
    model, optimizer = _model_and_optimizer()
    saved = NamedOptimizerState(model, optimizer).state_dict()
    saved["param_groups"][1]["params"][0] = "3.bias"
    with pytest.raises(ValueError, match=r"parameter group 1 .* \(3\.bias\) .* \(0\.bias\)"):
        NamedOptimizerState(model, optimizer).load_state_dict(saved)


def test_a_parameter_without_state_has_none_after_a_resume():
    model, optimizer = _model_and_optimizer()
    _train_steps(model, optimizer, steps=2, head=False)  # the last layer has no gradient yet: no state
    weights, saved = copy.deepcopy((model.state_dict(), NamedOptimizerState(model, optimizer).state_dict()))
    assert sorted(saved["state"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    expected = _train_steps(model, optimizer, seed=2)

    model, optimizer = _model_and_optimizer()
    model.load_state_dict(weights)
    NamedOptimizerState(model, optimizer).load_state_dict(saved)
    assert model[2].weight not in optimizer.state  # torch's loader had created one for the load
    for a, b in zip(_train_steps(model, optimizer, seed=2), expected):
        assert torch.equal(a, b)


def _train_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def test_a_run_that_saves_best_at_step_0_trains_the_same_and_resumes_from_it(lm_data: Path, tmp_path: Path,
                                                                            monkeypatch):
    settings = dict(max_steps=4, log_every=1, eval_every=2, save_every=100)
    plain = train(load_config(None, base=tiny_run(lm_data, tmp_path / "plain", **settings)), quiet=True)
    assert len(_train_losses(plain.run_dir)) == 4

    saves, step_0 = [], tmp_path / "step-0"

    def save_and_keep_step_0(path: Path, **kwargs) -> Path:
        saves.append((Path(path).name, kwargs["step"]))
        save_checkpoint(path, **kwargs)
        if kwargs["step"] == 0:
            shutil.copytree(path, step_0)
        return path
    monkeypatch.setattr("lmforge.train.loop.save_checkpoint", save_and_keep_step_0)
    config = load_config(None, base=tiny_run(lm_data, tmp_path / "eval-at-start", eval_at_start=True, **settings))
    at_start = train(config, quiet=True)
    monkeypatch.undo()
    assert saves[0] == ("best", 0)  # train.eval_at_start: the untrained model is the first best
    assert _train_losses(at_start.run_dir) == _train_losses(plain.run_dir)  # bitwise

    resumed = train(config, resume_from=step_0, quiet=True)
    assert resumed.steps == 4
    assert _train_losses(resumed.run_dir)[-4:] == _train_losses(plain.run_dir)
