"""A Llama-class model through `lmforge train`: a kill -9 then --resume ends bitwise where an
uninterrupted run ends (DDP and the quickstart: tests/slow/test_llama_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
import yaml

import forked_cli
from lmforge.checkpoint import load_checkpoint

LLAMA = {"kind": "llama", "preset": None, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "context": 32,
         "attention_bias": "qkv", "dropout": 0.1}
SETTINGS = {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 100, "eval_batches": 1,
            "save_every": 3, "sample_tokens": 0, "seed": 7, "max_steps": 7}


def _config(data: Path, out: Path, name: str, model: dict | None = None, **train) -> Path:
    cfg = {"model": {**LLAMA, **(model or {})}, "data": {"path": str(data)}, "train": {**SETTINGS, **train},
           "run": {"out_dir": str(out), "name": name}}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _lmforge(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`lmforge ARGS` in a process of its own, forked without the interpreter's startup (forked_cli)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_FAULT")}
    environ.update(env, OMP_NUM_THREADS="1")
    return forked_cli.run(["-m", "lmforge", *args], cwd, environ)


def _losses(run: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if e["event"] == "train"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last").state_dict


def test_kill_9_then_resume_equals_the_uninterrupted_run_bitwise(lm_data: Path, tmp_path: Path):
    straight = _lmforge(["train", str(_config(lm_data, tmp_path, "straight")), "--quiet"], tmp_path)
    assert straight.returncode == 0, straight.stderr
    killed = _lmforge(["train", str(_config(lm_data, tmp_path, "killed")), "--quiet"], tmp_path,
                      LMFORGE_FAULT="after_step_5")
    assert killed.returncode == 137, killed.stderr
    assert json.loads((tmp_path / "killed/checkpoints/last/manifest.json").read_text())["step"] == 3
    resumed = _lmforge(["train", "--resume", str(tmp_path / "killed"), "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight") and len(_losses(tmp_path / "straight")) == 7
    want, got = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert want.keys() == got.keys() and "model.layers.0.self_attn.k_proj.bias" in want
    for name in want:
        assert torch.equal(want[name], got[name]), name
