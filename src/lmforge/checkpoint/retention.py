"""Checkpoint retention: cleaning leftovers of interrupted saves, keeping the newest epochs,
and picking the newest complete checkpoint to resume from."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmforge.base.files import fsync_dir, remove_path
from lmforge.checkpoint.format import CheckpointError
from lmforge.checkpoint.load import read_manifest

_LEFTOVER_RE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)")
_EPOCH_RE = re.compile(r"epoch-(\d+)")


def clean_stale_temp(checkpoints_dir: Path) -> list[Path]:
    """Remove ``.*.tmp-*`` / ``.*.old-*`` / ``.*.del-*`` leftovers of interrupted saves.

    A complete ``.{name}.old-<pid>`` whose ``{name}`` is missing (crash between the two
    renames) is renamed back to ``{name}`` instead. Returns the folders so restored.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    leftovers = [(m, p) for p in checkpoints_dir.iterdir() if (m := _LEFTOVER_RE.fullmatch(p.name))]
    restored = []
    for name in sorted({m["name"] for m, _ in leftovers if m["kind"] == "old"}):
        dest = checkpoints_dir / name
        if os.path.lexists(dest):
            continue
        complete = [(step, p) for m, p in leftovers
                    if m["kind"] == "old" and m["name"] == name and (step := _complete_step(p)) is not None]
        if complete:
            os.rename(max(complete)[1], dest)
            restored.append(dest)
    if restored:
        fsync_dir(checkpoints_dir)
    for _, p in leftovers:
        remove_path(p)
    return restored


def prune_epochs(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``epoch-N`` folders (by numeric N); returns those deleted.

    ``last``, ``best`` and anything not named ``epoch-<digits>`` are never touched.
    """
    if keep < 0:
        raise ValueError(f"keep: must be >= 0, got {keep}")
    checkpoints_dir = Path(checkpoints_dir)
    epochs = sorted(_epoch_dirs(checkpoints_dir))
    doomed = [p for _, p in epochs[: max(len(epochs) - keep, 0)]]
    for p in doomed:
        # Rename first so a crash mid-delete leaves a hidden leftover, not a broken epoch-N.
        trash = checkpoints_dir / f".{p.name}.del-{os.getpid()}"
        os.rename(p, trash)
        remove_path(trash)
    return doomed


def find_latest(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint among ``last`` and ``epoch-*`` with the highest manifest step.

    Ties go to ``last``, then to the higher epoch. Hidden temp/old folders are never
    considered. None when there is none.
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    candidates = _epoch_dirs(checkpoints_dir) + [(float("inf"), checkpoints_dir / "last")]
    best: tuple[tuple[int, float], Path] | None = None
    for n, p in candidates:
        step = _complete_step(p)
        if step is not None and (best is None or (step, n) > best[0]):
            best = ((step, n), p)
    return None if best is None else best[1]


def _epoch_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    return [(int(m.group(1)), p) for p in checkpoints_dir.iterdir()
            if p.is_dir() and (m := _EPOCH_RE.fullmatch(p.name))]


def _complete_step(path: Path) -> int | None:
    """The manifest step of ``path`` if it is a complete checkpoint folder, else None."""
    try:
        return read_manifest(path)["step"] if path.is_dir() else None
    except CheckpointError:
        return None
