"""The architecture a checkpoint fixes, against the one a run's config asks for.

- `model.init_from`: a checkpoint fixes kind, n_layer, n_head, n_embd and activation, and holds
  `context` learned positions. A shorter context is honoured (the positions are cut,
  `with_context`), and so is dropout; any other model.* field the user set to another value
  is refused, all at once, with the checkpoint's values (`settle_init_from`). The settled config
  carries the checkpoint's fields, so config.yaml records what is trained.
- The model a task can train (`check_task_model`): GPT for lm and dialogue, BERT for mlm, either
  or a classifier for classify, named before anything is built.
- A resumed run keeps its architecture (`check_resume_architecture`): every field of the
  checkpoint's config.json but dropout must be the config's.
- model.init_from pointed at a Hugging Face transformers folder (its config.json names
  `architectures` or a transformers version, and no manifest.json is beside it) is refused with
  the `lmforge import-hf` command that converts it (`check_not_transformers`): the conversion
  checks the weights against config.json and writes a verified checkpoint once, instead of on
  every run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from lmforge.base.config import Config, ModelConfig
from lmforge.models.bert import BERT_PRESETS
from lmforge.models.gpt import GPT_PRESETS
from lmforge.train.tasks import TASKS, task_class

SHAPE = ("n_layer", "n_head", "n_embd", "context")
FIXED = ("kind", "n_layer", "n_head", "n_embd", "activation")
"""model.* fields a checkpoint fixes; `context` may only shrink."""
POSITION_WEIGHTS = ("wpe.weight", "position_embeddings.weight")
"""The learned positions of a GPT and of a BERT (under any prefix, such as a classifier's backbone)."""
_ARCH_NAMES = {"model_type": "model.kind", "activation": "model.activation", "hidden_act": "model.activation",
               **{name: f"model.{name}" for name in SHAPE}}


def backbone_of(arch: Mapping[str, Any]) -> Mapping[str, Any]:
    """The GPT / BERT part of a config.json (a classifier's backbone, else the whole)."""
    inner = arch.get("backbone")
    return inner if arch.get("model_type") == "classifier" and isinstance(inner, Mapping) else arch


def checkpoint_fields(arch: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json's architecture as model.* fields."""
    inner = backbone_of(arch)
    return {"kind": inner.get("model_type"), **{name: inner.get(name) for name in SHAPE},
            "activation": inner.get("activation", inner.get("hidden_act", "gelu"))}


def fields_set(model: ModelConfig) -> set[str]:
    """The model.* fields that differ from their defaults: what a config built in code asks for
    (the command line knows better: the keys the YAML file and the overrides name)."""
    default = ModelConfig()
    return {f.name for f in dataclasses.fields(ModelConfig) if getattr(model, f.name) != getattr(default, f.name)}


def read_arch(checkpoint: Path) -> dict | None:
    """A checkpoint folder's config.json, or None where it is missing or unreadable (loading the
    checkpoint names that problem)."""
    try:
        arch = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return arch if isinstance(arch, dict) else None


def check_not_transformers(folder: Path, arch: Mapping[str, Any]) -> None:
    """ValueError with the import-hf command when `folder` is a transformers model folder."""
    folder = Path(folder)
    if (folder / "manifest.json").is_file() or not ("architectures" in arch or "transformers_version" in arch):
        return
    names = arch.get("architectures")
    what = names[0] if isinstance(names, list) and names else f"model_type {arch.get('model_type')!r}"
    target = Path("checkpoints") / (folder.resolve().name or "imported")
    raise ValueError(f"model.init_from {folder} is a Hugging Face transformers folder ({what}), not an lmforge "
                     f"checkpoint; convert it once with `lmforge import-hf {folder} --out {target}` (GPT-2, "
                     f"BERT and Llama-class models) and set model.init_from={target}")


def settle_init_from(cfg: Config, explicit: Collection[str] | None = None) -> Config:
    """`cfg` with model.init_from's architecture in its model.* fields (a shorter context and
    dropout kept); ValueError listing every field in `explicit` (default: `fields_set`) that
    asks for another value, with the checkpoint's. Without model.init_from, `cfg` itself."""
    model = cfg.model
    arch = read_arch(Path(model.init_from)) if model.init_from is not None else None
    if arch is None:
        return cfg
    check_not_transformers(Path(model.init_from), arch)
    have = checkpoint_fields(arch)
    explicit = fields_set(model) if explicit is None else set(explicit)
    asked, conflicts = _asked(model, explicit, have)
    for name, value in asked.items():
        if name == "context" and value > have["context"]:
            conflicts.append(f"model.context={value} (longer than its {have['context']} learned positions)")
        elif name != "context" and value != have[name]:
            conflicts.append(f"model.{name}={value}")
    if conflicts:
        fixed = ", ".join(f"{name}={have[name]}" for name in FIXED)
        raise ValueError(f"model.init_from {model.init_from}: the checkpoint fixes the model, and this "
                         f"config asks for another one: {'; '.join(conflicts)}. It has {fixed} and at most "
                         f"context={have['context']} ({have['context']} learned positions); leave these "
                         "settings out (or set the checkpoint's values), or train a new model without "
                         "model.init_from")
    kind = have["kind"] if have["kind"] in ("gpt", "bert", "llama") else model.kind
    settled = dataclasses.replace(model, kind=kind, preset=None, n_layer=have["n_layer"], n_head=have["n_head"],
                                  n_embd=have["n_embd"], context=asked.get("context", have["context"]),
                                  activation=have["activation"])
    return dataclasses.replace(cfg, model=settled)


def _asked(model: ModelConfig, explicit: set[str], have: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the architecture fields the user asked for: a named preset's, then the fields they set;
    the presets that cannot be read as fields)."""
    asked: dict[str, Any] = {}
    conflicts: list[str] = []
    if "preset" in explicit and model.preset is not None:
        kind = model.kind if "kind" in explicit else have["kind"]
        preset = (BERT_PRESETS if kind == "bert" else GPT_PRESETS).get(model.preset)
        if preset is None:
            conflicts.append(f"model.preset={model.preset} (not a {kind} preset)")
        elif any(preset[k] != have[k] for k in SHAPE if k != "context") or preset["context"] > have["context"]:
            shape = ", ".join(f"{k}={preset[k]}" for k in SHAPE)
            conflicts.append(f"model.preset={model.preset} ({shape})")
        else:
            asked["context"] = preset["context"]
    for name in (*FIXED, "context"):
        value = getattr(model, name)
        if name in explicit and value is not None:
            asked[name] = value
    return asked, conflicts


def with_context(arch: dict, state_dict: dict[str, torch.Tensor],
                 context: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """`arch` and its weights cut to the first `context` learned positions (unchanged when the
    checkpoint has no more than that)."""
    inner = backbone_of(arch)
    old = inner.get("context")
    if context is None or not isinstance(old, int) or context >= old:
        return arch, state_dict
    cut = dict(inner, context=context)
    arch = dict(arch, backbone=cut) if inner is not arch else cut
    state = {name: (t[:context].clone() if name.endswith(POSITION_WEIGHTS) and t.shape[0] == old else t)
             for name, t in state_dict.items()}
    return arch, state


def check_task_model(task: str, model_types: tuple[str, ...], found: str, source: str | None = None,
                     arch: Mapping[str, Any] | None = None) -> None:
    """ValueError unless the task trains a `found` model; `source`: the checkpoint it comes from
    (model.init_from), else it is the config's model.kind."""
    if found in model_types:
        return
    needs = " or ".join(t for t in model_types)
    fits = [name for name in TASKS if found in task_class(name).model_types]
    other_tasks = f"train.task={' or '.join(fits)}" if fits else "another task"
    if source is None:
        raise ValueError(f"train.task={task} trains a {needs} model, not model.kind={found}; set "
                         f"model.kind={model_types[0]}, or train a {found} with {other_tasks}")
    what = f"a {found} checkpoint"
    if found == "classifier" and arch is not None:
        what = (f"a classifier checkpoint (a {backbone_of(arch).get('model_type')} backbone with a head for "
                f"labels {', '.join(map(str, arch.get('label_names') or []))})")
    raise ValueError(f"model.init_from {source} is {what}; train.task={task} needs a {needs} checkpoint: "
                     f"start from one (for a classifier, the checkpoint it was fine-tuned from), or "
                     f"fine-tune this one with {other_tasks}")


def check_resume_architecture(arch: Mapping[str, Any], saved: Mapping[str, Any], checkpoint: Path) -> None:
    """ValueError naming every architecture field (dropout aside) the config changed against the
    resumed checkpoint's config.json `saved`, with both values."""
    now, then = _flat(arch), _flat(saved)
    changed = [f"{_ARCH_NAMES.get(key.rpartition('.')[2], key)}: {then[key]} in the checkpoint, {now[key]} now"
               for key in now if key in then and now[key] != then[key]]
    if changed:
        raise ValueError(f"--resume {checkpoint}: a run keeps its architecture, and the config changed it ("
                         + "; ".join(changed) + "); resume without these changes, or start a new run from "
                         f"these weights with model.init_from={checkpoint}")


def _flat(arch: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in arch.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif key != "dropout":
            flat[f"{prefix}{key}"] = value
    return flat
