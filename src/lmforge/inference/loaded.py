"""Using a trained checkpoint: load model + tokenizer, and stream generated text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

import torch
from torch import nn

from lmforge.inference.generate import SamplingConfig, stream_generate
from lmforge.base.runtime import pick_device
from lmforge.base.tokenizer import load_tokenizer, special_ids
from lmforge.checkpoint import load_model


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    specials: object
    device: torch.device
    path: Path
    architecture: dict  # the checkpoint's config.json


def load_for_inference(checkpoint: str | Path, device: str = "auto") -> LoadedModel:
    """A checkpoint folder (or a run folder: its best, else last checkpoint) ready for inference."""
    dev, _ = pick_device(device)
    model, ckpt = load_model(checkpoint, device=dev)
    model.eval()
    path = ckpt.path
    tokenizer = load_tokenizer(ckpt.tokenizer_file)
    vocab = tokenizer.get_vocab_size()
    if vocab > ckpt.model_config["vocab_size"]:
        raise ValueError(f"{path}: tokenizer.json has {vocab} tokens but the model only "
                         f"{ckpt.model_config['vocab_size']}; the files do not belong together")
    return LoadedModel(model=model, tokenizer=tokenizer, specials=special_ids(tokenizer), device=dev, path=path,
                       architecture=ckpt.model_config)


def stream_text(loaded: LoadedModel, prompt: str, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield pieces of text as tokens are generated (whole characters only)."""
    ids = loaded.tokenizer.encode(prompt).ids
    new: list[int] = []
    shown = ""
    for token in stream_generate(loaded.model, ids, cfg, generator=generator):
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


def generate_to(out: TextIO, checkpoint: str | Path, prompt: str, cfg: SamplingConfig,
                num_samples: int = 1, device: str = "auto") -> list[str]:
    """The `lmforge generate` command: print `num_samples` continuations of `prompt` as they come."""
    loaded = load_for_inference(checkpoint, device)
    kind = type(loaded.model).__name__
    if kind != "GPT":
        raise ValueError(f"{loaded.path}: a {kind} checkpoint cannot generate text; generation needs a GPT "
                         "(use `lmforge embed` for BERT, `lmforge classify` for classifiers)")
    if cfg.stop_ids == () and loaded.specials.eos is not None:
        cfg = dataclasses.replace(cfg, stop_ids=(loaded.specials.eos,))
    generator = torch.Generator(device=loaded.device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    texts = []
    for index in range(num_samples):
        if num_samples > 1:
            out.write(f"--- sample {index + 1} ---\n")
        out.write(prompt)
        pieces = []
        for piece in stream_text(loaded, prompt, cfg, generator):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        texts.append("".join(pieces))
    return texts
