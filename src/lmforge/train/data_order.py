"""The order samples are seen in: a seeded permutation per epoch, cut into optimizer-step
windows, and the run's position in it.

The order depends only on (seed, epoch), so a resumed run seeks straight to its position
instead of replaying the batches before it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=1)
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's sample order. Kept between calls, since every step reads it and a large
    corpus's is slow to draw (millions of samples): read it, never write it."""
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


@dataclass
class DataPosition:
    """Where a run is in its sample order; saved in every checkpoint so a resume seeks straight to it."""

    epoch: int = 0
    epoch_sample: int = 0
    """Samples of this epoch's permutation already consumed (by all ranks together)."""

    def turn_epoch_if_done(self, window: int, num_samples: int) -> bool:
        """Start the next epoch when another full window of `window` samples no longer fits in
        this one (the remainder is left out); True when it did."""
        if self.epoch_sample + window <= num_samples:
            return False
        self.epoch, self.epoch_sample = self.epoch + 1, 0
        return True

    def epochs(self, num_samples: int) -> float:
        """Fractional epochs, by samples (whatever the world size)."""
        return round(self.epoch + self.epoch_sample / num_samples, 4)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "epoch_sample": self.epoch_sample}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.epoch_sample = int(state["epoch"]), int(state["epoch_sample"])
