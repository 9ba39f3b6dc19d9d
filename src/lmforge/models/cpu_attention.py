"""Causal self-attention through lmforge's CPU kernel (float32), where it applies.

On a CPU, torch's flash-attention kernel runs T = 256, hs = 64 heads at about a third of the
matrix-product peak, and the model must copy q, k, v out of the qkv projection into
(B, nh, T, hs) and the output back; with attention dropout, torch has no fused CPU kernel at
all and the (B, nh, T, T) probabilities are materialised. `lmforge.kernels`' causal_attention
reads the projection's (B, T, 3C) output as it is, writes the (B, T, C) input of the next one,
and drops probabilities with a mask it regenerates in the backward from a seed drawn from
torch's generator (so torch.manual_seed still fixes a run).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge import kernels

_SEED_RANGE = 2**62


def causal_attention(qkv: Tensor, n_head: int, dropout_p: float = 0.0) -> Tensor | None:
    """dropout(softmax(q k^T / sqrt(hs), causal)) v of qkv (B, T, 3C) as (B, T, C), or None where
    the kernel does not apply (off a CPU, not float32, under torch.compile, kernels unavailable)."""
    if (qkv.device.type != "cpu" or qkv.dtype != torch.float32 or torch.compiler.is_compiling()
            or not 0.0 <= dropout_p < 1.0):
        return None
    if kernels.ops() is None:
        return None
    seed = int(torch.randint(_SEED_RANGE, (1,))) if dropout_p > 0 else 0
    return _CausalAttention.apply(qkv.contiguous(), n_head, float(dropout_p), seed)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int, dropout_p: float, seed: int) -> Tensor:
        out, lse = kernels.ops().causal_attention(qkv, n_head, dropout_p, seed)
        ctx.save_for_backward(qkv, out, lse)
        ctx.settings = (n_head, dropout_p, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        qkv, out, lse = ctx.saved_tensors
        return kernels.ops().causal_attention_backward(grad_out, qkv, out, lse, *ctx.settings), None, None, None
