"""Resuming at step N seeks to its data position: it reads no training samples of steps 1..N."""

from __future__ import annotations

from pathlib import Path

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.data.datasets import PackedLMDataset
from lmforge.train.loop import train


def test_resume_reads_only_the_samples_of_the_steps_it_runs(lm_data: Path, tmp_path: Path, monkeypatch):
    base = tiny_run(lm_data, tmp_path, max_steps=12, save_every=12, eval_every=100, batch_size=4)
    train(load_config(None, base=base), quiet=True)
    read: list[int] = []
    real = PackedLMDataset.__getitem__

    def counting(self, i):
        if self.store.split == "train":
            read.append(i)
        return real(self, i)

    monkeypatch.setattr(PackedLMDataset, "__getitem__", counting)
    run_dir = tmp_path / "tiny"
    resumed = load_config(None, base={**base, "train": {**base["train"], "max_steps": 13}})
    result = train(resumed, resume_from=run_dir / "checkpoints" / "last", quiet=True)
    assert result.steps == 13
    assert len(read) == 4  # one step of batch 4: nothing replayed from the 12 steps before
