"""Activation checkpointing per block (`train.activation_checkpointing: true`).

Each transformer block keeps only its input during the forward pass and runs its forward again
in the backward (torch.utils.checkpoint, non-reentrant). The random generators are restored for
the second forward, so dropout masks (lmforge's CPU dropout and the attention kernel's seeded
masks alike) are the ones of the first: the losses and gradients are those of a run without it.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.heads import blocks_and_final

ACTIVATIONS_PER_BLOCK = 16
"""Tensors of (batch, context, width) a GPT or BERT block keeps for its backward, counted in
widths: the norms' inputs and outputs, q/k/v, the attention output, the 4x-wide MLP input and
activation (a BERT block is close to it)."""


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a GPT, a BERT, or a classifier's backbone."""
    return blocks_and_final(getattr(model, "backbone", model))[0]


def enable(model: nn.Module) -> int:
    """Checkpoint every block's forward from now on; the number of blocks."""
    blocks = model_blocks(model)
    for block in blocks:
        if not isinstance(block.forward, functools.partial):  # enabling twice changes nothing
            block.forward = functools.partial(_checkpointed, block.forward)
    return len(blocks)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpointing_note(model: nn.Module, batch_size: int, context: int) -> str:
    """What checkpointing saves, estimated for a full micro-batch, for the run header."""
    blocks = model_blocks(model)
    width = getattr(model.config, "n_embd", None) or getattr(model.config, "hidden_size")
    bytes_per = next(model.parameters()).element_size()
    one = batch_size * context * width * bytes_per  # one (B, T, C) tensor
    without = len(blocks) * ACTIVATIONS_PER_BLOCK * one
    with_it = len(blocks) * one + ACTIVATIONS_PER_BLOCK * one  # block inputs, plus one block recomputed
    return (f"activation checkpointing: {len(blocks)} blocks keep their input only and recompute their forward "
            f"in the backward: about {without / 2**20:,.0f} MiB of block activations become "
            f"{with_it / 2**20:,.0f} MiB at batch {batch_size} x {context} tokens, for one more forward pass")
