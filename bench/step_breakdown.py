"""Where a training step's time goes: every aten operator of the fixed workload's step, timed.

The step of `make bench-train` (GPT-2 4 x 256, context 256, vocabulary 8192, batch 8, fp32,
clipping, fused AdamW), on the same tiny Shakespeare tokens, for two models:

- lmforge: `GPT.forward(ids, targets=...)`, the loop's clipping and the fused AdamW;
- transformers: `GPT2LMHeadModel(ids, labels=ids)`, `clip_grad_norm_` and the fused AdamW,
  which is the Trainer's step without the Trainer around it.

Each runs in its own worker process. A `TorchDispatchMode` times every aten call of forward,
backward and update with the wall clock (torch.profiler's CPU times, on this 2-core machine,
came out several times too large for memory-bound kernels such as GELU). The table groups the
calls into matrix products (with their GFLOP/s), attention, optimizer and the rest, next to
the step's wall time measured without the timer, and the matrix products' time at the
measured 2048^3 peak: the floor no eager formulation of this step can go below.

BENCH_BREAKDOWN_MODEL=llama times the Llama step of `make bench-llama-train` instead (the same
shape with 2 key / value heads, SwiGLU 704, untied output layer) against `LlamaForCausalLM`.

BENCH_BREAKDOWN_SIZE=124M times the same step at GPT-2 small (12 x 768, context 1024,
vocabulary 50,257, batch 2: the 124M size of bench/scale.py) instead; BENCH_BREAKDOWN_SIZE=mid
at its mid size. BENCH_BREAKDOWN_PRECISION=bf16 runs both sides' forward under bf16 autocast (as
`train.precision: bf16` and the Trainer's `bf16=True` do), with the products' floor at the bf16
2048^3 peak.

    python bench/step_breakdown.py        # BENCH_BREAKDOWN_STEPS=5 BENCH_BREAKDOWN_SIZE=fixed BENCH_BREAKDOWN_MODEL=gpt
                                          # BENCH_BREAKDOWN_PRECISION=fp32
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict

from common import SEED, WORKLOAD, Worker, log, machine, matmul_peak, shakespeare_data, write_summary

STEPS = int(os.environ.get("BENCH_BREAKDOWN_STEPS", "5"))
TOP = int(os.environ.get("BENCH_BREAKDOWN_TOP", "15"))  # operators listed per side
SIZE = os.environ.get("BENCH_BREAKDOWN_SIZE", "fixed")
MODEL = os.environ.get("BENCH_BREAKDOWN_MODEL", "gpt")
PRECISION = os.environ.get("BENCH_BREAKDOWN_PRECISION", "fp32")
WARMUP = 3
MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul"}
PACKED = {"packed_product_out", "pack_right_operand"}  # lmforge's products of a packed weight, and its packing
OPTIMIZER_PREFIXES = ("_fused_adam", "_foreach_", "sum_of_squares")


def category(op: str) -> str:
    base = op.split(".")[1]
    if base in MATMULS or base in PACKED:
        return "matrix products"
    if "scaled_dot_product" in base or "attention" in base:
        return "attention kernels"
    if base.startswith(OPTIMIZER_PREFIXES):
        return "optimizer and clipping"
    return "everything else (elementwise, norms, copies, reductions)"


def matmul_flops(op: str, shapes: list[list[int]]) -> float:
    """2 M K N of a product from its operands' shapes (the last two of a batched product; a packed
    product's are its left operand (M, K) and its output (M, N))."""
    if "pack_right_operand" in op:
        return 0.0
    mats = [s for s in shapes if len(s) >= 2][-2:]
    if len(mats) < 2:
        return 0.0
    (*batch, m, k), n = mats[0], mats[1][-1]
    size = 1
    for b in batch:
        size *= b
    return 2.0 * size * m * k * n


def workload() -> tuple:
    """(data folder, shape) of the size BENCH_BREAKDOWN_SIZE names."""
    if SIZE == "fixed":
        return shakespeare_data(), WORKLOAD
    from lmforge.data.store import read_meta
    from scale import SIZES, gpt2_vocab_data

    if SIZE not in SIZES:
        raise SystemExit(f"BENCH_BREAKDOWN_SIZE must be one of {list(SIZES)}, got {SIZE!r}")
    data = gpt2_vocab_data() if SIZE == "124M" else shakespeare_data()
    spec = SIZES[SIZE]
    return data, dict(spec["model"], batch_size=spec["batch"], vocab_size=int(read_meta(data)["vocab_size"]))


def lmforge_model(shape: dict, model_shape: dict):
    """lmforge's GPT, or its Llama with BENCH_BREAKDOWN_MODEL=llama."""
    if MODEL == "llama":
        from lmforge.models.llama import Llama
        from lmforge.models.llama_config import LlamaConfig

        return Llama(LlamaConfig(vocab_size=shape["vocab_size"], context=shape["context"], n_kv_head=2,
                                 tie_embeddings=False, **model_shape))
    from lmforge.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=shape["vocab_size"], context=shape["context"], activation="gelu", **model_shape))


def transformers_model(shape: dict, model_shape: dict):
    """The same model in transformers: GPT2LMHeadModel, or LlamaForCausalLM of lmforge's Llama's shape."""
    if MODEL == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        from lmforge.models.llama_config import LlamaConfig as Shape

        ffn = Shape(vocab_size=shape["vocab_size"], n_kv_head=2, **model_shape).ffn
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=shape["vocab_size"], hidden_size=model_shape["n_embd"], intermediate_size=ffn,
            num_hidden_layers=model_shape["n_layer"], num_attention_heads=model_shape["n_head"],
            num_key_value_heads=2, max_position_embeddings=shape["context"], tie_word_embeddings=False))
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["context"],
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **model_shape))


def breakdown_runner(side: str):
    """A function(steps) -> {"wall_ms", "ops": [[op, shapes, calls, ms, flops] per step]}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge.data.datasets import PackedLMDataset
    from lmforge.data.store import TokenStore
    from lmforge.base.runtime import keep_freed_memory, setup_runtime

    data, shape = workload()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16")

    blocks = PackedLMDataset(TokenStore(data, "train"), shape["context"])
    ids = torch.stack([blocks[i]["input_ids"] for i in range(shape["batch_size"])])
    model_shape = {k: shape[k] for k in ("n_layer", "n_head", "n_embd")}
    if side == "lmforge":
        from lmforge.base.config import TrainConfig
        from lmforge.train.optim import build_optimizer
        from lmforge.train.update import clip

        setup_runtime("cpu", seed=SEED)  # threads, as `lmforge train` sets them up
        keep_freed_memory()  # the allocator setting `lmforge train` asks for
        model = lmforge_model(shape, model_shape)
        optimizer = build_optimizer(model, TrainConfig(lr=6e-4), torch.device("cpu"))
        targets = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)

        def step() -> None:
            with autocast():
                loss_sum, _, counted = model(ids, targets=targets)
            (loss_sum / counted).backward()
            clip(model, optimizer, None, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        torch.manual_seed(SEED)
        model = transformers_model(shape, model_shape)
        optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

        def step() -> None:
            with autocast():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    calls: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            elapsed = time.perf_counter() - start
            op = str(func)
            shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
            entry = calls[(op, str(shapes))]
            entry[0] += 1
            entry[1] += elapsed
            if category(op) == "matrix products":
                entry[2] += matmul_flops(op, shapes)
            return out

    for _ in range(WARMUP):
        step()

    def run(steps: int) -> dict:
        walls = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            walls.append(time.perf_counter() - start)
        calls.clear()
        with OpTimer():
            for _ in range(steps):
                step()
        ops = [[op, shapes, n / steps, seconds * 1e3 / steps, flops / steps]
               for (op, shapes), (n, seconds, flops) in calls.items()]
        return {"wall_ms": statistics.median(walls) * 1e3, "ops": ops}

    return run


def report(results: dict[str, dict], peak: float) -> list[str]:
    sides = list(results)
    _, shape = workload()
    what = "the fixed workload's" if SIZE == "fixed" else f"the {SIZE} size's ({shape})"
    what += " Llama" if MODEL == "llama" else ""
    what += " bf16 autocast" if PRECISION == "bf16" else ""
    lines = [f"## step breakdown: {what} training step, {STEPS} steps timed per side",
             f"| {'':<56} | " + " | ".join(f"{s + ' ms':>16}" for s in sides),
             f"|{'-' * 58}|" + "|".join("-" * 18 for _ in sides)]
    totals = {s: defaultdict(float) for s in sides}
    flops = {s: 0.0 for s in sides}
    for s, result in results.items():
        for op, _, _, ms, f in result["ops"]:
            totals[s][category(op)] += ms
            flops[s] += f
    names = sorted({c for t in totals.values() for c in t}, key=lambda c: -totals[sides[0]][c])
    for name in names:
        lines.append(f"| {name:<56} | " + " | ".join(f"{totals[s][name]:>16.1f}" for s in sides))
    rows = {"sum of the timed operators": lambda s: sum(totals[s].values()),
            "step wall time, without the timer": lambda s: results[s]["wall_ms"],
            "matrix products at the 2048^3 peak (their floor)": lambda s: flops[s] / peak * 1e3}
    for name, value in rows.items():
        lines.append(f"| {name:<56} | " + " | ".join(f"{value(s):>16.1f}" for s in sides))
    mm = {s: totals[s]["matrix products"] for s in sides}
    lines.append("matrix products' rate: " + ", ".join(
        f"{s} {flops[s] / mm[s] / 1e6:,.0f} GFLOP/s" for s in sides if mm[s]) + f"; 2048^3 {PRECISION} peak {peak / 1e9:,.0f} GFLOP/s")
    for s in sides:
        lines += ["", f"### {s}: the {TOP} largest operators (per step)",
                  "| ms | calls | GFLOP/s | operator | operand shapes |", "|---:|---:|---:|---|---|"]
        for op, shapes, n, ms, f in sorted(results[s]["ops"], key=lambda r: -r[3])[:TOP]:
            rate = f"{f / ms / 1e6:,.0f}" if f else ""
            lines.append(f"| {ms:.2f} | {n:g} | {rate} | {op} | {shapes[:90]} |")
    lines.append(f"\nmachine: {machine()}")
    return lines


def main() -> None:
    import torch

    from lmforge.train.flops import time_matmul

    data, _ = workload()  # built here once, before the workers read it
    log(f"step breakdown on {data}, {STEPS} timed steps per side")
    workers = {side: Worker("step_breakdown:breakdown_runner", side=side) for side in ("lmforge", "transformers")}
    try:
        results = {side: worker(steps=STEPS) for side, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    name = "step_breakdown" + ("" if SIZE == "fixed" else f"_{SIZE}") + ("_llama" if MODEL == "llama" else "")
    name += "_bf16" if PRECISION == "bf16" else ""
    peak = time_matmul(2048, 0.5, dtype=torch.bfloat16) if PRECISION == "bf16" else matmul_peak()
    write_summary(name, report(results, peak))


if __name__ == "__main__":
    main()
