"""`lmforge config`: every run config key with its type, default and meaning, read from the
config's own dataclasses and their field docstrings (`lmforge.base.config_schema`), as a list or
as a commented YAML file; and `lmforge train --print-config`: the config a run would train
with, resolved (preset, YAML, overrides, a resumed run's saved config), without training.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from lmforge.base import config_schema
from lmforge.base.config import Config


@dataclass(frozen=True)
class ConfigKey:
    """One key of a run config."""

    key: str
    """Dotted: section.name (train.lora.rank for a nested section)."""
    type: str
    default: Any
    doc: str


def _docstrings() -> dict[str, dict[str, str]]:
    """Class name -> field name -> the docstring written under the field in config_schema.py."""
    tree = ast.parse(inspect.getsource(config_schema))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for field_node, after in zip(node.body, node.body[1:]):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[field_node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def type_text(hint: Any) -> str:
    """A field's type as a user writes it: `int or null`, `one of: fp32, bf16, fp16`, `list of text`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of: " + ", ".join(map(str, args))
    if origin is list:
        return f"list of {type_text(args[0])}"
    return {str: "text", int: "int", float: "number", bool: "true/false"}.get(hint, getattr(hint, "__name__", str(hint)))


def config_keys(cls: type = Config, prefix: str = "", docs: dict[str, dict[str, str]] | None = None) -> list[ConfigKey]:
    """Every key of `cls` (the whole run config by default), nested sections flattened, in file order."""
    docs = _docstrings() if docs is None else docs
    hints = typing.get_type_hints(cls)
    keys: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys += config_keys(hint, f"{prefix}{f.name}.", docs)
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        keys.append(ConfigKey(f"{prefix}{f.name}", type_text(hint), default, docs.get(cls.__name__, {}).get(f.name, "")))
    return keys


def _yaml_value(value: Any) -> str:
    """A default as YAML writes it on one line (text and lists in JSON's quoting: a newline stays \\n)."""
    if isinstance(value, list) or (isinstance(value, str) and "\n" in value):
        return json.dumps(value, ensure_ascii=False)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def describe_keys(only: str | None = None, width: int = 100) -> str:
    """The listing `lmforge config` prints: key, default and type, then the meaning, indented;
    `only` keeps a section or a key (train, train.lr, train.lora)."""
    keys = select_keys(only)
    lines: list[str] = []
    for item in keys:
        lines.append(f"{item.key} = {_yaml_value(item.default)}    ({item.type})")
        lines += textwrap.wrap(item.doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)


def select_keys(only: str | None) -> list[ConfigKey]:
    """The keys under `only` (a section, a nested section or a key); ValueError naming the nearest."""
    keys = config_keys()
    if not only:
        return keys
    chosen = [k for k in keys if k.key == only or k.key.startswith(only.rstrip(".") + ".")]
    if not chosen:
        import difflib

        names = sorted({k.key for k in keys} | {k.key.rsplit(".", 1)[0] for k in keys})
        near = difflib.get_close_matches(only, names, n=1)
        raise ValueError(f"no config key or section {only!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                         + " (`lmforge config` lists them all)")
    return chosen


def defaults_yaml(only: str | None = None, width: int = 96) -> str:
    """A YAML run config holding every default, each key after its meaning as comments: a file to
    start from (`lmforge config --yaml > run.yaml`; data.path must be filled in)."""
    lines = ["# every key of an lmforge run config at its default (`lmforge config` explains them);",
             "# data.path is required. Keys left out of a file keep these defaults."]
    opened: list[str] = []
    for item in select_keys(only):
        *sections, name = item.key.split(".")
        common = 0
        while common < min(len(opened), len(sections)) and opened[common] == sections[common]:
            common += 1
        for depth in range(common, len(sections)):
            lines.append(("\n" if depth == 0 else "") + "  " * depth + f"{sections[depth]}:")
        opened = sections
        indent = "  " * len(sections)
        lines += textwrap.wrap(f"{item.doc} ({item.type})", width - len(indent),
                               initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
        lines.append(f"{indent}{name}: {_yaml_value(item.default)}")
    return "\n".join(lines) + "\n"


def resolved_yaml(cfg: Config, source: str) -> str:
    """The YAML of a resolved config, as config.yaml of the run will hold it, after a comment
    naming where it came from and the sizes its model.preset gives."""
    from lmforge.models.registry import PRESETS

    model = cfg.model
    header = [f"# resolved config of {source} (lmforge train --print-config: nothing was trained)"]
    preset = PRESETS.get(model.kind, {}).get(model.preset) if model.preset else None
    if preset:
        sizes = {k: getattr(model, k) if getattr(model, k) is not None else v for k, v in preset.items()
                 if hasattr(model, k)}
        header.append(f"# model.preset {model.preset} ({model.kind}): "
                      + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " (fields set here override it)")
    body = yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def print_config(config: str | Path | None, overrides: Sequence[str], resume: Path | None = None) -> str:
    """What `lmforge train --print-config` prints: the config `run_training` would train with."""
    from lmforge.train.run import preview_config

    cfg = preview_config(config, overrides, resume)
    source = f"--resume {resume}" if resume is not None else str(config)
    return resolved_yaml(cfg, source + (" " + " ".join(overrides) if overrides else ""))
