"""GPT-2 (nanoGPT style): the config, the model, and the block both training and decoding run.

Owns: `GPTConfig` (+ validation and presets), the `GPT` module, `block` (one pre-LN block as
a function of its tensors, which `Block.forward` and the decode step of models/gpt_decode.py
both call), parameter counting and the FLOPs-per-token estimate used for MFU. The fast paths
(attention kernels, dropout, the fused output layer, the KV cache) are lmforge.ops' and are
called here in one line each.

Parameter names follow Hugging Face `GPT2LMHeadModel` (transformer.wte, transformer.h.0.attn.c_attn,
...), so interop is an explicit key map; we use `nn.Linear` where HF uses `Conv1D`, so the
c_attn / c_proj / c_fc weights are transposed relative to HF. `lm_head.weight` is
`transformer.wte.weight` (tied), so a state dict holds the same tensor under both names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.models.activations import ACTIVATIONS
from lmforge.models.arch_config import checked_fields
from lmforge.models.causal_lm import attention_setup
from lmforge.ops.attention import attend
from lmforge.ops.decode import KVCache
from lmforge.ops.dropout import Dropout
from lmforge.ops.linear import add_projection
from lmforge.ops.lm_loss import lm_head_cross_entropy
from lmforge.ops.lora import LoRALinear, project
from lmforge.models.init import init_normal

# vocab_size comes from the tokenizer, except for "gpt2", which pins GPT-2's own vocabulary.
GPT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, context=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=256, context=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context=512),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, context=1024),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context=1024, vocab_size=50257),
}


@dataclass(kw_only=True, slots=True)
class GPTConfig:
    """Architecture of a GPT-2 style model. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    """Number of token ids (the tokenizer's vocabulary size)."""
    context: int = 1024
    """Maximum sequence length (number of learned positions)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (GPT-2 uses 1e-5)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers (GPT-2 has them)."""
    activation: str = "gelu"
    """MLP activation: gelu (exact, as nanoGPT), gelu_new (GPT-2's tanh approximation), relu."""
    intermediate_size: int | None = None
    """Width of the MLP; None: 4 * n_embd (GPT-2's n_inner)."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}={value!r}: must be a positive integer")
        if not errors and self.n_embd % self.n_head:
            errors.append(
                f"n_embd={self.n_embd}: must be divisible by n_head={self.n_head} "
                f"(e.g. n_embd={self.n_embd // self.n_head * self.n_head or self.n_head})"
            )
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not dropout_ok or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout!r}: must be a number in [0, 1)")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            errors.append(f"layer_norm_eps={self.layer_norm_eps!r}: must be a positive number")
        if not isinstance(self.bias, bool):
            errors.append(f"bias={self.bias!r}: must be true or false")
        if self.intermediate_size is not None and (not isinstance(self.intermediate_size, int)
                                                   or isinstance(self.intermediate_size, bool) or self.intermediate_size < 1):
            errors.append(f"intermediate_size={self.intermediate_size!r}: must be a positive integer or null")
        if self.activation not in ACTIVATIONS:
            errors.append(f"activation={self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if errors:
            raise ValueError("invalid GPT config: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn(self) -> int:
        """The MLP's width."""
        return self.intermediate_size or 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build from a plain dict (config.json, YAML). A "model_type" key, if present, must be "gpt".

        A dict without "activation" is a checkpoint from before the field existed: those GPTs
        all used GPT-2's tanh GELU.
        """
        return cls(**checked_fields(cls, {"activation": "gelu_new", **d}, "gpt", "GPT"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset from GPT_PRESETS with fields overridden (typically vocab_size=len(tokenizer))."""
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of: {', '.join(GPT_PRESETS)}")
        return cls.from_dict({**GPT_PRESETS[name], **overrides})


class Affine(NamedTuple):
    """The weight (out, in) and bias of a Linear or LayerNorm, as plain tensors."""

    weight: Tensor
    bias: Tensor | None


class BlockParts(NamedTuple):
    """What `block` reads of one Block: its tensors and settings. `Block.forward` takes them from
    the modules at every call; the decode step once (models/gpt_decode.py)."""

    ln_1: Affine
    c_attn: Affine
    attn_proj: Affine
    ln_2: Affine
    c_fc: Affine
    mlp_proj: Affine
    act: Callable[[Tensor], Tensor]
    n_head: int
    eps: float
    attn_dropout: float
    """Dropout on the attention probabilities (0 in eval mode)."""
    resid_dropout: nn.Dropout
    mlp_dropout: nn.Dropout


def block(x: Tensor, p: BlockParts, attn_mask: Tensor | None, is_causal: bool,
          kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
    """GPT-2's pre-LN block on x (B, T, C): x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    attn_mask / is_causal: which keys each query sees (`ops.attention.causal_mask`); kv: this
    layer's KV cache buffers, written at position `start` (None without a cache). A decode step
    passes x as (B, C), one position per row, and every line below reads it so.
    """
    C = x.shape[-1]  # torch.layer_norm: F.layer_norm without its Python wrapper (a decode step is tiny calls)
    h = torch.layer_norm(x, (C,), p.ln_1.weight, p.ln_1.bias, p.eps)  # (B, T, C)
    qkv = project(h, p.c_attn)  # (B, T, 3C)
    y = attend(qkv, p.n_head, causal=is_causal, attn_mask=attn_mask, kv=kv, start=start,
               dropout_p=p.attn_dropout)  # (B, T, C): softmax(q k^T / sqrt(hs)) v, heads side by side
    x = add_projection(x, p.attn_proj, y, p.resid_dropout)  # (B, T, C): x + dropout(c_proj(y))
    h = torch.layer_norm(x, (C,), p.ln_2.weight, p.ln_2.bias, p.eps)  # (B, T, C)
    h = p.act(project(h, p.c_fc))  # (B, T, 4C)
    return add_projection(x, p.mlp_proj, h, p.mlp_dropout)  # (B, T, C): x + dropout(c_proj(h))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention's weights: c_attn makes q, k, v; c_proj mixes the heads."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)


class MLP(nn.Module):
    """The feed-forward weights: c_fc widens to intermediate_size (4C by default), the activation, c_proj back to C."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn, bias=config.bias)
        self.c_proj = nn.Linear(config.ffn, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.act = ACTIVATIONS[config.activation]


class Block(nn.Module):
    """One transformer block; its math is `block`."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        return block(x, self.parts(), attn_mask, is_causal, kv, start)  # (B, T, C)

    def parts(self) -> BlockParts:
        """This block's tensors and settings, as they are now (training flag included)."""
        attn, mlp = self.attn, self.mlp
        return BlockParts(
            ln_1=Affine(self.ln_1.weight, self.ln_1.bias), c_attn=affine_of(attn.c_attn),
            attn_proj=affine_of(attn.c_proj), ln_2=Affine(self.ln_2.weight, self.ln_2.bias),
            c_fc=affine_of(mlp.c_fc), mlp_proj=affine_of(mlp.c_proj),
            act=mlp.act, n_head=attn.n_head, eps=self.ln_1.eps, attn_dropout=attn.dropout if self.training else 0.0,
            resid_dropout=attn.resid_dropout, mlp_dropout=mlp.dropout)


def affine_of(linear: nn.Linear) -> Affine | LoRALinear:
    """A Linear's weight and bias for `block`; a layer with a low-rank adapter stays a module
    (`lmforge.ops.lora.project` runs its adapter's path too)."""
    return linear if isinstance(linear, LoRALinear) else Affine(linear.weight, linear.bias)


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, a GELU MLP (exact by default, GPT-2's tanh
    form for its checkpoints: `GPTConfig.activation`), tied input/output embeddings."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.context, config.n_embd),
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one tensor, two names
        self.apply(init_normal)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def new_kv_cache(self, batch: int, max_len: int | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` (default: the context) tokens."""
        c = self.config
        max_len = c.context if max_len is None else max_len
        if not 1 <= max_len <= c.context:
            raise ValueError(f"max_len={max_len}: must be between 1 and the model context ({c.context})")
        w = self.transformer.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.head_dim,
                       device=w.device if device is None else device, dtype=w.dtype if dtype is None else dtype)

    def _attention_setup(self, input_ids: Tensor, attention_mask: Tensor | None,
                         kv_cache: KVCache | None) -> tuple[int, Tensor | None, bool]:
        """Check the call; return (start position, SDPA attn_mask or None, is_causal)."""
        return attention_setup(self.config.context, input_ids, attention_mask, kv_cache)

    def _run(self, input_ids: Tensor, attention_mask: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f; advances kv_cache."""
        start, attn_mask, is_causal = self._attention_setup(input_ids, attention_mask, kv_cache)
        T = input_ids.shape[1]
        x = self.transformer.wte(input_ids) + self.transformer.wpe.weight[start:start + T]  # (B, T, C)
        x = self.transformer.drop(x)
        layers = kv_cache.layers if kv_cache is not None else [None] * self.config.n_layer
        for layer, kv in zip(self.transformer.h, layers):
            x = layer(x, attn_mask, is_causal, kv, start)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.length = start + T
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, kv_cache: KVCache | None = None,
                return_hidden: bool = False, *, last_only: bool = False,
                targets: Tensor | None = None) -> Tensor | tuple[Tensor, ...]:
        """Logits (B, T, V), or (logits, hidden (B, T, C)) when return_hidden.

        attention_mask: (B, T) of 1/0 for right-padded batches (with kv_cache: (B, cached + T)).
        kv_cache: keys/values are appended at kv_cache.length and positions continue from it.
        last_only: logits for the last position only, (B, 1, V) (generation: skips the big matmul).
        targets: (B, T) token ids aligned with the positions (already shifted; -100 = none):
        returns (loss_sum, correct, counted) instead of logits, through the fused output
        projection + cross-entropy of `lmforge.ops.lm_loss` (training and evaluation).
        """
        hidden = self._run(input_ids, attention_mask, kv_cache)  # (B, T, C)
        if targets is not None:
            return lm_head_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, targets.flatten())
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)  # (B, T or 1, V)
        return (logits, hidden) if return_hidden else logits

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Final hidden states (B, T, C) after ln_f, without the output projection."""
        return self._run(input_ids, attention_mask, None)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once).

    exclude_embeddings drops embedding tables used only as lookups (GPT: the positions).
    An embedding tied to an output layer (GPT's wte = lm_head) does real matmul work and
    stays counted, as in nanoGPT; this is the N of the 6N FLOPs estimate.
    """
    params = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in params.values())
    if not exclude_embeddings:
        return total
    in_other = {id(p) for m in model.modules() if not isinstance(m, nn.Embedding)
                for p in m.parameters(recurse=False)}
    lookup_only = {id(m.weight): m.weight for m in model.modules()
                   if isinstance(m, nn.Embedding) and id(m.weight) not in in_other}
    return total - sum(p.numel() for p in lookup_only.values())


def flops_per_token(config: GPTConfig) -> int:
    """Training FLOPs (forward + backward) per token at full context, PaLM appendix B style.

    6 * N for the matmuls with the weights (2 forward, 4 backward; N = num_params(model,
    exclude_embeddings=True), including the tied lm_head) plus 12 * L * C * T for attention
    scores and weighted values (QK^T and AV: 2 * 2 * T * C per layer forward, x3 with backward).
    Forward-only (inference) cost is a third of this. Used for MFU = flops/s / peak flops/s.
    """
    L, C, V, T = config.n_layer, config.n_embd, config.vocab_size, config.context
    b = 1 if config.bias else 0
    ffn = config.ffn
    per_layer = 4 * C * C + 2 * C * ffn + b * (5 * C + ffn) + (2 + 2 * b) * C  # c_attn, c_proj, c_fc, mlp.c_proj, ln_1, ln_2
    n = L * per_layer + (1 + b) * C + V * C  # + ln_f + tied lm_head
    return 6 * n + 12 * L * C * T
