"""Batching: right-pad samples to the longest in the batch (inputs: pad id, labels: -100)."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # labels the loss skips (torch cross_entropy's default ignore_index)


def pad_collate(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into a batch, right-padded to the longest "input_ids".

    - "input_ids" (1-D) padded with `pad_id`;
    - "labels" padded with -100; a sample without labels uses its input_ids;
    - "attention_mask": 1 on real tokens, 0 on padding (any given one is rebuilt);
    - other 1-D fields as long as input_ids (e.g. "token_type_ids") padded with 0;
    - scalar fields (e.g. "label") stacked into shape (B,).
    """
    if not samples:
        raise ValueError("pad_collate got an empty list of samples")
    lengths = [len(s["input_ids"]) for s in samples]
    batch, longest = len(samples), max(lengths)
    input_ids = torch.full((batch, longest), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        ids = torch.as_tensor(s["input_ids"], dtype=torch.long)
        lab = torch.as_tensor(s["labels"], dtype=torch.long) if "labels" in s else ids
        if lab.shape != ids.shape:
            raise ValueError(f"sample {i}: labels shape {tuple(lab.shape)} differs from input_ids "
                             f"shape {tuple(ids.shape)}")
        input_ids[i, :n] = ids
        labels[i, :n] = lab
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    for key in samples[0]:
        if key in out:
            continue
        missing = [i for i, s in enumerate(samples) if key not in s]
        if missing:
            raise ValueError(f"pad_collate: field {key!r} is in sample 0 but not in sample(s) "
                             f"{missing[:5]}")
        values = [torch.as_tensor(s[key]) for s in samples]
        if all(v.dim() == 0 for v in values):
            out[key] = torch.stack(values)  # (B,)
        elif all(v.dim() == 1 and len(v) == n for v, n in zip(values, lengths)):
            padded = torch.zeros((batch, longest), dtype=values[0].dtype)  # (B, T)
            for i, (v, n) in enumerate(zip(values, lengths)):
                padded[i, :n] = v
            out[key] = padded
        else:
            raise ValueError(f"pad_collate: field {key!r} is neither a scalar nor a 1-D tensor as "
                             f"long as input_ids in every sample")
    return out
