"""The contract between the loop and the tasks (`Task`), the sums a step yields, and the registry.

`Task` is the whole of what the loop knows about a task: the members without a default are
required; the members with a default are optional hooks, and a task class gets those defaults
by naming `Task` as its base (the loop calls every hook unconditionally, never probing).
"""

from __future__ import annotations

import importlib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

from lmforge.base.config import Config


@dataclass
class StepStats:
    """Sums over one micro-batch; the loop divides by the targets of the whole accumulation window."""

    loss_sum: torch.Tensor
    targets: torch.Tensor
    correct: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What a task supplies to the one training loop."""

    name: str
    """The value of train.task that selects it."""
    throughput_unit: str
    """What the console's throughput counts: "tok" counts tokens (`count_tokens`); any other unit
    counts samples ("ex" for classify's examples, "pairs" for mlm's sentence pairs) and is logged
    as "<unit>_per_s" next to tokens_per_s."""

    # -- required ---------------------------------------------------------------------------

    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The samples of one split of the prepared data."""

    @abstractmethod
    def collate(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """A batch (host tensors) from samples."""

    @abstractmethod
    def count_targets(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss is averaged over (tokens with a label, texts, sentence pairs)."""

    @abstractmethod
    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the model reads, for tokens/s and MFU."""

    @abstractmethod
    def loss_and_metrics(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> StepStats:
        """The batch's summed loss and metrics, on the device (no host sync)."""

    @abstractmethod
    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Means from summed statistics; "loss" always, "accuracy" where the task has one."""

    # -- optional hooks, with what a task that leaves them out gets ------------------------

    best_metric: str = "val_loss"
    """What train.best_metric=auto means for this task."""
    eval_train: bool = False
    """Also evaluate a few training batches at each evaluation (classify: over-fitting shows)."""
    reports_perplexity: bool = False
    """Show perplexity in the evaluation line (it means something for token prediction only)."""
    model_types: tuple[str, ...] = ("gpt", "bert")
    """The models it trains, by config.json's model_type ("gpt", "bert", "classifier"): a new
    model's model.kind and a model.init_from checkpoint are checked against it before loading."""

    def prepare_model(self, model: nn.Module, arch: dict) -> tuple[nn.Module, dict]:
        """The model to train and its architecture, from the built (or model.init_from) one."""
        return model, arch

    def start_epoch(self, dataset: Dataset, epoch: int) -> None:
        """Called before every step with the training dataset and its epoch (mlm draws pairs anew)."""

    def console_extras(self, metrics: dict[str, float]) -> dict[str, float]:
        """Task metrics for the console line of a train or eval event, after loss and accuracy."""
        return {}

    def samples(self, model: nn.Module, runtime: Any) -> list[dict]:
        """Generations for the log and the report at the end of a run ({"prompt", "text"} each)."""
        return []

    def final_report(self, model: nn.Module, runtime: Any, log: Any, position: dict) -> dict[str, dict]:
        """Metrics of the finished run beyond the evaluations, logged by the task (rank 0 only)."""
        return {}


def step_sums(stats: StepStats) -> dict[str, torch.Tensor]:
    """A micro-batch's sums by name, detached from the graph."""
    return {"loss_sum": stats.loss_sum.detach(), "targets": stats.targets, "correct": stats.correct,
            **{k: v.detach() for k, v in stats.extras.items()}}


def add_sums(sums: dict[str, torch.Tensor], stats: StepStats) -> None:
    """Accumulate a micro-batch's sums on the device, without a host sync."""
    accumulate(sums, step_sums(stats))


def accumulate(sums: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> None:
    """sums += items, key by key, on the device."""
    for key, value in items.items():
        sums[key] = sums[key] + value if key in sums else value


def sums_to_floats(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    values = torch.stack([v.double() for v in sums.values()]).tolist()
    return dict(zip(sums, values))


# Each task lives in its own module and is imported only when used.
TASKS = {"lm": "lmforge.train.task_lm:LMTask"}
TASKS["classify"] = "lmforge.train.task_classify:ClassifyTask"
TASKS["dialogue"] = "lmforge.train.task_dialogue:DialogueTask"
TASKS["mlm"] = "lmforge.train.task_mlm:MLMTask"
# A task's variant for data whose meta.json names a problem_type (train.task stays the data's task).
VARIANTS = {("classify", "regression"): "lmforge.train.task_regress:RegressTask"}


def task_class(name: str) -> type[Task]:
    """The class registered for train.task=`name`."""
    if name not in TASKS:
        raise ValueError(f"train.task={name!r}: not available in this version of lmforge "
                         f"(available: {', '.join(TASKS)})")
    module_name, _, class_name = TASKS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def best_score(cfg: Config, task: Task, result: dict[str, float]) -> float:
    """The validation number that picks the best checkpoint, lower is better (accuracy negated).
    `train.best_metric` auto: the task's `best_metric`."""
    name = cfg.train.best_metric if cfg.train.best_metric != "auto" else task.best_metric
    key = name.removeprefix("val_")
    if key not in result:
        raise ValueError(f"train.best_metric={name}: the {task.name} task reports no {key!r} "
                         f"(it reports {', '.join(sorted(result))})")
    return -result[key] if key == "accuracy" else result[key]


def task_for_data(cfg: Config, meta: dict) -> type[Task]:
    """The task class for `cfg.train.task`, checked against the prepared data's task."""
    name = cfg.train.task
    if meta.get("task") != name:
        raise ValueError(f"{cfg.data.path}: the data was prepared for task {meta.get('task')!r}, "
                         f"but train.task={name!r}; prepare it with --task {name} "
                         "or set train.task to match")
    variant = VARIANTS.get((name, meta.get("problem_type")))
    if variant is not None:
        module_name, _, class_name = variant.partition(":")
        return getattr(importlib.import_module(module_name), class_name)
    return task_class(name)


def make_task(cfg: Config, meta: dict, context: int) -> Task:
    """The task object for `cfg.train.task`, checked against the prepared data's task."""
    return task_for_data(cfg, meta)(cfg, meta, context)
