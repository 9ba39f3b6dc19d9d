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
Python each layer is then one call instead of about fifteen. A step of up to `KERNEL_ROWS`
rows goes further: the whole model in one call (`rows_step`, `decode_gpt_rows` in
ops/kernels/decode_gpt_rows.cpp), the embeddings, blocks and output layer in the kernel's own
loops. Its logits are the forward's up to float rounding, and each row's numbers are the same
whichever rows share its step. With the model's own weights each output is a dot product summed
in vector lanes; with weights stored transposed (the serving engine's copies, `with_weights`)
each output is a running sum over the inputs in order, which keeps several rows' products in
registers without summing lanes: the faster of the two for a batch.
"""

from __future__ import annotations

import copy

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
KERNEL_ROWS = 32
"""The most rows `rows_step` takes: wider steps are products the BLAS runs faster than its loops."""


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
        self.n_head = c.n_head
        self.kernel_parts = _kernel_parts(self)

    def step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        pos = cache.length
        if pos >= min(self.context, cache.max_len):
            raise ValueError(f"KV cache is full ({pos} positions); start a new one or slide the window")
        ids = tokens.view(-1)
        logits = rows_step(self, ids, torch.full_like(ids, pos), None, cache.k, cache.v, pos)
        if logits is not None:
            cache.length = pos + 1
            return logits.unsqueeze(1)  # (B, 1, V)
        x = F.embedding(ids, self.wte) + self.wpe[pos]  # (B, C): rows, no reshaping on the way
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


def prefill_block(x: Tensor, parts: BlockParts, mask: Tensor | None, causal: bool, kv: tuple[Tensor, Tensor],
                  start: int) -> Tensor:
    """`block` of a prompt's positions x (B, T, C) written into the cache kv at `start`, as one C++
    call of the same operators (`prefill_gpt_block`) where the kernels are loaded, no gradients,
    float32, no adapters, an activation the kernel knows; else `block` itself."""
    code = _ACTIVATION_CODES.get(parts.act)
    if (code is not None and x.dim() == 3 and parts.attn_dropout == 0.0 and not torch.is_grad_enabled()
            and kv[0].dim() == 4 and kernels.applies_to(x) and all(type(getattr(parts, n)) is Affine for n in _TENSORS)):
        tensors = [t for name in _TENSORS for t in getattr(parts, name)]
        return kernels.ops().prefill_gpt_block(x, tensors, mask, causal, *kv, start, parts.n_head, parts.eps, code)
    return block(x, parts, mask, causal, kv, start)  # (B, T, C)


def _kernel_parts(d: Decoder) -> tuple[list[Tensor], int] | None:
    """(every block's tensors in `decode_gpt_rows`'s order, the activation's code), or None where the
    model has something the kernel does not run: adapters, another activation, a non-float32 or
    non-contiguous tensor."""
    codes = {_ACTIVATION_CODES.get(parts.act) for parts in d.blocks}
    if len(codes) != 1 or None in codes or not all(type(getattr(p, n)) is Affine for p in d.blocks for n in _TENSORS):
        return None
    tensors = [t for parts in d.blocks for name in _TENSORS for t in getattr(parts, name)]  # (weight, bias) pairs
    named = [d.wte, d.wpe, d.lm_head, *d.ln_f, *tensors]
    if not all(t.dtype == torch.float32 and (t.is_contiguous() or _is_stored_transposed(t))
               for t in named if t is not None):
        return None
    return tensors, codes.pop()


def _is_stored_transposed(t: Tensor) -> bool:
    """Whether t (out, in) lies in (in, out) memory order (strides (1, out))."""
    return t.dim() == 2 and t.stride() == (1, t.shape[0])


def with_weights(d: Decoder, blocks: list[BlockParts], lm_head: Tensor) -> Decoder:
    """d reading other tensors of the same values: the serving engine's copies stored transposed,
    which `decode_gpt_rows` multiplies in another order (see `rows_step`)."""
    other = copy.copy(d)
    other.blocks, other.lm_head = blocks, lm_head
    other.kernel_parts = _kernel_parts(other)
    return other


def rows_step(d: Decoder, ids: Tensor, positions: Tensor, mask: Tensor | None, k: Tensor, v: Tensor,
              start: int, joined: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor | None:
    """Logits (R, V) of token ids (R,) at positions (R,), one per cache row 0 .. R - 1 of k, v
    (n_layer, slots, nh, columns, hs), written at column `start`, through the whole model in one
    C++ call; or None where it does not apply (a plain step over `KERNEL_ROWS` rows, kernels not
    loaded, gradients on, a model `_kernel_parts` refuses, a mask `kernel_mask` cannot take).
    mask: what each row sees of columns 0 .. start, as `kernel_mask` takes it or additive
    (R, start + 1) with each row's values contiguous (a view of a wider mask is read in place).

    joined: (slots (R,), columns (R,), logit_rows (L,)) for a step that prompts join: row r writes
    cache row slots[r] at column columns[r] (at most `start`) and sees its columns up to that one
    (a prompt's positions share a cache row); the logits (L, V) are those of rows logit_rows. The
    caller sizes such a step (`batch_decode.JOIN_ROWS`)."""
    R = ids.numel()
    widest = KERNEL_ROWS if joined is None else R
    if d.kernel_parts is None or not 1 <= R <= widest or k.dim() != 5 or not k.is_contiguous() \
            or not v.is_contiguous() or k.dtype != torch.float32 or torch.is_grad_enabled() \
            or not kernels.applies_to(d.wte):
        return None
    fitted = mask  # (R, start + 1) additive, rows possibly apart: read where it lies
    if mask is not None and not (mask.dim() == 2 and mask.dtype == k.dtype and mask.stride(-1) == 1):
        fitted = kernel_mask(mask, R, start + 1, k.dtype)
        if fitted is UNFIT:
            return None
        fitted = None if fitted is None else fitted.view(R, start + 1)
    tensors, code = d.kernel_parts
    return kernels.ops().decode_gpt_rows(ids.contiguous(), positions.contiguous(), d.wte, d.wpe, tensors, *d.ln_f,
                                         d.lm_head, fitted, k, v, start, d.n_head, d.eps, code, *(joined or ()))
