"""One new token through a GPT with its KV cache, without the module machinery.

A decode step at batch 1 is about 70 tiny operations. Through `GPT.forward` each of them also
pays for nn.Module calls, attribute look-ups, identity dropouts and the forward's argument
checks: on 2 CPU cores that overhead was about 40% of a token's time. `Decoder` reads every
block's tensors once (`Block.parts`) and runs the same `block` function the forward runs, so
its logits are the forward's (tests/models/test_gpt_decode.py); generation uses it after the
prompt's prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.gpt import GPT, KVCache, block


class Decoder:
    """`step(tokens, cache)`: logits (B, 1, V) of tokens (B, 1) at position cache.length."""

    def __init__(self, model: GPT) -> None:
        if model.training:
            raise ValueError("Decoder is for inference: call model.eval() first (dropout is skipped here)")
        c = model.config
        t = model.transformer
        self.context, self.eps, self.shape = c.context, c.layer_norm_eps, (c.n_embd,)
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias)
        self.lm_head = model.lm_head.weight
        self.blocks = [layer.parts() for layer in t.h]

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        pos = cache.length
        if pos >= min(self.context, cache.max_len):
            raise ValueError(f"KV cache is full ({pos} positions); start a new one or slide the window")
        x = F.embedding(tokens.view(-1), self.wte) + self.wpe[pos]  # (B, C): rows, no reshaping on the way
        for parts, kv in zip(self.blocks, cache.layers):
            x = block(x, parts, None, False, kv, pos)  # (B, C): one new query sees every cached key
        cache.length = pos + 1
        return F.linear(torch.layer_norm(x, self.shape, *self.ln_f, self.eps), self.lm_head).unsqueeze(1)  # (B, 1, V)
