"""Llama-class decoders (Llama, Mistral, Qwen2, SmolLM): the model and the block both training
and decoding run.

A block, as the papers write it (pre-norm, no positions in the residual stream):
    h = x + o_proj(attention(rope(q_proj(rms(x))), rope(k_proj(rms(x))), v_proj(rms(x))))
    out = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))
with n_kv_head key / value heads shared by groups of query heads (`ops.grouped_attention`),
rotary angles from `ops.rotary`, and the output layer fused with the loss in training
(`ops.lm_loss`), as GPT's.

`llama_block` is that block as one function of its tensors (`LlamaParts`): `LlamaBlock.forward`
calls it with the modules' tensors at every call, the decode step (models/llama_decode.py)
with tensors read once. q, k and v run as one product over their stacked weights, and gate and
up as another: the same numbers as three and two products, in fewer, larger calls. Their weights
lie side by side in one buffer (`ops.joined`), so the stacked weight is that buffer, not a copy
made at every forward.

Parameter names are transformers' `LlamaForCausalLM` (model.embed_tokens, model.layers.0.self_attn.q_proj,
..., model.norm, lm_head), in the same (out, in) layout: the Hugging Face map is the identity.
With `tie_embeddings` lm_head.weight is model.embed_tokens.weight (one tensor, two names).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lmforge.models.causal_lm import attention_setup
from lmforge.models.gpt import Affine, affine_of
from lmforge.models.llama_config import LlamaConfig
from lmforge.ops.decode import KVCache
from lmforge.ops.dropout import Dropout
from lmforge.ops.grouped_attention import attend_projected
from lmforge.ops.joined import joined_rows, share_rows
from lmforge.ops.linear import add_projection
from lmforge.ops.lm_loss import lm_head_cross_entropy
from lmforge.ops.lora import LoRALinear, Stacked, project
from lmforge.ops.rotary import RopeTables, rms_norm, rms_norm_residual
from lmforge.ops.swiglu import swiglu
from lmforge.models.init import init_normal


class LlamaParts(NamedTuple):
    """What `llama_block` reads of one block: its tensors and settings."""

    input_norm: Tensor
    qkv: Affine | Stacked
    """q_proj, k_proj and v_proj stacked: ((nh + 2 nkv) hs, C) (their modules where one has a LoRA adapter)."""
    o: Affine | LoRALinear
    post_norm: Tensor
    gate_up: Affine | Stacked
    """gate_proj and up_proj stacked: (2 I, C)."""
    down: Affine | LoRALinear
    n_head: int
    n_kv_head: int
    head_dim: int
    eps: float
    attn_dropout: float
    """Dropout on the attention probabilities (0 in eval mode)."""
    resid_dropout: nn.Dropout
    mlp_dropout: nn.Dropout


def llama_block(x: Tensor, p: LlamaParts, rope: tuple[Tensor, Tensor], attn_mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
    """One pre-RMSNorm block on x (B, T, C), or on rows x (B, C) in a decode step.

    rope: cos, sin of the positions (T, 1, hs) (a decode step: (1, hs)); attn_mask / is_causal /
    kv / start as GPT's `block`.
    """
    x, h = rms_norm_residual(x, p.input_norm, p.eps)  # (B, T, C): x goes on as the residual
    qkv = project(h, p.qkv)  # (B, T, (nh + 2 nkv) hs)
    y = attend_projected(qkv, rope, p.n_head, p.n_kv_head, p.head_dim, causal=is_causal, attn_mask=attn_mask,
                         kv=kv, start=start, dropout_p=p.attn_dropout)  # (B, T, nh hs): rotary inside
    x = add_projection(x, p.o, y, p.resid_dropout)  # (B, T, C): x + dropout(o_proj(y))
    x, h = rms_norm_residual(x, p.post_norm, p.eps)  # (B, T, C)
    gate_up = project(h, p.gate_up)  # (B, T, 2 I), read by the gate alone
    return add_projection(x, p.down, swiglu(gate_up, consume=True), p.mlp_dropout)  # x + dropout(down(...))


def _stacked(*linears: nn.Linear) -> Affine | Stacked:
    if any(isinstance(lin, LoRALinear) for lin in linears):  # each with its adapter (train.lora)
        return Stacked(linears)
    return Affine(_rows([lin.weight for lin in linears]),
                  None if linears[0].bias is None else _rows([lin.bias for lin in linears]))


def _rows(tensors: list[Tensor]) -> Tensor:
    """The tensors stacked: their shared buffer where they still lie in it (`share_rows`), else a copy."""
    joined = joined_rows(tensors)
    return torch.cat(tensors) if joined is None else joined


def _affine(linear: nn.Linear) -> Affine | LoRALinear:
    return linear if isinstance(linear, LoRALinear) else Affine(linear.weight, linear.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (transformers' LlamaRMSNorm: one `weight`, no bias)."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    """The attention weights: q_proj (nh heads), k_proj and v_proj (nkv heads), o_proj."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        qkv_bias, o_bias = c.attention_bias != "none", c.attention_bias == "all"
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.hs, bias=qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.kv_heads * c.hs, bias=qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.kv_heads * c.hs, bias=qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.hs, c.n_embd, bias=o_bias)
        share_rows(self.q_proj, self.k_proj, self.v_proj)  # the stacked product reads them in place
        self.dropout = c.dropout
        self.resid_dropout = Dropout(c.dropout)


class LlamaMLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.ffn, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.n_embd, c.ffn, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.ffn, c.n_embd, bias=c.mlp_bias)
        share_rows(self.gate_proj, self.up_proj)
        self.dropout = Dropout(c.dropout)


class LlamaBlock(nn.Module):
    """One decoder layer; its math is `llama_block`."""

    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.config = c
        self.input_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], attn_mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        return llama_block(x, self.parts(), rope, attn_mask, is_causal, kv, start)  # (B, T, C)

    def parts(self) -> LlamaParts:
        """This block's tensors and settings, as they are now (training flag included)."""
        a, m, c = self.self_attn, self.mlp, self.config
        return LlamaParts(
            input_norm=self.input_layernorm.weight, qkv=_stacked(a.q_proj, a.k_proj, a.v_proj),
            o=affine_of(a.o_proj), post_norm=self.post_attention_layernorm.weight,
            gate_up=_stacked(m.gate_proj, m.up_proj), down=affine_of(m.down_proj),
            n_head=c.n_head, n_kv_head=c.kv_heads, head_dim=c.hs, eps=c.rms_norm_eps,
            attn_dropout=a.dropout if self.training else 0.0, resid_dropout=a.resid_dropout, mlp_dropout=m.dropout)


class Llama(nn.Module):
    """A Llama-class decoder: token embeddings, rotary positions inside attention, pre-RMSNorm
    blocks with grouped-query attention and a SwiGLU MLP, a final RMSNorm, an output layer tied
    to the embeddings or not."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),
            layers=nn.ModuleList([LlamaBlock(config) for _ in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.drop = Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two names
        self.rope = RopeTables(config.hs, config.rope_theta, config.rope_scaling, config.context)
        self.apply(init_normal)
        for name, p in self.named_parameters():  # residual projections scaled by 1/sqrt(2 * n_layer), as GPT-2
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @property
    def embedding(self) -> Tensor:
        """The input embedding matrix (V, C): where the model's device and dtype are read."""
        return self.model.embed_tokens.weight

    def new_kv_cache(self, batch: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache of n_kv_head heads for `batch` sequences of up to `max_len` (default: the context)."""
        c = self.config
        max_len = c.context if max_len is None else max_len
        if not 1 <= max_len <= c.context:
            raise ValueError(f"max_len={max_len}: must be between 1 and the model context ({c.context})")
        w = self.embedding
        return KVCache(c.n_layer, batch, c.kv_heads, max_len, c.hs,
                       device=w.device if device is None else device, dtype=w.dtype if dtype is None else dtype)

    def _run(self, input_ids: Tensor, attention_mask: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after the final norm; advances kv_cache."""
        start, attn_mask, is_causal = attention_setup(self.config.context, input_ids, attention_mask, kv_cache)
        T = input_ids.shape[1]
        x = self.drop(self.model.embed_tokens(input_ids))  # (B, T, C)
        rope = self.rope.window(start, T, x.device, x.dtype)  # 2 x (T, 1, hs)
        layers = kv_cache.layers if kv_cache is not None else [None] * self.config.n_layer
        for layer, kv in zip(self.model.layers, layers):
            x = layer(x, rope, attn_mask, is_causal, kv, start)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.model.norm(x)  # (B, T, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False, *, last_only: bool = False,
                targets: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        """Logits (B, T, V), or (logits, hidden (B, T, C)) when return_hidden; with targets,
        (loss_sum, correct, counted) through the fused output layer. The arguments are GPT's
        (models/gpt.py: right-padded attention_mask, kv_cache, last_only, targets)."""
        hidden = self._run(input_ids, attention_mask, kv_cache)  # (B, T, C)
        if targets is not None:
            return lm_head_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)  # (B, T or 1, V)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, C) after the final norm, without the output layer."""
        return self._run(input_ids, attention_mask, None)
