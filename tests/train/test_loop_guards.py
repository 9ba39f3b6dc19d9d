"""Loop safeguards: non-finite losses, early stopping, mixed precision on CPU, the time limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.train import loop, task_lm
from lmforge.checkpoint import load_checkpoint
from lmforge.train.loop import train
from lmforge.train.update import clip


@pytest.fixture(params=["host", "device"])
def decided_on(request, monkeypatch) -> str:
    """Where the loop decides about non-finite steps: on the host every step (CPU), or on the
    device, read at log steps (GPU with the fused AdamW; the same code runs on the CPU here)."""
    if request.param == "device":
        monkeypatch.setattr(loop, "defers_host_sync", lambda device, optimizer: True)
    return request.param


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def _poison_from(monkeypatch, first_bad_call: int) -> None:
    """Make every loss NaN from the n-th training forward on."""
    real = task_lm.LMTask.loss_and_metrics
    calls = {"n": 0}

    def poisoned(self, model, batch):
        stats = real(self, model, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= first_bad_call:
                stats.loss_sum = stats.loss_sum * float("nan")
        return stats

    monkeypatch.setattr(task_lm.LMTask, "loss_and_metrics", poisoned)


def test_non_finite_losses_skip_updates_then_stop_keeping_the_last_good_checkpoint(
        lm_data: Path, tmp_path: Path, monkeypatch, decided_on):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=30, save_every=4, eval_every=4,
                                          max_non_finite=3, log_every=2))
    _poison_from(monkeypatch, first_bad_call=10)
    result = train(cfg, quiet=True)
    assert result.reason == "non_finite" and result.exit_code == 1
    assert result.steps == 12  # steps 10, 11, 12 were skipped: 3 in a row stops the run
    last = load_checkpoint(result.run_dir / "checkpoints" / "last", with_training_state=True)
    assert last.training_state["loop"]["step"] == 8  # the last good save, nothing with NaN
    assert all(torch.isfinite(t).all() for t in last.state_dict.values())
    log = (result.run_dir / "train.log").read_text()
    if decided_on == "host":
        assert "step 10: loss nan" in log and "update skipped (3 in a row)" in log
    else:  # read at the log steps 10 and 12
        assert "1 update(s) up to step 10 skipped" in log and "2 update(s) up to step 12 skipped" in log
        assert "(3 in a row)" in log


def test_a_single_non_finite_step_is_skipped_and_training_goes_on(lm_data: Path, tmp_path: Path, monkeypatch,
                                                                  decided_on):
    real = task_lm.LMTask.loss_and_metrics
    calls = {"n": 0}

    def once(self, model, batch):
        stats = real(self, model, batch)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                stats.loss_sum = stats.loss_sum * float("inf")
        return stats

    monkeypatch.setattr(task_lm.LMTask, "loss_and_metrics", once)
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=6))
    result = train(cfg, quiet=True)
    assert result.reason == "max_steps" and result.steps == 6
    weights = load_checkpoint(result.run_dir / "checkpoints" / "last").state_dict
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_early_stopping_after_patience_evaluations(lm_data: Path, tmp_path: Path, monkeypatch):
    # every evaluation after the first reports a worse validation loss (a tiny learning rate
    # alone leaves the loss to rounding, which may improve it in the last bit)
    real, worse_by = loop.evaluate, iter(range(1000))

    def worsening(*args, **kwargs):
        result = real(*args, **kwargs)
        result["loss"] += next(worse_by)
        return result

    monkeypatch.setattr(loop, "evaluate", worsening)
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=100, eval_every=2, patience=2,
                                          lr=1e-9, warmup_steps=0, schedule="constant"))
    result = train(cfg, quiet=True)
    assert result.reason == "early_stop"
    assert [e["step"] for e in _events(result.run_dir, "eval")] == [2, 4, 6]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(lm_data: Path, tmp_path: Path, precision: str):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=12, precision=precision, lr=1e-2))
    result = train(cfg, quiet=True)
    losses = [e["loss"] for e in _events(result.run_dir, "train")]
    assert result.reason == "max_steps" and losses[-1] < losses[0]
    state = load_checkpoint(result.run_dir / "checkpoints" / "last", with_training_state=True).training_state
    assert ("scaler" in state) == (precision == "fp16")  # fp16 keeps its loss scale for resume
    weights = load_checkpoint(result.run_dir / "checkpoints" / "last").state_dict
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32


def test_fp16_overflows_lower_the_loss_scale_instead_of_stopping_the_run(lm_data: Path, tmp_path: Path,
                                                                          monkeypatch, decided_on):
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0 ** 24))
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=12, precision="fp16", max_non_finite=2))
    result = train(cfg, quiet=True)
    assert result.reason == "max_steps" and result.steps == 12
    log = (result.run_dir / "train.log").read_text()
    if decided_on == "host":  # on the device the scaler decides alone, unread
        assert "fp16: gradients overflowed at step 1; update skipped, loss scale lowered to 8.38861e+06" in log
    state = load_checkpoint(result.run_dir / "checkpoints" / "last", with_training_state=True).training_state
    assert state["scaler"]["scale"] < 2.0 ** 24
    weights = load_checkpoint(result.run_dir / "checkpoints" / "last").state_dict
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_time_limit_stops_with_a_checkpoint(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=100_000, max_time=1.0,
                                          eval_every=10_000))
    result = train(cfg, quiet=True)
    assert result.reason == "max_time" and 0 < result.steps < 100_000
    last = load_checkpoint(result.run_dir / "checkpoints" / "last", with_training_state=True)
    assert last.training_state["loop"]["step"] == result.steps


def test_data_for_another_task_is_refused(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, task="mlm"))
    with pytest.raises(ValueError, match="prepared for task 'lm'"):
        train(cfg, quiet=True)


def test_clip_scales_only_above_the_limit_and_returns_the_norm():
    model = torch.nn.Linear(3, 2, bias=False)
    model.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # norm 5
    assert clip(model, None, None, 10.0) == pytest.approx(5.0)
    assert torch.equal(model.weight.grad, torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))
    assert clip(model, None, None, 1.0) == pytest.approx(5.0)
    torch.testing.assert_close(model.weight.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=0)
    assert clip(model, None, None, None) == pytest.approx(1.0, rel=1e-5)  # no limit: the norm only


def test_clipping_folded_into_the_fused_adamw_step_equals_clipping_the_gradients():
    weights = []
    for folded in (True, False):
        model = torch.nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.arange(6.0).view(2, 3))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        for _ in range(2):
            model.weight.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # norm 5
            if folded:
                assert clip(model, optimizer, None, 1.0) == pytest.approx(5.0)
                assert model.weight.grad.norm() == pytest.approx(5.0)  # the step divides as it reads
                optimizer.step()
                del optimizer.grad_scale
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
        weights.append(model.weight.detach())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=1e-7)


def test_deciding_on_the_device_trains_exactly_as_deciding_on_the_host(lm_data: Path, tmp_path: Path, monkeypatch):
    runs = {}
    for mode in ("host", "device"):
        if mode == "device":
            monkeypatch.setattr(loop, "defers_host_sync", lambda device, optimizer: True)
        cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=8, log_every=3, grad_clip=0.5,
                                              grad_accum=2, lr=1e-2))
        cfg.run.name = mode
        result = train(cfg, quiet=True)
        runs[mode] = (load_checkpoint(result.run_dir / "checkpoints" / "last").state_dict,
                      [(e["step"], e["loss"], e["accuracy"], e["grad_norm"]) for e in _events(result.run_dir, "train")])
    (host_weights, host_log), (device_weights, device_log) = runs["host"], runs["device"]
    assert host_log == device_log and [step for step, *_ in host_log] == [3, 6, 8]
    for name in host_weights:
        assert torch.equal(host_weights[name], device_weights[name]), name
