"""Which parameters a run trains (`train.trainable`, for every task), and the run header's line
about them: trainable / total parameters and the optimizer state they cost.

"all" trains everything; "head" the output layer (a classifier's head, GPT's lm_head, which is
tied to the token embeddings, BERT's pretraining heads); "last_blocks:K" the head, the last K
blocks and the final norm (GPT's ln_f, BERT's pooler). With `train.lora` the adapters are what
trains (`lmforge.train.lora`), and this setting must stay "all".
"""

from __future__ import annotations

from torch import nn

from lmforge.base.config import TrainConfig
from lmforge.models.heads import SequenceClassifier, apply_trainable as classifier_trainable, select_trainable
from lmforge.models.lora import parameter_counts
from lmforge.train.activation_checkpointing import checkpointing_note

ADAMW_STATE_BYTES = 8
"""exp_avg and exp_avg_sq, float32, per trainable parameter."""


def apply_trainable(model: nn.Module, spec: str) -> tuple[int, int]:
    """Freeze what `spec` leaves out of any lmforge model; (trainable, total) distinct parameters."""
    if isinstance(model, SequenceClassifier):
        return classifier_trainable(model, spec)
    select_trainable(model, spec, output_head(model), model)
    return parameter_counts(model)


def output_head(model: nn.Module) -> nn.Module:
    """The layer that makes a GPT's or a BERT's outputs (lm_head; the pretraining heads)."""
    for name in ("lm_head", "cls"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__}: no output layer (lm_head or cls) for train.trainable=head")


def model_summary(model: nn.Module, arch: dict, t: TrainConfig, context: int) -> str:
    """The run header's model line: type, parameters, what trains and its AdamW state; with
    activation checkpointing a line before it says what that saves."""
    trainable, total = parameter_counts(model)
    state = trainable * ADAMW_STATE_BYTES
    how = ("all trainable" if trainable == total else
           f"{trainable:,} trainable ({trainable / max(1, total):.2%}"
           + (f", LoRA rank {arch['lora']['rank']}" if "lora" in arch else f", {t.trainable}") + ")")
    line = f"model {arch['model_type']} {total:,} parameters, {how}, AdamW state {_size(state)}"
    note = checkpointing_note(model, t.batch_size, context) if t.activation_checkpointing else None
    return f"{note}\n{line}" if note else line


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
