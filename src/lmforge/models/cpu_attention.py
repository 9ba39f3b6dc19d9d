"""Causal self-attention through lmforge's CPU kernel (float32), where it applies.

On a CPU, torch's flash-attention kernel runs T = 256, hs = 64 heads at about a third of the
matrix-product peak, and the model must copy q, k, v out of the qkv projection into
(B, nh, T, hs) and the output back. `lmforge.kernels`' causal_attention reads the projection's
(B, T, 3C) output as it is and writes the (B, T, C) input of the next one: fp32 forward and
backward 1.6x torch's (make bench-breakdown shows the step's share).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge import kernels


def causal_attention(qkv: Tensor, n_head: int) -> Tensor | None:
    """softmax(q k^T / sqrt(hs), causal) v of qkv (B, T, 3C) as (B, T, C), or None where the
    kernel does not apply (off a CPU, not float32, under torch.compile, kernels unavailable)."""
    if qkv.device.type != "cpu" or qkv.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    if kernels.ops() is None:
        return None
    return _CausalAttention.apply(qkv.contiguous(), n_head)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int) -> Tensor:
        out, lse = kernels.ops().causal_attention(qkv, n_head)
        ctx.save_for_backward(qkv, out, lse)
        ctx.n_head = n_head
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:
        qkv, out, lse = ctx.saved_tensors
        return kernels.ops().causal_attention_backward(grad_out, qkv, out, lse, ctx.n_head), None
