"""Helpers shared by the server tests (imported by name: tests/serve is on sys.path under pytest)."""

from __future__ import annotations

import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.llama import Llama
from lmforge.models.llama_config import LlamaConfig

PROMPTS = [[3, 14, 15, 9, 26], [5], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1, 2, 3], [40, 41], [33, 2, 60, 9]]


def peaked(context: int, vocab: int = 61, seed: int = 0, kind: str = "gpt") -> GPT | Llama:
    """A random GPT (or Llama, with grouped-query attention) with larger weights than the usual
    init: peaked, varied greedy output."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = Llama(LlamaConfig(vocab_size=vocab, context=context, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                  intermediate_size=48))
    else:
        model = GPT(GPTConfig(vocab_size=vocab, context=context, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model.eval()
