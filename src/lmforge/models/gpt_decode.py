"""One new token through a GPT with its KV cache, without the module machinery.

A decode step at batch 1 is about 70 tiny operations. Through `GPT.forward` each of them also
pays for nn.Module calls, identity dropouts and the forward's argument checks: on 2 CPU
cores that overhead was about 40% of a token's time. `Decoder` runs the same functional
operations on the same weight tensors, so its logits equal `GPT.forward(token, kv_cache=...)`
exactly (tests/models/test_gpt_decode.py); generation uses it after the prompt's prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.gpt import GPT, KVCache


class Decoder:
    """`step(tokens, cache)`: logits (B, 1, V) of tokens (B, 1) at position cache.length."""

    def __init__(self, model: GPT) -> None:
        if model.training:
            raise ValueError("Decoder is for inference: call model.eval() first (dropout is skipped here)")
        c = model.config
        t = model.transformer
        self.n_head, self.n_embd, self.context = c.n_head, c.n_embd, c.context
        self.eps = c.layer_norm_eps
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias)
        # (B, C) rows times transposed-weight views: the addmm / mm that F.linear runs, minus its
        # per-call transpose and reshapes (same kernels, so the same numbers).
        self.lm_head_t = model.lm_head.weight.t()
        self.blocks = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight.t(), b.attn.c_attn.bias,
                        b.attn.c_proj.weight.t(), b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                        b.mlp.c_fc.weight.t(), b.mlp.c_fc.bias, b.mlp.c_proj.weight.t(), b.mlp.c_proj.bias,
                        b.mlp.act)
                       for b in t.h]

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        pos = cache.length
        if pos >= min(self.context, cache.max_len):
            raise ValueError(f"KV cache is full ({pos} positions); start a new one or slide the window")
        B, C, nh = tokens.shape[0], self.n_embd, self.n_head
        shape = (C,)
        x = F.embedding(tokens.view(B), self.wte) + self.wpe[pos]  # (B, C)
        for (ln1_w, ln1_b, qkv_wt, qkv_b, proj_wt, proj_b, ln2_w, ln2_b, fc_wt, fc_b, out_wt, out_b, act), \
                (k_buf, v_buf) in zip(self.blocks, cache.layers):
            qkv = _affine(F.layer_norm(x, shape, ln1_w, ln1_b, self.eps), qkv_wt, qkv_b)  # (B, 3C)
            q, k, v = qkv.view(B, 1, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, 1, hs)
            k_buf.narrow(2, pos, 1).copy_(k)
            v_buf.narrow(2, pos, 1).copy_(v)
            y = F.scaled_dot_product_attention(q, k_buf.narrow(2, 0, pos + 1), v_buf.narrow(2, 0, pos + 1))
            x = x + _affine(y.reshape(B, C), proj_wt, proj_b)
            h = act(_affine(F.layer_norm(x, shape, ln2_w, ln2_b, self.eps), fc_wt, fc_b))  # (B, 4C)
            x = x + _affine(h, out_wt, out_b)
        cache.length = pos + 1
        return torch.mm(F.layer_norm(x, shape, *self.ln_f, self.eps), self.lm_head_t).view(B, 1, -1)  # (B, 1, V)


def _affine(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight_t + bias: what F.linear runs for 2-D input (bias=False models have none)."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
