"""The causal LM families generation can run, and the one-token decoder of each.

`CAUSAL_LMS` are the model classes with the decoder interface generation, chat and the server
use: `config.context`, `new_kv_cache(batch, max_len)`, `forward(ids, attention_mask, kv_cache,
last_only=...)`, `hidden_states(ids)`. `decoder_for(model)` is the step-by-step decoder of
models/gpt_decode.py or models/llama_decode.py, with one `step(tokens, cache)` interface.
"""

from __future__ import annotations

from torch import nn

from lmforge.models.gpt import GPT
from lmforge.models.gpt_decode import Decoder
from lmforge.models.llama import Llama
from lmforge.models.llama_decode import LlamaDecoder

CAUSAL_LMS = (GPT, Llama)
CAUSAL_LM_TYPES = ("gpt", "llama")
"""config.json model_type of each causal LM family."""


def decoder_for(model: nn.Module) -> Decoder | LlamaDecoder | None:
    """The module-free decode step of a GPT or Llama in eval mode; None for other modules."""
    if isinstance(model, GPT):
        return Decoder(model)
    if isinstance(model, Llama):
        return LlamaDecoder(model)
    return None
