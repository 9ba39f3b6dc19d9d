"""Sequence classification heads on either backbone, and which parameters a fine-tune trains.

Owns `SequenceClassifier(backbone, num_labels, pooling)`: a GPT or BERT backbone, kept whole
under the parameter prefix `backbone.` (strip it and the names are the backbone's own, so HF
export of the backbone stays a key map), plus a linear `classifier` on one vector per text:

- pooling "last" (GPT): the final hidden state (after ln_f) at the last real token. The batch is
  right-padded and attention is causal, so that position never sees padding: the backbone runs
  without a padding mask, on the fast causal kernel.
- pooling "cls" (BERT): the pooler output (tanh(dense(h_[CLS]))), as BertForSequenceClassification.

A classifier checkpoint's config.json (`classifier_architecture`; the registry builds the model
from it) is `{"model_type": "classifier", "vocab_size", "num_labels",
"label_names", "pooling", "dropout", "head_bias", "backbone": {...the backbone's own config.json...}}`.
A regression head (`problem_type: "regression"`) has `num_labels` 1, no `label_names`, and its one
output is the predicted value. `head_bias` is false for the last-token head (as transformers' `score`), true on BERT's pooler
and in checkpoints from before the field.

`apply_trainable` freezes parameters for `train.trainable`: "all", "head" (the classifier only)
or "last_blocks:K" (the head, the last K blocks and the final norm / pooler; the book's choice
for GPT is K=1).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from lmforge.ops.dropout import Dropout

POOLING = {"gpt": "last", "llama": "last", "bert": "cls"}
_TRAINABLE = re.compile(r"^(all|head|last_blocks:(\d+))$")


class SequenceClassifier(nn.Module):
    """backbone -> one pooled vector per text -> dropout -> linear -> logits (B, num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str, dropout: float = 0.0,
                 bias: bool | None = None) -> None:
        super().__init__()
        if pooling not in ("last", "cls"):
            raise ValueError(f"pooling {pooling!r}: choose 'last' (GPT) or 'cls' (BERT)")
        if num_labels < 1:
            raise ValueError(f"num_labels={num_labels}: a head needs at least 1 output (1: regression)")
        self.backbone = backbone
        self.pooling = pooling
        self.num_labels = num_labels
        self.dropout = Dropout(dropout)
        bias = pooling == "cls" if bias is None else bias  # as classifier_architecture's head_bias
        self.classifier = nn.Linear(hidden_size(backbone), num_labels, bias=bias)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=0.02)
        if bias:
            nn.init.zeros_(self.classifier.bias)

    @property
    def config(self):
        """The backbone's config (context, sizes): what the loop and FLOP counts read."""
        return self.backbone.config

    def pooled(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """One vector per text (B, C)."""
        if self.pooling == "last":
            hidden = self.backbone.hidden_states(input_ids)  # (B, T, C); causal: pads come after
            B, T, _ = hidden.shape
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0) if attention_mask is not None \
                else torch.full((B,), T - 1, device=hidden.device)  # (B,)
            return hidden[torch.arange(B, device=hidden.device), last]  # (B, C)
        return bert_pooled(self.backbone, input_ids, attention_mask, token_type_ids)  # (B, C)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Logits (B, num_labels); attention_mask is (B, T) of 1 real / 0 right padding."""
        x = self.dropout(self.pooled(input_ids, attention_mask, token_type_ids))  # (B, C)
        return self.classifier(x)  # (B, num_labels)


def bert_pooled(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                token_type_ids: Tensor | None) -> Tensor:
    """The BERT pooler output (B, C): tanh(dense(hidden at [CLS]))."""
    return backbone.encode(input_ids, attention_mask, token_type_ids)[1]  # (B, C)


def hidden_size(backbone: nn.Module) -> int:
    cfg = backbone.config
    for name in ("n_embd", "hidden_size"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(backbone).__name__}: cannot tell its hidden size (no n_embd / hidden_size)")


def blocks_and_final(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(transformer blocks in order, modules after the last block) of a GPT, Llama or BERT backbone."""
    transformer = getattr(backbone, "transformer", None)
    if transformer is not None and hasattr(transformer, "h"):  # GPT
        return list(transformer.h), [transformer.ln_f]
    decoder = getattr(backbone, "model", None)
    if isinstance(decoder, nn.ModuleDict) and "layers" in decoder:  # Llama
        return list(decoder.layers), [decoder.norm]
    body = getattr(backbone, "bert", None)
    if body is not None and hasattr(body, "encoder"):  # BERT (post-LN: the pooler comes last)
        return list(body.encoder.layer), [body.pooler]
    raise ValueError(f"{type(backbone).__name__}: unknown backbone (expected GPT, Llama or BERT)")


def apply_trainable(model: SequenceClassifier, spec: str) -> tuple[int, int]:
    """Freeze what `spec` leaves out; returns (trainable, total) distinct parameter counts."""
    select_trainable(model, spec, model.classifier, model.backbone)
    _freeze_pretraining_heads(model)
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def select_trainable(model: nn.Module, spec: str, head: nn.Module, body: nn.Module) -> None:
    """Leave trainable what `spec` names of `model`: everything ("all"), `head` ("head"), or the
    head, the last K blocks of `body` and its final modules ("last_blocks:K")."""
    match = _TRAINABLE.match(spec)
    if match is None:
        raise ValueError(f"train.trainable={spec!r}: choose all, head or last_blocks:K (e.g. last_blocks:1)")
    model.requires_grad_(spec == "all")
    if spec == "all":
        return
    train = [head]
    if match.group(2) is not None:
        blocks, final = blocks_and_final(body)
        k = int(match.group(2))
        if k > len(blocks):
            raise ValueError(f"train.trainable={spec}: the model has only {len(blocks)} blocks")
        train += blocks[len(blocks) - k:] + final
    for module in train:
        module.requires_grad_(True)


def _freeze_pretraining_heads(model: SequenceClassifier) -> None:
    """BERT's MLM / NSP heads take no part in classification: no gradients, no optimizer state,
    and DDP does not wait for gradients that never come. Weights they share with the encoder
    (the tied decoder) stay as they are."""
    heads = getattr(model.backbone, "cls", None)
    if heads is None:
        return
    # named_parameters lists a shared weight once, under its first (encoder) name
    used = {id(p) for name, p in model.named_parameters() if not name.startswith("backbone.cls.")}
    for param in heads.parameters():
        if id(param) not in used:
            param.requires_grad_(False)


# -------------------------------------------------------------------- architecture (config.json)


def classifier_architecture(backbone_arch: dict, label_names: list[str] | None, pooling: str | None = None,
                            dropout: float = 0.0) -> dict:
    """The config.json of a classifier on a backbone whose own config.json is `backbone_arch`;
    `label_names` None: a regression head (one output, `problem_type: "regression"`)."""
    kind = backbone_arch.get("model_type")
    if kind not in POOLING:
        raise ValueError(f"model_type {kind!r} cannot be a classification backbone "
                         f"(valid: {', '.join(POOLING)})")
    pooling = pooling or POOLING[kind]
    # the last-token head has no bias, as transformers' GPT2/Llama ForSequenceClassification `score`
    labels = {"num_labels": 1, "problem_type": "regression"} if label_names is None else \
        {"num_labels": len(label_names), "label_names": list(label_names)}
    return {"model_type": "classifier", "vocab_size": backbone_arch["vocab_size"], **labels, "pooling": pooling,
            "dropout": dropout, "head_bias": pooling == "cls", "backbone": dict(backbone_arch)}


def is_regression(arch: dict) -> bool:
    """Whether a classifier's config.json is a regression head's (one output: the value)."""
    return arch.get("model_type") == "classifier" and arch.get("problem_type") == "regression"


def backbone_config(arch: dict) -> dict:
    """The GPT / BERT / Llama part of a config.json: a classifier's backbone, else the whole."""
    inner = arch.get("backbone")
    return inner if arch.get("model_type") == "classifier" and isinstance(inner, dict) else arch


def label_names_of(arch: dict) -> list[str]:
    """The label names a classifier checkpoint predicts (ids as names when none were saved; none
    for a regression head)."""
    if is_regression(arch):
        return []
    names = arch.get("label_names")
    return list(names) if names else [str(i) for i in range(int(arch["num_labels"]))]
