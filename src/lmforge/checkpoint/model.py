"""Building a model from a checkpoint: the one place a checkpoint becomes an nn.Module.

`resolve_checkpoint` turns a run folder into its best (else last) checkpoint; `load_model`
verifies the folder, builds the architecture its config.json records (with the overrides a
caller may change, such as dropout) and loads the weights into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint.format import MANIFEST, Checkpoint
from lmforge.checkpoint.load import load_checkpoint
from lmforge.models.registry import load_weights, model_from_architecture


def resolve_checkpoint(path: Path | str) -> Path:
    """`path` itself if it is a checkpoint folder, else the run folder's best or last checkpoint."""
    path = Path(path)
    if (path / MANIFEST).exists() or (path / "config.json").exists():
        return path
    for name in ("best", "last"):
        candidate = path / "checkpoints" / name
        if (candidate / MANIFEST).exists():
            return candidate
    raise FileNotFoundError(f"{path}: not a checkpoint folder (no {MANIFEST}) nor a run folder "
                            "with checkpoints/best or checkpoints/last")


def load_model(path: Path | str, *, overrides: dict[str, Any] | None = None,
               device: torch.device | str | None = None,
               checkpoint: Checkpoint | None = None) -> tuple[nn.Module, Checkpoint]:
    """The model a checkpoint (or run folder) holds, with its weights, and the checkpoint itself.

    `overrides` replaces architecture fields that do not change the weights' shapes (dropout);
    `checkpoint` reuses one already loaded instead of reading the folder again.
    """
    ckpt = checkpoint if checkpoint is not None else load_checkpoint(resolve_checkpoint(path))
    arch = dict(ckpt.model_config, **(overrides or {}))
    model = model_from_architecture(arch)
    load_weights(model, ckpt.state_dict, ckpt.path)
    if device is not None:
        model.to(device)
    return model, ckpt
