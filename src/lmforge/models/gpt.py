"""GPT-2 architecture (nanoGPT style) and its KV cache for generation.

Owns: `GPTConfig` (+ validation and presets), the `GPT` module, `KVCache`, parameter
counting and the FLOPs-per-token estimate used for MFU.

Parameter names follow Hugging Face `GPT2LMHeadModel` (transformer.wte, transformer.h.0.attn.c_attn,
...), so interop is an explicit key map; we use `nn.Linear` where HF uses `Conv1D`, so the
c_attn / c_proj / c_fc weights are transposed relative to HF. `lm_head.weight` is
`transformer.wte.weight` (tied), so a state dict holds the same tensor under both names.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.models.activations import ACTIVATIONS
from lmforge.models.arch_config import checked_fields
from lmforge.ops.attention import right_padded_lengths, self_attention
from lmforge.ops.dropout import Dropout, attention
from lmforge.ops.lm_loss import lm_head_cross_entropy

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
        if self.activation not in ACTIVATIONS:
            errors.append(f"activation={self.activation!r}: must be one of {', '.join(ACTIVATIONS)}")
        if errors:
            raise ValueError("invalid GPT config: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

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


def add_projection(residual: Tensor, linear: nn.Linear, x: Tensor, dropout: nn.Dropout) -> Tensor:
    """residual + dropout(linear(x)). Without dropout the matrix product adds itself onto
    residual + bias in place: one pass over the output fewer than a product, then a sum."""
    if (linear.bias is None or (dropout.training and dropout.p > 0)
            or torch.is_autocast_enabled(x.device.type) or x.dtype != residual.dtype):
        return residual + dropout(linear(x))
    out = torch.add(residual.reshape(-1, residual.shape[-1]), linear.bias)  # a new (B*T, C) tensor
    return out.addmm_(x.reshape(-1, x.shape[-1]), linear.weight.t()).view(residual.shape)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int, residual: Tensor) -> Tensor:
        """residual + the attention output of x (B, T, C)."""
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        if kv is None and attn_mask is None and is_causal:
            # (B, T, C), or None where lmforge's kernel does not apply
            y = self_attention(qkv, self.n_head, causal=True, dropout_p=self.dropout if self.training else 0.0)
            if y is not None:
                return add_projection(residual, self.c_proj, y, self.resid_dropout)  # (B, T, C)
        qkv = qkv.view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        if kv is not None:
            k_buf, v_buf = kv  # (B, nh, max_len, hs), written in place
            k_buf.narrow(2, start, T).copy_(k)
            v_buf.narrow(2, start, T).copy_(v)
            k, v = k_buf.narrow(2, 0, start + T), v_buf.narrow(2, 0, start + T)  # (B, nh, start+T, hs)
        y = attention(q, k, v, attn_mask, is_causal, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return add_projection(residual, self.c_proj, y, self.resid_dropout)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + the MLP output of x (B, T, C)."""
        hidden = self.act(self.c_fc(x))  # (B, T, 4C)
        return add_projection(residual, self.c_proj, hidden, self.dropout)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, start: int) -> Tensor:
        x = self.attn(self.ln_1(x), attn_mask, is_causal, kv, start, residual=x)  # (B, T, C)
        return self.mlp(self.ln_2(x), residual=x)  # (B, T, C)


def _right_padded_on_cpu(attention_mask: Tensor) -> bool:
    """Whether every row is real tokens then padding only. Causal attention alone then gives the
    real positions the same outputs as the mask (the padded ones are meaningless either way), and
    takes the faster kernels. Checked on a CPU only, where reading the answer costs no device sync."""
    if attention_mask.device.type != "cpu" or torch.compiler.is_compiling():
        return False  # under torch.compile reading the answer would break the graph
    return right_padded_lengths(attention_mask) is not None


def _attention_mask(attention_mask: Tensor, start: int, T: int) -> Tensor:
    """Causal + key-padding boolean mask (B, 1, T, S), True = may attend.

    `attention_mask` is (B, S) of 1 (real) / 0 (pad) over all S = start + T keys. Every query
    may also attend to itself, so no row is fully masked (that would give NaN); the outputs
    at pad positions are meaningless either way and are ignored by the losses.
    """
    S = attention_mask.shape[1]
    keys = torch.arange(S, device=attention_mask.device)  # (S,)
    queries = torch.arange(start, start + T, device=attention_mask.device)[:, None]  # (T, 1)
    causal = keys <= queries  # (T, S)
    allowed = attention_mask.bool()[:, None, None, :] | (keys == queries)  # (B, 1, T, S)
    return allowed & causal  # (B, 1, T, S)


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLP, tied input/output embeddings."""

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
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        B, T = input_ids.shape
        start = 0 if kv_cache is None else kv_cache.length
        if start + T > self.config.context:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model context "
                             f"({self.config.context}); trim the input (generation slides a window for you)")
        if kv_cache is not None:
            if torch.is_grad_enabled():
                raise ValueError("the KV cache is for inference: call the model under torch.inference_mode() "
                                 "or torch.no_grad()")
            if start + T > kv_cache.max_len or B != kv_cache.batch:
                raise ValueError(f"KV cache holds {kv_cache.batch} x {kv_cache.max_len} positions ({start} used); "
                                 f"cannot add {B} x {T}; make a new one with model.new_kv_cache()")
        if attention_mask is not None:
            if attention_mask.shape != (B, start + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, start + T)} "
                                 "(1 real token, 0 right padding; with a KV cache it covers the cached positions too)")
            if start == 0 and _right_padded_on_cpu(attention_mask):
                return start, None, True  # real tokens never see the padding after them: plain causal
            return start, _attention_mask(attention_mask, start, T), False
        if start == 0 or T == 1:
            return start, None, start == 0  # a single new query attends to every cached key: no mask
        # several new tokens after cached ones: causal with an offset, which is_causal can't express
        all_real = torch.ones(B, start + T, dtype=torch.bool, device=input_ids.device)
        return start, _attention_mask(all_real, start, T), False

    def _run(self, input_ids: Tensor, attention_mask: Tensor | None, kv_cache: KVCache | None) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f; advances kv_cache."""
        start, attn_mask, is_causal = self._attention_setup(input_ids, attention_mask, kv_cache)
        T = input_ids.shape[1]
        x = self.transformer.wte(input_ids) + self.transformer.wpe.weight[start:start + T]  # (B, T, C)
        x = self.transformer.drop(x)
        layers = kv_cache.layers if kv_cache is not None else [None] * self.config.n_layer
        for block, kv in zip(self.transformer.h, layers):
            x = block(x, attn_mask, is_causal, kv, start)  # (B, T, C)
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
    per_layer = 12 * C * C + b * 9 * C + (2 + 2 * b) * C  # c_attn, c_proj, c_fc, mlp.c_proj, ln_1, ln_2
    n = L * per_layer + (1 + b) * C + V * C  # + ln_f + tied lm_head
    return 6 * n + 12 * L * C * T
