"""What only a CUDA device can check: autocast in bf16 and fp16, the fused AdamW path that keeps
its numbers on the device, flash attention, torch.compile, generation and a one-process nccl
job. Every test skips without CUDA; `make gpu-check` runs them first on a GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

STEPS = dict(max_steps=8, lr=1e-3, warmup_steps=0, schedule="constant", log_every=4, eval_every=8)


def _train(lm_data: Path, out: Path, name: str, **train):
    import lmforge

    config = tiny_run(lm_data, out, **{**STEPS, "device": "cuda", **train})
    config["run"]["name"] = name
    return lmforge.train_model(config, show_progress=False)


def _train_losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_with_finite_falling_losses(lm_data, tmp_path, precision):
    result = _train(lm_data, tmp_path, precision, precision=precision, max_steps=16)
    losses = _train_losses(result.run_dir)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    assert (result.run_dir / "checkpoints" / "last" / "model.safetensors").is_file()


def test_fused_adamw_keeps_step_numbers_on_the_device_and_matches_the_cpu(lm_data, tmp_path):
    from lmforge.base.config import TrainConfig
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.train.optim import build_optimizer
    from lmforge.train.update import defers_host_sync

    cuda = torch.device("cuda")
    model = GPT(GPTConfig(vocab_size=384, context=32, n_layer=1, n_head=2, n_embd=32)).to(cuda)
    assert defers_host_sync(cuda, build_optimizer(model, TrainConfig(), cuda))
    # the same run on both devices, TF32 off: the deferred reads log what the CPU logs
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = _train_losses(_train(lm_data, tmp_path, "gpu", lr=1e-4).run_dir)
    cpu = _train_losses(_train(lm_data, tmp_path, "cpu", lr=1e-4, device="cpu").run_dir)
    assert len(gpu) == len(cpu) == 2
    assert gpu == pytest.approx(cpu, rel=2e-3)


def test_flash_attention_matches_the_math_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.ops.attention import attend

    torch.manual_seed(0)
    qkv = torch.randn(2, 256, 3 * 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = attend(qkv, 4, causal=True)
        flash.sum().backward()
    flash_grad, qkv.grad = qkv.grad, None
    with sdpa_kernel(SDPBackend.MATH):
        math_out = attend(qkv, 4, causal=True)
        math_out.sum().backward()
    torch.testing.assert_close(flash.float(), math_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash_grad.float(), qkv.grad.float(), atol=5e-2, rtol=5e-2)


def test_compiled_training_runs_and_learns(lm_data, tmp_path):
    losses = _train_losses(_train(lm_data, tmp_path, "compiled", compile=True, precision="bf16",
                                  max_steps=16).run_dir)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_generation_on_cuda_is_repeatable_and_its_logits_match_the_cpu(lm_data, tmp_path):
    import lmforge

    run = _train(lm_data, tmp_path, "gen", max_steps=16).run_dir
    prompts = ["ROMEO:", "First Citizen:\nWe"]
    on_gpu = lmforge.load(run, device="cuda")
    first = on_gpu.generate(prompts, max_new_tokens=24, temperature=0)
    assert first == on_gpu.generate(prompts, max_new_tokens=24, temperature=0)
    assert all(len(text) > 0 for text in first)
    sampled = on_gpu.generate(prompts, max_new_tokens=24, temperature=0.8, top_k=40, seed=3)
    assert sampled == on_gpu.generate(prompts, max_new_tokens=24, temperature=0.8, top_k=40, seed=3)
    ids = torch.randint(0, 384, (2, 16))
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        gpu_logits = on_gpu.module(ids.cuda()).float().cpu()
        cpu_logits = lmforge.load(run, device="cpu").module(ids)
    torch.testing.assert_close(gpu_logits, cpu_logits, atol=1e-3, rtol=1e-3)


def test_one_process_nccl_job_trains(lm_data, tmp_path):
    config = tmp_path / "run.yaml"
    settings = tiny_run(lm_data, tmp_path, **{**STEPS, "device": "cuda", "strategy": "ddp"})
    settings["run"]["name"] = "nccl"
    config.write_text(yaml.safe_dump(settings))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "lmforge", "train", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_FAULT")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: max_steps at step 8" in result.stdout
    losses = _train_losses(tmp_path / "nccl")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
