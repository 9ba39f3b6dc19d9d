"""AdamW with weight decay on 2-D weights only, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import Optimizer

from lmforge.base.config import TrainConfig
from lmforge.ops.torch_private import unguarded


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights); never biases or LayerNorm parameters."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights appear once
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class AdamW(torch.optim.AdamW):
    """torch's AdamW, without the guards it wraps around its methods for torch.compile.

    `step` runs inside a graph break and `zero_grad`, `add_param_group`, `state_dict` and
    `load_state_dict` inside `torch._disable_dynamo`; both import torch._dynamo, 0.8 s of the
    2 s from `lmforge train` to its first step on 2 cores, and do nothing outside a compiled
    region. lmforge never compiles the optimizer (only the model), so it calls the plain
    methods: the same update, the same state dict; step hooks and the profiler still see it.
    """

    def step(self, closure=None):
        with torch.no_grad():  # what the guard does outside compilation (differentiable=False)
            return unguarded(torch.optim.AdamW.step)(self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        unguarded(Optimizer.zero_grad)(self, set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        unguarded(Optimizer.add_param_group)(self, param_group)

    def state_dict(self) -> dict:
        return unguarded(Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        unguarded(Optimizer.load_state_dict)(self, state_dict)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel where torch supports it on this device."""
    groups = parameter_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if device.type in ("cuda", "cpu"):
        try:
            return AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass  # an older torch without a fused kernel for this device
    return AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear/cosine decay."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
