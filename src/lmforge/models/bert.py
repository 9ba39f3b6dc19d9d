"""BERT encoder, pooler, masked-LM and next-sentence-prediction heads (transformers' BERT).

Owns: `BertConfig` (+ validation and presets "tiny" to "base"), the `Bert` module and the
FLOPs-per-token estimate. The architecture is transformers' `BertForPreTraining`: learned
absolute positions + token-type embeddings, post-LayerNorm blocks (eps 1e-12), exact (erf)
GELU, a tanh pooler over [CLS], an MLM head (dense -> GELU -> LayerNorm -> decoder tied to
the word embeddings, plus its own bias) and an NSP head on the pooled output.

Parameter names are those of transformers' `BertForPreTraining` (bert.embeddings.word_embeddings,
bert.encoder.layer.0.attention.self.query, ..., cls.predictions.bias, cls.seq_relationship), so
interop is a near-identity key map (see `lmforge.models.hf`). `cls.predictions.decoder.weight`
is `bert.embeddings.word_embeddings.weight` and `cls.predictions.decoder.bias` is
`cls.predictions.bias` (tied: one tensor, two names).

Public calls (token ids in, tensors out; right padding, attention_mask 1 real / 0 pad):
- `model(input_ids, attention_mask, token_type_ids, mlm_positions=None)` -> (mlm_logits, nsp_logits):
  (B, T, V) and (B, 2); with `mlm_positions` (B, T) bool, mlm_logits are (N, V) for those only.
- `model.encode(...)` -> (hidden (B, T, C), pooled (B, C)); `model.hidden_states(...)` -> (B, T, C).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from lmforge.models.activations import ACTIVATIONS
from lmforge.models.arch_config import checked_fields
from lmforge.ops.attention import attend_projections
from lmforge.ops.dropout import Dropout
from lmforge.models.init import init_normal

# vocab_size comes from the tokenizer; intermediate_size defaults to 4 * n_embd.
BERT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, context=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=256, context=512),
    "small": dict(n_layer=4, n_head=8, n_embd=512, context=512),
    "medium": dict(n_layer=8, n_head=8, n_embd=512, context=512),
    "base": dict(n_layer=12, n_head=12, n_embd=768, context=512),
}


@dataclass(kw_only=True, slots=True)
class BertConfig:
    """Architecture of a BERT model. Defaults are BERT-base (uncased vocabulary)."""

    vocab_size: int = 30522
    """Number of token ids (the tokenizer's vocabulary size)."""
    context: int = 512
    """Maximum sequence length (number of learned positions; HF max_position_embeddings)."""
    n_layer: int = 12
    """Number of encoder blocks (HF num_hidden_layers)."""
    n_head: int = 12
    """Attention heads per block; must divide n_embd (HF num_attention_heads)."""
    n_embd: int = 768
    """Hidden width (HF hidden_size)."""
    intermediate_size: int | None = None
    """Width of the feed-forward layer; None means 4 * n_embd."""
    type_vocab_size: int = 2
    """Number of segment (token type) ids."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT uses 1e-12)."""
    hidden_act: str = "gelu"
    """Feed-forward and MLM-transform activation: gelu (erf), gelu_new / gelu_pytorch_tanh, relu."""

    def __post_init__(self) -> None:
        errors = []
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}={value!r}: must be a positive integer")
        if self.intermediate_size is not None and (not isinstance(self.intermediate_size, int)
                                                   or self.intermediate_size < 1):
            errors.append(f"intermediate_size={self.intermediate_size!r}: must be a positive integer or null")
        if not errors and self.n_embd % self.n_head:
            errors.append(f"n_embd={self.n_embd}: must be divisible by n_head={self.n_head}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout={self.dropout!r}: must be a number in [0, 1)")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            errors.append(f"layer_norm_eps={self.layer_norm_eps!r}: must be a positive number")
        if self.hidden_act not in ACTIVATIONS:
            errors.append(f"hidden_act={self.hidden_act!r}: must be one of {', '.join(ACTIVATIONS)}")
        if errors:
            raise ValueError("invalid BERT config: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BertConfig:
        """Build from a plain dict (config.json); a "model_type" key, if present, must be "bert"."""
        return cls(**checked_fields(cls, d, "bert", "BERT"))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BertConfig:
        if name not in BERT_PRESETS:
            raise ValueError(f"unknown BERT preset {name!r}; choose one of: {', '.join(BERT_PRESETS)}")
        return cls.from_dict({**BERT_PRESETS[name], **overrides})


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embeddings = nn.Embedding(config.context, config.n_embd)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.LayerNorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        T = input_ids.shape[1]
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings.weight[:T])  # (B, T, C)
        return self.dropout(self.LayerNorm(x))  # (B, T, C)


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.query = nn.Linear(config.n_embd, config.n_embd)
        self.key = nn.Linear(config.n_embd, config.n_embd)
        self.value = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(hs)) v per head over the real keys, x (B, T, C) -> (B, T, C)."""
        dropout_p = self.dropout if self.training else 0.0
        return attend_projections(x, self.query, self.key, self.value, self.n_head, key_padding=attn_mask,
                                  dropout_p=dropout_p)  # (B, T, C)


class BertSelfOutput(nn.Module):
    """Projection + dropout + residual + post-LayerNorm (after attention, and after the FFN)."""

    def __init__(self, config: BertConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, config.n_embd)
        self.LayerNorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.dropout)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)  # (B, T, C)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.n_embd)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, attn_mask), x)  # (B, T, C)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.ffn)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))  # (B, T, 4C)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.ffn)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        x = self.attention(x, attn_mask)  # (B, T, C)
        return self.output(self.intermediate(x), x)  # (B, T, C)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.n_layer)])

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        for layer in self.layer:
            x = layer(x, attn_mask)  # (B, T, C)
        return x


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, C): the [CLS] position


class BertBody(nn.Module):
    """Embeddings + encoder + pooler (transformers' `BertModel`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.n_embd, config.n_embd)
        self.act = ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))  # (..., C)


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        self.bias = self.decoder.bias  # one tensor, two names (as in transformers)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x))  # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config)
        self.seq_relationship = nn.Linear(config.n_embd, 2)


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, T) of 1/0 -> SDPA boolean key mask (B, 1, 1, T), True = may attend; None if no padding."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)


class Bert(nn.Module):
    """BERT with its pretraining heads: masked-LM logits and next-sentence logits."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertBody(config)
        self.cls = BertPreTrainingHeads(config)
        self.apply(init_normal)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Token ids (B, T) -> (last hidden states (B, T, C), pooled [CLS] (B, C))."""
        B, T = input_ids.shape
        if T > self.config.context:
            raise ValueError(f"sequence of {T} tokens is longer than the model context "
                             f"({self.config.context}); truncate the input")
        if attention_mask is not None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.bert.embeddings(input_ids, token_type_ids)  # (B, T, C)
        hidden = self.bert.encoder(x, padding_mask(attention_mask))  # (B, T, C)
        return hidden, self.bert.pooler(hidden)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """Last hidden states (B, T, C) (transformers' `last_hidden_state`)."""
        return self.encode(input_ids, attention_mask, token_type_ids)[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, mlm_positions: Tensor | None = None,
                return_hidden: bool = False) -> tuple[Tensor, ...]:
        """(mlm_logits, nsp_logits[, hidden]).

        mlm_logits are (B, T, V), or (N, V) for the N True positions of `mlm_positions` (B, T)
        only: the vocabulary projection is the costly part and pretraining needs ~15% of it.
        """
        hidden, pooled = self.encode(input_ids, attention_mask, token_type_ids)  # (B, T, C), (B, C)
        chosen = hidden if mlm_positions is None else hidden[mlm_positions]  # (B, T, C) or (N, C)
        mlm_logits = self.cls.predictions(chosen)  # (B, T, V) or (N, V)
        nsp_logits = self.cls.seq_relationship(pooled)  # (B, 2)
        return (mlm_logits, nsp_logits, hidden) if return_hidden else (mlm_logits, nsp_logits)


def flops_per_token(config: BertConfig) -> int:
    """Training FLOPs per token at full context: 6 * N (weights) + 12 * L * C * T (attention).

    N counts the encoder's matmul weights plus the MLM head (transform + tied decoder), which
    the MLM task only applies to masked positions; this is an upper bound, as for GPT.
    """
    L, C, F_, V, T = config.n_layer, config.n_embd, config.ffn, config.vocab_size, config.context
    per_layer = 4 * C * C + 2 * C * F_
    n = L * per_layer + C * C + V * C  # + MLM transform + decoder
    return 6 * n + 12 * L * C * T
