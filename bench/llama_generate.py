"""Greedy generation tokens/s of a Llama-class model: `lmforge.inference.generate` against
transformers' `generate` with its KV cache, on the same weights.

The workload's shape as a Llama (4 layers, width 256, 4 query heads over 2 key / value heads,
SwiGLU 704, rotary positions, untied output layer, vocabulary 8192), lmforge's random weights
loaded into `LlamaForCausalLM` through the export's config and weight map. A 16-token prompt
from the tiny Shakespeare validation split, 256 new tokens, greedy, batch 1, fp32, KV cache on
both sides (lmforge's holds the 2 key / value heads). Both sides run in this process,
interleaved A B A B; a call's rate is 256 / its wall time; the tokens of both sides are compared.

    python bench/llama_generate.py           # BENCH_ROUNDS=3 BENCH_GEN_CALLS=3 (bench/generate.py's race)
"""

from __future__ import annotations

import sys

from common import SEED, WORKLOAD, shakespeare_data, transformers_kwargs
from generate import NEW, PROMPT, race

CONTEXT = 512  # 16 + 256 tokens, no sliding window on either side


def main() -> None:
    import torch
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaForCausalLM

    from lmforge.data.store import TokenStore, read_meta
    from lmforge.models.hf_llama import llama_config_to_hf, llama_to_hf
    from lmforge.models.llama import Llama
    from lmforge.models.llama_config import LlamaConfig

    data = shakespeare_data()
    prompt = [int(i) for i in TokenStore(data, "val").tokens[:PROMPT]]
    pad = int(read_meta(data)["special_ids"]["pad"])
    torch.manual_seed(SEED)
    shape = {k: WORKLOAD[k] for k in ("vocab_size", "n_layer", "n_head", "n_embd")}
    model = Llama(LlamaConfig(context=CONTEXT, n_kv_head=2, **shape)).eval()
    arch = {"model_type": "llama", **model.config.to_dict()}
    hf = LlamaForCausalLM(HFLlamaConfig(**transformers_kwargs(llama_config_to_hf(arch, None, None, pad)))).eval()
    hf.load_state_dict(llama_to_hf(model.state_dict(), tied=False))
    race(model, hf, prompt, pad, name="llama_generate", what="lmforge generate (llama)",
         title=f"generate, Llama 4x256 (4 heads / 2 kv heads): {PROMPT}-token prompt, {NEW} new tokens, greedy, "
               "batch 1, fp32, KV cache")


if __name__ == "__main__":
    sys.exit(main())
