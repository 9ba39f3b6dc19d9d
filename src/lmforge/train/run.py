"""Training from a config as one library call: resolve the config and the point to start from
(fresh, resumed, or an elastic restart under torchrun), train, write the report.

`run_training` is the library's entry for training; `lmforge train` is a thin call of it
(`lmforge.train.entry`). The run folder is held (`lmforge.train.setup.hold_run_folder`) from
before anything is written to it, the cleaning of interrupted saves included, until the report
is written; the run's experiment trackers (train.loggers) stay open until the report's plots
are logged to them. Cleaning the leftovers of interrupted saves happens here, once, before a checkpoint
is picked. A new run from model.init_from gets the checkpoint's architecture in its config, the
model.* keys the user gave checked against it (`lmforge.train.init_from.settle_init_from`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import yaml

from lmforge.base.config import Config, config_diff, config_from_dict, load_config
from lmforge.base.distributed import world_from_env
from lmforge.checkpoint import CheckpointError, clean_stale_temp, find_latest
from lmforge.train.init_from import fields_set, settle_init_from
from lmforge.train.loop import TrainResult, train
from lmforge.train.setup import hold_run_folder
from lmforge.train.trackers import RunTrackers

ConfigSource = Config | dict | str | Path
"""A resolved Config, a dict shaped as a YAML config file, or the path of one."""


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


def run_training(config: ConfigSource | None, overrides: Sequence[str] = (), *, resume: Path | str | None = None,
                 quiet: bool = False, show_progress: bool = True, handle_signals: bool = False) -> TrainResult:
    """Train from `config` with `overrides` ("section.key=value"), or continue the run folder or
    checkpoint `resume` (with `config` and `overrides` changing its saved config); write the
    run's report.html at the end (rank 0); return how the run ended.

    quiet: no console lines and no progress bar; notes (such as a changed config on resume) still
    go to stderr. show_progress=False: nothing on stdout or stderr at all. Either way train.log
    and metrics.jsonl record everything. handle_signals: SIGTERM / SIGINT stop the run
    gracefully (main thread only); for a process that is nothing but this run, as the CLI's.
    """
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if show_progress:
            _to_stderr(text)

    folder = run_folder(config, overrides, resume)
    with hold_run_folder(folder, enabled=world_from_env().rank == 0):
        cfg, checkpoint = resolve_run(config, overrides, resume, note)
        trackers = RunTrackers.from_config(cfg, enabled=world_from_env().rank == 0)
        try:
            result = train(cfg, resume_from=checkpoint, quiet=quiet or not show_progress,
                           handle_signals=handle_signals, notes=notes, trackers=trackers)
            trackers.warn = note  # train.log is closed: what a tracker says now goes to stderr
            if result.reason == "finished":
                note(result.detail)
                report = result.run_dir / "report.html"
                result.report = report if report.is_file() else None
            elif result.is_main:
                from lmforge.report import write_report  # matplotlib: imported only once the run is over

                result.report = write_report(result.run_dir)
                trackers.log_images(sorted((result.run_dir / "plots").glob("*.png")), result.steps)
        finally:
            trackers.close()
    return result


def run_folder(config: ConfigSource | None, overrides: Sequence[str], resume: Path | str | None) -> Path | None:
    """The run folder a call trains into, decided without writing anything (None: no run folder,
    as for a --resume path that is none; resolving it says so)."""
    if resume is None:
        return _fresh_config(config, overrides).run_dir
    resume = Path(resume)
    if (resume / "manifest.json").exists():
        return resume.parent.parent
    return resume if (resume / "checkpoints").is_dir() or (resume / "config.yaml").is_file() else None


def resolve_run(config: ConfigSource | None, overrides: Sequence[str], resume: Path | str | None,
                note: Callable[[str], None] = _to_stderr) -> tuple[Config, Path | None]:
    """The config to train with and the checkpoint to continue from (None: from step 0)."""
    if resume is not None:
        cfg, checkpoint = resolve_resume(Path(resume), config, overrides, note=note)
    else:
        cfg = _fresh_config(config, overrides)
        checkpoint = _start_point(cfg, note)
    if cfg.model.init_from is not None:
        check_tokenizer_match(Path(cfg.model.init_from) / "tokenizer.json", Path(cfg.data.path), "model.init_from")
        if checkpoint is None:
            cfg = settle_init_from(cfg, model_keys_given(config, overrides))
    return cfg, checkpoint


def _fresh_config(config: ConfigSource | None, overrides: Sequence[str]) -> Config:
    if config is None:
        raise ValueError("nothing to train: give a config (a YAML file such as configs/gpt-shakespeare.yaml, "
                         "a dict or a Config) or a run folder to resume")
    if isinstance(config, (Config, dict)):
        return load_config(None, list(overrides), base=_config_dict(config))
    return load_config(str(config), list(overrides))


def model_keys_given(config: ConfigSource | None, overrides: Sequence[str]) -> set[str]:
    """The model.* keys the user gave: in the YAML file or dict, as overrides, or (a Config built
    in code) those that differ from their defaults. What model.init_from must honour or refuse."""
    keys = {item.partition("=")[0].strip().removeprefix("model.") for item in overrides
            if item.strip().startswith("model.")}
    if isinstance(config, Config):
        return keys | fields_set(config.model)
    raw = config if isinstance(config, dict) else \
        yaml.safe_load(Path(config).read_text(encoding="utf-8-sig")) if config is not None else None
    model = raw.get("model") if isinstance(raw, dict) else None
    return keys | set(model if isinstance(model, dict) else ())


def resolve_resume(resume: Path, config: ConfigSource | None = None, overrides: Sequence[str] = (), *,
                   note: Callable[[str], None] = _to_stderr) -> tuple[Config, Path | None]:
    """The config and checkpoint to continue from: a run folder's newest complete checkpoint,
    or an explicit checkpoint folder. A wrong or incomplete path is an error, never a fresh start.

    A run folder that stopped before its first checkpoint (config.yaml, no checkpoint, not even
    a partial one) gives checkpoint None: the run starts again from step 0, which is exact."""
    if (resume / "manifest.json").exists():
        checkpoint, run_dir = resume, resume.parent.parent
    elif resume.is_dir() and (resume / "checkpoints").is_dir():
        run_dir = resume
        clean_stale_temp(resume / "checkpoints")  # a crash between two renames may have left `last` hidden
        checkpoint = find_latest(resume / "checkpoints")
        if checkpoint is None and any((resume / "checkpoints").iterdir()):
            raise CheckpointError(f"{resume}/checkpoints: no complete checkpoint to resume from")
    elif (resume / "config.yaml").is_file() and (resume / "metrics.jsonl").is_file():
        run_dir, checkpoint = resume, None  # killed before the first save
    elif resume.is_dir() and any(resume.iterdir()) and not (resume / "config.yaml").exists():
        raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no manifest.json)")
    else:
        raise FileNotFoundError(f"--resume {resume}: not a run folder (with checkpoints/) nor a checkpoint")
    cfg, changes = resumed_config(run_dir, config, overrides)
    if changes:
        note("resuming with a changed config:\n  " + "\n  ".join(changes))
    if checkpoint is None:
        note(f"note: {run_dir} stopped before its first checkpoint; starting it again from step 0")
    else:
        check_tokenizer_match(checkpoint / "tokenizer.json", Path(cfg.data.path), "--resume")
    return cfg, checkpoint


def resumed_config(run_dir: Path, config: ConfigSource | None, overrides: Sequence[str]) -> tuple[Config, list[str]]:
    """A resumed run's config: its saved config.yaml (or `config`) with `overrides`, in its own
    folder; and what changed from the saved one (`key: old -> new` lines)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise FileNotFoundError(f"{saved_path}: the run's resolved config is missing")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    base = _config_dict(config) if config is not None else saved
    cfg = load_config(None, list(overrides), base=base)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    return cfg, config_diff(config_from_dict(saved, str(saved_path)).to_dict(), cfg.to_dict())


def preview_config(config: ConfigSource | None, overrides: Sequence[str] = (),
                   resume: Path | str | None = None) -> Config:
    """The config `run_training` would train with (YAML and overrides, a resumed run's saved
    config, model.init_from's architecture settled in), resolved without writing anything."""
    if resume is None:
        return _settled(_fresh_config(config, overrides), config, overrides)
    run_dir = run_folder(None, (), resume)
    if run_dir is None:
        raise FileNotFoundError(f"--resume {resume}: not a run folder (with checkpoints/) nor a checkpoint")
    return resumed_config(run_dir, config, overrides)[0]


def _settled(cfg: Config, config: ConfigSource | None, overrides: Sequence[str]) -> Config:
    if cfg.model.init_from is not None:
        return settle_init_from(cfg, model_keys_given(config, overrides))
    return cfg


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


def _start_point(cfg: Config, note: Callable[[str], None]) -> Path | None:
    """None for a new run; after torchrun restarted the workers (--max-restarts), the newest
    complete checkpoint of this run (none yet: the failed attempt saved nothing, start over).
    Rank 0 first cleans the leftovers of interrupted saves (the other ranks read no checkpoint
    folder before the loop's first barrier)."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    if world_from_env().rank == 0:
        clean_stale_temp(ckpt_dir)  # leftovers of a save the last attempt did not finish
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    latest = find_latest(ckpt_dir)
    if latest is not None:
        note(f"elastic restart {os.environ['TORCHELASTIC_RESTART_COUNT']}: resuming from {latest}")
    return latest


def _config_dict(config: Config | dict | str | Path) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    return load_config(str(config)).to_dict()
