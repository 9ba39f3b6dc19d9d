"""Grouped-query attention (GQA / MQA): n_head query heads sharing n_kv_head key / value heads.

`attend_grouped(qk, v, n_head, n_kv_head, ...)` is `ops.attention.attend` for a model whose
queries and keys arrive side by side after the rotary step: qk (B, T, (nh + nkv) * hs) and
v (B, T, nkv * hs), query head h reading key / value head h // (nh / nkv), as transformers'
`repeat_kv` has it. The KV cache holds nkv heads, not nh: the cache of a 4-to-1 model is a
quarter of the size.

`attend_projected(qkv, rope, ...)` starts one step earlier, from the q | k | v projection's
output before the rotary step.

- Training and full-sequence forwards go through lmforge's CPU kernel where it applies: it reads
  the shared heads where they are, q | k | v side by side, and its backward sums each group's
  key / value gradients itself. From the projection's output it turns q and k itself, as it
  reads them (and their gradients back, as it writes them).
- One new query per row after the cache (a decode step) needs no repetition: the g = nh / nkv
  query heads of a group are g queries against the group's keys, one SDPA call without a mask.
  From the projection's output, one kernel call (`ops.decode.decode_attention`) turns q and k,
  writes the new key and value into the cache and attends, with a batched step's mask too.
- Everything else (a prompt's prefill into the cache, padding masks) repeats the cached heads
  and calls `ops.attention.sdpa`, the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.ops import kernels
from lmforge.ops.attention import KERNEL_MAX_CONTEXT, kernel_attention, sdpa
from lmforge.ops.decode import append_to_cache, decode_attention
from lmforge.ops.rotary import apply_rotary


def repeat_heads(x: Tensor, groups: int, dim: int) -> Tensor:
    """x with each head along `dim` repeated `groups` times in place (head j -> heads j*g .. j*g + g - 1)."""
    if groups == 1:
        return x
    return x.repeat_interleave(groups, dim=dim)


def attend_grouped(qk: Tensor, v: Tensor, n_head: int, n_kv_head: int, *, causal: bool,
                   attn_mask: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None, start: int = 0,
                   dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(hs)) v per query head, as (B, T, nh * hs); rows in, rows out for a
    decode step (qk (B, (nh + nkv) * hs), v (B, nkv * hs) -> (B, nh * hs)).

    causal / attn_mask / kv / start / dropout_p: as `ops.attention.attend` (kv: this layer's cache
    buffers (B, nkv, max_len, hs)).
    """
    hs = v.shape[-1] // n_kv_head
    groups = n_head // n_kv_head
    q, k = qk.split((n_head * hs, n_kv_head * hs), dim=-1)
    if kv is None and attn_mask is None and qk.dim() == 3 and kernels.applies_to(qk):
        y = kernel_attention(torch.cat((qk, v), dim=-1), n_head, causal=causal, dropout_p=dropout_p,
                             n_kv_head=n_kv_head)
        if y is not None:
            return y  # (B, T, nh * hs)
    B = qk.shape[0]
    q = q.view(B, -1, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, -1, n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
    v = v.view(B, -1, n_kv_head, hs).transpose(1, 2)  # (B, nkv, T, hs)
    if kv is not None:
        k, v = append_to_cache(kv, start, k, v)  # (B, nkv, start + T, hs)
    if q.shape[2] == 1 and attn_mask is None and not causal and dropout_p == 0.0:
        # one query per row sees every cached key: a group's g heads are g queries of one kv head
        y = sdpa(q.reshape(B, n_kv_head, groups, hs), k, v, None, False, 0.0)  # (B, nkv, g, hs)
        return y.reshape(B, n_head * hs) if qk.dim() == 2 else y.reshape(B, 1, n_head * hs)
    k, v = repeat_heads(k, groups, 1), repeat_heads(v, groups, 1)  # (B, nh, S, hs)
    y = sdpa(q, k, v, attn_mask, causal, dropout_p)  # (B, nh, T, hs)
    if qk.dim() == 2:
        return y.reshape(B, n_head * hs)
    return y.transpose(1, 2).reshape(B, -1, n_head * hs)  # (B, T, nh * hs)


def attend_projected(qkv: Tensor, rope: tuple[Tensor, Tensor], n_head: int, n_kv_head: int, head_dim: int, *,
                     causal: bool, attn_mask: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None,
                     start: int = 0, dropout_p: float = 0.0) -> Tensor:
    """`attend_grouped` of the projection's output qkv (B, T, (nh + 2 nkv) hs) (rows (B, ...) in
    a decode step) with the rotary angles rope = (cos, signed sin) (T, 1, hs) applied to q and k."""
    if kv is not None and qkv.dim() == 2 and not causal and dropout_p == 0.0:
        # a decode step: rotary, the cache writes and attention in one call (a batched step's mask too)
        cos, sin = (t.reshape(-1, head_dim) for t in rope)  # (1, hs), or (B, hs): each row at its own position
        if cos.shape[0] in (1, qkv.shape[0]):
            y = decode_attention(qkv, n_head, kv, start, attn_mask, rope=(cos, sin))
            if y is not None:
                return y  # (B, nh hs)
    if (kv is None and attn_mask is None and qkv.dim() == 3 and 0.0 <= dropout_p < 1.0
            and (dropout_p > 0 or qkv.shape[1] <= KERNEL_MAX_CONTEXT) and rope[0].shape[0] == qkv.shape[1]
            and rope[0].dim() == 3 and kernels.applies_to(qkv)):  # angles (T, 1, hs) shared by the batch
        y = kernel_attention(qkv, n_head, causal=causal, dropout_p=dropout_p, n_kv_head=n_kv_head,
                             rope=(rope[0].squeeze(1), rope[1].squeeze(1)))
        if y is not None:
            return y  # (B, T, nh * hs)
    qk, v = qkv.split(((n_head + n_kv_head) * head_dim, n_kv_head * head_dim), dim=-1)
    qk = apply_rotary(qk, *rope, head_dim)  # queries and keys turned by their position
    return attend_grouped(qk, v, n_head, n_kv_head, causal=causal, attn_mask=attn_mask, kv=kv, start=start,
                          dropout_p=dropout_p)
