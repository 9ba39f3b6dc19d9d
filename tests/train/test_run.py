"""Training as a library call: from a worker thread, without touching the process's signal
handlers unless asked, silent when asked, with the report written; FSDP needs a recent torch."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.checkpoint import load_checkpoint
from lmforge.train import loop
from lmforge.train.loop import train
from lmforge.train.run import run_training


def test_train_runs_in_a_worker_thread(lm_data: Path, tmp_path: Path):
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=3, eval_every=3))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    results, errors = [], []

    def work() -> None:
        try:
            results.append(train(cfg, quiet=True, handle_signals=True))  # a thread cannot: silently not
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors
    (result,) = results
    assert result.reason == "max_steps" and result.steps == 3 and result.exit_code == 0
    state = load_checkpoint(result.run_dir / "checkpoints" / "last", with_training_state=True).training_state
    assert state["loop"]["step"] == 3
    # one per stateful part (no fp16 scaler)
    assert set(state) == {"loop", "optimizer", "rng", "data", "epochs", "world_size"}
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_run_training_without_progress_prints_nothing_and_writes_the_report(lm_data: Path, tmp_path: Path, capfd):
    base = tiny_run(lm_data, tmp_path, max_steps=2, eval_every=2)
    result = run_training(base, ["train.lr=1e-3", "run.name=silent"], show_progress=False)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert result.reason == "max_steps" and result.report == tmp_path / "silent" / "report.html"
    assert result.report.is_file()
    assert "step 2/2" in (result.run_dir / "train.log").read_text()
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["train"]["lr"] == 1e-3
    resumed = run_training(None, ["train.max_steps=3"], resume=result.run_dir, show_progress=False)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "") and resumed.steps == 3
    assert "train.max_steps: 2 -> 3" in (result.run_dir / "train.log").read_text()  # the note, in the log only


def test_handle_signals_stops_gracefully_and_restores_the_handlers(lm_data: Path, tmp_path: Path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)

    def terminate_after_step_2(name: str, detail=None) -> None:
        if name == "after_step_2":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(loop, "fault_point", terminate_after_step_2)
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=20, eval_every=100))
    result = train(cfg, quiet=True, handle_signals=True)
    assert result.reason == "signal" and result.steps == 3 and result.exit_code == 128 + signal.SIGTERM
    assert load_checkpoint(result.run_dir / "checkpoints" / "last").state_dict  # `last` saved at the stop
    assert signal.getsignal(signal.SIGTERM) == before
    end = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert end["event"] == "end" and end["reason"] == "signal"


def test_fsdp_on_a_torch_without_fully_shard_fails_at_setup(lm_data: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    cfg = load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=2, strategy="fsdp"))
    with pytest.raises(ValueError, match=r"train.strategy=fsdp needs torch >= 2.6 .*torch 2.5.1\+cu121 is installed"):
        train(cfg, quiet=True)
    assert not cfg.run_dir.exists()  # nothing was started
