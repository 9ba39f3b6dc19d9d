"""One new token through a Llama-class model with its KV cache, without the module machinery.

The Llama counterpart of models/gpt_decode.py: `LlamaDecoder` reads every block's tensors once
(`LlamaBlock.parts`: q, k, v and gate, up already stacked) and runs the same `llama_block` the
forward runs, on rows (B, C), with the rotary angles of the one position and a cache of
n_kv_head heads; its logits are the forward's (tests/models/test_llama_decode.py).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lmforge.models.llama import Llama, llama_block
from lmforge.ops.decode import KVCache
from lmforge.ops.rotary import rms_norm


class LlamaDecoder:
    """`step(tokens, cache)`: logits (B, 1, V) of tokens (B, 1) at position cache.length."""

    def __init__(self, model: Llama) -> None:
        if model.training:
            raise ValueError("LlamaDecoder is for inference: call model.eval() first (dropout is skipped here)")
        c = model.config
        self.context, self.eps = c.context, c.rms_norm_eps
        self.embed, self.norm, self.lm_head = model.embedding, model.model.norm.weight, model.lm_head.weight
        self.rope = model.rope
        self.blocks = [layer.parts() for layer in model.model.layers]

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        pos = cache.length
        if pos >= min(self.context, cache.max_len):
            raise ValueError(f"KV cache is full ({pos} positions); start a new one or slide the window")
        x = F.embedding(tokens.view(-1), self.embed)  # (B, C): rows, no reshaping on the way
        cos, sin = self.rope.get(x.device, x.dtype, pos + 1)
        rope = (cos[pos:pos + 1], sin[pos:pos + 1])  # 2 x (1, hs)
        for parts, kv in zip(self.blocks, cache.layers):
            x = llama_block(x, parts, rope, None, False, kv, pos)  # (B, C): one new query sees every cached key
        cache.length = pos + 1
        return F.linear(rms_norm(x, self.norm, self.eps), self.lm_head).unsqueeze(1)  # (B, 1, V)
