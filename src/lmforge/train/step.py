"""One accumulation window's forward and backward passes: the loss normalised by the targets of
the whole window on all ranks, gradients synchronised on the last micro-step only, and the
out-of-memory recovery that splits every micro-batch in two and redoes the window.
"""

from __future__ import annotations

import gc

import torch
from torch import nn

from lmforge.base.distributed import all_reduce_sum
from lmforge.base.runtime import Runtime
from lmforge.train.log import RunLogger
from lmforge.train.parallel import gradient_sync
from lmforge.train.state import LoopState
from lmforge.train.tasks import Task, add_sums


def forward_backward(model: nn.Module, task: Task, micro_batches: list[dict[str, torch.Tensor]], state: LoopState,
                     rt: Runtime, scaler, log: RunLogger, flags: dict[str, float] | None = None,
                     local_targets: float | None = None, to_host: bool = True) -> dict:
    """Forward and backward over one accumulation window, normalised by the window's targets
    on all ranks together; returns the window's sums (and `flags`) summed over ranks, or with
    to_host=False this process's sums as device tensors (no host sync).

    Gradients are synchronised only on the last micro-step. Out of memory (one process):
    drop the partial gradients, split every micro-batch in two and redo the window; the
    effective batch and the result are unchanged.
    """
    if local_targets is None:
        local_targets = float(sum(task.count_targets(b) for b in micro_batches))
    total_targets = all_reduce_sum(torch.tensor([local_targets]), state.step + 1, "target count").item()
    # DDP and FSDP average gradients over ranks: scale back up so the result is the global mean.
    scale = rt.world_size / max(1.0, total_targets)
    while True:
        try:
            sums: dict[str, torch.Tensor] = {}
            pieces = [p for batch in micro_batches for p in _split_batch(batch, state.micro_split)]
            for index, piece in enumerate(pieces):
                with gradient_sync(model, index == len(pieces) - 1):
                    with rt.autocast():
                        stats = task.loss_and_metrics(model, piece)
                    loss = stats.loss_sum * scale
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                add_sums(sums, stats)
            break
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_out_of_memory(err):
                raise
            if rt.world_size > 1:
                raise RuntimeError(f"out of memory at step {state.step + 1} on rank {rt.rank}; with several "
                                   "processes lower train.batch_size (raise grad_accum to keep the batch)") from err
            model.zero_grad(set_to_none=True)
            _free_memory(rt)
            rows = max(b["input_ids"].shape[0] for b in micro_batches)
            if rows // state.micro_split <= 1:
                raise RuntimeError(f"out of memory at step {state.step + 1} with a micro-batch of one sample; "
                                   "lower model.context or the model size") from err
            state.micro_split *= 2
            log.line(f"warning: out of memory at step {state.step + 1}; retrying with micro-batches split "
                     f"{state.micro_split} ways (same effective batch)")
    if not to_host:
        return sums
    device = next(iter(sums.values())).device
    for name, value in (flags or {}).items():
        sums[name] = torch.tensor(value, dtype=torch.float64, device=device)
    names = list(sums)
    totals = torch.stack([sums[n].double().reshape(()) for n in names])
    return dict(zip(names, all_reduce_sum(totals.cpu(), state.step + 1, "metrics").tolist()))  # one host sync


def _split_batch(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    if parts == 1:
        return [batch]
    pieces = {k: torch.tensor_split(v, parts) for k, v in batch.items()}
    return [{k: pieces[k][i] for k in batch} for i in range(parts) if pieces["input_ids"][i].shape[0]]


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return "out of memory" in text or "can't allocate memory" in text


def _free_memory(rt: Runtime) -> None:
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
