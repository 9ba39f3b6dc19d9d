"""Text in, text out with a loaded GPT: `stream_text` (one prompt, pieces as they come) and
`generate_texts` (several prompts).

`lmforge.inference.generate` works on token ids only; this module adds the tokenizer around
it: prompts are encoded, generation stops at the end-of-text token unless `cfg.stop_ids` names
other stops, and new tokens are decoded without special tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from lmforge.inference.checks import check_text
from lmforge.inference.generate import SamplingConfig, generate, stream_generate
from lmforge.inference.loaded import LoadedModel
from lmforge.models.decoding import CAUSAL_LMS


def stream_text(loaded: LoadedModel, prompt: str, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Pieces of the continuation of `prompt` as tokens are generated (whole characters only).

    The checkpoint and prompt are checked here, before the first piece is asked for.
    """
    cfg = _text_config(loaded, cfg)
    ids = _prompt_ids(loaded, prompt)
    return _pieces(loaded, stream_generate(loaded.model, ids, cfg, generator=generator))


def generate_texts(loaded: LoadedModel, prompts: list[str], cfg: SamplingConfig,
                   generator: torch.Generator | None = None) -> list[str]:
    """The continuation of each prompt (without the prompt), in order.

    The prompts run one after another on one generator (one seeded from `cfg.seed` when none is
    given): greedy output equals generating each prompt alone, and a seeded run gives the same
    texts every time. One after another rather than as one padded batch, since a batch would
    need per-row positions and cache lengths, and on a CPU a batch of short prompts barely gains.
    """
    cfg = _text_config(loaded, cfg)
    encoded = [_prompt_ids(loaded, prompt, index) for index, prompt in enumerate(prompts)]
    if generator is None and cfg.seed is not None and cfg.temperature > 0:
        generator = torch.Generator(device=loaded.device).manual_seed(cfg.seed)
    return [loaded.tokenizer.decode(generate(loaded.model, ids, cfg, generator=generator), skip_special_tokens=True)
            for ids in encoded]


def _text_config(loaded: LoadedModel, cfg: SamplingConfig) -> SamplingConfig:
    """`cfg`, stopping at the end-of-text token when it names no stop; a GPT or Llama checkpoint is required."""
    if not isinstance(loaded.model, CAUSAL_LMS):
        raise ValueError(f"{loaded.path}: a {type(loaded.model).__name__} checkpoint cannot generate text; "
                         "generation needs a GPT or Llama (use `lmforge embed` for BERT, `lmforge classify` for "
                         "classifiers)")
    if cfg.stop_ids == () and loaded.specials.eos is not None:
        cfg = dataclasses.replace(cfg, stop_ids=(loaded.specials.eos,))
    return cfg


def _prompt_ids(loaded: LoadedModel, prompt: str, index: int = 0) -> list[int]:
    """The prompt's token ids; an empty prompt starts a new document (after the end-of-text token)."""
    ids = loaded.tokenizer.encode(check_text(prompt, f"prompt {index}")).ids
    if ids:
        return ids
    if loaded.specials.eos is None:
        raise ValueError(f"prompt {index} ({prompt!r}) has no tokens and this tokenizer has no end-of-text "
                         "token to start from; give some text")
    return [loaded.specials.eos]


def _pieces(loaded: LoadedModel, tokens: Iterator[int]) -> Iterator[str]:
    new: list[int] = []
    shown = ""
    for token in tokens:
        new.append(token)
        text = loaded.tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character still incomplete
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    final = loaded.tokenizer.decode(new, skip_special_tokens=True)
    if final.startswith(shown) and final[len(shown):]:
        yield final[len(shown):]
