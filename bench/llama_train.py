"""Training tokens/s of a Llama-class model: `lmforge train` against transformers' `Trainer` +
`LlamaForCausalLM` on the same config and data.

The fixed workload's shape as a Llama: 4 layers, width 256, 4 query heads over 2 key / value
heads, SwiGLU width 704 (lmforge's default for width 256), rotary positions (base 10000),
RMSNorm, untied output layer, context 256, vocabulary 8192 (byte-level BPE on tiny
Shakespeare), batch 8, fp32, AdamW, dropout 0, gradient clipping 1.0 on both sides.

- lmforge: the real `lmforge.train.loop.train` with log_every=1; a step's rate is the tokens/s
  the loop logs (data, forward, backward, clipping, optimizer; no eval or saving).
- transformers: `Trainer` + `LlamaForCausalLM` (its default attention, SDPA) built from the
  config.json lmforge's export writes for this architecture, on the same token blocks; a
  step's rate is 2048 tokens over the time between consecutive `on_step_end` callbacks.
- An ablation row runs lmforge without its C++ CPU kernels (LMFORGE_CPU_KERNELS=0).
- Two more rows leave the fp32 workload for bf16 autocast on both sides (`train.precision=bf16`
  against the Trainer's `bf16=True`; BENCH_BF16=0 drops them): on a CPU with AMX units that is
  the faster setting. The target is the fp32 ratio.

Each side runs in its own worker process (bench/common.py); rounds interleave A B A B; the
first WARMUP steps of every round are dropped.

    python bench/llama_train.py           # BENCH_ROUNDS=3 BENCH_TRAIN_STEPS=12 BENCH_ABLATIONS=1 BENCH_BF16=1
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from common import (BENCH_DIR, ROUNDS, SEED, WORKLOAD, Worker, interleave, log, loop_runner, machine, matmul_peak,
                    median, paired_ratio, shakespeare_data, table, transformers_kwargs, write_summary)

STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "12"))
WARMUP = 2
LLAMA = dict(kind="llama", preset=None, n_layer=WORKLOAD["n_layer"], n_head=WORKLOAD["n_head"], n_kv_head=2,
             n_embd=WORKLOAD["n_embd"], context=WORKLOAD["context"], tie_embeddings=False)
TOKENS_PER_STEP = WORKLOAD["batch_size"] * WORKLOAD["context"]
BF16_SIDES = ("lmforge, train.precision=bf16", "transformers Trainer, bf16=True")


def llama_architecture(vocab: int) -> dict:
    """The lmforge architecture (config.json) both sides train."""
    from lmforge.base.config import ModelConfig
    from lmforge.models.registry import architecture

    return architecture(ModelConfig(**LLAMA), vocab)


def lmforge_runner(data: str, cpu_kernels: bool = True, precision: str = "fp32"):
    """A function(steps) -> per-step tokens/s of `lmforge.train.loop.train` on the Llama workload."""
    from lmforge.base.runtime import keep_freed_memory

    keep_freed_memory()  # what `lmforge train` asks for
    if not cpu_kernels:
        os.environ["LMFORGE_CPU_KERNELS"] = "0"
    from lmforge.base.config import load_config

    def config(steps: int, name: str):
        return load_config(None, base={
            "model": dict(LLAMA),
            "data": {"path": data},
            "train": {"task": "lm", "batch_size": WORKLOAD["batch_size"], "grad_accum": 1, "lr": 6e-4,
                      "warmup_steps": 0, "max_steps": steps, "grad_clip": 1.0, "log_every": 1,
                      "eval_every": 10**9, "eval_batches": 1, "sample_tokens": 0, "device": "cpu", "seed": SEED,
                      "precision": precision},
            "run": {"out_dir": str(BENCH_DIR / "train-runs"), "name": name}})

    return loop_runner(config, "tokens_per_s", WARMUP)


def trainer_runner(data: str, bf16: bool = False):
    """A function(steps) -> per-step tokens/s of transformers' Trainer + LlamaForCausalLM."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lmforge.data.datasets import PackedLMDataset
    from lmforge.data.store import TokenStore, read_meta
    from lmforge.models.hf_llama import llama_config_to_hf

    blocks = PackedLMDataset(TokenStore(Path(data), "train"), WORKLOAD["context"])
    vocab = int(read_meta(Path(data))["vocab_size"])
    hf_config = transformers_kwargs(llama_config_to_hf(llama_architecture(vocab), None, None, None))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            ids = blocks[i]["input_ids"]
            return {"input_ids": ids, "labels": ids}

    def run(steps: int) -> list[float]:
        torch.manual_seed(SEED)
        net = LlamaForCausalLM(LlamaConfig(**hf_config))
        ends: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if not ends:
                    ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        args = TrainingArguments(
            output_dir=str(BENCH_DIR / "hf-trainer-llama"), per_device_train_batch_size=WORKLOAD["batch_size"],
            max_steps=WARMUP + steps, learning_rate=6e-4, weight_decay=0.1, adam_beta2=0.95, warmup_steps=0,
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to="none", use_cpu=True,
            dataloader_num_workers=0, seed=SEED, disable_tqdm=True, bf16=bf16)
        Trainer(model=net, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
        return [TOKENS_PER_STEP / (b - a) for a, b in zip(ends, ends[1:])][WARMUP:]

    return run


def main() -> None:
    from lmforge.models.llama_config import LlamaConfig, flops_per_token

    data = str(shakespeare_data())
    arch = llama_architecture(WORKLOAD["vocab_size"])
    flops_tok = flops_per_token(LlamaConfig.from_dict(arch))
    log(f"bench llama train | {machine()} | {ROUNDS} rounds x {STEPS} steps (+{WARMUP} warm-up) per side")
    workers = {"lmforge": Worker("llama_train:lmforge_runner", data=data),
               "transformers Trainer": Worker("llama_train:trainer_runner", data=data)}
    if os.environ.get("BENCH_ABLATIONS", "1") == "1":
        workers["lmforge, LMFORGE_CPU_KERNELS=0"] = Worker("llama_train:lmforge_runner", data=data, cpu_kernels=False)
    if os.environ.get("BENCH_BF16", "1") == "1":
        # Not the fp32 workload: what a CPU with bf16 units (AMX) gives each side under autocast.
        workers[BF16_SIDES[0]] = Worker("llama_train:lmforge_runner", data=data, precision="bf16")
        workers[BF16_SIDES[1]] = Worker("llama_train:trainer_runner", data=data, bf16=True)
    try:
        sides = {name: (lambda w=w: w(steps=STEPS)) for name, w in workers.items()}
        sides["matmul peak"] = lambda: [matmul_peak() / 1e9]
        labels = {"lmforge": "lmforge train (llama)", "matmul peak": "matmul 2048^3 fp32"}
        rates = interleave(sides, ROUNDS, "tokens/s",
                           label=lambda name: labels.get(name, f"ablation: {name}" if "," in name else name),
                           units={"matmul peak": "GFLOP/s"})
    finally:
        for w in workers.values():
            w.close()
    peak = median(rates.pop("matmul peak")) * 1e9
    rows = [(name, median(values), f"MFU {flops_tok * median(values) / peak:.1%}"
             + (" of the fp32 peak" if "bf16" in name else "")) for name, values in rates.items()]
    bf16 = ({"lmforge / Trainer in bf16": f"{paired_ratio(*BF16_SIDES):.2f}x"} if BF16_SIDES[0] in rates else {})
    shape = (f"{arch['n_layer']}x{arch['n_embd']}, {arch['n_head']} heads / 2 kv heads, "
             f"SwiGLU {arch.get('intermediate_size', 704)}")
    lines = table(f"train: Llama {shape}, context 256, vocab 8192, batch 8, fp32, AdamW", rows, "tokens/s",
                  "transformers Trainer", extra={
                      "lmforge / Trainer": f"{paired_ratio('lmforge', 'transformers Trainer'):.2f}x (target >= 1.5x)",
                      **bf16,
                      "model FLOPs per token": f"{flops_tok:,}", "machine": machine()})
    write_summary("llama_train", lines)


if __name__ == "__main__":
    sys.exit(main())
