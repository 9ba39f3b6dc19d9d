"""Reading a run config: YAML, dotted overrides, coercion to the field types, validation.

Defaults < YAML < `section.key=value`. Every error (unknown key, wrong type, bad value) is
collected and reported at once, each with its dotted key, the valid choices and the nearest
valid key, before any work starts. The sections themselves (fields, defaults, per-field
checks) are `lmforge.base.config_schema`, re-exported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from lmforge.base.config_examples import missing_config_hint
from lmforge.base.config_schema import (BestMetric, Config, DataConfig, Device, FieldErrors, ModelConfig,
                                        Precision, RunConfig, Schedule, Task, TrainConfig, non_finite_message)

__all__ = ["BestMetric", "Config", "ConfigError", "DataConfig", "Device", "ModelConfig", "Precision", "RunConfig",
           "Schedule", "Task", "TrainConfig", "config_diff", "config_from_dict", "load_config", "save_config"]


class ConfigError(ValueError):
    """One or more problems in a run config; the message lists all of them."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Build a Config from `base` (a dict), then a YAML file, then `section.key=value` overrides."""
    raw: dict[str, Any] = _deep_copy(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}; {missing_config_hint(path)}")
        try:
            loaded = yaml.safe_load(_read_text(path)) or {}
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


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a UTF-8 byte-order mark is fine); anything else is a ConfigError
    naming the file, the line and the conversion, not a codec traceback."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError([f"the file is UTF-16, not UTF-8; convert it, for example "
                           f"`iconv -f utf-16 -t utf-8 {path} > {path.stem}-utf8{path.suffix}`"], str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        bad = data[err.start:err.end]
        raise ConfigError([f"line {line}: not valid UTF-8 (bytes {bad!r} at byte offset {err.start}); save "
                           f"the file as UTF-8, for example `iconv -f latin1 -t utf-8 {path} > "
                           f"{path.stem}-utf8{path.suffix}`"], str(path)) from None


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
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override {item!r}: the key must look like section.key (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    for part in reversed(parts):  # section.key, or section.group.key (train.lora.rank=8)
        value = {part: value}
    return value


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
    except FieldErrors as err:
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf / nan in YAML, `inf` in an override
            raise ValueError(f"{key}: {non_finite_message(value)}")
        return number
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
