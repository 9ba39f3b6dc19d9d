"""Shared fixtures: a small Shakespeare token store and tiny run configs, built in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmforge.commands.quickstart import bundled_corpus

# One intra-op thread in this process and (through the environment) in the processes the tests
# start. The models here are tiny and the cores few and shared: a second OpenMP thread mostly
# spins waiting for the first, which made in-process training runs several times slower on a
# busy machine. tests/ops/test_kernel_threads.py runs the kernels' parallel loops on two threads.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

TINY_MODEL = {"preset": None, "n_layer": 2, "n_head": 2, "n_embd": 32, "context": 32}


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> Path:
    """The first ~60k characters of tiny Shakespeare, BPE 384, prepared for `lm`."""
    from lmforge.data.prepare import prepare
    from lmforge.base.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("lm_data")
    corpus = root / "corpus.txt"
    corpus.write_text(bundled_corpus().read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    tokenizer = train_tokenizer([corpus], kind="bpe", vocab_size=384, out_dir=root / "tok")
    prepare("lm", [corpus], tokenizer, root / "data", val_fraction=0.1, seed=1, show_progress=False)
    return root / "data"


def tiny_run(data_dir: Path, out_dir: Path, **train) -> dict:
    """A base config dict for a tiny GPT run in `out_dir`."""
    settings = {"batch_size": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, "eval_every": 4,
                "eval_batches": 2, "sample_tokens": 0, "seed": 7}
    settings.update(train)
    return {"model": dict(TINY_MODEL), "data": {"path": str(data_dir)}, "train": settings,
            "run": {"out_dir": str(out_dir), "name": "tiny"}}
