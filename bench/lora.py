"""LoRA fine-tuning tokens/s and peak memory: `lmforge train` with train.lora against
transformers + peft with the `Trainer`, on the dialogue workload.

bench/dialogue.py's workload (configs/chitchat-zh.yaml's GPT-2: 4 layers, 4 heads, 192 wide,
context 128, WordPiece 8000 on the bundled LCCC chit-chat, batch 32 dialogues, fp32, dropout
0.1, loss on the replies only), with rank-8 adapters (alpha 16, no adapter dropout) on every
linear layer of the blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj) of a frozen base; AdamW lr
2e-3, clip 1.0.

- lmforge: `lmforge train` with model.init_from (the base, saved once) and train.lora; a
  step's rate is the `tokens_per_s` the loop logs (real tokens, padding not counted).
- transformers: `GPT2LMHeadModel` with the same weights, `peft.get_peft_model` with the same
  rank, alpha and target modules, trained by `Trainer` over the same samples (its own order);
  a step's rate is its batch's real tokens over the time from one step's end to the next.

Peak memory is each worker process's peak resident set (ru_maxrss) after its rounds: the
model, the data and the steps of one side, never the other's. Interleaved A B A B; the first
WARMUP steps of every round are dropped.

A LoRA step should cost less than a full fine-tuning step of the same model (no gradients of
the frozen weights, optimizer state for the adapters alone): the summary also gives lmforge's
LoRA step time over its full step time, both models built from the base in one process, on the
same batch (forward, backward, clipping and the fused AdamW), alternating steps.

    python bench/lora.py           # BENCH_ROUNDS=3 BENCH_LORA_STEPS=10
"""

from __future__ import annotations

import os
import resource
import sys
import time

from common import (BENCH_DIR, ROUNDS, SEED, Worker, interleave, log, loop_runner, machine, median, paired_ratio,
                    table, train_split, transformers_kwargs, write_summary)
from dialogue import BATCH, MODEL, chitchat

STEPS = int(os.environ.get("BENCH_LORA_STEPS", "10"))
WARMUP = 2
RANK, ALPHA = 8, 16.0
PEER = "transformers + peft, Trainer"


def base_checkpoint(data: str) -> str:
    """The frozen base: a GPT of the workload's shape with its initial weights (saved once)."""
    import torch

    from lmforge.base.config import load_config
    from lmforge.checkpoint import save_checkpoint
    from lmforge.data.store import read_meta
    from lmforge.models.registry import architecture, model_from_architecture

    path = BENCH_DIR / "lora-base"
    if (path / "manifest.json").exists():
        return str(path)
    cfg = load_config(None, base={"model": dict(MODEL, dropout=0.0), "data": {"path": data}})
    arch = architecture(cfg.model, int(read_meta(data)["vocab_size"]))
    torch.manual_seed(SEED)
    save_checkpoint(path, model_state=model_from_architecture(arch).state_dict(), model_config=arch,
                    tokenizer_file=f"{data}/tokenizer.json")
    return str(path)


def _config(data: str, steps: int, name: str):
    from lmforge.base.config import load_config

    return load_config(None, base={
        "model": dict(MODEL, init_from=base_checkpoint(data)), "data": {"path": data},  # the base's shape, stated
        "train": {"task": "dialogue", "loss_on": "responses", "batch_size": BATCH, "lr": 2e-3, "warmup_steps": 0,
                  "max_steps": steps, "grad_clip": 1.0, "log_every": 1, "eval_every": 10**9, "eval_batches": 1,
                  "sample_tokens": 0, "device": "cpu", "precision": "fp32", "seed": SEED,
                  "lora": {"rank": RANK, "alpha": ALPHA}},
        "run": {"out_dir": str(BENCH_DIR / "lora-runs"), "name": name}})


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def lmforge_runner(data: str):
    run = loop_runner(lambda steps, name: _config(data, steps, name), "tokens_per_s", WARMUP)
    return lambda steps=0, memory=False: peak_rss_mib() if memory else run(steps)


def hf_runner(data: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from lmforge.checkpoint import load_checkpoint
    from lmforge.models.hf import gpt2_config_to_hf, gpt2_to_hf

    cfg = _config(data, 1, "unused")
    task, dialogues, _, _ = train_split(cfg, data)
    base = load_checkpoint(base_checkpoint(data))
    hf_config = transformers_kwargs(gpt2_config_to_hf(dict(base.model_config, dropout=MODEL["dropout"]), None, None, None))
    weights = gpt2_to_hf(base.state_dict)
    counted: list[int] = []

    def collate(samples: list[dict]) -> dict:
        batch = task.collate(samples)
        counted.append(task.count_tokens(batch))
        return {"input_ids": batch["input_ids"], "labels": batch["labels"]}

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    def run(steps: int = 0, memory: bool = False):
        if memory:
            return peak_rss_mib()
        torch.manual_seed(SEED)
        model = GPT2LMHeadModel(GPT2Config(**hf_config))
        model.load_state_dict(weights, strict=False)
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, fan_in_fan_out=True,
                                                 target_modules=["c_attn", "c_proj", "c_fc"]))
        times = StepTimes()
        args = TrainingArguments(output_dir=str(BENCH_DIR / "lora-trainer"), per_device_train_batch_size=BATCH,
                                 max_steps=WARMUP + steps, learning_rate=2e-3, warmup_steps=0, max_grad_norm=1.0,
                                 lr_scheduler_type="constant", optim="adamw_torch_fused", seed=SEED,
                                 use_cpu=True, report_to=[], save_strategy="no", logging_steps=10**6,
                                 dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True)
        counted.clear()
        start = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=dialogues, data_collator=collate, callbacks=[times]).train()
        ends = [start, *times.ends]
        rates = [tokens / (b - a) for tokens, a, b in zip(counted, ends, ends[1:])]
        return rates[WARMUP:]

    return run


def lora_over_full_step(data: str, steps: int = STEPS) -> float:
    """Median over alternating pairs of (LoRA step time / full step time), one process, one batch."""
    import torch

    from lmforge.checkpoint import load_checkpoint
    from lmforge.models.lora import add_adapters, resolve_spec
    from lmforge.models.registry import model_from_architecture

    task, dialogues, _, _ = train_split(_config(data, 1, "unused"), data)
    batch = task.collate([dialogues[i] for i in range(BATCH)])
    base = load_checkpoint(base_checkpoint(data))
    arch = dict(base.model_config, dropout=MODEL["dropout"])
    sides = []
    for lora in (False, True):
        torch.manual_seed(SEED)
        model = model_from_architecture(arch)
        model.load_state_dict(base.state_dict)
        if lora:
            add_adapters(model, resolve_spec(model, RANK, ALPHA, 0.0, [], [], {}))
        params = [p for p in model.parameters() if p.requires_grad]
        sides.append((model.train(), params, torch.optim.AdamW(params, lr=2e-3, fused=True)))

    def step(model, params, optimizer) -> float:
        start = time.perf_counter()
        task.loss_and_metrics(model, batch).loss_sum.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = [[step(*side) for side in sides] for _ in range(WARMUP + steps)][WARMUP:]
    return median([lora / full for full, lora in times])


def main() -> None:
    data = str(chitchat())
    base_checkpoint(data)
    log(f"bench lora | {machine()} | {ROUNDS} rounds x {STEPS} steps (+{WARMUP} warm-up) per side")
    workers = {"lmforge": Worker("lora:lmforge_runner", data=data), PEER: Worker("lora:hf_runner", data=data)}
    try:
        rates = interleave({n: (lambda w=w: w(steps=STEPS)) for n, w in workers.items()}, ROUNDS, "tokens/s",
                           label=lambda n: "lmforge lora" if n == "lmforge" else n)
        peaks = {n: w(memory=True) for n, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    rows = [(n, median(v), f"peak memory {peaks[n]:,.0f} MiB") for n, v in rates.items()]
    write_summary("lora", table(f"LoRA rank {RANK} fine-tuning: dialogue GPT-2 4 x 192, context 128, batch {BATCH}, "
                                "fp32, loss on replies", rows, "tokens/s", PEER, extra={
                                    "lmforge / transformers + peft": f"{paired_ratio('lmforge', PEER):.2f}x",
                                    "peak memory lmforge / peer": f"{peaks['lmforge'] / peaks[PEER]:.2f}x",
                                    "lmforge LoRA step / full step (one process, same batch)":
                                        f"{lora_over_full_step(data):.2f}x",
                                    "machine": machine()}))


if __name__ == "__main__":
    sys.exit(main())
