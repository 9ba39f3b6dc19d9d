"""A residual projection fused into its matrix product: residual + dropout(linear(x)).

Without dropout, the product adds itself onto residual + bias in place (`addmm_`), or onto the
residual itself when there is no bias (`addmm`, the Llama family's projections): one pass over
the output fewer than a product followed by a sum. Under autocast, with dropout, or with a
low-rank adapter (`lmforge.ops.lora`), it is the plain sum.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lmforge.ops.lora import LoRALinear


def add_projection(residual: Tensor, linear: nn.Linear, x: Tensor, dropout: nn.Dropout) -> Tensor:
    """residual + dropout(linear(x)) for x (..., in) and residual (..., out); `linear` is anything
    with a `weight` (out, in) and a `bias`."""
    if isinstance(linear, LoRALinear):  # the adapter's path is a product of its own
        return residual + dropout(linear(x))
    if ((dropout.training and dropout.p > 0) or x.dtype != residual.dtype
            or torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)):  # x.device: slow in a decode step
        return residual + dropout(torch.nn.functional.linear(x, linear.weight, linear.bias))
    if linear.bias is None:
        if residual.dim() == 2:
            return torch.addmm(residual, x, linear.weight.t())
        out = torch.addmm(residual.reshape(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t())
        return out.view(residual.shape)
    if residual.dim() == 2:  # rows already (a decode step): the same product without the reshapes
        return torch.add(residual, linear.bias).addmm_(x, linear.weight.t())
    out = torch.add(residual.reshape(-1, residual.shape[-1]), linear.bias)  # a new (B*T, C) tensor
    return out.addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t()).view(residual.shape)
