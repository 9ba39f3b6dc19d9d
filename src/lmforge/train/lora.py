"""`train.lora`: a run that trains low-rank adapters on a frozen model.init_from.

`adapt` resolves the config's target and trainable patterns against the task's model (a
classifier's fresh head is always trained), puts the adapters in (`lmforge.models.lora`) and
records them in the architecture as its "lora" entry, with the base checkpoint's path, the sha256
of its weights, and the prefix its names take here (`backbone.` under a new classifier head).
Checkpoints of the run then hold the adapters alone (`lmforge.checkpoint.save`), the optimizer
has state for the adapters alone, and loading one reads the base back (`lmforge.checkpoint.load`).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.base.config import Config
from lmforge.checkpoint import resolve_checkpoint
from lmforge.checkpoint.load import base_reference
from lmforge.models.lora import add_adapters, resolve_spec
from lmforge.train.init_from import backbone_of, read_arch


def adapt(model: nn.Module, arch: dict, cfg: Config) -> tuple[nn.Module, dict]:
    """`model` with adapters as cfg.train.lora says, and its architecture with the "lora" entry."""
    lora = cfg.train.lora
    if cfg.model.init_from is None:
        raise ValueError("train.lora: LoRA adapts a trained model; set model.init_from to the checkpoint to "
                         "adapt (an lmforge run, or a Hugging Face model brought in with lmforge import-hf)")
    base_path = resolve_checkpoint(Path(cfg.model.init_from))
    base_arch = read_arch(base_path) or {}
    if "lora" in base_arch:
        raise ValueError(f"model.init_from {cfg.model.init_from} is a LoRA adapter itself; merge it first "
                         "(lmforge export --format hf --merge, then lmforge import-hf) and adapt the result")
    base_context = backbone_of(base_arch).get("context")
    if isinstance(base_context, int) and model.config.context < base_context:
        raise ValueError(f"train.lora: model.context={model.config.context} is shorter than the base's "
                         f"{base_context}; an adapter keeps its base's positions, leave model.context out")
    prefix = "backbone." if arch.get("model_type") == "classifier" and base_arch.get("model_type") != "classifier" \
        else ""
    trainable = list(lora.trainable)
    if arch.get("model_type") == "classifier" and "classifier" not in trainable:
        trainable.append("classifier")  # the head is new, or fits new labels: it always trains
    spec = resolve_spec(model, lora.rank, lora.alpha, lora.dropout, list(lora.targets), trainable,
                        base_reference(base_path, prefix))
    return add_adapters(model, spec), dict(arch, lora=spec)
