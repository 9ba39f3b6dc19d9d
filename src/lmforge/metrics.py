"""Metrics shared by tasks and evaluation: shifted targets, token accuracy, perplexity."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts label t+1; the last position has none.

    Shifting the labels (a small int tensor) instead of the logits avoids copying the
    (B, T, V) logits, the largest tensor of a step.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) over positions whose target is not IGNORE_INDEX; targets already shifted."""
    mask = targets != IGNORE_INDEX
    predictions = logits.detach().argmax(dim=-1)
    return ((predictions == targets) & mask).sum(), mask.sum()


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Next-token accuracy with the usual shift, ignoring IGNORE_INDEX labels (GPT2-chitchat's calculate_acc)."""
    correct, counted = count_correct(logits, shift_labels(labels))
    return correct.item() / max(1, counted.item())


def perplexity(loss: float) -> float:
    """exp(loss), capped so a diverged run reports a large finite number."""
    return math.exp(min(loss, 50.0))
