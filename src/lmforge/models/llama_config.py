"""The Llama-class architecture: `LlamaConfig`, its presets, and its FLOPs per token.

One config covers the decoders people now train and import: Llama, Mistral, Qwen2, SmolLM.
They differ in numbers, not in code: grouped-query attention (`n_kv_head`), the rotary base
and scaling, RMSNorm's epsilon, the SwiGLU width, which projections carry biases (Qwen2: q, k
and v), and whether the output layer is the embedding (SmolLM, small Qwen2) or its own matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lmforge.models.arch_config import checked_fields
from lmforge.ops.rotary import check_rope_scaling

ATTENTION_BIAS = ("none", "qkv", "all")
"""Biases of the attention projections: none (Llama, Mistral), qkv (Qwen2), all (q, k, v and o)."""

# vocab_size comes from the tokenizer, except where a preset pins its family's vocabulary.
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context=128),
    "mini": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=256, context=256),
    "small": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, context=512),
    "medium": dict(n_layer=8, n_head=8, n_kv_head=4, n_embd=512, context=1024),
    # SmolLM-135M's shape: 30 thin layers, 9 heads over 3 key/value heads, tied embeddings
    "smollm-135m": dict(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, intermediate_size=1536, context=2048,
                        vocab_size=49152, rope_theta=10000.0, tie_embeddings=True),
    # Qwen2-0.5B's shape: biases on q, k, v, 14 heads over 2 key/value heads, rope base 1e6
    "qwen2-0.5b": dict(n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864, context=4096,
                       vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias="qkv",
                       tie_embeddings=True),
}


def default_intermediate_size(n_embd: int) -> int:
    """SwiGLU's width when none is given: 2/3 of GPT's 4C (three matrices cost what GPT's two
    did), rounded up to a multiple of 64."""
    return -(-(8 * n_embd // 3) // 64) * 64


@dataclass(kw_only=True, slots=True)
class LlamaConfig:
    """Architecture of a Llama-class decoder. Defaults are the "mini" preset with 8192 tokens."""

    vocab_size: int = 8192
    """Number of token ids (the tokenizer's vocabulary size)."""
    context: int = 256
    """Maximum sequence length (rotary positions need no table; this bounds the KV cache)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Query heads per block."""
    n_kv_head: int | None = None
    """Key / value heads per block (grouped-query attention); must divide n_head. None: n_head
    (multi-head attention); 1: multi-query attention."""
    n_embd: int = 256
    """Width of the residual stream."""
    head_dim: int | None = None
    """Width of one head; None: n_embd / n_head."""
    intermediate_size: int | None = None
    """Width of the SwiGLU feed-forward; None: `default_intermediate_size(n_embd)`."""
    rope_theta: float = 10000.0
    """Base of the rotary angles."""
    rope_scaling: dict | None = None
    """transformers' rope_scaling: null, {"rope_type": "linear", "factor": F} or Llama 3.1's
    {"rope_type": "llama3", ...}; other types are refused."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    attention_bias: str = "none"
    """Biases of the attention projections: none, qkv (Qwen2) or all."""
    mlp_bias: bool = False
    """Biases in the gate / up / down projections."""
    tie_embeddings: bool = False
    """The output layer is the input embedding (one matrix, two names)."""
    dropout: float = 0.0
    """Dropout on the embeddings, attention probabilities and residual branches (training only)."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim",
                     "intermediate_size"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_head", "head_dim", "intermediate_size"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}={value!r}: must be a positive integer")
        if not errors:
            errors += self._shape_problems()
        if not isinstance(self.rope_theta, (int, float)) or isinstance(self.rope_theta, bool) or self.rope_theta <= 0:
            errors.append(f"rope_theta={self.rope_theta!r}: must be a positive number")
        errors += check_rope_scaling(self.rope_scaling)
        if not isinstance(self.rms_norm_eps, (int, float)) or not self.rms_norm_eps > 0:
            errors.append(f"rms_norm_eps={self.rms_norm_eps!r}: must be a positive number")
        if self.attention_bias not in ATTENTION_BIAS:
            errors.append(f"attention_bias={self.attention_bias!r}: must be one of {', '.join(ATTENTION_BIAS)}")
        for name in ("mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                errors.append(f"{name}={getattr(self, name)!r}: must be true or false")
        dropout_ok = isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
        if not dropout_ok or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout!r}: must be a number in [0, 1)")
        if errors:
            raise ValueError("invalid Llama config: " + "; ".join(errors))

    def _shape_problems(self) -> list[str]:
        problems = []
        if self.head_dim is None and self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd}: must be divisible by n_head={self.n_head} (or set head_dim)")
        if self.n_head % self.kv_heads:
            problems.append(f"n_kv_head={self.n_kv_head}: must divide n_head={self.n_head}")
        if self.hs % 2:
            problems.append(f"head_dim={self.hs}: must be even (rotary embeddings turn channel pairs)")
        return problems

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def hs(self) -> int:
        """The width of one head."""
        return self.n_embd // self.n_head if self.head_dim is None else self.head_dim

    @property
    def ffn(self) -> int:
        """The width of the feed-forward."""
        return self.intermediate_size or default_intermediate_size(self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a plain dict (config.json, YAML); a "model_type" key, if present, must be "llama"."""
        return cls(**checked_fields(cls, d, "llama", "Llama"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        if name not in LLAMA_PRESETS:
            raise ValueError(f"unknown llama preset {name!r}; choose one of: {', '.join(LLAMA_PRESETS)}")
        return cls.from_dict({**LLAMA_PRESETS[name], **overrides})


def flops_per_token(config: LlamaConfig) -> int:
    """Training FLOPs per token at full context: 6 N + 12 L (nh hs) T, as GPT's count (see
    models/gpt.py): N the weights every token multiplies by (the output layer included, the
    embedding lookup not, unless tied to it, where it is the output layer), and the attention
    scores and weighted values over nh heads of hs."""
    c = config
    L, C, V, T = c.n_layer, c.n_embd, c.vocab_size, c.context
    q, kv = c.n_head * c.hs, c.kv_heads * c.hs
    per_layer = C * (q + 2 * kv) + q * C + 3 * C * c.ffn + 2 * C  # q/k/v, o, gate/up/down, two norms
    per_layer += {"none": 0, "qkv": q + 2 * kv, "all": q + 2 * kv + C}[c.attention_bias]
    per_layer += (2 * c.ffn + C) if c.mlp_bias else 0
    n = L * per_layer + C + V * C  # + the final norm + the output layer
    return 6 * n + 12 * L * q * T
