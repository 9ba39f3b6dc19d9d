"""Adapting a model end to end: a run with activation checkpointing logs the losses of one without
(dropout on) and says what it saves; train.trainable=last_blocks:1 on an lm run leaves the rest
of the GPT bitwise unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.checkpoint import load_checkpoint
from lmforge.train.loop import train


@pytest.mark.slow
def test_a_run_with_checkpointing_logs_the_same_losses_and_says_what_it_saves(lm_data, tmp_path, capsys):
    runs = {}
    for on in (False, True):
        cfg = tiny_run(lm_data, tmp_path, max_steps=4, activation_checkpointing=on)
        cfg["model"]["dropout"] = 0.1
        cfg["run"]["name"] = f"ac-{on}"
        result = train(load_config(None, base=cfg))
        runs[on] = [e["loss"] for e in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
                    if e["event"] in ("train", "eval")]
    header = capsys.readouterr().out
    assert "activation checkpointing: 2 blocks keep their input only" in header
    assert len(runs[True]) == len(runs[False]) >= 3
    for a, b in zip(runs[True], runs[False]):
        assert abs(a - b) <= 1e-6


@pytest.mark.slow
def test_an_lm_run_with_trainable_last_blocks_leaves_the_rest_unchanged(lm_data, tmp_path, capsys):
    start = train(load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=2)), quiet=True)
    cfg = tiny_run(lm_data, tmp_path, max_steps=4, trainable="last_blocks:1")
    cfg["model"] = {"init_from": str(start.run_dir / "checkpoints" / "last")}
    cfg["run"]["name"] = "tuned"
    tuned = train(load_config(None, base=cfg))
    assert "trainable (" in capsys.readouterr().out
    before = load_checkpoint(start.run_dir / "checkpoints" / "last").state_dict
    after = load_checkpoint(tuned.run_dir / "checkpoints" / "last").state_dict
    for name, value in before.items():
        frozen = name.startswith(("transformer.h.0.", "transformer.wpe."))
        assert torch.equal(value, after[name]) == frozen, name
