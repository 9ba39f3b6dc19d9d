"""SwiGLU's gate: silu(gate) * up from the stacked gate | up projection's output (..., 2I).

Float32 on a CPU goes through lmforge's C++ kernel where it is available (one pass forward; one
backward that writes the stacked gradient the projection's backward reads, over the stacked
activation where the caller says nothing else reads it), where torch's ops run silu, a product, their
backwards and a concatenation; torch's ops otherwise, with the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.ops import kernels


def swiglu(gate_up: Tensor, consume: bool = False) -> Tensor:
    """silu(gate) * up of gate_up (..., 2I) = [gate | up]: (..., I).

    consume: gate_up is this call's alone (a projection's fresh output, read by nothing else), so
    the kernel's backward may write the gradient over it rather than into a new tensor."""
    if kernels.applies_to(gate_up):
        if not torch.is_grad_enabled():  # inference: the kernel without autograd's wrapper
            return kernels.ops().swiglu(gate_up.contiguous())
        return _SwiGLU.apply(gate_up.contiguous(), consume and not gate_up.is_leaf)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor, consume: bool) -> Tensor:
        ctx.save_for_backward(gate_up)
        ctx.consume = consume
        return kernels.ops().swiglu(gate_up)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (gate_up,) = ctx.saved_tensors
        if not ctx.consume:
            return kernels.ops().swiglu_backward(grad.contiguous(), gate_up), None
        # The version bump makes a second backward through this graph (retain_graph=True) fail
        # loudly instead of reading the gradient as the activation.
        kernels.ops().swiglu_backward_(grad.contiguous(), gate_up)
        torch.autograd.graph.increment_version(gate_up)
        return gate_up, None
