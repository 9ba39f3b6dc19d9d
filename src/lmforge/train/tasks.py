"""The contract between the loop and the tasks, and the task registry.

A task object offers: `dataset(split)`, `collate(samples)`, `count_targets(batch)`,
`count_tokens(batch)`, `loss_and_metrics(model, batch) -> StepStats`, `summarize(sums)`,
`console_extras(metrics)` and `samples(model, runtime)`; the loop knows nothing else.
A `console_extras` entry named "<unit>/s" (`lmforge.train.log.throughput_extra`) is the task's
own throughput: the console line shows it in place of tok/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import importlib

import torch

from lmforge.base.config import Config


@dataclass
class StepStats:
    """Sums over one micro-batch; the loop divides by the targets of the whole accumulation window."""

    loss_sum: torch.Tensor
    targets: torch.Tensor
    correct: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def add_sums(sums: dict[str, torch.Tensor], stats: StepStats) -> None:
    """Accumulate a micro-batch's sums on the device, without a host sync."""
    items = {"loss_sum": stats.loss_sum.detach(), "targets": stats.targets, "correct": stats.correct,
             **{k: v.detach() for k, v in stats.extras.items()}}
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


def best_score(cfg: Config, task, result: dict[str, float]) -> float:
    """The validation number that picks the best checkpoint, lower is better (accuracy negated).
    `train.best_metric` auto: the task's `best_metric` attribute, else val_loss."""
    name = cfg.train.best_metric if cfg.train.best_metric != "auto" else getattr(task, "best_metric", "val_loss")
    key = name.removeprefix("val_")
    if key not in result:
        raise ValueError(f"train.best_metric={name}: the {task.name} task reports no {key!r} "
                         f"(it reports {', '.join(sorted(result))})")
    return -result[key] if key == "accuracy" else result[key]


def make_task(cfg: Config, meta: dict, context: int):
    """The task object for `cfg.train.task`, checked against the prepared data's task."""
    name = cfg.train.task
    if meta.get("task") != name:
        raise ValueError(f"{cfg.data.path}: the data was prepared for task {meta.get('task')!r}, "
                         f"but train.task={name!r}; prepare it with --task {name} "
                         "or set train.task to match")
    if name not in TASKS:
        raise ValueError(f"train.task={name!r}: not available in this version of lmforge "
                         f"(available: {', '.join(TASKS)})")
    module_name, _, class_name = TASKS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)(cfg, meta, context)
