"""The KV cache of decoding: preallocated keys and values, filled in place as tokens come.

`KVCache` holds every layer's buffers; `append_to_cache` is what one attention layer does
with them at each call (`ops.attention.attend`). The decode step that runs a whole model on
them, one token at a time without the module machinery, is the model's own block code
(models/gpt_decode.py), so there is one definition of a block for training and decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
