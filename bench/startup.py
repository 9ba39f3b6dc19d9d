"""Time to the first optimizer step: from `lmforge train` starting to its first step done.

The issue's workload (GPT-2 4 x 256, context 256, vocabulary 8192, batch 8) through the real
command line, `python -m lmforge train CONFIG`, in a fresh process each round; the clock runs
from just before the process is spawned to the moment the first step's line lands in
metrics.jsonl (polled every 5 ms), so it covers interpreter start, imports, config, data,
model, optimizer and the first forward/backward/step. The matmul peak for MFU is cached per
machine (train/flops.py), as on any run after the first.

    python bench/startup.py           # BENCH_ROUNDS=3
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

from common import BENCH_DIR, ROOT, ROUNDS, WORKLOAD, log, machine, median, shakespeare_data, write_summary


def first_step_seconds(config: str, name: str) -> float:
    run_dir = BENCH_DIR / "startup-runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    metrics = run_dir / "metrics.jsonl"
    command = [sys.executable, "-m", "lmforge", "train", config, f"run.name={name}", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    while seen is None and proc.poll() is None:
        if metrics.exists() and '"event": "train"' in metrics.read_text(encoding="utf-8"):
            seen = time.perf_counter() - start
        else:
            time.sleep(0.005)
    _, err = proc.communicate()
    if seen is None:
        raise RuntimeError(f"lmforge train logged no step (exit {proc.returncode}):\n{err}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return seen


def main() -> None:
    data = shakespeare_data()
    config = BENCH_DIR / "startup.yaml"
    config.write_text(
        f"model: {{kind: gpt, preset: null, n_layer: {WORKLOAD['n_layer']}, n_head: {WORKLOAD['n_head']}, "
        f"n_embd: {WORKLOAD['n_embd']}, context: {WORKLOAD['context']}, dropout: 0.0}}\n"
        f"data: {{path: {data}}}\n"
        f"train: {{task: lm, batch_size: {WORKLOAD['batch_size']}, max_steps: 1, log_every: 1, eval_every: 1000000,"
        f" eval_batches: 1, sample_tokens: 0, device: cpu}}\n"
        f"run: {{out_dir: {BENCH_DIR / 'startup-runs'}, name: startup}}\n", encoding="utf-8")
    log(f"bench startup | {machine()} | {ROUNDS} rounds")
    first_step_seconds(str(config), "startup-warm")  # file cache, peak-FLOPs cache
    seconds = []
    for r in range(1, ROUNDS + 1):
        seconds.append(first_step_seconds(str(config), f"startup-{r}"))
        log(f"lmforge train first step: {seconds[-1]:.2f} s from process start   (round {r}/{ROUNDS})")
    lines = ["## startup: `lmforge train` on the workload, process start -> first optimizer step done",
             f"median {median(seconds):.2f} s over {ROUNDS} fresh processes (target <= 2 s); "
             f"rounds: {', '.join(f'{s:.2f}' for s in seconds)}", f"machine: {machine()}"]
    write_summary("startup", lines)
    for s in seconds:
        log(f"lmforge startup: {s:.2f} s to the first optimizer step")


if __name__ == "__main__":
    sys.exit(main())
