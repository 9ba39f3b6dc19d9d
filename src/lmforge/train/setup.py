"""Setting a run up: owning the run folder, the model to train (new, or from model.init_from,
as the task prepares it), the checkpoint to resume from, and the run folder (config.yaml, the
history cut back to the restart point, the logger).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lmforge.base.config import Config, save_config
from lmforge.base.locks import hold_folder
from lmforge.base.runtime import Runtime
from lmforge.checkpoint import Checkpoint, load_checkpoint, load_model
from lmforge.models.registry import architecture, model_from_architecture
from lmforge.models.lora import merged_state, without_lora
from lmforge.train.activation_checkpointing import enable as enable_checkpointing
from lmforge.train.init_from import check_task_model, with_context
from lmforge.train.lora import adapt
from lmforge.train.log import RunLogger, truncate_metrics
from lmforge.train.tasks import Task, task_for_data
from lmforge.train.trainable import apply_trainable, model_summary  # noqa: F401  (model_summary: the loop's header)

_held = threading.local()


@contextlib.contextmanager
def hold_run_folder(run_dir: Path | None, *, enabled: bool = True) -> Iterator[None]:
    """Own `run_dir` for the block: one process at a time (`lmforge.base.locks.hold_folder`; a
    second one gets FolderBusy naming the holder's pid, a dead holder's lock is taken over).

    Held again in the same thread it is a no-op (`run_training` holds it around the `train` that
    holds it too). enabled=False: torchrun ranks other than 0, which write nothing; None: no folder."""
    held = getattr(_held, "folders", None)
    if held is None:
        held = _held.folders = set()
    key = Path(run_dir).absolute() if run_dir is not None else None
    if not enabled or key is None or key in held:
        yield
        return
    with hold_folder(key, "run folder"):
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)


def check_run_folder_free(run_dir: Path) -> None:
    """A new run never writes over another one (leftovers of an interrupted save do not count)."""
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(p.name[0] != "." for p in ckpt_dir.iterdir()):
        raise ValueError(f"{run_dir} already holds a run; continue it with `lmforge train --resume {run_dir}` "
                         "or choose another run.name")


def build_model(cfg: Config, meta: dict, device: torch.device) -> tuple[nn.Module, dict, Task]:
    """(model on `device`, its architecture, the task): new or from model.init_from (its
    architecture already settled into `cfg`, `lmforge.train.init_from.settle_init_from`), as the
    task prepares it (classify adds a head), with what trains chosen (`train.lora`'s adapters,
    else `train.trainable`) and activation checkpointing on when asked. A model the task cannot
    train is refused first."""
    task_cls = task_for_data(cfg, meta)
    vocab_size = int(meta["vocab_size"])
    if cfg.model.init_from is None:
        check_task_model(task_cls.name, task_cls.model_types, cfg.model.kind)
        arch = architecture(cfg.model, vocab_size)
        model = model_from_architecture(arch)
    else:
        model, arch = _init_from(cfg, vocab_size, task_cls)
    model.to(device)
    task = task_cls(cfg, meta, model.config.context)
    model, arch = task.prepare_model(model, arch)
    if cfg.train.lora.rank:  # adapters on the frozen model; otherwise train.trainable picks
        model, arch = adapt(model, arch, cfg)
    else:
        apply_trainable(model, cfg.train.trainable)
    if cfg.train.activation_checkpointing:
        enable_checkpointing(model)
    return model.to(device), arch, task


def _same_vocabulary(model_vocab, data_vocab: int, model_tokenizer: Path, data: str) -> bool:
    """Whether data tokenized with `data_vocab` ids fits the checkpoint: the same size, or fewer ids
    than the embedding rows from the checkpoint's own tokenizer (Llama-class checkpoints pad
    their embeddings beyond the tokenizer: Qwen2-0.5B has 151,936 rows for 151,665 tokens)."""
    if model_vocab == data_vocab:
        return True
    data_tokenizer = Path(data) / "tokenizer.json"
    return (isinstance(model_vocab, int) and data_vocab < model_vocab and data_tokenizer.is_file()
            and data_tokenizer.read_bytes() == Path(model_tokenizer).read_bytes())


def _init_from(cfg: Config, vocab_size: int, task_cls: type[Task]) -> tuple[nn.Module, dict]:
    """model.init_from's model and architecture (this run's dropout, its context if shorter),
    checked against the task and the data."""
    ckpt = load_checkpoint(Path(cfg.model.init_from))
    check_task_model(task_cls.name, task_cls.model_types, str(ckpt.model_config.get("model_type")),
                     cfg.model.init_from, ckpt.model_config)
    if not _same_vocabulary(ckpt.model_config.get("vocab_size"), vocab_size, ckpt.tokenizer_file, cfg.data.path):
        raise ValueError(f"model.init_from {cfg.model.init_from}: its vocabulary has "
                         f"{ckpt.model_config.get('vocab_size')} tokens but the data in {cfg.data.path} "
                         f"was tokenized with {vocab_size}; prepare the data with the checkpoint's tokenizer")
    arch, state = ckpt.model_config, ckpt.state_dict
    if "lora" in arch:  # a LoRA run's checkpoint: its adapters merged into the weights
        arch, state = without_lora(arch), merged_state(state, arch["lora"])
    arch, state = with_context(arch, state, cfg.model.context)
    arch = dict(arch, dropout=cfg.model.dropout)
    model, _ = load_model(ckpt.path, checkpoint=dataclasses.replace(ckpt, model_config=arch, state_dict=state))
    return model, arch


def steps_per_epoch(train_samples: int, meta: dict, cfg: Config, context: int, world_size: int) -> int:
    """Optimizer steps in an epoch of `train_samples`; ValueError when not one fits, saying why."""
    t, data_dir = cfg.train, cfg.data.path
    if train_samples == 0:  # not the batch size's fault: no sample at all fits the context
        tokens = (meta.get("splits") or {}).get("train", {}).get("tokens")  # older data folders lack it
        raise ValueError(f"{data_dir}: the training split" + (f" ({tokens:,} tokens)" if tokens else "")
                         + f" holds no sample of model.context={context:,} tokens; lower model.context "
                         "or add data")
    steps = train_samples // (t.batch_size * t.grad_accum * world_size)
    if steps == 0:
        raise ValueError(f"{data_dir}: {train_samples} training samples, fewer than one optimizer step needs "
                         f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {world_size} processes); "
                         "lower them or add data")
    return steps


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
