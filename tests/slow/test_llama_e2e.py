"""A Llama-class model end to end: two DDP or FSDP processes equal one process with the same
global batch, and `lmforge quickstart --arch llama` learns the play's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.test_distributed import TORCHRUN, _run
from train.test_llama_training import _config, _lmforge, _weights


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(lm_data: Path, tmp_path: Path, strategy: str):
    """FSDP shards the block's q | k | v and gate | up weights out of their shared buffers
    (ops/joined.py): its stacked products then concatenate the shards' gathered weights."""
    # dropout off and a small constant learning rate: only float summation order may differ
    quiet = {"model": {"dropout": 0.0}, "lr": 1e-4, "warmup_steps": 0, "schedule": "constant", "max_steps": 4}
    one = _lmforge(["train", str(_config(lm_data, tmp_path, "one", batch_size=8, **quiet)), "--quiet"], tmp_path)
    assert one.returncode == 0, one.stderr
    two_config = _config(lm_data, tmp_path, "two", batch_size=4, strategy=strategy, **quiet)
    two = _run([*TORCHRUN, "-m", "lmforge", "train", str(two_config)], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 (micro 4 x accum 1 x world 2)" in two.stdout
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
def test_quickstart_arch_llama_learns(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--arch", "llama", "--out",
                             str(tmp_path / "qs"), "--minutes", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "-layer Llama for" in result.stdout
    config = json.loads((tmp_path / "qs" / "llama" / "checkpoints" / "best" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["n_kv_head"] == 2
    events = [json.loads(line) for line in (tmp_path / "qs" / "llama" / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "eval"][-1]["loss"] < 5.0  # random init over 2048 tokens is 7.6
