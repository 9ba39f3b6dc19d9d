"""Experiment trackers: TensorBoard holds the numbers metrics.jsonl holds; a tracker of one's own
gets every call; a failing one is a warning; a run without trackers imports none of their packages.
(W&B and MLflow: tests/slow/test_trackers_wandb_mlflow.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_run
from lmforge.train.run import run_training
from lmforge.train.trackers import RunTrackers, event_metrics

USER_TRACKERS = '''
CALLS = []

class Recorder:
    def __init__(self, run):
        CALLS.append(("init", run.name, run.resumed_step))
    def log_hparams(self, config):
        CALLS.append(("hparams", config["train"]["lr"]))
    def log_metrics(self, step, metrics):
        CALLS.append(("metrics", step, dict(metrics)))
    def log_image(self, name, path, step):
        CALLS.append(("image", name, step))
    def close(self):
        CALLS.append(("close",))

class Broken(Recorder):
    def log_metrics(self, step, metrics):
        raise ConnectionError("tracking server gone")
'''


def readme_tracker() -> str:
    """The tracker example of the README's "Watching a run" section, as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Watching a run", 1)[1].split("\n### ", 1)[0]
    [example] = [code for code in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "class " in code]
    return example


def _events(run_dir: Path, kind: str, split: str | None = None) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == kind and (split is None or e.get("split") == split)]


def tensorboard_scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}, tags


def test_tensorboard_and_a_users_tracker_hold_the_metrics_of_metrics_jsonl(lm_data, tmp_path, monkeypatch):
    (tmp_path / "user_trackers.py").write_text(USER_TRACKERS + readme_tracker())
    monkeypatch.syspath_prepend(str(tmp_path))
    loggers = ["tensorboard", "user_trackers:Recorder", "user_trackers:Broken", "user_trackers:CSVTracker"]
    config = tiny_run(lm_data, tmp_path, max_steps=8, loggers=loggers, eval_at_start=True)
    result = run_training(config, show_progress=False)
    assert result.exit_code == 0 and result.steps == 8
    run = result.run_dir
    train = {e["step"]: e for e in _events(run, "train")}
    val = {e["step"]: e for e in _events(run, "eval", "val")}
    assert sorted(train) == [2, 4, 6, 8] and sorted(val) == [0, 4, 8]  # eval_at_start: step 0

    scalars, tags = tensorboard_scalars(run)
    for name, events in (("train/loss", train), ("val/loss", val), ("train/lr", train)):
        key = name.split("/")[1]
        assert [s for s, _ in scalars[name]] == sorted(events)
        assert [v for _, v in scalars[name]] == pytest.approx([events[s][key] for s in sorted(events)], rel=1e-6)
    assert {"train/tokens", "train/examples", "train/grad_norm", "train/tokens_per_s", "train/mfu"} <= set(scalars)
    assert {"plots/loss", "plots/lr"} <= set(tags["images"]) and "config/text_summary" in tags["tensors"]

    calls = sys.modules["user_trackers"].CALLS
    assert calls[0] == ("init", "tiny", None) and ("hparams", 3e-3) in calls
    recorded = {step: m["train/loss"] for kind, *rest in calls if kind == "metrics"
                for step, m in [rest] if "train/loss" in m}
    assert recorded == {s: e["loss"] for s, e in train.items()}
    assert ("image", "loss", 8) in calls and calls.count(("close",)) == 1  # Broken was dropped
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]  # the README's example
    assert {int(step): float(value) for step, name, value in rows if name == "train/loss"} == \
        {s: e["loss"] for s, e in train.items()}
    log = (run / "train.log").read_text()
    assert log.count("warning: logger user_trackers:Broken failed in log_metrics: ConnectionError") == 1


def test_a_tracker_that_cannot_start_is_one_warning(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    warnings: list[str] = []
    trackers = RunTrackers(["wandb", "no_such_package.mod:Tracker"])
    from lmforge.base.config import load_config

    cfg = load_config(None, ["data.path=d", f"run.out_dir={tmp_path}"])
    trackers.start(cfg, None, warnings.append)
    trackers.log_event("train", {"event": "train", "step": 1, "loss": 2.0})
    trackers.close()
    assert len(warnings) == 2 and not trackers.active
    assert "logger wandb could not start: ModuleNotFoundError" in warnings[0] and "pip install 'lmforge[wandb]'" in warnings[0]
    assert "No module named 'no_such_package'" in warnings[1]


def test_events_become_named_metrics():
    assert event_metrics("train", {"step": 4, "epoch": 0.5, "tokens": 512, "loss": 2.0, "lr": 1e-3,
                                   "grad_norm": None, "mfu": 0.3}) == \
        {"train/epoch": 0.5, "train/tokens": 512.0, "train/loss": 2.0, "train/lr": 1e-3, "train/mfu": 0.3}
    assert event_metrics("epoch", {"step": 9, "split": "val", "epoch": 1.0, "loss": 3.0, "accuracy": 0.5}) == \
        {"val/loss": 3.0, "val/accuracy": 0.5}
    assert event_metrics("eval", {"step": 9, "split": "train", "loss": 1.0}) == {"train_eval/loss": 1.0}
    assert event_metrics("epoch_end", {"step": 9, "epoch": 1, "train_loss": 2.5, "seconds": 3.0}) == \
        {"epoch/train_loss": 2.5, "epoch/seconds": 3.0}
    assert event_metrics("final", {"step": 9, "split": "test", "accuracy": 0.9, "confusion": [[1]]}) == \
        {"final/test/accuracy": 0.9}
    assert event_metrics("samples", {"step": 9, "samples": [{"prompt": "a"}]}) == {}


def test_training_without_loggers_imports_no_tracker_package():
    code = ("import sys, lmforge.train.run, lmforge.train.trackers; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
