"""The private torch hooks lmforge relies on, each behind a small named function.

torch does not promise these across versions, so they live here and nowhere else in this
layer or above; tests/ops/test_torch_private.py checks every one against the installed torch
and names the hook and the version when one has moved or gone.

- `unguarded`: torch wraps Optimizer methods (`zero_grad`, `state_dict`, ...) in
  `torch._disable_dynamo` and `step` in a graph break; both import torch._dynamo, which costs
  start-up time and does nothing outside a compiled region. The wrapped function is their
  `__wrapped__` (functools.wraps).
- `set_grad_scale` / `set_found_inf` / `clear_step_inputs`: the fused AdamW reads the
  optimizer attributes `grad_scale` (every gradient is divided by it as it is read) and
  `found_inf` (nonzero: the update is skipped on the device), the inputs GradScaler gives it.
- `compiled_original`: torch.compile wraps a module in one that keeps it as `_orig_mod`.

Used in base/, below this layer, and checked by the same test: the bf16 probes
`torch.cpu._is_amx_tile_supported` / `_is_avx512_bf16_supported` (base/runtime.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

_STEP_INPUTS = ("grad_scale", "found_inf")


def unguarded(method: Callable) -> Callable:
    """The function under torch's torch.compile guards (the end of its `__wrapped__` chain)."""
    return inspect.unwrap(method)


def set_grad_scale(optimizer: torch.optim.Optimizer, scale: torch.Tensor) -> None:
    """The next fused step divides every gradient by `scale` as it reads it (no pass of its own)."""
    optimizer.grad_scale = scale


def set_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """The next fused step leaves weights and state as they are where `found_inf` is nonzero."""
    optimizer.found_inf = found_inf


def clear_step_inputs(optimizer: torch.optim.Optimizer) -> None:
    """Remove `grad_scale` and `found_inf` after a step, so no later step reads them."""
    for name in _STEP_INPUTS:
        optimizer.__dict__.pop(name, None)


def compiled_original(model: nn.Module) -> nn.Module:
    """The module torch.compile wrapped, or `model` itself when it is not a compiled wrapper."""
    return getattr(model, "_orig_mod", model)
