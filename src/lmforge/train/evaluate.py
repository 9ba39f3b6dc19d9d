"""Validation during training: mean loss, perplexity and task metrics over a fixed set of batches."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.base.metrics import perplexity
from lmforge.base.runtime import Runtime
from lmforge.train.tasks import add_sums, sums_to_floats


@torch.no_grad()
def evaluate(model: nn.Module, task, dataset, batch_size: int, max_batches: int | None,
             rt: Runtime) -> dict[str, float]:
    """Metrics over the first `max_batches` batches of `dataset` (all of it when None), in eval mode.

    With several processes every rank evaluates the same batches: the numbers agree without a
    reduction, and FSDP ranks stay in step (each forward gathers shards from all of them).
    """
    if len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    count = len(dataset) if max_batches is None else min(len(dataset), batch_size * max_batches)
    sums: dict[str, torch.Tensor] = {}
    try:
        for start in range(0, count, batch_size):
            batch = task.collate([dataset[i] for i in range(start, min(count, start + batch_size))])
            batch = {k: v.to(rt.device) for k, v in batch.items()}
            with rt.autocast():
                add_sums(sums, task.loss_and_metrics(model, batch))
    finally:
        model.train(was_training)
    metrics = task.summarize(sums_to_floats(sums))
    metrics["perplexity"] = perplexity(metrics["loss"])
    return metrics

