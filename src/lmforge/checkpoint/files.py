"""Checkpoints on disk: atomic save, verified load, stale-folder cleanup, epoch retention.

A checkpoint is a folder (``checkpoints/last``, ``best``, ``epoch-N``) holding config.json,
model.safetensors, tokenizer.json, optional run_config.json and training_state.pt, and
manifest.json, written last: ``{"format": 1, "files": {name: {"size", "sha256"}}, "step",
"epoch", "created", "lmforge_version"}``. A folder without a manifest is not a checkpoint.

Saving never exposes a half-written folder under a checkpoint name. Files go to a sibling
``.{name}.tmp-<pid>`` and are fsynced, the manifest last, then the folder; an existing
checkpoint is renamed aside to ``.{name}.old-<pid>``, the new one renamed in, the parent
fsynced, and only then the old one removed. A crash at any moment therefore leaves the old
or the new checkpoint complete, plus leftovers that ``clean_stale_temp`` removes; if the
crash fell between the two renames the ``.old`` folder is the only complete copy and
``clean_stale_temp`` puts it back. Call ``clean_stale_temp`` before ``find_latest`` when a
run resumes, while no other process saves into that folder.

Disk full (ENOSPC, EDQUOT, or EFBIG from RLIMIT_FSIZE) becomes a CheckpointError with the
temp folder removed and the previous checkpoint untouched. EFBIG is only returned when
SIGXFSZ is ignored, otherwise the kernel kills the process; CPython ignores it at startup,
and ``ignore_sigxfsz()`` makes sure of it for embedded interpreters (the loop calls it).

Nothing here unpickles: weights use safetensors, training_state.pt is read only with
``torch.load(weights_only=True)``. Crash tests use the fault points of ``lmforge.base.faults``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmforge.base.version import __version__
from lmforge.base.faults import fault_point

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_PLAIN_SCALARS = (bool, int, float, str, type(None))


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged or unsafe, or could not be written."""


@dataclass(slots=True)
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer_file: Path
    run_config: dict[str, Any] | None
    training_state: dict[str, Any] | None


def ignore_sigxfsz() -> None:
    """Make writes past RLIMIT_FSIZE fail with EFBIG (reported as disk full) instead of killing us."""
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# ---------------------------------------------------------------------------------- save


def save_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    model_config: dict,
    tokenizer_file: Path,
    run_config: dict | None = None,
    training_state: dict | None = None,
    step: int | None = None,
    epoch: float | None = None,
) -> Path:
    """Write a checkpoint folder at ``path`` atomically, replacing any previous one.

    ``step`` / ``epoch`` go into the manifest; when not given they are taken from
    ``training_state["step"]`` / ``["epoch"]`` (else 0 / None). Raises CheckpointError on
    non-finite weights or a full disk, ValueError on state that cannot be saved without
    pickle; in every failure case the previous checkpoint at ``path`` is left as it was.
    """
    path, tokenizer_file = Path(path), Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{tokenizer_file}: tokenizer file not found (pass the model's tokenizer.json)")
    if not isinstance(model_config, dict) or not isinstance(model_config.get("model_type"), str):
        raise ValueError('model_config: needs a "model_type" string ("gpt" or "bert")')
    tensors, aliases = _unique_tensors(model_state)
    if training_state is not None:
        _check_plain(training_state, "training_state")
    step, epoch = _step_and_epoch(step, epoch, training_state)
    # Serialise the JSON files first so a bad value fails before anything touches the disk.
    jsons = {"config.json": _json_bytes(model_config, "config.json")}
    if run_config is not None:
        jsons["run_config.json"] = _json_bytes(run_config, "run_config.json")
    meta = {"format": "pt", "aliases": json.dumps(aliases)} if aliases else {"format": "pt"}

    writers: list[tuple[str, Callable[[Path], None]]] = [
        ("config.json", lambda p: _write_bytes(p, jsons["config.json"])),
        ("model.safetensors", lambda p: save_file(tensors, str(p), metadata=meta)),
        ("tokenizer.json", lambda p: _write_bytes(p, tokenizer_file.read_bytes())),
    ]
    if run_config is not None:
        writers.append(("run_config.json", lambda p: _write_bytes(p, jsons["run_config.json"])))
    if training_state is not None:
        writers.append(("training_state.pt", lambda p: _torch_save(training_state, p)))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    current = "(folder)"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        fault_point("ckpt_before_write", path.name)
        files = {}
        for name, write in writers:
            current = name
            write(tmp / name)
            files[name] = _fsync_and_hash(tmp / name)
            if name == "model.safetensors":
                fault_point("ckpt_mid_write", path.name)
        current = MANIFEST
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = {"format": MANIFEST_FORMAT, "files": files, "step": step, "epoch": epoch,
                    "created": created, "lmforge_version": __version__}
        _write_bytes(tmp / MANIFEST, _json_bytes(manifest, MANIFEST))
        _fsync_and_hash(tmp / MANIFEST)
        _fsync_dir(tmp)
        fault_point("ckpt_after_flush", path.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _errno_of(e)
        if code in _DISK_FULL:
            raise CheckpointError(
                f"disk full while saving checkpoint {path} (writing {current}: {os.strerror(code)}, "
                f"{errno.errorcode.get(code, code)}); "
                f"the previous checkpoint is untouched; free some space and save again"
            ) from e
        raise
    _swap_in(tmp, path)
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``tmp`` so that a crash never loses both."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    moved = os.path.lexists(path)
    if moved:
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(path, old)
    fault_point("ckpt_after_rename", path.name)
    try:
        os.rename(tmp, path)
    except BaseException:
        if moved:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if moved:
        (old / MANIFEST).unlink(missing_ok=True)  # from here on nothing would restore it
        fault_point("ckpt_during_cleanup", path.name)
        shutil.rmtree(old)


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors with shared ones stored once (safetensors refuses shared storage).

    Returns (tensors, aliases) where aliases maps each dropped name to the name kept for the
    same view (tied lm_head / wte). Views that merely overlap are copied instead.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"model_state[{name!r}]: expected a tensor, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"model_state[{name!r}]: tensor contains NaN/inf; refusing to save it")
        if t.numel() == 0:
            tensors[name] = t.detach().cpu().contiguous()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        t = t.detach().cpu().contiguous()
        if storage in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(storage)
        tensors[name] = t
    return tensors, aliases


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything torch.load(weights_only=True) could not read back (numpy arrays, objects)."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN_SCALARS):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where}: a {type(obj).__name__} cannot go into training_state.pt; use tensors, numbers, "
        f"strings, None, lists and dicts (convert numpy arrays with torch.from_numpy or .tolist())"
    )


def _step_and_epoch(step: int | None, epoch: float | None, state: dict | None) -> tuple[int, float | None]:
    state = state or {}
    if step is None:
        step = state["step"] if isinstance(state.get("step"), int) else 0
    if epoch is None and isinstance(state.get("epoch"), (int, float)):
        epoch = float(state["epoch"])
    return int(step), (None if epoch is None else float(epoch))


def _json_bytes(obj: Any, name: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be written as JSON ({e})") from e


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class _RecordingWriter:
    """File wrapper that keeps the OSError torch.save turns into an opaque RuntimeError."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(state: dict, path: Path) -> None:
    with open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(state, writer)
        except Exception as e:
            if writer.error is not None:
                raise writer.error from e
            raise


def _errno_of(e: BaseException) -> int | None:
    """errno of an OSError, or of the '(os error N)' safetensors' Rust writer puts in its message."""
    if isinstance(e, OSError):
        return e.errno
    match = re.search(r"os error (\d+)", str(e))
    return int(match.group(1)) if match else None


def _fsync_and_hash(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory for fsync; NTFS journals renames.
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- load


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
    state that is not plain data.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    manifest = read_manifest(path)
    _verify_files(path, manifest["files"])
    model_config = _read_json(path / "config.json")
    run_config = _read_json(path / "run_config.json") if "run_config.json" in manifest["files"] else None
    state_dict = _read_weights(path / "model.safetensors", map_location)
    training_state = None
    if with_training_state:
        if "training_state.pt" not in manifest["files"]:
            raise CheckpointError(f"{path}: has no training_state.pt (saved without it; cannot resume from it)")
        training_state = _read_training_state(path / "training_state.pt", map_location)
    return Checkpoint(path=path, model_config=model_config, state_dict=state_dict,
                      tokenizer_file=path / "tokenizer.json", run_config=run_config,
                      training_state=training_state)


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
        elif _sha256(file) != entry["sha256"]:
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
