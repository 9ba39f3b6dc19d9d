"""The one evaluation loop: a measure summed over a dataset's batches in eval mode, without
gradients; and the validation of training on it (mean loss, perplexity and task metrics).

Validation during training (`evaluate`), the classify task's full-split metrics and
`lmforge eval` all go through `evaluation_sums`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lmforge.base.metrics import perplexity
from lmforge.base.runtime import Runtime
from lmforge.train.tasks import Task, accumulate, step_sums, sums_to_floats

Measure = Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
"""(model, device batch) -> sums over the batch, as device tensors of any shape."""


@torch.no_grad()
def evaluation_sums(model: nn.Module, task: Task, dataset, batch_size: int, rt: Runtime, measure: Measure,
                    max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """`measure` summed over the first `max_batches` batches of `dataset` (all of it when None),
    in order, in eval mode and under the run's autocast; the model's mode is restored after."""
    count = len(dataset) if max_batches is None else min(len(dataset), batch_size * max_batches)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    try:
        for start in range(0, count, batch_size):
            batch = task.collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with rt.autocast():
                accumulate(sums, measure(model, batch))
    finally:
        model.train(was_training)
    return sums


def evaluate(model: nn.Module, task: Task, dataset, batch_size: int, max_batches: int | None,
             rt: Runtime) -> dict[str, float]:
    """The task's metrics and the perplexity over the first `max_batches` batches of `dataset`.

    With several processes every rank evaluates the same batches: the numbers agree without a
    reduction, and FSDP ranks stay in step (each forward gathers shards from all of them).
    """
    if len(dataset) == 0:
        return {}
    sums = evaluation_sums(model, task, dataset, batch_size, rt,
                           lambda m, batch: step_sums(task.loss_and_metrics(m, batch)), max_batches)
    metrics = task.summarize(sums_to_floats(sums))
    metrics["perplexity"] = perplexity(metrics["loss"])
    return metrics
