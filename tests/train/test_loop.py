"""The training loop: exact accumulation, losses going down, resume equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import forked_cli
from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.data.collate import pad_collate
from lmforge.models.registry import architecture, model_from_architecture
from lmforge.base.runtime import setup_runtime
from lmforge.checkpoint import load_checkpoint
from lmforge.train.loop import train
from lmforge.train.state import LoopState
from lmforge.train.step import forward_backward
from lmforge.train.log import RunLogger
from lmforge.train.tasks import make_task


def _model_and_task(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path))
    meta = json.loads((lm_data / "meta.json").read_text())
    torch.manual_seed(0)
    model = model_from_architecture(architecture(cfg.model, meta["vocab_size"]))
    return model, make_task(cfg, meta, cfg.model.context), setup_runtime("cpu")


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_equal_one_large_batch(lm_data: Path, tmp_path: Path):
    model, task, rt = _model_and_task(lm_data, tmp_path)
    log = RunLogger(tmp_path, enabled=False)
    # ragged samples: padding makes the per-micro-batch target counts differ
    samples = [{"input_ids": torch.randint(0, 300, (n,))} for n in (32, 20, 9, 27, 32, 14)]
    big = pad_collate(samples, task.pad_id)
    forward_backward(model, task, [big], LoopState(), rt, None, log)
    one = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = [pad_collate(samples[i:i + 2], task.pad_id) for i in (0, 2, 4)]
    forward_backward(model, task, micro, LoopState(), rt, None, log)
    for a, b in zip(one, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_out_of_memory_splits_the_batch_and_keeps_the_gradients(lm_data: Path, tmp_path: Path):
    model, task, rt = _model_and_task(lm_data, tmp_path)
    batch = pad_collate([{"input_ids": torch.randint(0, 300, (32,))} for _ in range(4)], task.pad_id)
    forward_backward(model, task, [batch], LoopState(), rt, None, RunLogger(tmp_path, enabled=False))
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    real = task.loss_and_metrics

    def small_only(m, b):
        if b["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(m, b)

    task.loss_and_metrics = small_only
    state = LoopState()
    forward_backward(model, task, [batch], state, rt, None, RunLogger(tmp_path, enabled=False))
    assert state.micro_split == 4
    for a, b in zip(expected, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    task.loss_and_metrics = lambda m, b: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(RuntimeError, match="micro-batch of one sample"):
        forward_backward(model, task, [batch], LoopState(), rt, None, RunLogger(tmp_path, enabled=False))


def test_training_lowers_the_loss_and_writes_the_run_folder(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=40, eval_every=20))
    result = train(cfg, quiet=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [e["loss"] for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert train_losses[-1] < train_losses[0] - 0.5
    assert [e["step"] for e in evals] == [20, 40]
    assert evals[-1]["loss"] < evals[0]["loss"] + 0.5
    assert events[-1] == {**events[-1], "event": "end", "reason": "max_steps", "step": 40}
    ckpts = result.run_dir / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} >= {"last", "best"}
    assert load_checkpoint(ckpts / "last", with_training_state=True).training_state["loop"]["step"] == 40
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 40
    assert "step 40/40" in (result.run_dir / "train.log").read_text()


def test_epochs_write_epoch_checkpoints_and_keep_the_newest(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, epochs=3, batch_size=32, keep_epochs=2,
                                          eval_every=1000, log_every=1000))
    result = train(cfg, quiet=True)
    names = sorted(p.name for p in (result.run_dir / "checkpoints").iterdir())
    assert names == ["best", "epoch-2", "epoch-3", "last"]
    epochs = [e for e in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0, 3.0]


def _cli(args: list[str], cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LMFORGE_FAULT", None)
    # One thread: CPU kernels such as LayerNorm's backward sum per-thread partials, so their bits
    # depend on how the work was split over threads, and Adam turns that last-bit noise in the
    # attention's key bias (whose true gradient is zero) into visible weight differences. What
    # is tested here is that resuming is exact, not the thread scheduling of the machine.
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["LMFORGE_FAULT"] = fault
    return forked_cli.run(["-m", "lmforge", *args], cwd, env)  # a process of its own, without the startup


def test_kill_and_resume_ends_with_the_same_weights(lm_data: Path, tmp_path: Path):
    config = tmp_path / "tiny.yaml"
    run = tiny_run(lm_data, tmp_path, max_steps=12, save_every=3, eval_every=6, grad_accum=2)
    run["model"]["dropout"] = 0.1  # the dropout masks too must continue where they stopped
    config.write_text(yaml.safe_dump(run))
    straight = _cli(["train", str(config), "run.name=straight", "--quiet"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = _cli(["train", str(config), "run.name=killed", "--quiet"], tmp_path, fault="after_step_7")
    assert killed.returncode == 137
    resumed = _cli(["train", "--resume", str(tmp_path / "killed"), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last").state_dict
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last").state_dict
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    losses = lambda run: [(e["step"], e["loss"]) for e in map(json.loads, (tmp_path / run / "metrics.jsonl")
                          .read_text().splitlines()) if e["event"] == "train"]
    assert losses("straight") == losses("killed")


def test_resume_of_a_wrong_path_is_an_error(tmp_path: Path):
    result = _cli(["train", "--resume", str(tmp_path / "missing")], tmp_path)
    assert result.returncode == 2
    assert "not a run folder" in result.stderr


def test_logged_train_loss_and_accuracy_match_a_direct_computation(lm_data: Path, tmp_path: Path):
    from lmforge.base.runtime import seed_everything
    from lmforge.train.data_order import epoch_permutation

    base = tiny_run(lm_data, tmp_path, max_steps=1, log_every=1, batch_size=4)
    result = train(load_config(None, base=base), quiet=True)
    logged = [e for e in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "train"][0]
    cfg = load_config(None, base=base)
    meta = json.loads((lm_data / "meta.json").read_text())
    seed_everything(cfg.train.seed)  # the loop seeds, then builds the model
    model = model_from_architecture(architecture(cfg.model, meta["vocab_size"]))
    task = make_task(cfg, meta, cfg.model.context)
    dataset = task.dataset("train")
    first = epoch_permutation(len(dataset), cfg.train.seed, 0)[:4].tolist()
    with torch.no_grad():
        stats = task.loss_and_metrics(model, task.collate([dataset[i] for i in first]))
    assert logged["loss"] == pytest.approx(stats.loss_sum.item() / stats.targets.item(), rel=1e-6)
    assert logged["accuracy"] == pytest.approx(stats.correct.item() / stats.targets.item(), rel=1e-9)


def test_the_collector_is_paused_while_training_and_young_garbage_collected_every_few_steps(
        lm_data: Path, tmp_path: Path, monkeypatch):
    import gc

    from lmforge.train import loop

    monkeypatch.setattr(loop, "YOUNG_GARBAGE_EVERY", 2)
    enabled_in_steps, collections = [], []
    real_step, real_collect = loop.Trainer.step, gc.collect
    monkeypatch.setattr(loop.Trainer, "step", lambda self: enabled_in_steps.append(gc.isenabled()) or real_step(self))
    monkeypatch.setattr(loop.gc, "collect",
                        lambda *generation: collections.append(generation) or real_collect(*generation))
    assert gc.isenabled()
    train(load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=5)), quiet=True)
    assert enabled_in_steps == [False] * 5 and collections == [(1,), (1,)]  # after steps 2 and 4
    assert gc.isenabled()  # as it was before the run
