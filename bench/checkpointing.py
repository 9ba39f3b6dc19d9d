"""Activation checkpointing: peak memory and step time with and without it, on the `gpt2` preset.

GPT-2 small's shape (12 layers, 12 heads, 768 wide, context 1024) with the benchmark's 8192
BPE vocabulary on tiny Shakespeare, batch BATCH x 1024 tokens, fp32, `lmforge train` both times,
`train.activation_checkpointing` off and on. Each side runs in its own worker process
(interleaved A B A B, the first WARMUP steps of a round dropped); a step's rate is the
`tokens_per_s` the loop logs, and peak memory is the worker's peak resident set (ru_maxrss):
the weights, AdamW's state and the activations of the steps.

    python bench/checkpointing.py      # BENCH_ROUNDS=3 BENCH_AC_STEPS=3 BENCH_AC_BATCH=4
"""

from __future__ import annotations

import os
import sys

from common import (BENCH_DIR, ROUNDS, SEED, Worker, interleave, log, loop_runner, machine, median, paired_ratio,
                    shakespeare_data, table, write_summary)
from lora import peak_rss_mib

STEPS = int(os.environ.get("BENCH_AC_STEPS", "3"))
BATCH = int(os.environ.get("BENCH_AC_BATCH", "4"))
WARMUP = 1
SIDES = {"without checkpointing": False, "with activation checkpointing": True}


def _config(data: str, steps: int, name: str, checkpointing: bool):
    from lmforge.base.config import load_config

    return load_config(None, base={
        "model": {"preset": "gpt2"}, "data": {"path": data},
        "train": {"batch_size": BATCH, "lr": 3e-4, "warmup_steps": 0, "max_steps": steps, "log_every": 1,
                  "eval_every": 10**9, "eval_batches": 1, "sample_tokens": 0, "device": "cpu", "precision": "fp32",
                  "seed": SEED, "activation_checkpointing": checkpointing},
        "run": {"out_dir": str(BENCH_DIR / "checkpointing-runs"), "name": name}})


def runner(data: str, checkpointing: bool):
    run = loop_runner(lambda steps, name: _config(data, steps, name, checkpointing), "tokens_per_s", WARMUP)
    return lambda steps=0, memory=False: peak_rss_mib() if memory else run(steps)


def main() -> None:
    data = str(shakespeare_data())
    log(f"bench checkpointing | {machine()} | {ROUNDS} rounds x {STEPS} steps (+{WARMUP} warm-up) per side")
    workers = {name: Worker("checkpointing:runner", data=data, checkpointing=on) for name, on in SIDES.items()}
    try:
        rates = interleave({n: (lambda w=w: w(steps=STEPS)) for n, w in workers.items()}, ROUNDS, "tokens/s")
        peaks = {n: w(memory=True) for n, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    off, on = SIDES
    rows = [(n, median(v), f"peak memory {peaks[n]:,.0f} MiB") for n, v in rates.items()]
    write_summary("checkpointing", table(f"activation checkpointing: gpt2 preset (124M shape, vocabulary 8192), "
                                         f"batch {BATCH} x 1024, fp32", rows, "tokens/s", off, extra={
                                             "step time with / without": f"{1 / paired_ratio(on, off):.2f}x",
                                             "peak memory with / without": f"{peaks[on] / peaks[off]:.2f}x",
                                             "machine": machine()}))


if __name__ == "__main__":
    sys.exit(main())
