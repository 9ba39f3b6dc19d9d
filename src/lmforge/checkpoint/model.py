"""Building a model from a checkpoint: the one place a checkpoint becomes an nn.Module.

`resolve_checkpoint` turns a run folder into its best (else last) checkpoint; `load_model`
verifies the folder, builds the architecture its config.json records (with the overrides a
caller may change, such as dropout) and loads the weights into it.

A config.json is checked against the weights before anything is allocated
(`check_weights_fit`): the architecture is first built on the meta device, which costs no
memory, and its tensor names and shapes must be the ones the weights hold. A damaged or
hostile config.json (a width of 1e9, 48 layers over 1-layer weights) is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint.format import MANIFEST, Checkpoint, CheckpointError
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
    check_weights_fit(arch, {name: t.shape for name, t in ckpt.state_dict.items()}, ckpt.path / "config.json")
    model = model_from_architecture(arch)
    load_weights(model, ckpt.state_dict, ckpt.path)
    if device is not None:
        model.to(device)
    return model, ckpt


def check_weights_fit(arch: dict, shapes: Mapping[str, Any], source: Path | str) -> None:
    """Refuse an architecture whose tensors are not exactly those `shapes` holds (name -> shape).

    Nothing is allocated: the model is built on the meta device. Tied output weights
    (`lm_head.weight`) may be absent from `shapes`.
    """
    layers = [v for k, v in _int_fields(arch) if k in ("n_layer", "num_hidden_layers")]
    if any(n > len(shapes) for n in layers):  # every layer holds at least one tensor
        raise CheckpointError(f"{source}: asks for {max(layers)} layers but the weights hold only "
                              f"{len(shapes)} tensors; config.json and the weights do not belong together")
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in model_from_architecture(arch).state_dict().items()}
    except (RuntimeError, OverflowError, MemoryError) as err:  # sizes past what any tensor can hold
        raise CheckpointError(f"{source}: an impossible architecture ({str(err).splitlines()[0]})") from None
    missing = [k for k in expected if k not in shapes and not k.endswith("lm_head.weight")]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {tuple(shapes[k])} (config.json needs {expected[k]})"
             for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if missing or unexpected or wrong:
        details = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
                   for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                   if items]
        raise CheckpointError(f"{source}: the weights do not fit this architecture; " + "; ".join(details))


def _int_fields(arch: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(key, value) of every integer field, nested configs (a classifier's backbone) included."""
    found = []
    for key, value in arch.items():
        if isinstance(value, Mapping):
            found += _int_fields(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            found.append((key, value))
    return found
