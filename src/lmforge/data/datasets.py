"""The packed language-modelling Dataset over a TokenStore (task "lm").

The other tasks' datasets live with their tasks: `lmforge.data.mlm` (sentence pairs),
`lmforge.train.task_classify` and `lmforge.train.task_dialogue`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lmforge.data.store import TokenStore


class PackedLMDataset(Dataset):
    """The split's token stream (documents joined by EOS) cut into non-overlapping blocks.

    Item i is {"input_ids": LongTensor(context)} = tokens[i*context:(i+1)*context]; the last
    partial block is dropped (a split shorter than one block is empty; the loop says so).
    Labels are the inputs themselves (HF convention: the loss shifts them), so `pad_collate`
    fills "labels" in.
    """

    def __init__(self, store: TokenStore, context: int) -> None:
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.store = store
        self.context = context

    def __len__(self) -> int:
        return len(self.store.tokens) // self.context

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range ({n} blocks)")
        start = (i % n) * self.context
        block = np.asarray(self.store.tokens[start:start + self.context], dtype=np.int64)
        return {"input_ids": torch.from_numpy(block)}
