"""Self-attention: the one seam for its fast paths and the torch path they are compared with.

`attend(qkv, n_head, ...)` goes from the qkv projection's (B, T, 3C) output to the (B, T, C)
input of the output projection, for GPT (causal, padding masks, the KV cache) and, through
`attend_projections`, for BERT (key padding, separate query / key / value projections). It
takes lmforge's C++ kernel where it applies, else splits the heads and calls `sdpa`: torch's
`F.scaled_dot_product_attention` (flash attention on a GPU, under autocast too), with the CPU
path with dropout written out. `sdpa` with the kernels off is the reference the fast paths are
tested against (tests/models/test_cpu_kernels.py, tests/ops/test_attention.py).

Why a kernel: on a CPU, torch's flash-attention kernel runs T = 256, hs = 64 heads at about a
third of the matrix-product peak, and the model must copy q, k, v out of the qkv projection
into (B, nh, T, hs) and the output back; with attention dropout or a padding mask, torch has
no fused CPU kernel at all and materialises the (B, nh, T, T) probabilities. The kernel
(`kernels/self_attention.cpp`) reads the projection's output as it is, writes the next one's
input, skips the keys a query cannot see (the future, the padding), and drops probabilities
with a mask it regenerates in the backward from a seed drawn from torch's generator (so
torch.manual_seed still fixes a run). For short contexts without dropout its forward keeps the
probabilities for the backward instead of the backward recomputing them (`keeps_probabilities`).

Why dropout is written out: `F.scaled_dot_product_attention` with dropout has no fast CPU
kernel; torch falls back to its math path, which took 3x the time of the flash kernel per
layer. `sdpa` writes that path out with lmforge's dropout (`ops.dropout`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lmforge.ops import kernels
from lmforge.ops.decode import append_to_cache, decode_attention
from lmforge.ops.dropout import dropout
from lmforge.ops.lora import LoRALinear

_SEED_RANGE = 2**62
# Beyond this many positions torch's flash kernel runs plain causal attention (no dropout, no
# padding) faster than lmforge's: measured in one process, forward + backward, 12 heads of 64,
# the kernel took 0.78-0.93x the time at 1024, 1.19x at 2048 and 1.74x at 4096.
KERNEL_MAX_CONTEXT = 1024


def attend(qkv: Tensor, n_head: int, *, causal: bool, attn_mask: Tensor | None = None,
           key_padding: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
           dropout_p: float = 0.0) -> Tensor:
    """dropout(softmax(q k^T / sqrt(hs) over the visible keys)) v per head, of qkv (B, T, 3C), as
    (B, T, C); or of qkv (B, 3C), one position per row (a decode step), as (B, C).

    causal: each query sees the keys up to its own position. attn_mask: boolean (B, 1, T, S),
    True = may attend (GPT's padding masks). key_padding: boolean (B, 1, 1, S), True = a real
    key (BERT). kv: this layer's KV cache buffers (B, nh, max_len, hs); the new keys and values
    are written at `start` and the queries see keys 0 .. start + T.
    """
    if kv is None and attn_mask is None and qkv.dim() == 3:
        y = kernel_attention(qkv, n_head, causal=causal, key_padding=key_padding, dropout_p=dropout_p)
        if y is not None:
            return y  # (B, T, C)
    if (kv is not None and (qkv.dim() == 2 or qkv.shape[1] == 1) and not causal and key_padding is None
            and dropout_p == 0.0):  # one query per row after the cache: its writes and attention in one call
        y = decode_attention(qkv.reshape(qkv.shape[0], -1), n_head, kv, start, attn_mask)  # (B, C)
        if y is not None:
            return y if qkv.dim() == 2 else y.unsqueeze(1)  # (B, C) or (B, 1, C), as the input
    B, C = qkv.shape[0], qkv.shape[-1] // 3
    q, k, v = qkv.view(B, -1, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hs)
    if kv is not None:
        k, v = append_to_cache(kv, start, k, v)  # (B, nh, start + T, hs)
    y = sdpa(q, k, v, attn_mask if key_padding is None else key_padding, causal, dropout_p)  # (B, nh, T, hs)
    if qkv.dim() == 2:  # one position per row: (B, nh, 1, hs) is already (B, C) in memory order
        return y.reshape(B, C)
    return y.transpose(1, 2).reshape(B, -1, C)  # (B, T, C)


def attend_projections(x: Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, n_head: int, *,
                       key_padding: Tensor | None, dropout_p: float) -> Tensor:
    """Bidirectional `attend` of x (B, T, C) through three projections (BERT's), as (B, T, C).
    Where the kernel applies, one product over the three weights gives the qkv it reads in place."""
    B, T, C = x.shape
    if kernels.applies_to(x) and any(isinstance(p, LoRALinear) for p in (query, key, value)):
        qkv = torch.cat([proj(x) for proj in (query, key, value)], dim=-1)  # (B, T, 3C), adapters included
        return attend(qkv, n_head, causal=False, key_padding=key_padding, dropout_p=dropout_p)  # (B, T, C)
    if kernels.applies_to(x):
        weight = torch.cat((query.weight, key.weight, value.weight))  # (3C, C)
        bias = torch.cat((query.bias, key.bias, value.bias))
        qkv = F.linear(x, weight, bias)  # (B, T, 3C)
        return attend(qkv, n_head, causal=False, key_padding=key_padding, dropout_p=dropout_p)  # (B, T, C)
    q, k, v = (proj(x).view(B, T, n_head, C // n_head).transpose(1, 2)
               for proj in (query, key, value))  # 3 x (B, nh, T, hs)
    y = sdpa(q, k, v, key_padding, False, dropout_p)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal) for (B, nh, T, hs).

    attn_mask is boolean (True = may attend) or additive. Every query must be allowed at least
    one key: a fully masked row gives NaN here, where torch's math path gives zeros.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, nh, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        scores.masked_fill_(torch.ones(T, S, dtype=torch.bool, device=q.device).triu_(1), -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(attn_mask.logical_not(), -math.inf)
        else:
            scores.add_(attn_mask)
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), dropout_p, True), v)  # (B, nh, T, hs)


def causal_mask(attention_mask: Tensor | None, start: int, T: int, batch: int,
                device: torch.device) -> tuple[Tensor | None, bool]:
    """(attn_mask, is_causal) for `attend` of T queries at positions start .. start + T - 1.

    attention_mask: (B, start + T) of 1 real / 0 right padding, or None. Rows of real tokens
    then padding only need no mask at all from position 0 (see `_right_padded_on_cpu`); a
    single new query after cached keys sees all of them; several need an offset causal mask.
    """
    if attention_mask is not None:
        if start == 0 and _right_padded_on_cpu(attention_mask):
            return None, True
        return _padded_causal_mask(attention_mask, start, T), False
    if start == 0 or T == 1:
        return None, start == 0
    all_real = torch.ones(batch, start + T, dtype=torch.bool, device=device)
    return _padded_causal_mask(all_real, start, T), False


def kernel_attention(qkv: Tensor, n_head: int, *, causal: bool, key_padding: Tensor | None = None,
                     dropout_p: float = 0.0, n_kv_head: int | None = None,
                     rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """`attend` through lmforge's CPU kernel, or None where it does not apply: see
    `kernels.applies_to`, padding that is not all at the end of its row, dropout_p outside [0, 1),
    plain causal attention over more than KERNEL_MAX_CONTEXT positions.
    key_padding: True = real key, any shape that views as (B, T). n_kv_head (grouped-query
    attention): qkv is (B, T, (nh + 2 nkv) hs), query head h reading key / value head h // (nh / nkv).
    rope: cos and signed sin tables (T, hs) that turn q and k inside the kernel (a Llama's)."""
    if not kernels.applies_to(qkv) or not 0.0 <= dropout_p < 1.0:
        return None
    if dropout_p == 0.0 and key_padding is None and qkv.shape[1] > KERNEL_MAX_CONTEXT:
        return None  # torch's flash kernel is faster there
    lengths = None
    if key_padding is not None:
        lengths = right_padded_lengths(key_padding.reshape(qkv.shape[0], qkv.shape[1]))
        if lengths is None:
            return None
    seed = int(torch.randint(_SEED_RANGE, (1,))) if dropout_p > 0 else 0
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    cos, sin = (None, None) if rope is None else (t.contiguous() for t in rope)
    return _SelfAttention.apply(qkv.contiguous(), n_head, causal, lengths, float(dropout_p), seed, n_kv_head, cos, sin)


def right_padded_lengths(real: Tensor) -> Tensor | None:
    """Each row's number of real keys when every row is real keys then padding only, else None."""
    real = real.bool()
    if real.shape[1] > 1 and not bool((real[:, 1:] <= real[:, :-1]).all()):
        return None
    return real.sum(dim=1)


def _right_padded_on_cpu(attention_mask: Tensor) -> bool:
    """Whether every row is real tokens then padding only. Causal attention alone then gives the
    real positions the same outputs as the mask (the padded ones are meaningless either way), and
    takes the faster kernels. Checked on a CPU only, where reading the answer costs no device sync."""
    if attention_mask.device.type != "cpu" or torch.compiler.is_compiling():
        return False  # under torch.compile reading the answer would break the graph
    return right_padded_lengths(attention_mask) is not None


def _padded_causal_mask(attention_mask: Tensor, start: int, T: int) -> Tensor:
    """Causal + key-padding boolean mask (B, 1, T, S), True = may attend.

    `attention_mask` is (B, S) of 1 (real) / 0 (pad) over all S = start + T keys. Every query
    may also attend to itself, so no row is fully masked (that would give NaN); the outputs
    at pad positions are meaningless either way and are ignored by the losses.
    """
    S = attention_mask.shape[1]
    keys = torch.arange(S, device=attention_mask.device)  # (S,)
    queries = torch.arange(start, start + T, device=attention_mask.device)[:, None]  # (T, 1)
    causal = keys <= queries  # (T, S)
    allowed = attention_mask.bool()[:, None, None, :] | (keys == queries)  # (B, 1, T, S)
    return allowed & causal  # (B, 1, T, S)


def keeps_probabilities(qkv: Tensor, n_head: int, dropout_p: float) -> bool:
    """Whether the kernel's forward keeps its probabilities for the backward (which then skips a
    product and an exponential per block): without dropout, and where they take at most twice
    the memory of q | k | v (B nh T^2 floats against B T width: short contexts)."""
    return dropout_p == 0.0 and n_head * qkv.shape[1] <= 2 * qkv.shape[2]


class _SelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int, causal: bool, lengths: Tensor | None, dropout_p: float,
                seed: int, n_kv_head: int, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        probs = qkv.new_empty(0) if ctx.needs_input_grad[0] and keeps_probabilities(qkv, n_head, dropout_p) else None
        out, lse = kernels.ops().self_attention(qkv, n_head, causal, lengths, dropout_p, seed, n_kv_head, cos, sin,
                                                probs)
        ctx.save_for_backward(qkv, out, lse, lengths, cos, sin, probs)
        ctx.settings = (n_head, causal, dropout_p, seed, n_kv_head)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qkv, out, lse, lengths, cos, sin, probs = ctx.saved_tensors
        n_head, causal, dropout_p, seed, n_kv_head = ctx.settings
        grad_qkv = kernels.ops().self_attention_backward(grad_out, qkv, out, lse, n_head, causal, lengths,
                                                         dropout_p, seed, n_kv_head, cos, sin, probs)
        return grad_qkv, None, None, None, None, None, None, None, None
