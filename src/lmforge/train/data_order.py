"""The order samples are seen in: a seeded permutation per epoch, cut into optimizer-step windows.

The order depends only on (seed, epoch), so a resumed run seeks straight to its position
instead of replaying the batches before it.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


def window_indices(permutation: torch.Tensor, sample_start: int, batch_size: int, grad_accum: int,
                   rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's micro-batches of the optimizer step that starts at `sample_start` of an epoch.

    The step consumes batch_size x grad_accum x world_size samples of the permutation; rank r
    takes the r-th slice, so ranks never overlap and the position is counted in samples: a run
    saved with N processes resumes with M at the same place.
    """
    window = batch_size * grad_accum
    start = sample_start + rank * window
    chunk = permutation[start:start + window].tolist()
    assert len(chunk) == window, "the loop never asks past the last full window"
    return [chunk[i:i + batch_size] for i in range(0, window, batch_size)]
