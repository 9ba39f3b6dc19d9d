"""One new token through a GPT with its KV cache, without the module machinery.

A decode step at batch 1 is about 70 tiny operations. Through `GPT.forward` each of them also
pays for nn.Module calls, attribute look-ups, identity dropouts and the forward's argument
checks: on 2 CPU cores that overhead was about 40% of a token's time. `Decoder` reads every
block's tensors once (`Block.parts`) and runs the same `block` function the forward runs, so
its logits are the forward's (tests/models/test_gpt_decode.py); generation uses it after the
prompt's prefill.

Where lmforge's CPU kernels are built, `decode_block` runs a whole block's step in one C++ call
(`decode_gpt_block` in ops/kernels/decode_attention.cpp): the ATen operators `block` calls, in
the same order (so the same numbers), around the one-call attention of the new position; from
Python each layer is then one call instead of about fifteen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.models.activations import ACTIVATIONS
from lmforge.models.gpt import GPT, Affine, BlockParts, KVCache, block
from lmforge.ops import kernels
from lmforge.ops.decode import UNFIT, decode_kernel_applies, kernel_mask

# The kernel's activation codes: exact GELU, GPT-2's tanh GELU, ReLU.
_ACTIVATION_CODES = {ACTIVATIONS["gelu"]: 0, ACTIVATIONS["gelu_new"]: 1, ACTIVATIONS["gelu_pytorch_tanh"]: 1,
                     ACTIVATIONS["relu"]: 2}
_TENSORS = ("ln_1", "c_attn", "attn_proj", "ln_2", "c_fc", "mlp_proj")


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
            x = decode_block(x, parts, None, kv, pos)  # (B, C): one new query sees every cached key
        cache.length = pos + 1
        return F.linear(torch.layer_norm(x, self.shape, *self.ln_f, self.eps), self.lm_head).unsqueeze(1)  # (B, 1, V)


def decode_block(x: Tensor, parts: BlockParts, mask: Tensor | None, kv: tuple[Tensor, Tensor], start: int) -> Tensor:
    """`block` of x with one new position per row (a decode step; mask: `ops.decode.kernel_mask`'s
    input), in one C++ call where the kernels apply: rows (B, C), float32, no adapters, no dropout,
    an activation the kernel knows. Anything else (a prefill's (B, T, C)) goes to `block` itself."""
    if x.dim() == 2 and parts.attn_dropout == 0.0 and decode_kernel_applies(x, kv):
        code = _ACTIVATION_CODES.get(parts.act)
        fitted = kernel_mask(mask, x.shape[0], start + 1, x.dtype)
        if code is not None and fitted is not UNFIT and all(type(getattr(parts, n)) is Affine for n in _TENSORS):
            tensors = [t for name in _TENSORS for t in getattr(parts, name)]  # (weight, bias) pairs
            return kernels.ops().decode_gpt_block(x, tensors, fitted, *kv, start, parts.n_head, parts.eps, code)
    return block(x, parts, mask, False, kv, start)  # (..., C)
