"""Outputs never destroy what they do not own: links, inputs, other kinds of folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, prune_epochs, save_checkpoint


@pytest.fixture()
def tok_file(tmp_path: Path) -> Path:
    from lmforge.base.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus for a small tokenizer\n" * 20, encoding="utf-8")
    return train_tokenizer([corpus], kind="bpe", vocab_size=280, out_dir=tmp_path / "tok", show_progress=False)


def _save(path: Path, tok_file: Path, value: float) -> Path:
    return save_checkpoint(path, model_state={"w": torch.full((2, 2), value)},
                           model_config={"model_type": "gpt"}, tokenizer_file=tok_file, step=int(value))


def test_saving_over_a_symlinked_checkpoint_replaces_the_link_not_its_target(tmp_path: Path, tok_file: Path):
    target = _save(tmp_path / "elsewhere" / "kept", tok_file, 1.0)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.symlink(target, checkpoints / "last")
    _save(checkpoints / "last", tok_file, 2.0)
    assert not (checkpoints / "last").is_symlink()
    assert float(load_checkpoint(checkpoints / "last").state_dict["w"][0, 0]) == 2.0
    assert float(load_checkpoint(target).state_dict["w"][0, 0]) == 1.0  # manifest and weights intact
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last"]


def test_pruning_a_symlinked_epoch_removes_the_link_only(tmp_path: Path, tok_file: Path):
    target = _save(tmp_path / "elsewhere" / "epoch", tok_file, 1.0)
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    os.symlink(target, checkpoints / "epoch-1")
    _save(checkpoints / "epoch-2", tok_file, 2.0)
    assert prune_epochs(checkpoints, keep=1) == [checkpoints / "epoch-1"]
    assert load_checkpoint(target).state_dict["w"].shape == (2, 2)
