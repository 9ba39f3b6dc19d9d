"""What every causal LM family shares around its blocks: checking a call and choosing its mask.

`attention_setup(context, input_ids, attention_mask, kv_cache)` checks the sequence against the
context and the KV cache, and returns the start position and the mask `ops.attention.attend`
takes; GPT and the Llama family run it on every forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.ops.attention import causal_mask
from lmforge.ops.decode import KVCache


def attention_setup(context: int, input_ids: Tensor, attention_mask: Tensor | None,
                    kv_cache: KVCache | None) -> tuple[int, Tensor | None, bool]:
    """Check a decoder's call; return (start position, SDPA attn_mask or None, is_causal).
    Positions continue from the cache."""
    B, T = input_ids.shape
    start = 0 if kv_cache is None else kv_cache.length
    if start + T > context:
        raise ValueError(f"sequence of {start + T} tokens is longer than the model context "
                         f"({context}); trim the input (generation slides a window for you)")
    if kv_cache is not None:
        if torch.is_grad_enabled():
            raise ValueError("the KV cache is for inference: call the model under torch.inference_mode() "
                             "or torch.no_grad()")
        if start + T > kv_cache.max_len or B != kv_cache.batch:
            raise ValueError(f"KV cache holds {kv_cache.batch} x {kv_cache.max_len} positions ({start} used); "
                             f"cannot add {B} x {T}; make a new one with model.new_kv_cache()")
    if attention_mask is not None and attention_mask.shape != (B, start + T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, start + T)} "
                         "(1 real token, 0 right padding; with a KV cache it covers the cached positions too)")
    return start, *causal_mask(attention_mask, start, T, B, input_ids.device)
