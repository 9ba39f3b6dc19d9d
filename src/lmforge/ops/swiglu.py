"""SwiGLU's gate: silu(gate) * up from the stacked gate | up projection's output (..., 2I).

Float32 on a CPU goes through lmforge's C++ kernel where it is available (one pass forward, one
backward that writes the stacked gradient the projection's backward reads, where torch's ops
run silu, a product, their backwards and a concatenation); torch's ops otherwise, with the same
numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.ops import kernels


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of gate_up (..., 2I) = [gate | up]: (..., I)."""
    if kernels.applies_to(gate_up):
        if not torch.is_grad_enabled():  # inference: the kernel without autograd's wrapper
            return kernels.ops().swiglu(gate_up.contiguous())
        return _SwiGLU.apply(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        return kernels.ops().swiglu(gate_up)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor]:
        (gate_up,) = ctx.saved_tensors
        return (kernels.ops().swiglu_backward(grad.contiguous(), gate_up),)
