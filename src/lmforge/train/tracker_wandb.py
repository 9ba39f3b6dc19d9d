"""The Weights & Biases tracker (`train.loggers: [wandb]`, `pip install 'lmforge[wandb]'`): one
W&B run per training session, its files under <run>/wandb.

W&B's own environment variables choose where it goes (WANDB_PROJECT, default "lmforge";
WANDB_ENTITY; WANDB_MODE). Without WANDB_MODE and without a W&B login (WANDB_API_KEY or
`wandb login`) it logs offline, and `wandb sync <run>/wandb/offline-run-*` uploads it later.
A resumed run is a new W&B run in the group of the run's name ("<name> (resumed at step N)"):
an offline run cannot be continued. Console capture is off (the run has train.log).
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lmforge.train.trackers import TrackerRun


def has_login() -> bool:
    """Whether W&B credentials are configured: WANDB_API_KEY, or a `wandb login` in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbTracker:
    """Logs the run's metrics, config and plots to a W&B run."""

    def __init__(self, run: TrackerRun) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if has_login() else "offline")
        name = run.name if run.resumed_step is None else f"{run.name} (resumed at step {run.resumed_step})"
        run.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(run.run_dir), project=os.environ.get("WANDB_PROJECT", "lmforge"),
                              name=name, group=run.name, mode=mode, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True))

    def log_hparams(self, config: dict[str, Any]) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, name: str, path: Path, step: int) -> None:
        self.run.log({f"plots/{name}": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()
