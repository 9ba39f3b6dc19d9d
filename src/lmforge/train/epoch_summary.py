"""What a run says about its epochs and its end: at each epoch's end the mean training loss and
accuracy over all of the epoch's steps (not a sample of them) and its wall time, at the end
the list of per-epoch losses, and the `done:` line naming the metric that chose `best`.

`EpochSummary` is a stateful part of the checkpoint ("epochs"): an epoch cut by a kill and
resumed is summed over all its steps, and the list of past epochs survives the restart. A step's
sums are added where they are: host floats (already summed over ranks) or, on a GPU that the
loop never waits for, this rank's device tensors, added on the device and summed over ranks
only when an epoch ends or a checkpoint is saved (moments every rank shares).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from lmforge.base.config import Config
from lmforge.base.distributed import all_reduce_sum
from lmforge.checkpoint import read_manifest
from lmforge.train.log import format_duration
from lmforge.train.tasks import Task


class EpochSummary:
    """The sums of the current epoch's steps and the summaries of the finished epochs."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.settled: dict[str, float] = {}  # host floats, summed over ranks
        self.pending: dict[str, torch.Tensor] = {}  # this rank's device sums since the last settle
        self.steps = 0
        self.started_at = 0.0  # the run's elapsed seconds when the epoch began
        self.history: list[dict[str, float]] = []

    def add(self, sums: dict[str, Any]) -> None:
        """One step's sums: floats summed over ranks, or this rank's device tensors."""
        self.steps += 1
        for key, value in sums.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().double().reshape(())
                self.pending[key] = self.pending[key] + value if key in self.pending else value
            else:
                self.settled[key] = self.settled.get(key, 0.0) + float(value)

    def _settle(self, step: int) -> None:
        """Move the device sums to the host, summed over ranks (a collective: every rank calls it)."""
        if not self.pending:
            return
        names = list(self.pending)
        totals = all_reduce_sum(torch.stack([self.pending[n] for n in names]).cpu(), step, "epoch sums").tolist()
        for name, value in zip(names, totals):
            self.settled[name] = self.settled.get(name, 0.0) + value
        self.pending = {}

    def end_epoch(self, epoch: int, step: int, elapsed: float, log: Any) -> dict[str, float]:
        """Epoch `epoch` (1-based) ended at `step`, `elapsed` seconds into the run: log its
        summary line and `epoch_end` event, start the next one, and return the summary."""
        self._settle(step)
        means = self.task.summarize(self.settled) if self.settled else {}
        summary = {"epoch": epoch, "steps": self.steps, "seconds": elapsed - self.started_at,
                   **{f"train_{key}": value for key, value in means.items()}}
        self.history.append(summary)
        self.settled, self.steps, self.started_at = {}, 0, elapsed
        log.event("epoch_end", step=step, **summary)
        log.line(epoch_line(summary))
        return summary

    def finish(self, log: Any) -> None:
        """At the end of a run: the per-epoch training losses, when an epoch ended."""
        if self.history:
            log.line("epoch losses: " + ", ".join(f"{int(e['epoch'])}: {e.get('train_loss', math.nan):.4f}"
                                                  for e in self.history))

    def state_dict(self) -> dict[str, Any]:
        """The sums so far (a collective on a GPU that defers its host syncs), steps, start, history."""
        self._settle(-1)
        return {"sums": dict(self.settled), "steps": self.steps, "started_at": self.started_at,
                "history": [dict(e) for e in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.settled = {k: float(v) for k, v in state["sums"].items()}
        self.pending, self.steps = {}, int(state["steps"])
        self.started_at = float(state["started_at"])
        self.history = [dict(e) for e in state["history"]]


def epoch_line(summary: dict[str, float]) -> str:
    """`epoch 3 done | train loss 2.1034 | acc 41.2% | 120 steps in 1m05s` (means over the epoch)."""
    parts = [f"epoch {int(summary['epoch'])} done"]
    if "train_loss" in summary:
        parts.append(f"train loss {summary['train_loss']:.4f}")
    if "train_accuracy" in summary:
        parts.append(f"acc {summary['train_accuracy']:.1%}")
    parts.append(f"{int(summary['steps'])} steps in {format_duration(summary['seconds'])}")
    return " | ".join(parts)


def best_metric_name(cfg: Config, task: Task) -> str:
    """The validation metric that picks `best`: train.best_metric, or the task's for auto."""
    return cfg.train.best_metric if cfg.train.best_metric != "auto" else task.best_metric


def done_line(reason: str, step: int, elapsed: float, metric: str, best_score: float, ckpt_dir: Path) -> str:
    """The last line of a run: why and when it stopped, and the best checkpoint by the metric that
    chose it (`best_score` as `lmforge.train.tasks.best_score` keeps it: lower is better)."""
    key = metric.removeprefix("val_")
    if math.isfinite(best_score):
        value = -best_score if key == "accuracy" else best_score
        shown = f"{value:.1%}" if key == "accuracy" else f"{value:.4f}"
        try:
            where = f" at step {read_manifest(ckpt_dir / 'best')['step']}"
        except (OSError, ValueError, KeyError):
            where = ""  # no best checkpoint kept (a library caller's folder was cleaned)
        best = f"best val {key} {shown}{where}"
    else:
        best = "no validation ran"
    return f"done: {reason} at step {step} in {elapsed:.1f}s | {best}"
