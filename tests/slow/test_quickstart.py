"""`lmforge quickstart` end to end on a short budget: it learns the play's shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quickstart_learns_speaker_lines(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", str(tmp_path / "qs"),
                             "--minutes", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validation loss" in result.stdout and "report:" in result.stdout
    events = [json.loads(line) for line in (tmp_path / "qs" / "gpt" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["loss"] < 5.0  # random init over 2048 tokens is 7.6
    samples = [e for e in events if e["event"] == "samples"][-1]["samples"]
    assert len(samples) == 3
    assert all(":\n" in s["prompt"] + s["text"] for s in samples)
    assert (tmp_path / "qs" / "gpt" / "report.html").exists()


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(lm_data: Path, tmp_path: Path):
    from conftest import tiny_run
    from lmforge.base.config import load_config
    from lmforge.train.loop import train

    losses = {}
    for compile_ in (False, True):
        base = tiny_run(lm_data, tmp_path, max_steps=6, compile=compile_)
        base["run"]["name"] = f"compile-{compile_}"
        run_dir = train(load_config(None, base=base), quiet=True).run_dir
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compile_] = [e["loss"] for e in events if e["event"] == "train"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
