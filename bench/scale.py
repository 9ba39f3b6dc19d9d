"""Training speed at three sizes: lmforge, transformers' Trainer and nanoGPT, fp32 and bf16.

Sizes (GPT-2 architecture, biases, dropout 0, clipping 1.0, AdamW):

- fixed: the issue's workload, 4 layers, width 256, context 256, vocabulary 8,192, batch 8;
- mid: 6 layers, 8 heads, width 512, context 512, vocabulary 8,192, batch 4;
- 124M: GPT-2 small, 12 layers, width 768, context 1024, vocabulary 50,257, batch 2 (a
  byte-level BPE trained on the bundled texts of ../shared/data, or on tiny Shakespeare alone
  where that is absent: the title then gives the vocabulary it reached).

Each (size, precision) is one group of sides interleaved A B C A B C for BENCH_SCALE_ROUNDS
rounds (default 2), each side in its own worker process, closed before the next group; at
124M a side's worker is started for its round and closed after it, so only one model of 2-5
GB is in memory at a time (its start-up is not timed):

- lmforge: `lmforge.train.loop.train`, `train.precision` fp32 or bf16;
- transformers Trainer: `GPT2LMHeadModel`, `bf16=True` for bf16;
- nanoGPT: in fp32 its own `train.py`, unmodified (bench/nanogpt_peer.py); its train.py has
  no CPU autocast (`dtype=bfloat16` runs fp32 on a CPU), so in bf16 the row is its model
  under bf16 autocast with fused AdamW in a plain loop. At the fixed size one more row runs
  its model with fused AdamW, torch.compile and malloc tuning (the fastest nanoGPT setup
  found): the best peer there.

A row gives the median tokens/s, MFU (model FLOPs x tokens/s over the 2048^3 matmul peak
measured in the group's dtype in every round: the AMX bf16 peak for bf16), the side's peak
resident memory (its process's high-water mark: Python, libraries, model, optimizer state and
activations), and lmforge's rate over that row's as the median of per-round ratios. The run
prints how long it took; about 12-15 minutes on a quiet 2-core machine.

    python bench/scale.py      # BENCH_SCALE_SIZES=fixed,mid,124M BENCH_SCALE_PRECISIONS=fp32,bf16
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from pathlib import Path

import nanogpt_peer
from common import (BENCH_DIR, ROOT, Worker, interleave, log, machine, median, paired_ratio, shakespeare_data,
                    write_summary)

ROUNDS = int(os.environ.get("BENCH_SCALE_ROUNDS", "2"))
SIZES = {
    "fixed": dict(model=dict(n_layer=4, n_head=4, n_embd=256, context=256), batch=8, steps=6, warmup=2),
    "mid": dict(model=dict(n_layer=6, n_head=8, n_embd=512, context=512), batch=4, steps=3, warmup=1),
    "124M": dict(model=dict(n_layer=12, n_head=12, n_embd=768, context=1024), batch=2, steps=2, warmup=1,
                 fresh=True),
}
GPT2_VOCAB = 50257
SHARED_TEXTS = ["wikitext2/wiki.valid.raw", "wikitext2/wiki.test.raw", "tinyshakespeare/input.txt",
                "chitchat_zh/gpt2chitchat_50w_part0.txt", "chitchat_zh/train.txt",
                "dailydialog/dialogues_validation.txt", "dailydialog/dialogues_test.txt",
                "sms_spam/SMSSpamCollection"]


def gpt2_vocab_data() -> Path:
    """A token store with GPT-2's vocabulary size, from the bundled texts (built once, cached)."""
    data = BENCH_DIR / "bundled-50257"
    if (data / "meta.json").exists():
        return data
    from lmforge.base.tokenizer import train_tokenizer
    from lmforge.commands.quickstart import bundled_corpus
    from lmforge.data.prepare import prepare

    shared = ROOT.parent / "shared" / "data"
    texts = [shared / t for t in SHARED_TEXTS if (shared / t).is_file()] or [bundled_corpus()]
    log(f"building the 124M benchmark data in {data} from {len(texts)} texts (once)")
    tok = train_tokenizer(texts, kind="bpe", vocab_size=GPT2_VOCAB, out_dir=BENCH_DIR / "tok-50257",
                          min_frequency=1, show_progress=False, overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        prepare("lm", texts, tok, data, overwrite=True, show_progress=False)
    return data


# -- the sides (run inside worker processes) ------------------------------------------------------


def side_runner(kind: str, **kwargs):
    """bench/train.py's lmforge or Trainer runner, each round returning its rates and peak memory."""
    import train

    run = getattr(train, f"{kind}_runner")(**kwargs)
    return lambda steps: {"rates": run(steps), "peak_mib": nanogpt_peer.peak_mib()}


def peak_runner(dtype: str):
    from lmforge.train.flops import time_matmul

    import torch

    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    return lambda steps: {"rates": [time_matmul(2048, 0.5, dtype=kind) / 1e9], "peak_mib": 0.0}


class FreshWorker:
    """A Worker started for each call and closed after it (the same interface)."""

    def __init__(self, factory: str, **kwargs) -> None:
        self.factory, self.kwargs = factory, kwargs

    def __call__(self, **request):
        worker = Worker(self.factory, **self.kwargs)
        try:
            return worker(**request)
        finally:
            worker.close()

    def close(self) -> None:
        pass


def group_workers(size: str, precision: str, data: str) -> dict:
    spec = SIZES[size]
    start = FreshWorker if spec.get("fresh") else Worker
    common = dict(data=data, model=spec["model"], batch=spec["batch"], warmup=spec["warmup"])
    workers = {"lmforge": start("scale:side_runner", kind="lmforge", precision=precision, **common),
               "transformers Trainer": start("scale:side_runner", kind="trainer", bf16=precision == "bf16",
                                             **common)}
    if nanogpt_peer.available():
        if precision == "fp32":
            workers["nanoGPT train.py"] = start("nanogpt_peer:train_py_runner", **common)
        else:
            workers["nanoGPT model, bf16 autocast, plain loop"] = start(
                "nanogpt_peer:model_loop_runner", compile=False, malloc_tuning=False, precision="bf16", **common)
        if size == "fixed":
            workers["nanoGPT model + fused AdamW + compile + malloc tuning"] = start(
                "nanogpt_peer:model_loop_runner", precision=precision, **common)
    workers["matmul peak"] = Worker("scale:peak_runner", dtype=precision)
    return workers


def run_group(size: str, precision: str, data: str) -> list[dict]:
    """Interleave one group's sides; one result row per side (the peak row last)."""
    workers = group_workers(size, precision, data)
    peaks: dict[str, float] = {}
    key = f"{size} {precision}"

    def side(name: str, w):
        def run() -> list[float]:
            result = w(steps=SIZES[size]["steps"])
            peaks[name] = max(peaks.get(name, 0.0), result["peak_mib"])
            if result["peak_mib"]:
                log(f"{key} | {name}: peak memory {result['peak_mib']:,.0f} MiB")
            return result["rates"]
        return run

    try:
        rates = interleave({f"{key} | {n}": side(n, w) for n, w in workers.items()}, ROUNDS, "tokens/s",
                           label=lambda n: n.replace(f"{key} | lmforge", f"lmforge {key}"),
                           units={f"{key} | matmul peak": "GFLOP/s"})
    finally:
        for w in workers.values():
            w.close()
    return [{"size": size, "precision": precision, "side": n, "key": f"{key} | {n}",
             "rate": median(rates[f"{key} | {n}"]), "peak_mib": peaks.get(n, 0.0)} for n in workers]


def flops_per_token(size: str, vocab: int) -> int:
    from lmforge.models.gpt import GPTConfig, flops_per_token as count

    return count(GPTConfig(vocab_size=vocab, **SIZES[size]["model"]))


def report(rows: list[dict], vocabs: dict[str, int], seconds: float) -> list[str]:
    lines = ["## scale: training tokens/s at three sizes, fp32 and bf16",
             "| size | precision | side | tokens/s (median) | MFU | peak memory | lmforge / this |",
             "|---|---|---|---:|---:|---:|---:|"]
    for size, precision in dict.fromkeys((r["size"], r["precision"]) for r in rows):
        group = [r for r in rows if (r["size"], r["precision"]) == (size, precision)]
        peak = next(r["rate"] for r in group if r["side"] == "matmul peak") * 1e9
        lmforge = f"{size} {precision} | lmforge"
        for r in group:
            if r["side"] == "matmul peak":
                lines.append(f"| {size} | {precision} | 2048^3 matmul peak | {r['rate']:,.0f} GFLOP/s | | | |")
                continue
            mfu = flops_per_token(size, vocabs[size]) * r["rate"] / peak
            ratio = "" if r["key"] == lmforge else f"{paired_ratio(lmforge, r['key']):.2f}x"
            lines.append(f"| {size} | {precision} | {r['side']} | {r['rate']:,.0f} | {mfu:.1%} | "
                         f"{r['peak_mib'] / 1024:.2f} GB | {ratio} |")
    shapes = "; ".join(f"{s}: {v['model']['n_layer']}x{v['model']['n_embd']}, context {v['model']['context']}, "
                       f"vocabulary {vocabs.get(s, 0):,}, batch {v['batch']}, {v['steps']} steps + "
                       f"{v['warmup']} warm-up per round" for s, v in SIZES.items() if s in vocabs)
    lines += [f"sizes: {shapes}", f"rounds: {ROUNDS}, interleaved within each size and precision",
              "MFU: flops_per_token x tokens/s / the group's 2048^3 matmul peak (bf16 rows: the bf16 peak)",
              f"nanoGPT: {'../shared/peers/nanoGPT, unmodified' if nanogpt_peer.available() else nanogpt_peer.ABSENT}",
              f"took {seconds / 60:.1f} min; machine: {machine()}"]
    return lines


def main() -> None:
    start = time.perf_counter()
    sizes = [s for s in os.environ.get("BENCH_SCALE_SIZES", "fixed,mid,124M").split(",") if s]
    precisions = [p for p in os.environ.get("BENCH_SCALE_PRECISIONS", "fp32,bf16").split(",") if p]
    unknown = sorted(set(sizes) - set(SIZES)) + sorted(set(precisions) - {"fp32", "bf16"})
    if unknown:
        raise SystemExit(f"unknown sizes or precisions {unknown}: sizes {list(SIZES)}, precisions fp32, bf16")
    data = {s: str(gpt2_vocab_data() if s == "124M" else shakespeare_data()) for s in sizes}
    from lmforge.data.store import read_meta

    vocabs = {s: int(read_meta(Path(d))["vocab_size"]) for s, d in data.items()}
    log(f"bench scale | {machine()} | {ROUNDS} rounds | sizes {sizes} | {precisions}")
    rows: list[dict] = []
    for s in sizes:
        for p in precisions:  # the table so far after each group: a stopped run keeps what it measured
            rows += run_group(s, p, data[s])
            write_summary("scale", report(rows, vocabs, time.perf_counter() - start))


if __name__ == "__main__":
    sys.exit(main())
