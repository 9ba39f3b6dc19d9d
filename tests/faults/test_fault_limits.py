"""Sizes read from a file are checked against the weights before anything is allocated."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import CheckpointError, load_model, save_checkpoint
from lmforge.models.gpt import GPT, GPTConfig


@pytest.fixture(scope="module")
def small_checkpoint_parts(tmp_path_factory) -> tuple[dict, dict, Path]:
    folder = tmp_path_factory.mktemp("limits")
    corpus = folder / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 50, encoding="utf-8")
    tok_file = train_tokenizer([corpus], kind="bpe", vocab_size=300, out_dir=folder / "tok", show_progress=False)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, context=32, vocab_size=300)
    state = GPT(config).state_dict()
    return state, {"model_type": "gpt", **config.to_dict()}, tok_file


def _hostile(tmp_path: Path, parts, **changes) -> Path:
    state, arch, tok_file = parts
    return save_checkpoint(tmp_path / "ckpt", model_state=state, model_config={**arch, **changes},
                           tokenizer_file=tok_file)


@pytest.mark.parametrize("changes", [{"n_embd": 10**9}, {"n_layer": 48}, {"n_layer": 2},
                                     {"vocab_size": 10**9}, {"context": 10**12}])
def test_a_config_json_the_weights_do_not_back_is_refused_before_allocating(
        changes: dict, small_checkpoint_parts, tmp_path: Path):
    path = _hostile(tmp_path, small_checkpoint_parts, **changes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(path)
    assert time.perf_counter() - started < 5
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB before the refusal"


def test_a_checkpoint_whose_config_fits_loads(small_checkpoint_parts, tmp_path: Path):
    model, ckpt = load_model(_hostile(tmp_path, small_checkpoint_parts))
    assert ckpt.model_config["n_embd"] == 16
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_refusal_names_the_mismatched_tensor(small_checkpoint_parts, tmp_path: Path):
    path = _hostile(tmp_path, small_checkpoint_parts, n_embd=32)
    with pytest.raises(CheckpointError, match=r"wrong shape: transformer\.\w+.*config\.json needs"):
        load_model(path)
    assert json.loads((path / "config.json").read_text())["n_embd"] == 32
