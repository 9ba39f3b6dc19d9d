"""pad_collate: right padding, -100 labels, attention mask, extra fields (hand-checked numbers)."""

import pytest
import torch

from lmforge.data.collate import pad_collate


def test_pads_inputs_labels_and_mask():
    batch = pad_collate([
        {"input_ids": torch.tensor([5, 6, 7])},
        {"input_ids": torch.tensor([8]), "labels": torch.tensor([-100])},
        {"input_ids": torch.tensor([9, 10])},
    ], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1], [9, 10, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [-100, -100, -100], [9, 10, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_scalar_and_per_token_fields():
    batch = pad_collate([
        {"input_ids": torch.tensor([2, 3]), "label": torch.tensor(1), "token_type_ids": torch.tensor([0, 1])},
        {"input_ids": torch.tensor([4, 5, 6]), "label": 0, "token_type_ids": torch.tensor([0, 0, 1])},
    ], pad_id=0)
    assert batch["label"].tolist() == [1, 0]
    assert batch["token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["input_ids"].tolist() == [[2, 3, 0], [4, 5, 6]]
    assert batch["labels"].tolist() == [[2, 3, -100], [4, 5, 6]]


def test_errors():
    with pytest.raises(ValueError, match="empty list"):
        pad_collate([], pad_id=0)
    with pytest.raises(ValueError, match="labels shape"):
        pad_collate([{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1])}], pad_id=0)
    with pytest.raises(ValueError, match="not in sample"):
        pad_collate([{"input_ids": torch.tensor([1]), "label": 1}, {"input_ids": torch.tensor([2])}], 0)
