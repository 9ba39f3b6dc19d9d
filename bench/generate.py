"""Generation tokens/s: `lmforge.inference.generate` against transformers' `generate` with its KV cache.

The workload's GPT (4 layers, 4 heads, 256 wide, vocabulary 8192) with the same weights on
both sides (lmforge's, converted by lmforge.models.hf), a 16-token prompt from the tiny
Shakespeare validation split, 256 new tokens, greedy, batch 1, fp32, KV cache on both sides.
16 + 256 tokens do not fit the training context of 256, so this model has 512 positions (only
the position table differs; no sliding window on either side). Both sides run in this process,
interleaved A B A B; a call's rate is 256 / its wall time; the tokens of both sides are compared.

    python bench/generate.py           # BENCH_ROUNDS=3 BENCH_GEN_CALLS=3
"""

from __future__ import annotations

import os
import sys

from common import (ROUNDS, SEED, WORKLOAD, interleave, log, machine, median, paired_ratio, shakespeare_data,
                    table, timed, write_summary)

CALLS = int(os.environ.get("BENCH_GEN_CALLS", "3"))
PROMPT, NEW, CONTEXT = 16, 256, 512


def main() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.data.store import TokenStore, read_meta
    from lmforge.models.gpt import GPT, GPTConfig
    from lmforge.models.hf import gpt2_config_to_hf, gpt2_to_hf

    data = shakespeare_data()
    prompt = [int(i) for i in TokenStore(data, "val").tokens[:PROMPT]]
    pad = int(read_meta(data)["special_ids"]["pad"])
    torch.manual_seed(SEED)
    arch = {k: WORKLOAD[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}
    model = GPT(GPTConfig(context=CONTEXT, **arch)).eval()
    hf_config = gpt2_config_to_hf({"model_type": "gpt", **model.config.to_dict()}, None, None, None)
    hf_config.pop("architectures")
    hf_config.pop("model_type")
    hf = GPT2LMHeadModel(GPT2Config(**hf_config)).eval()
    hf.load_state_dict(gpt2_to_hf(model.state_dict()), strict=False)
    hf.tie_weights()
    race(model, hf, prompt, pad, name="generate", what="lmforge generate",
         title=f"generate: {PROMPT}-token prompt, {NEW} new tokens, greedy, batch 1, fp32, KV cache")


def race(model, hf, prompt: list[int], pad: int, *, name: str, what: str, title: str) -> None:
    """lmforge's `generate` on `model` against `hf.generate` (same weights), greedy, interleaved for
    ROUNDS rounds of CALLS calls; prints and keeps the table runs/bench/<name>.md."""
    import torch

    from lmforge.inference.generate import SamplingConfig, generate

    cfg = SamplingConfig(max_new_tokens=NEW, temperature=0.0)
    prompt_hf = torch.tensor([prompt])
    outputs: dict[str, list[int]] = {}

    def ours() -> list[float]:
        rates = []
        for _ in range(CALLS):
            seconds = timed(lambda: outputs.__setitem__("lmforge", generate(model, prompt, cfg)))
            rates.append(NEW / seconds)
        return rates

    def theirs() -> list[float]:
        rates = []
        for _ in range(CALLS):
            def call():
                with torch.inference_mode():
                    out = hf.generate(prompt_hf, attention_mask=torch.ones_like(prompt_hf), max_new_tokens=NEW,
                                      min_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=pad)
                outputs["transformers"] = out[0, len(prompt):].tolist()
            rates.append(NEW / timed(call))
        return rates

    log(f"bench {name} | {machine()} | {ROUNDS} rounds x {CALLS} calls per side")
    ours(), theirs()  # warm-up of both, not counted
    ref = "transformers generate (KV cache)"
    rates = interleave({"lmforge": ours, ref: theirs}, ROUNDS, "tokens/s",
                       label=lambda n: what if n == "lmforge" else n)
    same = sum(a == b for a, b in zip(outputs["lmforge"], outputs["transformers"]))
    rows = [(side, median(values), "") for side, values in rates.items()]
    lines = table(title, rows, "tokens/s", ref, extra={
        "lmforge / transformers": f"{paired_ratio('lmforge', ref):.2f}x (target >= 2x)",
        "same greedy tokens": f"{same} of {NEW} (same weights; float rounding may flip a near tie)",
        "machine": machine()})
    write_summary(name, lines)

if __name__ == "__main__":
    sys.exit(main())
