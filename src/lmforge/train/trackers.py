"""Experiment trackers (`train.loggers`): the `Tracker` interface, the built-in ones by name
(TensorBoard, W&B, MLflow, each in its own module and imported only when asked for) or a class
of the user's own by import path, and `RunTrackers`, the set one run feeds.

Every event the run writes to metrics.jsonl reaches the trackers as metrics with the step as x
(`event_metrics` names them: train/loss, val/loss, epoch/train_loss, ...); the resolved config
is logged once as hyperparameters and the report's plots as images at the end. Only rank 0
tracks. A tracker that fails, at its start or at any call, costs one warning line and is
dropped: the run goes on with the others, metrics.jsonl and the console.

A tracker of your own is a class with the four methods of `Tracker`, built from a `TrackerRun`:

    class PrintTracker:
        def __init__(self, run: TrackerRun): self.name = run.name
        def log_hparams(self, config): print(self.name, config["train"]["lr"])
        def log_metrics(self, step, metrics): print(step, metrics.get("train/loss"))
        def log_image(self, name, path, step): pass
        def close(self): pass

and `train.loggers: [tensorboard, mypackage.tracking:PrintTracker]` selects it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from lmforge.base.config import Config
from lmforge.base.config_schema import TRACKERS

BUILT_IN = {"tensorboard": "lmforge.train.tracker_tensorboard:TensorBoardTracker",
            "wandb": "lmforge.train.tracker_wandb:WandbTracker",
            "mlflow": "lmforge.train.tracker_mlflow:MLflowTracker"}
assert set(BUILT_IN) == set(TRACKERS)

# Where an event is in the run, not a measure of it: kept for train events only (tokens and
# examples seen, the fractional epoch), the step itself is the x axis.
_POSITION = ("epoch", "tokens", "examples", "time")


@dataclass(frozen=True)
class TrackerRun:
    """What a tracker is built from: the run folder it writes under, the run's name, and the
    step a resumed run continues from (None: a new run)."""

    run_dir: Path
    name: str
    resumed_step: int | None = None


@runtime_checkable
class Tracker(Protocol):
    """One experiment tracker. Metric names are "group/name" (train/loss, val/accuracy); values
    are finite floats; `step` is the optimizer step."""

    def log_hparams(self, config: dict[str, Any]) -> None:
        """The resolved run config (nested as config.yaml), once at the start."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Metrics at `step`."""

    def log_image(self, name: str, path: Path, step: int) -> None:
        """A PNG the run wrote (the report's plots, at the end)."""

    def close(self) -> None:
        """Flush and finish; the last call."""


def tracker_class(name: str) -> type:
    """The class for a train.loggers entry: a built-in name or "package.module:Class"."""
    module_name, _, class_name = BUILT_IN.get(name, name).partition(":")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ImportError(f"module {module_name} has no {class_name!r}") from None


def event_metrics(kind: str, record: dict[str, Any]) -> dict[str, float]:
    """The metrics of one metrics.jsonl event, by tracker name: a train event's numbers under
    train/ (with the tokens and examples seen), an evaluation's under val/ (or train_eval/ for
    classify's measure on training batches), an epoch summary's under epoch/, the classify final
    report's under final/<split>/, the end's under end/. Text, lists and missing values are left out."""
    split = record.get("split")
    if kind in ("eval", "epoch"):
        group = "val" if split in (None, "val") else "train_eval" if split == "train" else split
    elif kind == "final":
        group = f"final/{split}"
    else:
        group = {"train": "train", "epoch_end": "epoch"}.get(kind, kind)
    return {f"{group}/{key}": float(value) for key, value in record.items()
            if key not in ("event", "step", "split") and (kind == "train" or key not in _POSITION)
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


class RunTrackers:
    """The trackers of one run, fed by the run's logger. Built from the names alone (nothing is
    imported or opened); `start` opens them under the run folder; a failure in any of them is one
    warning line through `warn` and that tracker is dropped."""

    def __init__(self, names: list[str] | tuple[str, ...], enabled: bool = True) -> None:
        self.names = list(names) if enabled else []
        self.active: dict[str, Tracker] = {}
        self.warn: Callable[[str], None] = lambda text: None
        self.started = False

    @classmethod
    def from_config(cls, cfg: Config, enabled: bool = True) -> RunTrackers:
        return cls(cfg.train.loggers, enabled)

    def start(self, cfg: Config, resumed_step: int | None, warn: Callable[[str], None]) -> None:
        """Open every tracker (once) and give it the resolved config."""
        self.warn = warn
        if self.started:
            return
        self.started = True
        run = TrackerRun(run_dir=cfg.run_dir, name=cfg.run.name, resumed_step=resumed_step)
        for name in self.names:
            try:
                tracker = tracker_class(name)(run)
            except Exception as err:  # noqa: BLE001 - not installed, no server, a bug in a user class
                self._drop(name, "could not start", err)
                continue
            self.active[name] = tracker
        self._each("log_hparams", cfg.to_dict())

    def log_event(self, kind: str, record: dict[str, Any]) -> None:
        """One metrics.jsonl event, as metrics at its step."""
        metrics = event_metrics(kind, record)
        step = record.get("step")
        if metrics and isinstance(step, int):
            self._each("log_metrics", step, metrics)

    def log_images(self, paths: list[Path], step: int) -> None:
        """Images (the report's plots) by file stem, at `step`."""
        for path in paths:
            self._each("log_image", path.stem, path, step)

    def close(self) -> None:
        self._each("close")
        self.active.clear()

    def _each(self, method: str, *args: Any) -> None:
        for name, tracker in list(self.active.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as err:  # noqa: BLE001 - a tracker never stops the run
                del self.active[name]
                self._drop(name, f"failed in {method}", err)

    def _drop(self, name: str, what: str, err: Exception) -> None:
        hint = ""
        if isinstance(err, ImportError) and name in BUILT_IN:
            hint = f" (pip install 'lmforge[{name}]')"
        self.warn(f"warning: logger {name} {what}: {type(err).__name__}: {err}{hint}; "
                  "training goes on without it")


def attach_trackers(log: Any, cfg: Config, trackers: RunTrackers | None, resumed_step: int | None) -> None:
    """Feed the run's logger's events to `trackers` (run_training's, which it closes after the
    report's plots), or to train.loggers' own trackers, closed with the logger. Rank 0 only: the
    other ranks' loggers are disabled."""
    if not log.enabled:
        return
    owned = trackers is None
    trackers = RunTrackers.from_config(cfg) if owned else trackers
    if not trackers.names:
        return
    trackers.start(cfg, resumed_step, log.line)
    log.attach(trackers, close_with_log=owned)
