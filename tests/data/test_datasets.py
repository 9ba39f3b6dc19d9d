"""PackedLMDataset: non-overlapping blocks of the token stream."""

import pytest
import torch

from lmforge.data.datasets import PackedLMDataset
from lmforge.data.store import TokenStore, TokenStoreWriter, write_meta


def test_packed_blocks(tmp_path):
    w = TokenStoreWriter(tmp_path, "train", 100)
    w.add([10, 11, 12, 0])
    w.add([13, 14, 0])
    w.add([15, 16, 17, 18, 0])
    w.close()
    write_meta(tmp_path, {"dtype": "uint16", "vocab_size": 100})
    ds = PackedLMDataset(TokenStore(tmp_path, "train"), context=5)
    assert len(ds) == 2  # 12 tokens -> 2 blocks of 5, the last 2 tokens dropped
    assert ds[0]["input_ids"].tolist() == [10, 11, 12, 0, 13]
    assert ds[1]["input_ids"].tolist() == [14, 0, 15, 16, 17]
    assert ds[1]["input_ids"].dtype == torch.long and set(ds[0]) == {"input_ids"}
    with pytest.raises(IndexError):
        ds[2]
    assert len(PackedLMDataset(TokenStore(tmp_path, "train"), context=13)) == 0  # shorter than a block
