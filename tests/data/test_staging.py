"""Staged data folders: the swap over an existing folder, and what a killed prepare left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.data import staging
from lmforge.data.staging import move_into_place, recover_folder, staged_folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "meta.json").write_text(text)
    return path


def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch):
    out = _folder(tmp_path / "data", "old")
    tmp = _folder(tmp_path / ".data.tmp-1", "new")
    real = os.replace

    def failing(src, dst):
        if Path(src) == tmp:
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "replace", failing)
    with pytest.raises(OSError, match="rename failed"):
        move_into_place(tmp, out)
    assert (out / "meta.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.tmp-1", "data"]


def test_replacing_a_symlinked_folder_replaces_the_link_not_its_target(tmp_path: Path):
    target = _folder(tmp_path / "elsewhere", "kept")
    os.symlink(target, tmp_path / "data")
    with staged_folder(tmp_path / "data") as tmp:
        (tmp / "meta.json").write_text("new")
    assert not (tmp_path / "data").is_symlink() and (tmp_path / "data" / "meta.json").read_text() == "new"
    assert (target / "meta.json").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "elsewhere"]


def test_recovery_touches_only_leftovers_of_dead_processes(tmp_path: Path):
    dead, alive = _dead_pid(), os.getppid()
    _folder(tmp_path / f".data.tmp-{dead}", "half")
    _folder(tmp_path / f".data.tmp-{alive}", "someone else's, still running")
    _folder(tmp_path / f".other.tmp-{dead}", "another folder's")
    assert recover_folder(tmp_path / "data") == []  # a reader never deletes a lone temp folder
    notes = recover_folder(tmp_path / "data", clean=True)
    assert len(notes) == 1 and f".data.tmp-{dead}" in notes[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".data.tmp-{alive}", f".other.tmp-{dead}"]


def test_an_old_folder_beside_a_finished_swap_is_removed(tmp_path: Path):
    dead = _dead_pid()
    _folder(tmp_path / "data", "new")
    _folder(tmp_path / f".data.old-{dead}", "old")
    assert "removed" in recover_folder(tmp_path / "data")[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert (tmp_path / "data" / "meta.json").read_text() == "new"
