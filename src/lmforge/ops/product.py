"""A layer's product x W^T + b on a CPU, its weight gradient taken in the faster orientation.

The weight gradient of a layer is g^T x for the output gradient g (N, out) and the input x
(N, in). MKL computes it as that product of a transposed operand, or as (x^T g)^T; for a layer
wider out than in (a stacked qkv, a gated MLP's gate | up, GPT's c_fc) the second runs about a
sixth faster at training shapes, and its (in, out) result costs one small copy into the weight's
layout (lmforge's tiled transpose where the CPU kernels are loaded: torch's copy of a transposed
view is about three times slower). Same sums, other order: the gradients agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge.ops import kernels


def transposed(m: Tensor) -> Tensor:
    """m^T as a new contiguous matrix, for a contiguous float32 matrix m on a CPU."""
    library = kernels.ops(build=False)
    return m.t().contiguous() if library is None else library.transposed(m)


class _WideProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)  # (N, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad.mm(weight) if need_x else None  # (N, in)
        grad_w = transposed(x.t().mm(grad)) if need_w else None  # (out, in)
        grad_b = grad.sum(0) if ctx.has_bias and need_b else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias) for x (..., in); on a CPU in float32 training, for a weight of
    more outputs than inputs, with the weight gradient of `_WideProduct`."""
    if (not (weight.requires_grad and torch.is_grad_enabled()) or weight.shape[0] <= weight.shape[1]
            or not x.is_cpu or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    return _WideProduct.apply(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])
