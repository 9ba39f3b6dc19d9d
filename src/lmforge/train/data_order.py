"""The order samples are seen in: a seeded permutation per epoch, cut into optimizer-step windows.

The order depends only on (seed, epoch), so a resumed run seeks straight to its position
instead of replaying the batches before it.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def window_indices(permutation: torch.Tensor, step_in_epoch: int, batch_size: int,
                   grad_accum: int) -> list[list[int]]:
    """Sample indices of the micro-batches of optimizer step `step_in_epoch` of an epoch."""
    window = batch_size * grad_accum
    start = step_in_epoch * window
    chunk = permutation[start:start + window].tolist()
    assert len(chunk) == window, "the loop never asks past the last full window"
    return [chunk[i:i + batch_size] for i in range(0, window, batch_size)]
