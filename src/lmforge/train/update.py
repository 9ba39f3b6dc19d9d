"""The optimizer update of a step: clip, skip it when it is not finite, step.

On a CPU the loop decides on the host every step (`host_update`): reading values costs
nothing there. On a GPU steps never wait for it (`device_update`): the step's sums, its
gradient norm and its non-finite decision stay on the device until a log step reads them all
at once (`DeviceCounters`).

Reading a loss or a gradient norm on the host makes the CPU wait for the GPU to finish the
step before it can queue the next one, so every step pays its Python and kernel-launch time on
top of the GPU's. On a GPU with a fused AdamW (which takes the skip decision as a device
tensor, `found_inf`, as the fp16 GradScaler uses it) the loop therefore:

- clips with a coefficient computed on the device (min(1, max_norm / norm): a multiply by
  exactly 1 below the limit, the same bits as not clipping);
- skips the update of a step whose gradient norm (or, in one process, loss) is not finite, on
  the device, leaving weights and optimizer state as they were;
- counts skipped steps and the current run of them on the device, and acts on the count at the
  next log step: a run of train.max_non_finite skipped steps stops the run there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.base.distributed import all_reduce_sum
from lmforge.ops.grad_norm import total_norm
from lmforge.ops.torch_private import clear_step_inputs, set_found_inf, set_grad_scale


def defers_host_sync(device: torch.device, optimizer: torch.optim.Optimizer) -> bool:
    """Whether steps keep their numbers on the device: CUDA with the fused AdamW."""
    return (device.type == "cuda" and bool(optimizer.defaults.get("fused"))
            and hasattr(torch.nn.utils, "get_total_norm"))  # torch 2.6+


class DeviceCounters:
    """Per-step sums and non-finite counts, accumulated on the device between two reads."""

    def __init__(self, device: torch.device, non_finite_in_row: int = 0) -> None:
        self.device = device
        self.names: list[str] = []
        self.totals: torch.Tensor | None = None
        self.skipped = torch.zeros((), device=device)
        self.in_row = torch.full((), float(non_finite_in_row), device=device)
        self.grad_norm = torch.zeros((), device=device)

    def add(self, sums: dict[str, torch.Tensor], skipped: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """One step: its sums (device scalars), whether its update was skipped, its gradient norm."""
        totals = torch.stack([v.detach().double().reshape(()) for v in sums.values()])
        if self.totals is None:
            self.names, self.totals = list(sums), totals
        else:
            self.totals += totals
        bad = skipped.to(self.skipped.dtype)
        self.skipped += bad
        self.in_row = (self.in_row + bad) * bad  # back to 0 after a good step
        self.grad_norm = grad_norm.detach()

    def read(self, step: int) -> tuple[dict[str, float], int, int, float]:
        """(sums over ranks, skipped steps, non-finite steps in a row, last gradient norm) since the
        last read; one host sync. Resets the sums and the skipped count."""
        values = torch.cat([torch.zeros(0, dtype=torch.float64, device=self.device) if self.totals is None
                            else self.totals, torch.stack([self.skipped, self.in_row, self.grad_norm]).double()])
        values = all_reduce_sum(values, step, "metrics").tolist()  # ranks agree on skips: the norm is global
        n = len(self.names) if self.totals is not None else 0
        sums = dict(zip(self.names, values[:n]))
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        skipped, in_row, grad_norm = values[n] / world, values[n + 1] / world, values[n + 2] / world
        self.totals = None
        self.skipped = torch.zeros((), device=self.device)
        return sums, round(skipped), round(in_row), grad_norm


def device_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, max_norm: float | None,
                  loss_sum: torch.Tensor, check_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and step without reading anything on the host; returns (skipped, gradient norm) as
    device scalars. check_loss: also skip when this process's loss is not finite (one process;
    across ranks only the gradient norm, the same on every rank, may decide)."""
    params, norm = _gradient_norm(model, optimizer, scaler)
    if max_norm is not None:
        if _clips_in_step(optimizer, scaler, params):  # the same factor as `clip` gives, on the device
            set_grad_scale(optimizer, torch.where(norm > max_norm, (norm + 1e-6) / max_norm, torch.ones_like(norm)))
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    skipped = ~torch.isfinite(loss_sum) if check_loss else torch.zeros((), dtype=torch.bool, device=norm.device)
    if scaler is not None:  # the scaler skips overflowing steps itself and lowers its scale
        scaler.step(optimizer)
        scaler.update()
    else:
        skipped = skipped | ~torch.isfinite(norm)
        set_found_inf(optimizer, skipped.float())  # the fused AdamW skips the update on the device
        try:
            optimizer.step()
        finally:
            clear_step_inputs(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return skipped, norm


def host_update(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, max_norm: float | None,
                sums: dict[str, float], step: int, non_finite_in_row: int, log) -> tuple[float, int]:
    """Clip and step, deciding on the host whether step `step` is finite (free on a CPU).
    Returns (gradient norm, non-finite steps in a row, this one included)."""
    loss = sums["loss_sum"] / max(1.0, sums["targets"])
    try:
        grad_norm = clip(model, optimizer, scaler, max_norm)
        non_finite_in_row = _step_unless_non_finite(optimizer, scaler, loss, grad_norm, step, non_finite_in_row, log)
    finally:
        clear_step_inputs(optimizer)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, non_finite_in_row


def _step_unless_non_finite(optimizer, scaler, loss: float, grad_norm: float, step: int, non_finite_in_row: int,
                            log) -> int:
    """optimizer.step(), or the reason it is skipped logged; returns the non-finite steps in a row."""
    if scaler is not None and math.isfinite(loss):
        # The scaler skips a step whose fp16 gradients overflowed and lowers its scale, as it is
        # meant to: not a divergence (the loss is finite).
        scaler.step(optimizer)
        scaler.update()
        if math.isfinite(grad_norm):
            non_finite_in_row = 0
        else:
            log.line(f"fp16: gradients overflowed at step {step}; update skipped, "
                     f"loss scale lowered to {scaler.get_scale():g}")
    elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
        non_finite_in_row += 1
        log.line(f"warning: step {step}: loss {loss} / grad norm {grad_norm} is not finite; "
                 f"update skipped ({non_finite_in_row} in a row)")
    else:
        non_finite_in_row = 0
        optimizer.step()
    return non_finite_in_row


def clip(model: nn.Module, optimizer, scaler, max_norm: float | None) -> float:
    """Global gradient norm, clipped once per optimizer step (after the last micro-batch)."""
    if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              max_norm if max_norm is not None else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    params, norm = _gradient_norm(model, optimizer, scaler)
    value = float(norm)
    if max_norm is not None and value > max_norm:  # below the limit, skip a pass over every gradient
        if _clips_in_step(optimizer, scaler, params):
            set_grad_scale(optimizer, (norm + 1e-6) / max_norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return value


def _clips_in_step(optimizer, scaler, params: list[torch.Tensor]) -> bool:
    """Whether clipping can ride on the optimizer step: the fused AdamW divides each gradient by
    `optimizer.grad_scale` as it reads it (the hook GradScaler uses), so the clipping costs no
    pass over the gradients of its own. Not with a GradScaler (it sets grad_scale itself) nor
    with sharded (DTensor) gradients. The caller clears it after the step (`clear_step_inputs`)."""
    return (scaler is None and optimizer is not None and bool(optimizer.defaults.get("fused"))
            and all(type(p.grad) is torch.Tensor for p in params))


def _gradient_norm(model: nn.Module, optimizer, scaler) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(parameters with a gradient, their global gradient norm as a tensor), after unscaling fp16
    gradients; under FSDP the norm is gathered from the shards."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = total_norm([p.grad for p in params])
    return params, norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
