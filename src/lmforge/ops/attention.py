"""Self-attention through lmforge's CPU kernel (float32), where it applies.

On a CPU, torch's flash-attention kernel runs T = 256, hs = 64 heads at about a third of the
matrix-product peak, and the model must copy q, k, v out of the qkv projection into
(B, nh, T, hs) and the output back; with attention dropout or a padding mask, torch has no
fused CPU kernel at all and materialises the (B, nh, T, T) probabilities. `lmforge.ops.kernels`'
self_attention reads the projection's (B, T, 3C) output as it is, writes the (B, T, C) input
of the next one, skips the keys a query cannot see (the future, the padding), and drops
probabilities with a mask it regenerates in the backward from a seed drawn from torch's
generator (so torch.manual_seed still fixes a run).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lmforge.ops import kernels

_SEED_RANGE = 2**62


def self_attention(qkv: Tensor, n_head: int, *, causal: bool, key_padding: Tensor | None = None,
                   dropout_p: float = 0.0) -> Tensor | None:
    """dropout(softmax(q k^T / sqrt(hs) over the visible keys)) v of qkv (B, T, 3C) as (B, T, C).

    Visible: the keys up to the query (causal) and, with key_padding (True = real key, any shape
    that views as (B, T)), the real ones. None where the kernel does not apply: see
    `kernels.applies_to`, padding that is not all at the end of its row, dropout_p outside [0, 1).
    """
    if not kernels.applies_to(qkv) or not 0.0 <= dropout_p < 1.0:
        return None
    lengths = None
    if key_padding is not None:
        lengths = right_padded_lengths(key_padding.reshape(qkv.shape[0], qkv.shape[1]))
        if lengths is None:
            return None
    seed = int(torch.randint(_SEED_RANGE, (1,))) if dropout_p > 0 else 0
    return _SelfAttention.apply(qkv.contiguous(), n_head, causal, lengths, float(dropout_p), seed)


def right_padded_lengths(real: Tensor) -> Tensor | None:
    """Each row's number of real keys when every row is real keys then padding only, else None."""
    real = real.bool()
    if real.shape[1] > 1 and not bool((real[:, 1:] <= real[:, :-1]).all()):
        return None
    return real.sum(dim=1)


class _SelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int, causal: bool, lengths: Tensor | None, dropout_p: float,
                seed: int) -> Tensor:
        out, lse = kernels.ops().self_attention(qkv, n_head, causal, lengths, dropout_p, seed)
        ctx.save_for_backward(qkv, out, lse, lengths)
        ctx.settings = (n_head, causal, dropout_p, seed)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qkv, out, lse, lengths = ctx.saved_tensors
        n_head, causal, dropout_p, seed = ctx.settings
        grad_qkv = kernels.ops().self_attention_backward(grad_out, qkv, out, lse, n_head, causal, lengths,
                                                         dropout_p, seed)
        return grad_qkv, None, None, None, None, None
