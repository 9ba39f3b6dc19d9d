"""The weight initialisation GPT-2, BERT and Llama share: N(0, 0.02) for linear and embedding
weights, zero biases (a model applies it to every module, then scales its residual outputs)."""

from __future__ import annotations

from torch import nn


def init_normal(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
