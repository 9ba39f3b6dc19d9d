"""How a run ended (`TrainResult`): what `lmforge.train.loop.train` and `run_training` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainResult:
    """How a run ended."""

    run_dir: Path
    steps: int
    reason: str
    """max_steps, max_time, early_stop, signal, non_finite, or finished (a resumed run that had
    already reached its length: nothing was done, `detail` says so)."""
    best_val_loss: float
    last_eval: dict = field(default_factory=dict)
    elapsed: float = 0.0
    exit_code: int = 0
    is_main: bool = True
    """Whether this process is rank 0, the one that writes the run folder."""
    report: Path | None = None
    """report.html, once `lmforge.train.run.run_training` wrote it."""
    detail: str = ""
    """Why nothing was trained (a finished run), for the caller to say."""
