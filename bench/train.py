"""Training tokens/s: `lmforge train` against transformers' `Trainer` on the issue's workload.

GPT-2 architecture, n_layer 4, n_head 4, n_embd 256, context 256, vocabulary 8192 (byte-level
BPE on tiny Shakespeare), batch 8, fp32, AdamW (each side's default: lmforge's fused AdamW,
the Trainer's default `optim`), dropout 0, gradient clipping 1.0 on both sides.

- lmforge: the real `lmforge.train.loop.train` with log_every=1; a step's rate is the
  tokens/s the loop logs (data, forward, backward, clipping, optimizer; no eval or saving).
- transformers: `Trainer` + `GPT2LMHeadModel` on the same token blocks; a step's rate is
  2048 tokens over the time between consecutive `on_step_end` callbacks.
- matmul peak: a 2048^3 fp32 `torch.mm`, measured in each round, for MFU.

Each side trains its own default GPT-2: lmforge's uses the exact GELU (as nanoGPT and BERT;
on CPU about 4x faster than the tanh form), transformers' GPT2Config the tanh GELU (gelu_new).
The ablation rows (BENCH_ABLATIONS=1, the default) swap them: lmforge with gelu_new, and the
Trainer with activation_function=gelu, so the table shows what the activation alone is worth;
two more show lmforge without its malloc tuning and without its C++ CPU kernels.
Two more rows leave the fp32 workload for bf16 autocast on both sides (BENCH_BF16=0 drops
them): on a CPU with AMX units that is the faster setting.

- nanoGPT: its own `train.py`, unmodified, from ../shared/peers/nanoGPT, as its README runs
  it on a CPU (`--device=cpu --compile=False`, fp32, GPT-2's biases, dropout 0) on the same
  token stream; a step's rate is 2048 tokens over the iteration time it prints. The ablation
  row runs nanoGPT's model with fused AdamW, torch.compile and lmforge's malloc tuning in a
  plain loop: the fastest setup of that model found here (bench/nanogpt_peer.py). Where
  ../shared is absent the table says so instead.

Each side runs in its own worker process (see bench/common.py); rounds interleave A B A B.
The first WARMUP steps of every round are dropped.

    python bench/train.py           # BENCH_ROUNDS=3 BENCH_TRAIN_STEPS=12 BENCH_ABLATIONS=1
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nanogpt_peer
from common import (BENCH_DIR, ROUND_MEDIANS, ROUNDS, SEED, WORKLOAD, Worker, interleave, log, loop_runner, machine, matmul_peak,
                    median, paired_ratio, shakespeare_data, table, write_summary)

STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "12"))
WARMUP = 2
MODEL = {k: WORKLOAD[k] for k in ("n_layer", "n_head", "n_embd", "context")}
NANOGPT = "nanoGPT train.py"
NANOGPT_STACKED = "nanoGPT model, fused AdamW + torch.compile + malloc tuning, plain loop"


# -- the sides (run inside worker processes) ------------------------------------------------------


def lmforge_runner(data: str, malloc_tuning: bool = True, compile: bool = False, activation: str = "gelu",
                   precision: str = "fp32", cpu_kernels: bool = True, model: dict | None = None,
                   batch: int = WORKLOAD["batch_size"], warmup: int = WARMUP, device: str = "cpu"):
    """A function(steps) -> per-step tokens/s of `lmforge.train.loop.train` on the workload
    (or on `model`: n_layer, n_head, n_embd, context; and `batch`)."""
    if malloc_tuning:
        from lmforge.base.runtime import keep_freed_memory

        keep_freed_memory()  # what `lmforge train` asks for; the library leaves malloc alone
    if not cpu_kernels:
        os.environ["LMFORGE_CPU_KERNELS"] = "0"  # torch's attention and softmax (lmforge.ops.kernels)
    from lmforge.base.config import load_config

    model = model or MODEL

    def config(steps: int, name: str):
        return load_config(None, base={
            "model": {"kind": "gpt", "preset": None, "dropout": 0.0, "activation": activation, **model},
            "data": {"path": data},
            "train": {"task": "lm", "batch_size": batch, "grad_accum": 1, "lr": 6e-4,
                      "warmup_steps": 0, "max_steps": steps, "grad_clip": 1.0, "log_every": 1,
                      "eval_every": 10**9, "eval_batches": 1, "sample_tokens": 0, "device": device,
                      "precision": precision, "compile": compile, "seed": SEED},
            "run": {"out_dir": str(BENCH_DIR / "train-runs"), "name": name}})

    return loop_runner(config, "tokens_per_s", warmup)


def trainer_runner(data: str, activation: str = "gelu_new", bf16: bool = False, model: dict | None = None,
                   batch: int = WORKLOAD["batch_size"], warmup: int = WARMUP, device: str = "cpu"):
    """A function(steps) -> per-step tokens/s of transformers' Trainer + GPT2LMHeadModel."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from lmforge.data.datasets import PackedLMDataset
    from lmforge.data.store import TokenStore, read_meta

    shape = model or MODEL
    blocks = PackedLMDataset(TokenStore(Path(data), "train"), shape["context"])
    vocab = int(read_meta(Path(data))["vocab_size"])

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(blocks)

        def __getitem__(self, i: int) -> dict:
            ids = blocks[i]["input_ids"]
            return {"input_ids": ids, "labels": ids}

    def run(steps: int) -> list[float]:
        torch.manual_seed(SEED)
        config = GPT2Config(vocab_size=vocab, n_positions=shape["context"], n_embd=shape["n_embd"],
                            n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                            attn_pdrop=0.0, activation_function=activation)
        net = GPT2LMHeadModel(config)
        ends: list[float] = []

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if not ends:
                    ends.append(time.perf_counter())

            def on_step_end(self, args, state, control, **kwargs):
                ends.append(time.perf_counter())

        args = TrainingArguments(
            output_dir=str(BENCH_DIR / "hf-trainer"), per_device_train_batch_size=batch,
            max_steps=warmup + steps, learning_rate=6e-4, weight_decay=0.1, adam_beta2=0.95, warmup_steps=0,
            max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to="none",
            use_cpu=device == "cpu", dataloader_num_workers=0, seed=SEED, disable_tqdm=True, bf16=bf16)
        Trainer(model=net, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
        rates = [batch * shape["context"] / (b - a) for a, b in zip(ends, ends[1:])]
        return rates[warmup:]

    return run


# -- the comparison -------------------------------------------------------------------------------


def rates_of(result) -> list[float]:
    return result["rates"] if isinstance(result, dict) else result


def nanogpt_workers(data: str, ablations: bool) -> dict:
    if not nanogpt_peer.available():
        return {}
    kwargs = dict(data=data, model=MODEL, batch=WORKLOAD["batch_size"], warmup=WARMUP)
    workers = {NANOGPT: Worker("nanogpt_peer:train_py_runner", **kwargs)}
    if ablations:
        workers[NANOGPT_STACKED] = Worker("nanogpt_peer:model_loop_runner", **kwargs)
    return workers


def nanogpt_ratios() -> dict[str, str]:
    if not nanogpt_peer.available():
        return {"nanoGPT": nanogpt_peer.ABSENT}
    ratios = {f"lmforge / {NANOGPT}": f"{paired_ratio('lmforge', NANOGPT):.2f}x (its train.py, unmodified, "
                                      "--device=cpu --compile=False; target >= 1.2x)"}
    if NANOGPT_STACKED in ROUND_MEDIANS:
        ratios["lmforge / nanoGPT's stacked plain loop"] = f"{paired_ratio('lmforge', NANOGPT_STACKED):.2f}x"
    return ratios


def main() -> None:
    from lmforge.models.gpt import GPTConfig, flops_per_token

    data = str(shakespeare_data())
    flops_tok = flops_per_token(GPTConfig(vocab_size=WORKLOAD["vocab_size"], context=WORKLOAD["context"],
                                          n_layer=WORKLOAD["n_layer"], n_head=WORKLOAD["n_head"],
                                          n_embd=WORKLOAD["n_embd"]))
    log(f"bench train | {machine()} | {ROUNDS} rounds x {STEPS} steps (+{WARMUP} warm-up) per side")
    ablations = os.environ.get("BENCH_ABLATIONS", "1") == "1"
    workers = {"lmforge": Worker("train:lmforge_runner", data=data),
               "transformers Trainer": Worker("train:trainer_runner", data=data)}
    if ablations:
        workers["lmforge, malloc tuning off"] = Worker("train:lmforge_runner", data=data,
                                                       malloc_tuning=False)
        workers["lmforge, LMFORGE_CPU_KERNELS=0"] = Worker("train:lmforge_runner", data=data, cpu_kernels=False)
        workers["lmforge, model.activation=gelu_new"] = Worker("train:lmforge_runner", data=data,
                                                               activation="gelu_new")
        workers["transformers Trainer, activation_function=gelu"] = Worker("train:trainer_runner", data=data,
                                                                           activation="gelu")
    if os.environ.get("BENCH_BF16", "1" if ablations else "0") == "1":
        # Not the fp32 workload: what a CPU with bf16 units (AMX) gives each side under autocast.
        workers["lmforge, train.precision=bf16"] = Worker("train:lmforge_runner", data=data, precision="bf16")
        workers["transformers Trainer, bf16=True"] = Worker("train:trainer_runner", data=data, bf16=True)
    if os.environ.get("BENCH_COMPILE") == "1":
        workers["lmforge, train.compile=true"] = Worker("train:lmforge_runner", data=data, compile=True)
    workers.update(nanogpt_workers(data, ablations))
    try:
        sides = {name: (lambda w=w: rates_of(w(steps=STEPS))) for name, w in workers.items()}
        sides["matmul peak"] = lambda: [matmul_peak() / 1e9]
        labels = {"lmforge": "lmforge train", "matmul peak": "matmul 2048^3 fp32"}
        rates = interleave(sides, ROUNDS, "tokens/s",
                           label=lambda name: labels.get(name, f"ablation: {name}" if "," in name else name),
                           units={"matmul peak": "GFLOP/s"})
    finally:
        for w in workers.values():
            w.close()
    peak = median(rates.pop("matmul peak")) * 1e9
    medians = {name: median(values) for name, values in rates.items()}
    rows = [(name, rate, f"MFU {flops_tok * rate / peak:.1%}" + (" of the fp32 peak" if "bf16" in name else ""))
            for name, rate in medians.items()]
    lines = table("train: GPT-2 4x256, context 256, vocab 8192, batch 8, fp32, AdamW", rows, "tokens/s",
                  "transformers Trainer", extra={
                      "lmforge / Trainer": f"{paired_ratio('lmforge', 'transformers Trainer'):.2f}x "
                                           "(median of per-round ratios; target >= 1.5x)",
                      **nanogpt_ratios(),
                      "MFU": f"flops_per_token x tokens/s / peak = {flops_tok:,} x tokens/s / "
                             f"{peak / 1e9:.1f} GFLOP/s (median of the rounds' 2048^3 fp32 matmul); "
                             "flops_per_token = 6N + 12 L C T (N: parameters without the position table)",
                      "machine": machine()})
    write_summary("train", lines)


if __name__ == "__main__":
    sys.exit(main())
