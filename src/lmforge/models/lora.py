"""LoRA on any lmforge model: which layers get adapters, putting them in, merging them out, and
the part of a state dict an adapter checkpoint holds.

A model with adapters is described in its config.json by a "lora" entry beside the model's own
fields: `{"rank", "alpha", "dropout", "targets": [full module names], "trainable": [full module
names], "base": {"path", "sha256", "prefix"}}`. Targets are resolved to full names once, when a
run starts (`resolve_spec`), so the checkpoint says exactly which layers carry adapters. The base
is the frozen checkpoint the adapter was trained on (`lmforge.checkpoint.load` reads it back).

The layer itself is `lmforge.ops.lora.LoRALinear`: the frozen weight keeps its name (a base
state dict loads as it is), the adapter adds `<layer>.lora_A.weight` (rank, in) and
`<layer>.lora_B.weight` (out, rank), as peft names them.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from lmforge.models.heads import blocks_and_final
from lmforge.ops.lora import LoRALinear

ADAPTER_KEYS = re.compile(r"\.lora_[AB]\.weight$")


def matches(name: str, pattern: str) -> bool:
    """A module name matches a pattern equal to its last components (`c_attn`, `attn.c_proj`) or a
    regular expression matching the whole name."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def default_targets(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (not embeddings, heads or the pooler)."""
    backbone = getattr(model, "backbone", model)  # a classifier's blocks are its backbone's
    blocks, _ = blocks_and_final(backbone)
    inside = {id(m) for block in blocks for m in block.modules()}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def resolve_spec(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
                 trainable: list[str], base: dict) -> dict:
    """The "lora" entry of config.json for `model`: patterns resolved to full module names.
    ValueError when a pattern names no linear layer (targets) or no module (trainable)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets:
        unused = [p for p in targets if not any(matches(n, p) for n in linears)]
        if unused:
            raise ValueError(f"train.lora.targets: {unused} match no linear layer of this model "
                             f"(its linear layers end in: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))})")
        names = [n for n in linears if any(matches(n, p) for p in targets)]
    else:
        names = default_targets(model)
    modules = [name for name, _ in model.named_modules() if name]
    unused = [p for p in trainable if not any(matches(n, p) for n in modules)]
    if unused:
        raise ValueError(f"train.lora.trainable: {unused} match no module of this model")
    kept = [n for n in modules if any(matches(n, p) for p in trainable)]
    kept = [n for n in kept if not any(n.startswith(k + ".") for k in kept)]  # the outermost of nested matches
    overlap = [n for n in names if any(n == k or n.startswith(k + ".") for k in kept)]
    if overlap:
        raise ValueError(f"train.lora: {overlap[:3]} are both adapted (targets) and trained in full (trainable)")
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": names, "trainable": kept, "base": base}


def add_adapters(model: nn.Module, spec: dict) -> nn.Module:
    """Put a LoRALinear in place of every target and freeze all but the adapters and the
    `trainable` modules; the model is changed in place and returned."""
    model.requires_grad_(False)
    for name in spec["targets"]:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, child)
        if not isinstance(layer, nn.Linear) or isinstance(layer, LoRALinear):
            raise ValueError(f"config.json: lora target {name!r} is not a plain linear layer of this model")
        setattr(owner, child, LoRALinear(layer, int(spec["rank"]), float(spec["alpha"]), float(spec["dropout"])))
    for name in spec["trainable"]:
        model.get_submodule(name).requires_grad_(True)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by the plain Linear W + scale * B @ A, in place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    return model


def adapter_state(state: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """What an adapter checkpoint holds of a full state dict: the adapters and the `trainable` modules."""
    kept = tuple(f"{name}." for name in spec["trainable"])
    return {k: v for k, v in state.items() if ADAPTER_KEYS.search(k) or k.startswith(kept)}


def merged_state(state: dict[str, Tensor], spec: dict) -> dict[str, Tensor]:
    """A full state dict with adapters -> the plain model's (each target's weight merged)."""
    out = {k: v for k, v in state.items() if not ADAPTER_KEYS.search(k)}
    scale = float(spec["alpha"]) / int(spec["rank"])
    for name in spec["targets"]:
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        out[f"{name}.weight"] = (state[f"{name}.weight"] + (b @ a) * scale).to(state[f"{name}.weight"].dtype)
    return out


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters (a tied weight counts once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def without_lora(arch: dict) -> dict:
    """config.json without its "lora" entry: the architecture of the model underneath."""
    return {k: v for k, v in arch.items() if k != "lora"}
