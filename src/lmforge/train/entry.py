"""`lmforge train`: resolve the config (fresh or resumed), run the loop, write the report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from lmforge.base.config import Config, config_diff, config_from_dict, load_config
from lmforge.checkpoint import CheckpointError
from lmforge.base.distributed import leave_job
from lmforge.checkpoint.retention import clean_stale_temp, find_latest
from lmforge.train.log import truncate_metrics


def resolve_resume(resume: Path, config_path: str | None, overrides: list[str]) -> tuple[Config, Path | None]:
    """The config and checkpoint to continue from: a run folder's newest complete checkpoint,
    or an explicit checkpoint folder. A wrong or incomplete path is an error, never a fresh start.

    A run folder that stopped before its first checkpoint (config.yaml, no checkpoint, not even
    a partial one) gives checkpoint None: the run starts again from step 0, which is exact."""
    if (resume / "manifest.json").exists():
        checkpoint, run_dir = resume, resume.parent.parent
    elif resume.is_dir() and (resume / "checkpoints").is_dir():
        run_dir = resume
        clean_stale_temp(resume / "checkpoints")
        checkpoint = find_latest(resume / "checkpoints")
        if checkpoint is None and any((resume / "checkpoints").iterdir()):
            raise CheckpointError(f"{resume}/checkpoints: no complete checkpoint to resume from")
    elif (resume / "config.yaml").is_file() and (resume / "metrics.jsonl").is_file():
        run_dir, checkpoint = resume, None  # killed before the first save
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
    if checkpoint is None:
        print(f"note: {run_dir} stopped before its first checkpoint; starting it again from step 0",
              file=sys.stderr)
    else:
        check_tokenizer_match(checkpoint / "tokenizer.json", Path(cfg.data.path), "--resume")
    return cfg, checkpoint


def check_tokenizer_match(model_tokenizer: Path, data_dir: Path, what: str) -> None:
    """Refuse data tokenized with another vocabulary than the model's (same size or not)."""
    data_tokenizer = data_dir / "tokenizer.json"
    if not (model_tokenizer.is_file() and data_tokenizer.is_file()):
        return  # a missing data folder is reported by the loop, with its own fix
    if model_tokenizer.read_bytes() == data_tokenizer.read_bytes():
        return
    from lmforge.base.tokenizer import load_tokenizer

    model_vocab = load_tokenizer(model_tokenizer).get_vocab(with_added_tokens=True)
    data_vocab = load_tokenizer(data_tokenizer).get_vocab(with_added_tokens=True)
    if model_vocab != data_vocab:
        raise ValueError(f"{what}: the model's tokenizer ({model_tokenizer}, {len(model_vocab)} tokens) is not "
                         f"the one the data in {data_dir} was prepared with ({data_tokenizer}, "
                         f"{len(data_vocab)} tokens); prepare the data again with "
                         f"`lmforge prepare --tokenizer {model_tokenizer}`")


def _elastic_restart_point(cfg: Config) -> Path | None:
    """After torchrun restarted the workers (--max-restarts), continue from the newest complete
    checkpoint of this run; none yet means the failed attempt saved nothing: start over."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        return None
    if os.environ.get("RANK", "0") == "0":
        clean_stale_temp(ckpt_dir)
    latest = find_latest(ckpt_dir)
    if latest is not None:
        print(f"elastic restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from {latest}", file=sys.stderr)
    return latest


def train_command(config_path: str | None, overrides: list[str], *, resume: Path | None = None,
                  quiet: bool = False) -> int:
    from lmforge.report import write_report
    from lmforge.train.loop import train

    if config_path is not None and "=" in config_path and not Path(config_path).exists():
        overrides, config_path = [config_path, *overrides], None  # `train --resume DIR key=value`
    if resume is not None:
        cfg, checkpoint = resolve_resume(resume, config_path, overrides)
        if checkpoint is None:
            truncate_metrics(cfg.run_dir, 0)  # the restarted run logs its steps again
    elif config_path is None:
        raise ValueError("lmforge train: give a config file (e.g. configs/gpt-shakespeare.yaml) or --resume RUN_DIR")
    else:
        cfg, checkpoint = load_config(config_path, overrides), None
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            checkpoint = _elastic_restart_point(cfg)
    if cfg.model.init_from is not None:
        check_tokenizer_match(Path(cfg.model.init_from) / "tokenizer.json", Path(cfg.data.path),
                              "model.init_from")
    result = train(cfg, resume_from=checkpoint, quiet=quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 writes
        report = write_report(result.run_dir)
        if not quiet:
            print(f"run folder: {result.run_dir}\nreport: {report}")
    leave_job(result.steps, result.exit_code)  # returns only in a single process
    return result.exit_code
