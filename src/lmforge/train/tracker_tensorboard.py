"""The TensorBoard tracker (`train.loggers: [tensorboard]`): event files in <run>/tensorboard,
written with `torch.utils.tensorboard` (the `tensorboard` package: `pip install
'lmforge[tensorboard]'`). `tensorboard --logdir runs` shows every run side by side.

Scalars go under their tracker names (train/loss, val/loss, ...); the config is the run's
hyperparameters (the HPARAMS tab, flattened to section.key) and its YAML text (TEXT); the
report's plots are images (IMAGES). A resumed run purges the events after its checkpoint's
step, as metrics.jsonl drops them, so no step is drawn twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lmforge.train.trackers import TrackerRun


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """section.key -> a value TensorBoard's hparams take (numbers, text, booleans; lists and
    null as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = "null" if value is None else str(value)
    return flat


class TensorBoardTracker:
    """Writes the run's metrics as TensorBoard scalars under <run>/tensorboard."""

    def __init__(self, run: TrackerRun) -> None:
        from torch.utils.tensorboard import SummaryWriter  # ImportError names the missing package

        purge = None if run.resumed_step is None else run.resumed_step + 1
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=purge)

    def log_hparams(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # In this run's own event file (SummaryWriter.add_hparams would start a sub-run).
        for summary in hparams(flat_hparams(config), {"val/loss": 0.0, "train/loss": 0.0}):
            self.writer.file_writer.add_summary(summary)
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # markdown code block

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def log_image(self, name: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image  # matplotlib's own dependency

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
        self.writer.add_image(f"plots/{name}", pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()
