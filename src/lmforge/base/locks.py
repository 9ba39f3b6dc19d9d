"""One process at a time per folder: a run folder, a data folder being prepared, an export target.

`hold_folder(path, what)` takes an exclusive lock on `.NAME.lock` beside the folder (the folder
may not exist yet) for as long as the `with` block runs. A second process gets a FolderBusy
error naming the holder's pid and command. The lock is an advisory `flock` on the lock file:
the kernel drops it when its holder dies, however it dies, so the lock of a dead process is
simply taken over. Where `fcntl` is missing (Windows) the pid written in the file decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class FolderBusy(ValueError):
    """Another live process holds the folder."""


def lock_path(folder: Path) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f".{folder.name}.lock"


def _holder_text(file: Path) -> str:
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
        return f"process {info['pid']} ({info['command']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _describe_self() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "command": " ".join(["lmforge", *sys.argv[1:3]]) if sys.argv else "lmforge",
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")})


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this machine (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def hold_folder(folder: Path | str, what: str = "folder") -> Iterator[Path]:
    """Hold `folder` for the block; FolderBusy if another live process holds it."""
    file = lock_path(Path(folder))
    file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    holder = _flock(file, fcntl, what, folder) if fcntl else _pidfile(file, what, folder)
    try:
        yield file
    finally:
        with contextlib.suppress(OSError):
            file.unlink()
        if holder is not None:
            os.close(holder)


def _flock(file: Path, fcntl, what: str, folder) -> int:
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderBusy(f"{what} {folder} is in use by {_holder_text(file)}; wait for it to finish "
                             f"or stop it, then run this again") from None
        # The holder before us may have unlinked the file between our open and our lock:
        # then we locked an orphan and must start over on the file that is there now.
        try:
            same = os.stat(file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, _describe_self().encode())
            return fd
        os.close(fd)


def _pidfile(file: Path, what: str, folder) -> None:
    for _ in range(3):
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                pid = int(json.loads(file.read_text(encoding="utf-8"))["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                pid = None
            if pid is not None and pid_alive(pid):
                raise FolderBusy(f"{what} {folder} is in use by {_holder_text(file)}; wait for it to "
                                 f"finish or stop it, then run this again") from None
            with contextlib.suppress(OSError):
                file.unlink()  # the holder is dead: take its place
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_describe_self())
        return None
    raise FolderBusy(f"{what} {folder}: could not take its lock {file}")
