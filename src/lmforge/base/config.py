"""Run configuration: dataclasses with defaults, YAML loading, dotted overrides, validation.

Defaults < YAML < `section.key=value`. Every error (unknown key, wrong type, bad value) is
collected and reported at once, each with its dotted key, the valid choices and the nearest
valid key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Task = Literal["lm", "mlm", "classify", "dialogue"]
Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["linear", "cosine", "constant"]
Device = Literal["auto", "cpu", "cuda", "mps"]
BestMetric = Literal["auto", "val_loss", "val_accuracy"]


class ConfigError(ValueError):
    """One or more problems in a run config; the message lists all of them."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    kind: Literal["gpt", "bert"] = "gpt"
    """Architecture family."""
    preset: str | None = "mini"
    """Named size (see `lmforge.models.gpt.GPT_PRESETS`); fields below override it."""
    n_layer: int | None = None
    """Transformer blocks."""
    n_head: int | None = None
    """Attention heads per block."""
    n_embd: int | None = None
    """Hidden width; must be divisible by n_head."""
    context: int | None = None
    """Maximum sequence length (learned positions)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual paths."""
    activation: Literal["gelu", "gelu_new", "gelu_pytorch_tanh", "relu"] = "gelu"
    """Feed-forward activation of a new model: gelu (exact, as BERT and nanoGPT; on CPU about 4x
    faster than the tanh form), gelu_new (GPT-2's tanh approximation), relu. A checkpoint keeps its own."""
    init_from: str | None = None
    """A checkpoint folder to start from instead of random weights (fine-tuning)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        for name in ("n_layer", "n_head", "n_embd", "context"):
            value = getattr(self, name)
            _check(errors, value is None or value > 0, f"model.{name}", "must be positive")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class DataConfig:
    path: str = ""
    """A folder written by `lmforge prepare` (token store + meta.json)."""
    val_split: str = "val"
    """Which split validation reads."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, bool(self.path), "data.path", "is required: the folder written by `lmforge prepare`")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    task: Task = "lm"
    """What is learned; must match the prepared data's task."""
    batch_size: int = 8
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalised over the whole window)."""
    lr: float = 6e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of decay, as a fraction of `lr`."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to 2-D weights only."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    schedule: Schedule = "cosine"
    """Decay after warmup."""
    epochs: int = 1
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Train exactly this many optimizer steps, cycling through epochs as needed."""
    max_time: float | None = None
    """Stop (with a checkpoint) after this many seconds of training."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm once per optimizer step; null disables."""
    log_every: int = 10
    """Optimizer steps between log lines."""
    eval_every: int = 200
    """Optimizer steps between evaluations (and an evaluation at each epoch end)."""
    eval_batches: int = 20
    """Validation batches per evaluation."""
    save_every: int | None = None
    """Optimizer steps between `last` checkpoints; default: every evaluation."""
    keep_epochs: int = 3
    """Keep the newest K epoch checkpoints."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    precision: Precision = "fp32"
    """fp32, or autocast to bf16/fp16 (fp16 uses a gradient scaler)."""
    compile: bool = False
    """torch.compile the model."""
    seed: int = 1337
    """Seeds weights, data order and dropout."""
    device: Device = "auto"
    """auto picks cuda, then mps, then cpu."""
    max_non_finite: int = 5
    """Stop after this many optimizer steps in a row with a NaN/inf loss."""
    peak_flops: float | None = None
    """The device's peak FLOP/s for MFU (e.g. 312e12 for an A100 in bf16); null measures it once
    and caches it (see lmforge.train.flops)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Several processes (torchrun): ddp replicates the model, fsdp shards it across ranks."""
    collective_timeout: float = 600.0
    """Seconds a rank waits for the others before the run fails naming the step (hung rank)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["\n"])
    """Prompts for the sample generations written at the end of training (lm)."""
    sample_tokens: int = 200
    """New tokens per sample generation."""
    trainable: str = "all"
    """Which parameters a fine-tune trains (classify): all, head, or last_blocks:K (the head,
    the last K blocks and the final norm; chapter 6 of the book uses last_blocks:1)."""
    best_metric: BestMetric = "auto"
    """Which validation metric picks the best checkpoint; auto: val_accuracy for classify,
    val_loss otherwise."""
    loss_on: Literal["responses", "all"] = "responses"
    """dialogue: which tokens are learned: the replies only (user turns get -100), or all
    tokens of the dialogue, user turns too (as GPT2-chitchat does)."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        for name in ("batch_size", "grad_accum", "epochs", "log_every", "eval_every",
                     "eval_batches", "keep_epochs", "max_non_finite"):
            _check(errors, getattr(self, name) > 0, f"train.{name}", "must be a positive integer")
        for name in ("max_steps", "save_every", "patience"):
            value = getattr(self, name)
            _check(errors, value is None or value > 0, f"train.{name}", "must be positive or null")
        _check(errors, self.lr > 0, "train.lr", "must be positive")
        _check(errors, 0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _check(errors, self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(errors, 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(errors, self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(errors, self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be positive or null")
        _check(errors, self.max_time is None or self.max_time > 0, "train.max_time", "must be positive or null")
        _check(errors, self.peak_flops is None or self.peak_flops > 0, "train.peak_flops",
               "must be positive (FLOP/s) or null")
        _check(errors, self.collective_timeout > 0, "train.collective_timeout", "must be positive")
        _check(errors, self.sample_tokens >= 0, "train.sample_tokens", "must be >= 0")
        _check(errors, re.fullmatch(r"all|head|last_blocks:\d+", self.trainable) is not None,
               "train.trainable", f"{self.trainable!r}: choose all, head or last_blocks:K (e.g. last_blocks:1)")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    name: str = "run"
    """Run folder name under out_dir."""
    out_dir: str = "runs"
    """Where run folders are created."""

    def __post_init__(self) -> None:
        errors: list[str] = []
        _check(errors, bool(self.name) and "/" not in self.name, "run.name", "must be a non-empty folder name")
        _raise_if(errors)


@dataclass(kw_only=True, slots=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _FieldErrors(ValueError):
    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise _FieldErrors(errors)


def _check(errors: list[str], ok: bool, key: str, message: str) -> None:
    if not ok:
        errors.append(f"{key}: {message}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Build a Config from `base` (a dict), then a YAML file, then `section.key=value` overrides."""
    raw: dict[str, Any] = _deep_copy(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError([f"not valid YAML: {err}"], source) from None
        if not isinstance(loaded, dict):
            raise ConfigError(["the top level must be a mapping of sections (model, data, train, run)"], source)
        _merge(raw, loaded)
    problems: list[str] = []
    for item in overrides or []:
        try:
            _merge(raw, _parse_override(item))
        except ValueError as err:
            problems.append(str(err))
    config = _build(Config, raw, "", problems)
    if problems:
        raise ConfigError(problems, source)
    return config


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Rebuild a Config saved with `Config.to_dict()` (a checkpoint's run config)."""
    problems: list[str] = []
    config = _build(Config, _deep_copy(data), "", problems)
    if problems:
        raise ConfigError(problems, source)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human lines `key: old -> new` for every leaf that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, dotted + ".")
        elif a != b:
            lines.append(f"{dotted}: {a!r} -> {b!r}")
    return lines


def _parse_override(item: str) -> dict[str, Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"override {item!r}: the key must look like section.key (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return {parts[0]: {parts[1]: value}}


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Instantiate dataclass `cls` from `data`, appending every problem found to `problems`."""
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {type(data).__name__}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            problems.append(_unknown_key(f"{prefix}{key}", key, list(fields)))
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", problems)
            continue
        try:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
        except ValueError as err:
            problems.append(str(err))
    if any(v is None and dataclasses.is_dataclass(hints[k]) for k, v in kwargs.items()):
        return None
    try:
        return cls(**kwargs)
    except _FieldErrors as err:
        problems.extend(err.errors)
    except TypeError as err:  # a required field missing
        problems.append(f"{where}: {err}")
    return None


# Names other trainers use for our keys, so a typo of those still finds the right key.
_SYNONYMS = {
    "learning_rate": "lr", "max_grad_norm": "grad_clip", "gradient_clip": "grad_clip",
    "gradient_accumulation_steps": "grad_accum", "accumulation_steps": "grad_accum",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "steps": "max_steps",
    "block_size": "context", "n_positions": "context", "seq_len": "context", "max_len": "context",
    "lr_schedule": "schedule", "warmup": "warmup_steps", "micro_batch_size": "batch_size",
}


def _unknown_key(dotted: str, key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not near:
        alias = difflib.get_close_matches(key, list(_SYNONYMS), n=1, cutoff=0.6)
        near = [_SYNONYMS[alias[0]]] if alias and _SYNONYMS[alias[0]] in valid else []
    if not near:
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"{dotted}: unknown key{hint} (valid: {', '.join(valid)})"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not valid ({'; '.join(errors)})")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}{hint_text}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {hint} for {key}")


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
