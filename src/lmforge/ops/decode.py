"""The KV cache of decoding: preallocated keys and values, filled in place as tokens come.

`KVCache` holds every layer's buffers; `append_to_cache` is what one attention layer does
with them at each call (`ops.attention.attend`). The decode step that runs a whole model on
them, one token at a time without the module machinery, is the model's own block code
(models/gpt_decode.py), so there is one definition of a block for training and decoding.

`decode_attention` is a decode step's attention in one C++ call (`kernels/decode_attention.cpp`):
the new keys and values written into the cache and each row's one query attending over its
keys, where torch's ops take a dozen calls (views, two cache writes, SDPA with its mask); it
gives torch's numbers (tests/models/test_gpt_decode_kernel.py), and None sends the caller to them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmforge.ops import kernels


class KVCache:
    """Preallocated keys/values of every layer, filled in place as tokens are processed.

    Buffers are (n_layer, B, n_head, max_len, head_dim); `length` is the number of positions
    already stored, which is also the position of the next token.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Per-layer views made once, so the forward pass does no indexing to find them.
        self.layers = [(self.k[i], self.v[i]) for i in range(n_layer)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        """Forget the stored positions (buffers are overwritten on the next use)."""
        self.length = 0


def append_to_cache(kv: tuple[Tensor, Tensor], start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write k, v (B, nh, T, hs) into one layer's buffers at `start`; return the keys and values
    of positions 0 .. start + T as views (B, nh, start + T, hs)."""
    k_buf, v_buf = kv  # (B, nh, max_len, hs)
    T = k.shape[2]
    k_buf.narrow(2, start, T).copy_(k)
    v_buf.narrow(2, start, T).copy_(v)
    return k_buf.narrow(2, 0, start + T), v_buf.narrow(2, 0, start + T)


UNFIT = object()
"""`kernel_mask`'s answer for a mask the decode kernels cannot read (torch's path takes it)."""


def decode_kernel_applies(x: Tensor, kv: tuple[Tensor, Tensor]) -> bool:
    """Whether the C++ decode step can take rows x (B, ...) and their cache kv (B, nkv, max_len, hs):
    no gradients, lmforge's kernels loaded and applicable (`kernels.applies_to`), contiguous caches."""
    k_buf, v_buf = kv
    return (not torch.is_grad_enabled() and k_buf.dim() == 4 and k_buf.shape[0] == x.shape[0]
            and k_buf.dtype == x.dtype and k_buf.is_contiguous() and v_buf.is_contiguous() and kernels.applies_to(x))


def kernel_mask(mask: Tensor | None, rows: int, keys: int, dtype: torch.dtype):
    """mask as the decode kernels read it: additive, contiguous, `keys` values per row (booleans,
    True = may attend, become 0 / -inf); None for no mask; `UNFIT` for any other shape (one row
    broadcast to the batch, several queries)."""
    if mask is None:
        return None
    if mask.shape[0] != rows or mask.shape[-1] != keys or mask.numel() != rows * keys:
        return UNFIT
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, -math.inf)
    return mask.contiguous() if mask.dtype == dtype else UNFIT


def decode_attention(qkv: Tensor, n_head: int, kv: tuple[Tensor, Tensor], start: int, mask: Tensor | None = None,
                     rope: tuple[Tensor, Tensor] | None = None) -> Tensor | None:
    """One new query per row: the attention output rows (B, nh * hs) of qkv (B, (nh + 2 nkv) * hs),
    whose keys and values are written into kv (B, nkv, max_len, hs) at column `start` first; or
    None where the C++ kernel does not apply (`decode_kernel_applies`, `kernel_mask`).

    mask: what each row sees of columns 0 .. start, additive (B, 1, 1, start + 1) of 0 / -inf or
    boolean (True = may attend); the row's own new column must be visible. rope: the rotary
    angles (cos, signed sin), (1, hs) or (B, hs), turned into q and k (a Llama); None for a GPT.
    """
    if not decode_kernel_applies(qkv, kv):
        return None
    mask = kernel_mask(mask, qkv.shape[0], start + 1, qkv.dtype)
    if mask is UNFIT:
        return None
    cos, sin = (None, None) if rope is None else (t.contiguous() for t in rope)
    return kernels.ops().decode_attention_masked(qkv.contiguous(), cos, sin, mask, *kv, start, n_head)
