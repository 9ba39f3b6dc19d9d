"""The loop's own state and the random generators, as stateful parts of a checkpoint.

A checkpoint's training_state.pt is the composition of the state dicts of the run's stateful
parts (see `lmforge.train.loop.Trainer.state_dict`): the loop state here (with the data
position), the optimizer (`lmforge.train.parallel.NamedOptimizerState`), the fp16 loss scaler
and the RNG here. Each part saves and restores only itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from lmforge.train.data_order import DataPosition


@dataclass
class LoopState:
    """Loop position and history; saved in every checkpoint so a resume continues exactly."""

    step: int = 0
    tokens: int = 0
    examples: int = 0
    best_val_loss: float = math.inf
    best_score: float = math.inf  # train.best_metric, lower is better (see tasks.best_score)
    evals_since_best: int = 0
    non_finite_in_row: int = 0
    micro_split: int = 1
    """Out of memory halves every micro-batch; the split stays for the rest of the run."""
    elapsed: float = 0.0
    position: DataPosition = field(default_factory=DataPosition)

    def state_dict(self) -> dict:
        """The counters and the data position, in one flat dict."""
        counters = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "position"}
        return {**counters, **self.position.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state)
        for f in fields(self):
            if f.name != "position":
                setattr(self, f.name, state[f.name])

    def where(self, train_samples: int) -> dict:
        """Where the run is, for every event: steps, fractional epochs, tokens, examples."""
        return {"step": self.step, "epoch": self.position.epochs(train_samples),
                "tokens": self.tokens, "examples": self.examples}


class RngState:
    """The torch generators that dropout and the attention kernels draw from: the CPU's, and the
    GPU's on CUDA (data order and masking use their own seeded generators)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)


def upgrade_training_state(training: dict) -> dict:
    """A training state saved before the RNG was a part of its own (flat rng_torch / rng_cuda)."""
    if "rng" in training or "rng_torch" not in training:
        return training
    rng = {"torch": training["rng_torch"], **({"cuda": training["rng_cuda"]} if "rng_cuda" in training else {})}
    return {**training, "rng": rng}



class DataIdentity:
    """What the run trains on, as a stateful part: meta.json's content hash of the data folder and
    the training and validation samples the loop sees. Every checkpoint saves the current one; a
    resume loads the saved one beside it and says what changed (`changes`)."""

    def __init__(self, current: dict) -> None:
        self.current, self.saved = current, None

    def state_dict(self) -> dict:
        return dict(self.current)

    def load_state_dict(self, state: dict) -> None:
        self.saved = dict(state)

    def changes(self) -> list[str]:
        """What differs between the saved data and the current one ([] without a saved one)."""
        if self.saved is None:
            return []
        found = []
        for key, split in (("train_samples", "train"), ("val_samples", "val")):
            old, new = self.saved.get(key), self.current.get(key)
            if old is not None and new is not None and old != new:
                found.append(f"{split} {old:,} -> {new:,} samples")
        old, new = self.saved.get("content_sha256"), self.current.get("content_sha256")
        if old and new and old != new:
            found.append(f"content sha256 {old[:12]}... -> {new[:12]}...")
        return found
