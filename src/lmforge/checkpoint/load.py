"""Loading a checkpoint after verifying every file against its manifest.

Nothing here unpickles: weights use safetensors, training_state.pt is read only with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmforge.base.files import sha256_of
from lmforge.checkpoint.format import MANIFEST, MANIFEST_FORMAT, REQUIRED_FILES, Checkpoint, CheckpointError


def read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest.json of checkpoint folder ``path`` (CheckpointError if absent or bad)."""
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from e
    ok = (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
          and isinstance(manifest.get("step"), int) and not isinstance(manifest.get("step"), bool))
    if not ok:
        raise CheckpointError(f'{file}: not a checkpoint manifest (needs "files" and an integer "step")')
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r} not supported (expected {MANIFEST_FORMAT})")
    return manifest


def load_checkpoint(
    path: Path, *, with_training_state: bool = False, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load checkpoint folder ``path`` after checking every file against its manifest.

    Raises FileNotFoundError if the folder does not exist and CheckpointError (naming the
    file or tensor) if it is incomplete, damaged, holds non-finite weights or a training
    state that is not plain data. An adapter checkpoint's state dict is complete: its frozen
    base's weights (checked against the recorded sha256) under the adapted model's names, then
    the adapter's own tensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    manifest = read_manifest(path)
    _verify_files(path, manifest["files"])
    model_config = _read_json(path / "config.json")
    run_config = _read_json(path / "run_config.json") if "run_config.json" in manifest["files"] else None
    state_dict = _read_weights(path / "model.safetensors", map_location)
    if "lora" in model_config:
        state_dict = {**_base_weights(path, model_config["lora"], map_location), **state_dict}
    training_state = None
    if with_training_state:
        if "training_state.pt" not in manifest["files"]:
            raise CheckpointError(f"{path}: has no training_state.pt (saved without it; cannot resume from it)")
        training_state = _read_training_state(path / "training_state.pt", map_location)
    return Checkpoint(path=path, model_config=model_config, state_dict=state_dict,
                      tokenizer_file=path / "tokenizer.json", run_config=run_config,
                      training_state=training_state)


def base_reference(path: Path, prefix: str = "") -> dict[str, str]:
    """How an adapter names its frozen base checkpoint: absolute path, the sha256 of its weights
    (from its manifest) and the prefix its tensor names take in the adapted model."""
    path = Path(path).absolute()
    entry = read_manifest(path)["files"].get("model.safetensors")
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"{path / MANIFEST}: no sha256 for model.safetensors")
    return {"path": str(path), "sha256": entry["sha256"], "prefix": prefix}


def _base_weights(path: Path, lora: Any, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The frozen base's weights under the adapted model's names, checked against the sha256 the
    adapter recorded."""
    base = lora.get("base") if isinstance(lora, dict) else None
    if not (isinstance(base, dict) and all(isinstance(base.get(k), str) for k in ("path", "sha256", "prefix"))):
        raise CheckpointError(f"{path / 'config.json'}: the lora entry names no base checkpoint "
                              '("base": {"path", "sha256", "prefix"})')
    where = Path(base["path"])
    if not (where / MANIFEST).is_file():
        raise CheckpointError(f"{path}: a LoRA adapter whose frozen base checkpoint {where} (model.safetensors "
                              f"sha256 {base['sha256'][:16]}...) is not there; put the base back at that path, "
                              "or use a merged export (lmforge export --format hf --merge) made while it was")
    found = base_reference(where)["sha256"]
    if found != base["sha256"]:
        raise CheckpointError(f"{path}: its base checkpoint {where} has changed (model.safetensors sha256 "
                              f"{found[:16]}..., the adapter was trained on {base['sha256'][:16]}...)")
    ckpt = load_checkpoint(where, map_location=map_location)
    if "lora" in ckpt.model_config:
        raise CheckpointError(f"{path}: its base {where} is itself an adapter; merge it first")
    return {base["prefix"] + k: v for k, v in ckpt.state_dict.items()}


def _verify_files(path: Path, files: dict[str, Any]) -> None:
    problems = [f"{path / name}: missing from {MANIFEST}" for name in REQUIRED_FILES if name not in files]
    for name, entry in files.items():
        file = path / name
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{path / MANIFEST}: bad file name {name!r}")
        elif not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                  and isinstance(entry.get("sha256"), str)):
            problems.append(f"{path / MANIFEST}: bad entry for {name}")
        elif not file.is_file():
            problems.append(f"{file}: missing (listed in {MANIFEST})")
        elif (size := file.stat().st_size) != entry["size"]:
            problems.append(f"{file}: {size} bytes, manifest says {entry['size']} (file truncated or damaged)")
        elif sha256_of(file) != entry["sha256"]:
            problems.append(f"{file}: sha256 mismatch (file damaged)")
    if problems:
        raise CheckpointError("\n".join(problems))


def _read_json(file: Path) -> dict[str, Any]:
    try:
        obj = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_weights(file: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt", device=str(torch.device(map_location))) as f:
            metadata = f.metadata() or {}
            state = {name: f.get_tensor(name) for name in f.keys()}
        aliases = json.loads(metadata.get("aliases", "{}"))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e
    for name, t in state.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{file}: tensor {name!r} contains NaN/inf (the run diverged before this save)")
    if not isinstance(aliases, dict) or any(kept not in state for kept in aliases.values()):
        raise CheckpointError(f"{file}: bad 'aliases' metadata {aliases!r}")
    for alias, kept in aliases.items():
        state[alias] = state[kept]  # the same tensor object: tied weights stay tied
    return state


def _read_training_state(file: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # never retried with weights_only=False: that would run the pickle
        raise CheckpointError(
            f"{file}: refused to load ({_why_unpickling_failed(e)}); training_state.pt may only "
            f"hold tensors, numbers, strings, lists and dicts, and is never unpickled unsafely"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a dict, got {type(state).__name__}")
    return state


def _why_unpickling_failed(e: Exception) -> str:
    """The useful part of torch.load's error, without its advice to load the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if found else text).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].split('. Please')[0][:200] if lines else ''}"
