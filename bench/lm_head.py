"""The output layer at GPT-2's vocabulary: lmforge's fused head against projection + cross-entropy.

A GPT with GPT-2's vocabulary (50,257), 2 layers, 4 heads, width 256, context 512, batch 8
(4,096 tokens a step, so 4,096 x 50,257 logits), fp32, forward and backward of the summed
next-token loss. The two sides share everything but the last layer:

- lmforge: `GPT.forward(input_ids, targets=...)`, the fused projection + cross-entropy of
  `lmforge.ops.lm_loss` (one block of logits at a time, gradients made in the forward);
- plain: `logits = GPT.forward(input_ids)` then `F.cross_entropy`, as a training loop written
  around any language model does it (transformers' models among them).

Each side runs in its own process, so its peak resident memory (the kernel's high-water mark,
which includes the ~300 MiB of Python, torch and the model) is its own; rounds interleave
A B A B, and a step's rate is 4,096 tokens over its wall time.

    python bench/lm_head.py           # BENCH_ROUNDS=3 BENCH_HEAD_STEPS=4
"""

from __future__ import annotations

import os
import resource
import sys

from common import ROUNDS, SEED, Worker, interleave, log, machine, median, table, timed, write_summary

STEPS = int(os.environ.get("BENCH_HEAD_STEPS", "4"))
VOCAB, CONTEXT, BATCH = 50257, 512, 8


def head_runner(fused: bool):
    """A function(steps) -> {"rates": per-step tokens/s, "peak_mib": this process's peak RSS}."""
    import torch
    import torch.nn.functional as F

    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.base.runtime import keep_freed_memory, setup_runtime

    setup_runtime("cpu", seed=SEED)
    keep_freed_memory()  # the allocator setting `lmforge train` asks for
    model = GPT(GPTConfig(vocab_size=VOCAB, context=CONTEXT, n_layer=2, n_head=4, n_embd=256, activation="gelu"))
    ids = torch.randint(0, VOCAB, (BATCH, CONTEXT))
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1)

    def step() -> None:
        if fused:
            loss_sum, _, counted = model(ids, targets=targets)
        else:
            logits = model(ids)
            loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
            counted = (targets != -100).sum()
        (loss_sum / counted).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up

    def run(steps: int) -> dict:
        rates = [BATCH * CONTEXT / timed(step) for _ in range(steps)]
        return {"rates": rates, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    return run


def main() -> None:
    log(f"bench lm_head | {machine()} | {ROUNDS} rounds x {STEPS} steps per side")
    workers = {"lmforge fused head": Worker("lm_head:head_runner", fused=True),
               "projection + F.cross_entropy": Worker("lm_head:head_runner", fused=False)}
    peaks: dict[str, float] = {}

    def side(name: str):
        def run() -> list[float]:
            result = workers[name](steps=STEPS)
            peaks[name] = result["peak_mib"]
            return result["rates"]
        return run

    try:
        rates = interleave({name: side(name) for name in workers}, ROUNDS, "tokens/s",
                           label=lambda name: "lmforge lm_head" if name.startswith("lmforge") else name)
    finally:
        for w in workers.values():
            w.close()
    rows = [(name, median(values), f"peak memory {peaks[name]:,.0f} MiB") for name, values in rates.items()]
    lines = table(f"lm_head: GPT 2x256, vocabulary {VOCAB:,}, {BATCH} x {CONTEXT} tokens, fp32, forward + backward",
                  rows, "tokens/s", "projection + F.cross_entropy", extra={
                      "peak memory": f"{peaks['lmforge fused head']:,.0f} MiB against "
                                     f"{peaks['projection + F.cross_entropy']:,.0f} MiB (whole process)",
                      "machine": machine()})
    write_summary("lm_head", lines)


if __name__ == "__main__":
    sys.exit(main())
