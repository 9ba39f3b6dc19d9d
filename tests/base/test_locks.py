"""hold_folder: one live holder per folder, named in the error; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.base.locks import FolderBusy, hold_folder, lock_path

HOLDER = """
import sys, time
from lmforge.base.locks import hold_folder
with hold_folder(sys.argv[1], "run folder"):
    print("held", flush=True)
    time.sleep(60)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path: Path):
    folder = tmp_path / "runs" / "race"
    proc = _start_holder(folder)
    try:
        with pytest.raises(FolderBusy, match=rf"run folder .*race is in use by process {proc.pid}"):
            with hold_folder(folder, "run folder"):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path: Path):
    folder = tmp_path / "race"
    proc = _start_holder(folder)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(folder).exists()  # left behind by kill -9
    with hold_folder(folder) as file:
        assert str(os.getpid()) in file.read_text()
    assert not lock_path(folder).exists()


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path: Path):
    with hold_folder(tmp_path / "x"):
        with pytest.raises(FolderBusy):
            with hold_folder(tmp_path / "x"):
                pass
    with hold_folder(tmp_path / "x"):  # released on exit
        pass


def test_without_fcntl_the_pid_decides(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)
    folder = tmp_path / "y"
    lock_path(folder).write_text('{"pid": 999999999, "command": "lmforge train", "since": "then"}')
    with hold_folder(folder):
        with pytest.raises(FolderBusy, match=f"process {os.getpid()}"):
            with hold_folder(folder):
                pass
    started = time.perf_counter()
    with hold_folder(folder):
        pass
    assert time.perf_counter() - started < 1
