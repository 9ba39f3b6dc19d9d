"""What a checkpoint folder is: its files, its manifest, its errors, and the loaded form.

A checkpoint is a folder (``checkpoints/last``, ``best``, ``epoch-N``) holding config.json,
model.safetensors, tokenizer.json, optional run_config.json and training_state.pt (and, for an
imported model, the `TOKENIZER_EXTRAS` beside tokenizer.json), and
manifest.json, written last: ``{"format": 1, "files": {name: {"size", "sha256"}}, "step",
"epoch", "created", "lmforge_version"}``. A folder without a manifest is not a checkpoint.
"""

from __future__ import annotations

import errno
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
TOKENIZER_EXTRAS = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
"""Files an imported model keeps beside tokenizer.json (chat template, special tokens, generation defaults)."""
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
PLAIN_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged or unsafe, or could not be written."""


@dataclass(slots=True)
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer_file: Path
    run_config: dict[str, Any] | None
    training_state: dict[str, Any] | None


def ignore_sigxfsz() -> None:
    """Make writes past RLIMIT_FSIZE fail with EFBIG (reported as disk full) instead of killing us."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
