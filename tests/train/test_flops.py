import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.models.registry import flops_per_token, model_from_architecture
from lmforge.train import flops
from lmforge.train.loop import train


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "peak_flops.json"
    monkeypatch.setattr(flops, "CACHE", path)
    monkeypatch.delenv("LMFORGE_PEAK_FLOPS", raising=False)
    return path


def test_peaks_are_measured_once_per_dtype(cache, monkeypatch):
    measured = []
    monkeypatch.setattr(flops, "time_matmul", lambda size, seconds, device, dtype: measured.append(dtype) or
                        {torch.float32: 4e11, torch.bfloat16: 1.6e12}[dtype])
    cpu = torch.device("cpu")
    assert flops.measured_peak_flops(cpu) == 4e11
    assert flops.measured_peak_flops(cpu, torch.bfloat16) == 1.6e12
    assert flops.measured_peak_flops(cpu) == 4e11 and measured == [torch.float32, torch.bfloat16]
    flops.raise_peak(cpu, 2e12, torch.bfloat16)  # a bf16 run never moves the fp32 peak
    keys = json.loads(cache.read_text())
    assert sorted(keys.values()) == [4e11, 2e12]
    assert any(k.endswith(":mm2048") for k in keys)  # fp32 keeps the key earlier caches used


def test_configured_peak_is_used_for_mfu_and_never_cached(cache, lm_data: Path, tmp_path: Path):
    cfg = load_config(None, ["train.peak_flops=1e9"], base=tiny_run(lm_data, tmp_path, max_steps=4))
    result = train(cfg, quiet=True)
    events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    arch = json.loads((result.run_dir / "checkpoints" / "last" / "config.json").read_text())
    per_token = flops_per_token(model_from_architecture(arch).config)
    steps = [e for e in events if e["event"] == "train"]
    assert steps and all(e["mfu"] == pytest.approx(per_token * e["tokens_per_s"] / 1e9, rel=1e-3) for e in steps)
    assert not cache.exists()
