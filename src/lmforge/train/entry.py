"""`lmforge train`: resolve the config (fresh or resumed), run the loop, write the report."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from lmforge.config import Config, config_diff, config_from_dict, load_config
from lmforge.train.checkpoint import CheckpointError, clean_stale_temp, find_latest


def resolve_resume(resume: Path, config_path: str | None, overrides: list[str]) -> tuple[Config, Path]:
    """The config and checkpoint to continue from: a run folder's newest complete checkpoint,
    or an explicit checkpoint folder. A wrong or incomplete path is an error, never a fresh start."""
    if (resume / "manifest.json").exists():
        checkpoint, run_dir = resume, resume.parent.parent
    elif resume.is_dir() and (resume / "checkpoints").is_dir():
        run_dir = resume
        clean_stale_temp(resume / "checkpoints")
        checkpoint = find_latest(resume / "checkpoints")
        if checkpoint is None:
            raise CheckpointError(f"{resume}/checkpoints: no complete checkpoint to resume from")
    elif resume.is_dir() and any(resume.iterdir()) and not (resume / "config.yaml").exists():
        raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no manifest.json)")
    else:
        raise FileNotFoundError(f"--resume {resume}: not a run folder (with checkpoints/) nor a checkpoint")
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise FileNotFoundError(f"{saved_path}: the run's resolved config is missing")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    base = load_config(config_path).to_dict() if config_path else saved
    cfg = load_config(None, overrides, base=base)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    changes = config_diff(config_from_dict(saved, str(saved_path)).to_dict(), cfg.to_dict())
    if changes:
        print("resuming with a changed config:\n  " + "\n  ".join(changes), file=sys.stderr)
    return cfg, checkpoint


def train_command(config_path: str | None, overrides: list[str], *, resume: Path | None = None,
                  quiet: bool = False) -> int:
    from lmforge.report import write_report
    from lmforge.train.loop import train

    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides, config_path = [config_path, *overrides], None  # `train --resume DIR key=value`
    if resume is not None:
        cfg, checkpoint = resolve_resume(resume, config_path, overrides)
    elif config_path is None:
        raise ValueError("lmforge train: give a config file (e.g. configs/gpt-shakespeare.yaml) or --resume RUN_DIR")
    else:
        cfg, checkpoint = load_config(config_path, overrides), None
    result = train(cfg, resume_from=checkpoint, quiet=quiet)
    report = write_report(result.run_dir)
    if not quiet:
        print(f"run folder: {result.run_dir}\nreport: {report}")
    return result.exit_code
