"""`lmforge train`: the command's thin call of `lmforge.train.run.run_training`, asking for
signal handling (the process is the run's), and the end of a torchrun worker."""

from __future__ import annotations

from pathlib import Path

from lmforge.base.distributed import leave_job
from lmforge.train.run import run_training


def train_command(config_path: str | None, overrides: list[str], *, resume: Path | None = None,
                  quiet: bool = False) -> int:
    """Train (or resume) as the command line says; returns the exit status."""
    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides, config_path = [config_path, *overrides], None  # `train --resume DIR key=value`
    if config_path is None and resume is None:
        raise ValueError("lmforge train: give a config file (e.g. configs/gpt-shakespeare.yaml) or --resume RUN_DIR")
    result = run_training(config_path, overrides, resume=resume, quiet=quiet, handle_signals=True)
    if result.is_main and not quiet:
        print(f"run folder: {result.run_dir}" + (f"\nreport: {result.report}" if result.report else ""))
    leave_job(result.steps, result.exit_code)  # returns only in a single process
    return result.exit_code
