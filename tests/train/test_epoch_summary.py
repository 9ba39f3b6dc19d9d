"""The per-epoch summary (mean loss and accuracy over all the epoch's steps, wall time), the list
of epoch losses at the end, eval at start, the done line's best metric, and all of it across a
kill and a resume (TensorBoard drawing each step once)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.train.epoch_summary import EpochSummary, done_line, epoch_line
from lmforge.train.log import without_clock
from lmforge.base.config import load_config
from lmforge.checkpoint import load_checkpoint
from lmforge.train.loop import train
from lmforge.train.task_lm import token_means
from test_trackers import tensorboard_scalars

# 978 samples of 32 tokens in batches of 192: 5 steps an epoch, a log line every step
EPOCHS = dict(batch_size=192, epochs=2, log_every=1, eval_every=100, save_every=100)


def _events(run_dir: Path, kind: str) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == kind]


def _log(run_dir: Path) -> list[str]:
    return [without_clock(line) for line in (run_dir / "train.log").read_text().splitlines()]


class _Killed(Exception):
    pass


def test_epoch_means_cover_every_step_and_survive_a_resume(lm_data, tmp_path, monkeypatch):
    whole = train(load_config(None, base=tiny_run(lm_data, tmp_path / "a", eval_at_start=True, **EPOCHS)), quiet=True)
    assert whole.steps == 10
    ends = _events(whole.run_dir, "epoch_end")
    logged = _events(whole.run_dir, "train")
    assert [(e["epoch"], e["step"], e["steps"]) for e in ends] == [(1, 5, 5), (2, 10, 5)]
    for end in ends:  # every step has the same targets: the epoch's mean is the mean of its 5 steps
        steps = [e for e in logged if end["step"] - 5 < e["step"] <= end["step"]]
        assert len(steps) == 5
        assert end["train_loss"] == pytest.approx(sum(e["loss"] for e in steps) / 5, rel=1e-9)
        assert end["train_accuracy"] == pytest.approx(sum(e["accuracy"] for e in steps) / 5, rel=1e-9)
        assert end["seconds"] > 0
    lines = _log(whole.run_dir)
    assert lines.count(epoch_line(ends[0])) == 1 and epoch_line(ends[0]).startswith("epoch 1 done | train loss")
    assert f"epoch losses: 1: {ends[0]['train_loss']:.4f}, 2: {ends[1]['train_loss']:.4f}" in lines
    assert [e["step"] for e in _events(whole.run_dir, "eval")][:1] == [0]  # train.eval_at_start
    best = json.loads((whole.run_dir / "checkpoints" / "best" / "manifest.json").read_text())["step"]
    assert lines[-1].startswith("done: max_steps at step 10 in ") and "| best val loss " in lines[-1]
    assert lines[-1].endswith(f" at step {best}")

    # killed at step 8 (steps 6 to 8 logged, the last checkpoint at 5), then resumed: the same epochs
    def kill_after_step_8(name: str, detail=None) -> None:
        if name == "after_step_8":
            raise _Killed

    config = load_config(None, base=tiny_run(lm_data, tmp_path / "b", loggers=["tensorboard"], **EPOCHS))
    monkeypatch.setattr("lmforge.train.loop.fault_point", kill_after_step_8)
    with pytest.raises(_Killed):
        train(config, quiet=True)
    monkeypatch.undo()
    # every checkpoint of an epoch's last step has the epoch closed (best is saved by its evaluation)
    for name in ("best", "epoch-1", "last"):
        saved = load_checkpoint(config.run_dir / "checkpoints" / name, with_training_state=True)
        assert saved.training_state["loop"]["step"] == 5, name
        assert len(saved.training_state["epochs"]["history"]) == 1 and saved.training_state["epochs"]["steps"] == 0
    resumed = train(config, resume_from=config.run_dir / "checkpoints" / "last", quiet=True)
    again = _events(resumed.run_dir, "epoch_end")
    assert [(e["epoch"], e["steps"]) for e in again] == [(1, 5), (2, 5)]
    for a, b in zip(again, ends):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], rel=1e-12)
    assert f"epoch losses: 1: {ends[0]['train_loss']:.4f}, 2: {ends[1]['train_loss']:.4f}" in _log(resumed.run_dir)
    scalars, _ = tensorboard_scalars(resumed.run_dir)
    losses = {e["step"]: e["loss"] for e in _events(resumed.run_dir, "train")}
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 11))  # steps 6-8 of the killed run purged
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([losses[s] for s in sorted(losses)], rel=1e-6)
    assert [s for s, _ in scalars["epoch/train_loss"]] == [5, 10]


def test_device_sums_are_added_on_the_device_and_kept_in_the_checkpoint_state():
    class Log:
        def __init__(self):
            self.lines, self.events = [], []

        def line(self, text):
            self.lines.append(text)

        def event(self, kind, **fields):
            self.events.append((kind, fields))

    task = type("T", (), {"summarize": staticmethod(token_means)})()
    summary = EpochSummary(task)
    summary.add({"loss_sum": torch.tensor(6.0), "targets": torch.tensor(3), "correct": torch.tensor(1)})
    summary.add({"loss_sum": 2.0, "targets": 1.0, "correct": 1.0})  # a host step (summed over ranks)
    state = summary.state_dict()
    assert state["sums"] == {"loss_sum": 8.0, "targets": 4.0, "correct": 2.0} and state["steps"] == 2
    restored = EpochSummary(task)
    restored.load_state_dict(state)
    restored.add({"loss_sum": torch.tensor(4.0), "targets": torch.tensor(4), "correct": torch.tensor(4)})
    log = Log()
    result = restored.end_epoch(1, step=3, elapsed=12.5, log=log)
    assert result["train_loss"] == pytest.approx(12 / 8) and result["train_accuracy"] == pytest.approx(6 / 8)
    assert result["steps"] == 3 and result["seconds"] == 12.5
    assert log.lines == ["epoch 1 done | train loss 1.5000 | acc 75.0% | 3 steps in 0m12s"]
    assert log.events[0][0] == "epoch_end" and log.events[0][1]["step"] == 3


def test_the_done_line_names_the_metric_that_chose_best(tmp_path):
    assert done_line("max_steps", 40, 12.34, "val_accuracy", -0.9731, tmp_path) == \
        "done: max_steps at step 40 in 12.3s | best val accuracy 97.3%"
    assert done_line("early_stop", 9, 1.0, "val_loss", 2.5, tmp_path) == \
        "done: early_stop at step 9 in 1.0s | best val loss 2.5000"
    assert done_line("max_steps", 2, 1.0, "val_loss", math.inf, tmp_path).endswith("| no validation ran")
