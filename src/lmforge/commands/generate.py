"""`lmforge generate`: stream continuations of one prompt from a GPT checkpoint to a text stream."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import torch

from lmforge.inference.checks import check_count, check_text
from lmforge.inference.generate import SamplingConfig
from lmforge.inference.loaded import load_for_inference
from lmforge.inference.text import stream_text


def generate_command(out: TextIO, checkpoint: str | Path, prompt: str, cfg: SamplingConfig,
                     num_samples: int = 1, device: str = "auto") -> list[str]:
    """Print `num_samples` continuations of `prompt` as they come; return the continuations.

    The samples share one generator, seeded from `cfg.seed` (else at random), so they differ
    from each other and a seeded command prints the same text every time.
    """
    check_count(num_samples, "--num-samples")
    check_text(prompt, "--prompt")
    loaded = load_for_inference(checkpoint, device)
    generator = torch.Generator(device=loaded.device)
    generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    texts = []
    for index in range(num_samples):
        pieces = stream_text(loaded, prompt, cfg, generator)  # checks the checkpoint before printing
        if num_samples > 1:
            out.write(f"--- sample {index + 1} ---\n")
        out.write(prompt)
        text = ""
        for piece in pieces:
            text += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        texts.append(text)
    return texts
