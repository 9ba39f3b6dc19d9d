"""`make gpu-check`: everything that needs a GPU, in one command of at most 8 minutes.

1. The CUDA tests (tests/gpu, marker `cuda`): bf16 and fp16 autocast, the fused AdamW path that
   keeps a step's numbers on the device until a log step reads them, flash attention against
   the math path, torch.compile, generation, a one-process nccl job. Bounded to TEST_SECONDS.
2. Training tokens/s at GPT-2 124M (12 layers, width 768, context 1024, vocabulary 50,257,
   batch GPU_BATCH, bf16 autocast): `lmforge train` against transformers' Trainer +
   `GPT2LMHeadModel` with `bf16=True`, each in its own worker process, interleaved for
   BENCH_GPU_ROUNDS rounds (default 2), with each side's peak CUDA memory, and MFU against the
   GPU's bf16 peak measured here (an 8192^3 bf16 matrix product).

Without CUDA only the CPU part runs: the tests are collected (and skip), and the benchmark's
machinery runs once at a tiny size on the CPU, so the script is known to work before a GPU
machine is at hand; the table then says the GPU numbers are not measured. The table is printed
and kept in runs/bench/gpu_check.md; the run prints how long it took.

    python bench/gpu_check.py      # BENCH_GPU_ROUNDS=2 BENCH_GPU_STEPS=10 BENCH_GPU_BATCH=8
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from common import ROOT, Worker, interleave, log, machine, median, paired_ratio, write_summary

ROUNDS = int(os.environ.get("BENCH_GPU_ROUNDS", "2"))
STEPS = int(os.environ.get("BENCH_GPU_STEPS", "10"))
GPU_BATCH = int(os.environ.get("BENCH_GPU_BATCH", "8"))
WARMUP = 3
TEST_SECONDS = 270  # the tests' share of the 8 minutes; the benchmark gets the rest
GPT2_SMALL = dict(n_layer=12, n_head=12, n_embd=768, context=1024)
CPU_DRY_RUN = dict(n_layer=2, n_head=2, n_embd=64, context=64)


def run_cuda_tests() -> dict:
    """pytest tests/gpu in a child process; its summary counts and the tail of its output."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rfEs",
               "tests/gpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_SECONDS)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as err:
        output, code = f"{err.stdout or ''}\ntimed out after {TEST_SECONDS} s", -1
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    return {"code": code, "counts": counts, "tail": output[-4000:]}


def side_runner(kind: str, device: str, **kwargs):
    """bench/train.py's lmforge or Trainer runner; each round returns rates and peak memory."""
    import torch

    import train
    from nanogpt_peer import peak_mib

    run = getattr(train, f"{kind}_runner")(device=device, **kwargs)

    def measure(steps: int) -> dict:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rates = run(steps)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_mib()
        return {"rates": rates, "peak_mib": peak}

    return measure


def bf16_peak(device: str) -> float:
    """GFLOP/s of a bf16 matrix product: 8192^3 on a GPU (its steady rate), 2048^3 on a CPU."""
    import torch

    from lmforge.train.flops import time_matmul

    return time_matmul(8192 if device == "cuda" else 2048, 1.0, device=device, dtype=torch.bfloat16) / 1e9


def race(device: str, data: str, model: dict, batch: int, steps: int) -> dict:
    common = dict(data=data, model=model, batch=batch, warmup=WARMUP, device=device)
    workers = {"lmforge": Worker("gpu_check:side_runner", kind="lmforge", precision="bf16", **common),
               "transformers Trainer": Worker("gpu_check:side_runner", kind="trainer", bf16=True, **common)}
    peaks: dict[str, float] = {}

    def side(name: str, w: Worker):
        def run() -> list[float]:
            result = w(steps=steps)
            peaks[name] = max(peaks.get(name, 0.0), result["peak_mib"])
            return result["rates"]
        return run

    try:
        rates = interleave({n: side(n, w) for n, w in workers.items()}, ROUNDS, "tokens/s",
                           label=lambda n: "lmforge train (gpu-check)" if n == "lmforge" else n)
    finally:
        for w in workers.values():
            w.close()
    return {"rates": {n: median(r) for n, r in rates.items()}, "peaks": peaks}


def report(tests: dict, device: str, result: dict, shape: dict, peak: float, seconds: float) -> list[str]:
    from lmforge.models.gpt import GPTConfig, flops_per_token

    measured, model, batch, vocab = device == "cuda", shape["model"], shape["batch"], shape["vocab"]
    flops = flops_per_token(GPTConfig(vocab_size=vocab, **model))
    counts = ", ".join(f"{n} {w}" for w, n in tests["counts"].items()) or "no summary"
    lines = ["## gpu-check" + ("" if measured else ": no CUDA device, the CPU part only (GPU numbers not measured)"),
             f"CUDA tests (tests/gpu): {counts}; exit code {tests['code']}", "",
             f"| training, {model['n_layer']}x{model['n_embd']}, context {model['context']}, vocabulary {vocab:,},"
             f" batch {batch}, bf16, {device} | tokens/s (median) | MFU of the bf16 peak | peak memory | ratio |",
             "|---|---:|---:|---:|---:|"]
    for name, rate in result["rates"].items():
        ratio = f"{paired_ratio('lmforge', name):.2f}x" if name != "lmforge" else ""
        lines.append(f"| {name} | {rate:,.0f} | {flops * rate / (peak * 1e9):.1%} | "
                     f"{result['peaks'][name] / 1024:.2f} GB | {ratio} |")
    lines += [f"bf16 peak: {peak:,.0f} GFLOP/s ({'8192' if measured else '2048'}^3 matmul on {device}); "
              "ratio: lmforge / that row, the median of per-round ratios",
              f"took {seconds / 60:.1f} min; machine: {machine()}"]
    if measured:
        import torch

        lines.append(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    return lines


def main() -> int:
    import torch

    from lmforge.data.store import read_meta
    from scale import gpt2_vocab_data

    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"gpu-check on {device} | {machine()}")
    tests = run_cuda_tests()
    log(tests["tail"])
    data = gpt2_vocab_data()
    model, batch, steps = (GPT2_SMALL, GPU_BATCH, STEPS) if device == "cuda" else (CPU_DRY_RUN, 2, 2)
    peak = bf16_peak(device)
    result = race(device, str(data), model, batch, steps)
    shape = dict(model=model, batch=batch, vocab=int(read_meta(data)["vocab_size"]))
    write_summary("gpu_check", report(tests, device, result, shape, peak, time.perf_counter() - start))
    return 0 if tests["code"] in (0, 5) else 1  # 5: pytest collected nothing to run


if __name__ == "__main__":
    sys.exit(main())
