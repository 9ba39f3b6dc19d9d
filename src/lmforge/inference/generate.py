"""Sampling from a causal LM (GPT or Llama-class): temperature, top-k, top-p, repetition penalty,
stop tokens, KV cache.

Owns: `SamplingConfig`, `stream_generate` / `generate`, and the logit filters they use.
Generation sees token ids only (tokenizing and decoding belong to the caller) and draws
randomness from an explicit `torch.Generator`.

Context handling: the prompt is left-trimmed to the model context. With the KV cache the
prompt is prefilled in one forward and each new token costs one single-token forward. Once
prompt + generated tokens fill the context, the cache cannot grow (learned positions end
there), so generation slides a window: every further step re-runs the model without a
cache on the last `context` tokens. That is exactly what the no-cache path does at every
step, so both paths give the same tokens. The cache holds the positions this call can reach
(prompt + max_new_tokens, at most the context): a Llama with a 128k context does not allocate
128k positions for a short answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.models.decoding import decoder_for
from lmforge.models.gpt import GPT


@dataclass(kw_only=True, slots=True)
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = 200
    """Most tokens to generate (fewer if a stop id comes first)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax), top_k / top_p are then ignored."""
    top_k: int | None = None
    """Sample only among the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: only among the smallest set of most likely tokens whose probability reaches p."""
    repetition_penalty: float = 1.0
    """> 1 makes tokens already in prompt + output less likely (positive logits divided, negative multiplied)."""
    stop_ids: tuple[int, ...] = ()
    """Token ids that end generation; the stop id itself is not returned."""
    seed: int | None = None
    """Seed for a fresh generator when none is passed in; None uses torch's global RNG."""

    def __post_init__(self) -> None:
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        errors = []
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            errors.append(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not (_is_number(self.temperature) and 0 <= self.temperature < math.inf):
            errors.append(f"temperature={self.temperature!r}: must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            errors.append(f"top_k={self.top_k!r}: must be an integer >= 1 or None")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            errors.append(f"top_p={self.top_p!r}: must be in (0, 1] or None")
        if not (_is_number(self.repetition_penalty) and 0 < self.repetition_penalty < math.inf):
            errors.append(f"repetition_penalty={self.repetition_penalty!r}: must be a finite number > 0 (1 = off)")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            errors.append(f"seed={self.seed!r}: must be an integer from 0 to 2**64 - 1 or None")
        if errors:
            raise ValueError("invalid sampling config: " + "; ".join(errors))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A real number (NaN fails every comparison the checks make)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def apply_repetition_penalty(logits: Tensor, context_ids: Tensor | Sequence[int], penalty: float) -> Tensor:
    """Penalize every token id present in `context_ids` (CTRL / HF rule); returns a new tensor.

    logits (..., V), context_ids (..., N) with matching leading dims (or 1-D for 1-D logits).
    Positive logits are divided by `penalty`, negative ones multiplied, so penalty > 1 always
    lowers them. Repeated ids are penalized once.
    """
    if penalty == 1.0:
        return logits
    ids = torch.as_tensor(context_ids, dtype=torch.long, device=logits.device)
    if ids.numel() == 0:
        return logits
    seen = logits.gather(-1, ids)  # (..., N)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, ids, seen)  # duplicates write the same value


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits (ties broken by torch.topk), the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # (..., k)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the top token has mass_before 0 < p: always kept
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def _pick(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """logits (V,) float32 -> next token id, a (1,) long tensor."""
    if cfg.temperature == 0:  # max's index is the first maximum, as argmax's, at half the cost on CPU
        return logits.max(-1, keepdim=True).indices
    logits = logits / cfg.temperature
    candidates = None
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        # same distribution as top_k_filter, but top-p and softmax then work on k entries, not V
        logits, candidates = torch.topk(logits, cfg.top_k)  # (k,), (k,)
    if cfg.top_p is not None:
        logits = top_p_filter(logits, cfg.top_p)
    choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (1,)
    return choice if candidates is None else candidates[choice]


def stream_generate(model: GPT, prompt_ids: Sequence[int], cfg: SamplingConfig,
                    generator: torch.Generator | None = None, use_cache: bool = True) -> Iterator[int]:
    """Yield new token ids one at a time; stops at a stop id (not yielded) or after max_new_tokens.

    Runs the model in eval mode under torch.inference_mode() and restores its training flag
    when the iterator finishes or is closed.
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: give at least one token id (e.g. the eos id to start from nothing)")
    context = model.config.context
    device = next(model.parameters()).device
    if generator is None and cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    stop = frozenset(cfg.stop_ids)
    penalize = cfg.repetition_penalty != 1.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            # prompt + output so far: the repetition penalty sees all of it, the model the last `context`
            n = len(prompt_ids)
            # grown as it fills: a huge max_new_tokens that a stop id ends early allocates nothing
            ids = torch.empty(n + min(cfg.max_new_tokens, 1024), dtype=torch.long, device=device)
            ids[:n] = torch.as_tensor(prompt_ids, dtype=torch.long)
            cache = model.new_kv_cache(1, min(context, min(n, context) + cfg.max_new_tokens)) if use_cache else None
            decoder = decoder_for(model) if use_cache else None  # None: through the modules
            logits = model(ids[None, max(0, n - context):n], kv_cache=cache, last_only=True)  # (1, 1, V)
        for step in range(1, cfg.max_new_tokens + 1):
            # no yield inside inference_mode: the caller's code between tokens must run in its own mode
            with torch.inference_mode():
                last = logits[0, -1].float()  # (V,)
                if penalize:
                    last = apply_repetition_penalty(last, ids[:n], cfg.repetition_penalty)
                token = _pick(last, cfg, generator)  # (1,)
                token_id = int(token)
                if token_id in stop:
                    return
                if n == len(ids):
                    ids = torch.cat((ids, torch.empty_like(ids)))
                ids[n] = token_id
                n += 1
            yield token_id
            if step == cfg.max_new_tokens:
                return  # limit reached: skip the forward for a token nobody asks for
            with torch.inference_mode():
                if cache is not None and cache.length < cache.max_len:  # (1, 1, V)
                    logits = decoder.step(token[None], cache) if decoder else model(token[None], kv_cache=cache)
                else:  # no cache, or cache full: run on the last `context` tokens
                    logits = model(ids[None, max(0, n - context):n], last_only=True)  # (1, 1, V)
    finally:
        model.train(was_training)


def generate(model: GPT, prompt_ids: Sequence[int], cfg: SamplingConfig,
             generator: torch.Generator | None = None, use_cache: bool = True) -> list[int]:
    """All new token ids at once (see stream_generate)."""
    return list(stream_generate(model, prompt_ids, cfg, generator=generator, use_cache=use_cache))
