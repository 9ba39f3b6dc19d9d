"""Saving a checkpoint atomically: temp folder, fsync, manifest last, rename into place.

Saving never exposes a half-written folder under a checkpoint name. Files go to a sibling
``.{name}.tmp-<pid>`` and are fsynced, the manifest last, then the folder; an existing
checkpoint is renamed aside to ``.{name}.old-<pid>``, the new one renamed in, the parent
fsynced, and only then the old one removed. A crash at any moment therefore leaves the old
or the new checkpoint complete, plus leftovers that ``retention.clean_stale_temp`` removes; if
the crash fell between the two renames the ``.old`` folder is the only complete copy and
``clean_stale_temp`` puts it back.

Disk full (ENOSPC, EDQUOT, or EFBIG from RLIMIT_FSIZE) becomes a CheckpointError with the
temp folder removed and the previous checkpoint untouched. EFBIG is only returned when
SIGXFSZ is ignored, otherwise the kernel kills the process; CPython ignores it at startup,
and ``format.ignore_sigxfsz()`` makes sure of it for embedded interpreters.

Nothing is pickled: weights use safetensors and training_state.pt holds plain data only.
Crash tests use the fault points of ``lmforge.base.faults``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from lmforge.base.faults import fault_point
from lmforge.base.version import __version__
from lmforge.base.files import fsync_dir, remove_path, sha256_of
from lmforge.models.lora import adapter_state
from lmforge.checkpoint.format import DISK_FULL_ERRNOS, MANIFEST, MANIFEST_FORMAT, PLAIN_SCALARS, TOKENIZER_EXTRAS, CheckpointError


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
    tokenizer_extras: Sequence[Path] = (),
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
    tensors, aliases = _unique_tensors(_saved_part(model_state, model_config))
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
    writers += [(Path(extra).name, _copier(Path(extra))) for extra in tokenizer_extras]
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
        fsync_dir(tmp)
        fault_point("ckpt_after_flush", path.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        code = _errno_of(e)
        if code in DISK_FULL_ERRNOS:
            raise CheckpointError(
                f"disk full while saving checkpoint {path} (writing {current}: {os.strerror(code)}, "
                f"{errno.errorcode.get(code, code)}); "
                f"the previous checkpoint is untouched; free some space and save again"
            ) from e
        raise
    _swap_in(tmp, path)
    return path


def _saved_part(state: dict[str, torch.Tensor], model_config: dict) -> dict[str, torch.Tensor]:
    """What the folder holds of the weights: all of them, or for a model with low-rank adapters (a
    "lora" entry in its config) the adapters and the modules it trains in full; the frozen base
    stays where the entry's path and sha256 name it."""
    return adapter_state(state, model_config["lora"]) if "lora" in model_config else state


def _copier(extra: Path) -> Callable[[Path], None]:
    """The writer of one of `TOKENIZER_EXTRAS` (an imported model's tokenizer_config.json with its chat
    template, generation_config.json, special_tokens_map.json), kept under its own name."""
    if extra.name not in TOKENIZER_EXTRAS or not extra.is_file():
        raise ValueError(f"{extra}: not a tokenizer file a checkpoint keeps ({', '.join(TOKENIZER_EXTRAS)})")
    return lambda p: _write_bytes(p, extra.read_bytes())


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by the complete folder ``tmp`` so that a crash never loses both."""
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    moved = os.path.lexists(path)
    if moved:
        remove_path(old)
        os.rename(path, old)  # a link is renamed itself: its target is never written or deleted
    fault_point("ckpt_after_rename", path.name)
    try:
        os.rename(tmp, path)
    except BaseException:
        if moved:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if moved:
        if not os.path.islink(old):
            (old / MANIFEST).unlink(missing_ok=True)  # from here on nothing would restore it
        fault_point("ckpt_during_cleanup", path.name)
        remove_path(old)


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
    if isinstance(obj, torch.Tensor) or isinstance(obj, PLAIN_SCALARS):
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
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}
