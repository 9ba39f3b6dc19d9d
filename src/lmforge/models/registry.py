"""Model construction from a run config or a checkpoint's config.json, for every model family."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig


def architecture(cfg: ModelConfig, vocab_size: int) -> dict:
    """The architecture dict (`config.json` of a checkpoint): preset, then explicit fields."""
    if cfg.preset is not None and cfg.preset not in GPT_PRESETS:
        raise ValueError(f"model.preset: unknown preset {cfg.preset!r} (valid: {', '.join(GPT_PRESETS)})")
    arch = dict(GPT_PRESETS[cfg.preset]) if cfg.preset else {}
    for name in ("n_layer", "n_head", "n_embd", "context"):
        value = getattr(cfg, name)
        if value is not None:
            arch[name] = value
    missing = [n for n in ("n_layer", "n_head", "n_embd", "context") if n not in arch]
    if missing:
        raise ValueError(f"model: set a preset or all of n_layer, n_head, n_embd, context (missing: {', '.join(missing)})")
    arch.update(vocab_size=vocab_size, dropout=cfg.dropout)
    return {"model_type": cfg.kind, **arch}


def model_from_architecture(arch: dict) -> nn.Module:
    kind = arch.get("model_type")
    if kind == "gpt":
        return GPT(GPTConfig.from_dict({k: v for k, v in arch.items() if k != "model_type"}))
    raise ValueError(f"config.json: unknown model_type {kind!r} (valid: gpt)")


def model_context(model: nn.Module) -> int:
    return model.config.context


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load a state dict, reporting missing or unexpected names against `source`."""
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: weights do not match the architecture "
                         f"(missing: {missing[:5]}, unexpected: {result.unexpected_keys[:5]})")


def flops_per_token(config) -> int:
    """Training FLOPs per token of a model config (for MFU)."""
    from lmforge.models.gpt import flops_per_token as gpt_flops_per_token
    return gpt_flops_per_token(config)
