"""Writing a prepared data folder so that it is never seen half-written, and undoing a kill.

Every task's prepare writes into a hidden sibling `.NAME.tmp-PID`, fsyncs it and swaps it in
at the end: one rename when there is no NAME yet; over an existing NAME (--overwrite) two,
NAME -> `.NAME.old-PID` then `.NAME.tmp-PID` -> NAME, and the old folder is deleted. An error
removes the temp folder and puts the old one back.

A kill -9 leaves these hidden folders behind. `recover_folder` settles those of processes that
are no longer alive (the next prepare into that place calls it, and so does
`lmforge.data.store.read_meta` when a folder has no meta.json):

- `.NAME.old-PID` beside a NAME: the swap was done; the old folder is deleted;
- `.NAME.old-PID`, no NAME, and a `.NAME.tmp-PID` with its meta.json: the swap is finished (it
  only starts once the new folder is complete and synced);
- `.NAME.old-PID` and no complete new folder: the old folder is put back;
- a `.NAME.tmp-PID` alone (a kill while writing): deleted, by prepare only (`clean=True`).

Fault points (`lmforge.base.faults`): prepare_before_swap, prepare_between_renames.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmforge.base.faults import fault_point
from lmforge.base.files import fsync_dir, remove_path
from lmforge.base.locks import pid_alive


def _sibling(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{pid}"




@contextlib.contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `out_dir`; on success it replaces `out_dir`, on any error
    it is removed (and `out_dir` is as it was)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "tmp", os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_folder(tmp)
        fault_point("prepare_before_swap")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise




def fsync_folder(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir() and not p.is_symlink():  # a folder inside the output (a peft export's base)
            fsync_folder(p)
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the complete folder `tmp` to `out_dir`, replacing what is there (see the module
    docstring); the old folder is back in place if the second rename fails."""
    if os.path.lexists(out_dir):
        old = _sibling(out_dir, "old", os.getpid())
        if os.path.lexists(old):
            remove_path(old)
        os.replace(out_dir, old)
        try:
            fault_point("prepare_between_renames")
            os.replace(tmp, out_dir)
        except BaseException:
            os.replace(old, out_dir)
            raise
        remove_path(old)
    else:
        os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)


def dead_leftovers(out_dir: Path) -> dict[int, dict[str, Path]]:
    """The hidden `.NAME.tmp-PID` / `.NAME.old-PID` beside `out_dir` whose process is gone, by pid."""
    out_dir = Path(out_dir)
    prefix = f".{out_dir.name}."
    found: dict[int, dict[str, Path]] = {}
    if not out_dir.parent.is_dir():
        return found
    for path in out_dir.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        kind, _, pid = path.name[len(prefix):].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            found.setdefault(int(pid), {})[kind] = path
    return found


def recover_folder(out_dir: Path, *, clean: bool = False) -> list[str]:
    """Finish or undo the swap of a killed prepare into `out_dir`, and with `clean` delete its
    half-written temp folders (see the module docstring). Returns one note per action."""
    out_dir = Path(out_dir)
    notes: list[str] = []
    for pid, left in sorted(dead_leftovers(out_dir).items()):
        old, tmp = left.get("old"), left.get("tmp")
        try:
            if old is not None:
                notes.append(_settle_swap(out_dir, old, tmp, pid))
                if tmp is not None and not os.path.lexists(tmp):
                    tmp = None  # moved into place
            if tmp is not None and (clean or old is not None):
                remove_path(tmp)
                notes.append(f"removed {tmp}, left half-written by a prepare (pid {pid}) that was killed")
        except OSError:  # another process (a rank of the same job) settled it at the same moment
            continue
    return notes


def _settle_swap(out_dir: Path, old: Path, tmp: Path | None, pid: int) -> str:
    killed = f"a prepare --overwrite (pid {pid}) was killed while swapping folders"
    if os.path.lexists(out_dir):
        remove_path(old)
        return f"removed {old}, the folder {out_dir} replaced before {killed}"
    if tmp is not None and (tmp / "meta.json").is_file():
        os.replace(tmp, out_dir)
        remove_path(old)
        return f"finished replacing {out_dir} with the new data: {killed}"
    os.replace(old, out_dir)
    return f"restored the previous {out_dir} from {old}: {killed}"
