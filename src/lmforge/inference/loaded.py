"""Loading a checkpoint for use: the model in eval mode on its device, its tokenizer and special ids.

Owns `LoadedModel` and `load_for_inference`, which every inference function and command starts
from; the model itself is built by `lmforge.checkpoint.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.base.tokenizer import load_tokenizer, special_ids
from lmforge.base.tokenizer_config import tokenizer_settings
from lmforge.checkpoint import load_model
from lmforge.inference.checks import inference_device


@dataclass
class LoadedModel:
    """A checkpoint ready for inference."""

    model: nn.Module
    """GPT, Bert or a classifier, in eval mode on `device`."""
    tokenizer: object
    """The checkpoint's `tokenizers.Tokenizer`."""
    specials: object
    """Its special token ids (`lmforge.base.tokenizer.special_ids`)."""
    device: torch.device
    path: Path
    """The checkpoint folder (a run folder resolves to its best, else last, checkpoint)."""
    architecture: dict
    """The checkpoint's config.json: model_type and shape (and a classifier's labels)."""


def load_for_inference(checkpoint: str | Path, device: str = "auto") -> LoadedModel:
    """A checkpoint folder (or a run folder: its best, else last checkpoint) ready for inference.

    `device` is checked before the checkpoint is read (`inference_device`)."""
    dev = inference_device(device)
    model, ckpt = load_model(checkpoint, device=dev)
    model.eval()
    path = ckpt.path
    tokenizer = load_tokenizer(ckpt.tokenizer_file)
    vocab = tokenizer.get_vocab_size()
    if vocab > ckpt.model_config["vocab_size"]:
        raise ValueError(f"{path}: tokenizer.json has {vocab} tokens but the model only "
                         f"{ckpt.model_config['vocab_size']}; the files do not belong together")
    specials = special_ids(tokenizer, tokenizer_settings(path))  # an imported model's named eos/bos
    return LoadedModel(model=model, tokenizer=tokenizer, specials=specials, device=dev, path=path,
                       architecture=ckpt.model_config)
