"""What a resume checks: a finished run, changed data, a saved position past fewer samples; and
one process per run folder."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from lmforge.base.config import TrainConfig
from lmforge.base.locks import FolderBusy, hold_folder
from lmforge.train.data_order import DataPosition
from lmforge.train.resume import finished_detail, reached_its_end, resumed_data_lines
from lmforge.train.setup import hold_run_folder
from lmforge.train.state import DataIdentity


def _metrics(run: Path, *events: dict) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"event": "tra')
    return run


def test_a_run_is_finished_when_it_reached_its_length_and_ended_there(tmp_path: Path):
    run = _metrics(tmp_path / "a", {"event": "train", "step": 12}, {"event": "end", "step": 12, "reason": "max_steps"})
    assert reached_its_end(run, 12, 12)
    assert not reached_its_end(run, 12, 20)  # max_steps raised: it goes on
    assert not reached_its_end(_metrics(tmp_path / "b", {"event": "train", "step": 12}), 12, 12)  # killed before its end
    assert not reached_its_end(_metrics(tmp_path / "c", {"event": "end", "step": 12, "reason": "signal"}), 12, 12)
    assert not reached_its_end(_metrics(tmp_path / "d", {"event": "end", "step": 9, "reason": "max_steps"}), 12, 12)
    assert not reached_its_end(tmp_path / "none", 12, 12)
    detail = finished_detail(TrainConfig(epochs=3), tmp_path / "a", 30, 30)
    assert "finished" in detail and "train.epochs=3" in detail and "train.epochs=4" in detail


def test_changed_data_is_named_by_counts_and_hash():
    data = DataIdentity({"content_sha256": "b" * 64, "train_samples": 452, "val_samples": 30})
    assert data.changes() == []  # a checkpoint from before the data part: nothing to compare
    data.load_state_dict({"content_sha256": "a" * 64, "train_samples": 1448, "val_samples": 30})
    assert data.changes() == ["train 1,448 -> 452 samples", f"content sha256 {'a' * 12}... -> {'b' * 12}..."]
    assert data.state_dict()["train_samples"] == 452  # a checkpoint records the data as it is now
    same_counts = DataIdentity({"content_sha256": "c" * 64, "train_samples": 452, "val_samples": 30})
    same_counts.load_state_dict(data.state_dict())
    assert same_counts.changes() == [f"content sha256 {'b' * 12}... -> {'c' * 12}..."]


def test_a_position_past_fewer_samples_starts_the_next_epoch(tmp_path: Path):
    data = DataIdentity({"content_sha256": None, "train_samples": 40, "val_samples": 4})
    data.load_state_dict({"content_sha256": None, "train_samples": 90, "val_samples": 4})
    position = DataPosition(epoch=2, epoch_sample=32)
    (line,) = resumed_data_lines(data, position, 16, 40, tmp_path)
    assert "train 90 -> 40 samples" in line and "(epoch 2, sample 32)" in line and "from epoch 3" in line
    assert (position.epoch, position.epoch_sample) == (3, 0)
    unchanged = DataIdentity(data.current)
    unchanged.load_state_dict(data.current)
    assert resumed_data_lines(unchanged, DataPosition(epoch=1, epoch_sample=16), 16, 40, tmp_path) == []


def test_the_run_folder_is_held_once_per_thread_and_not_by_other_ranks(tmp_path: Path):
    run = tmp_path / "run"
    with hold_run_folder(run):
        assert json.loads((tmp_path / ".run.lock").read_text())["pid"]
        with hold_run_folder(run):  # run_training, then the train it calls
            pass
        errors = []

        def other() -> None:
            try:
                with hold_run_folder(run):
                    pass
            except FolderBusy as err:
                errors.append(str(err))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert len(errors) == 1 and f"run folder {run} is in use by process" in errors[0]
    assert not (tmp_path / ".run.lock").exists()
    with hold_folder(run, "run folder"):  # another holder: a rank other than 0 does not try
        with hold_run_folder(run, enabled=False):
            pass
        with pytest.raises(FolderBusy):
            with hold_run_folder(run):
                pass
