"""Setting a run up: the model to train (new, or from model.init_from, as the task prepares it),
the checkpoint to resume from, and the run folder (config.yaml, the history cut back to the
restart point, the logger).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lmforge.base.config import Config, save_config
from lmforge.base.runtime import Runtime
from lmforge.checkpoint import Checkpoint, load_checkpoint, load_model
from lmforge.models.registry import architecture, model_from_architecture
from lmforge.train.log import RunLogger, truncate_metrics
from lmforge.train.tasks import Task, make_task


def check_run_folder_free(run_dir: Path) -> None:
    """A new run never writes over another one (leftovers of an interrupted save do not count)."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(p.name[0] != "." for p in ckpt_dir.iterdir()):
        raise ValueError(f"{run_dir} already holds a run; continue it with `lmforge train --resume {run_dir}` "
                         "or choose another run.name")


def build_model(cfg: Config, meta: dict, device: torch.device) -> tuple[nn.Module, dict, Task]:
    """(model on `device`, its architecture, the task): new or from model.init_from, as the task
    prepares it (classify adds a head)."""
    vocab_size = int(meta["vocab_size"])
    if cfg.model.init_from is None:
        arch = architecture(cfg.model, vocab_size)
        model = model_from_architecture(arch)
    else:
        model, arch = _init_from(cfg, vocab_size)
    model.to(device)
    task = make_task(cfg, meta, model.config.context)
    model, arch = task.prepare_model(model, arch)
    return model.to(device), arch, task


def _init_from(cfg: Config, vocab_size: int) -> tuple[nn.Module, dict]:
    """model.init_from's model and architecture (with this run's dropout), checked against the data."""
    ckpt = load_checkpoint(Path(cfg.model.init_from))
    if ckpt.model_config.get("vocab_size") != vocab_size:
        raise ValueError(f"model.init_from {cfg.model.init_from}: its vocabulary has "
                         f"{ckpt.model_config.get('vocab_size')} tokens but the data in {cfg.data.path} "
                         f"was tokenized with {vocab_size}; prepare the data with the checkpoint's tokenizer")
    model, _ = load_model(ckpt.path, overrides={"dropout": cfg.model.dropout}, checkpoint=ckpt)
    return model, dict(ckpt.model_config, dropout=cfg.model.dropout)


def read_resume(path: Path) -> Checkpoint:
    ckpt = load_checkpoint(path, with_training_state=True)
    if not ckpt.training_state:
        raise ValueError(f"{path}: this checkpoint has no training state (weights only); "
                         "start a new run with model.init_from instead of --resume")
    return ckpt


def open_run_folder(cfg: Config, rt: Runtime, resumed_step: int | None, quiet: bool,
                    notes: Sequence[str] = ()) -> RunLogger:
    """The run folder made ready (rank 0 writes): config.yaml, metrics.jsonl without events past
    the restart point (all of them for a fresh start, with train.log), and the logger."""
    run_dir = cfg.run_dir
    if rt.is_main:
        truncate_metrics(run_dir, -1 if resumed_step is None else resumed_step)
        if resumed_step is None:
            (run_dir / "train.log").unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = RunLogger(run_dir, enabled=rt.is_main, quiet=quiet)
    for note in notes:
        log.note(note)
    return log
