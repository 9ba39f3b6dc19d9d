"""TokenStore format: write/read round trips (uint16, uint32), labels, roles, pieces, edits, clear errors."""

import json

import numpy as np
import pytest

from lmforge.data.store import (RolesWriter, TokenStore, TokenStoreWriter, cut_sample, dtype_for, has_split,
                                 move_last_sample, read_meta, read_roles, split_counts, write_meta)


def meta_for(vocab_size: int, **extra) -> dict:
    return {"task": "lm", "vocab_size": vocab_size, "dtype": dtype_for(vocab_size).name, **extra}


@pytest.mark.parametrize("vocab_size, dtype, itemsize", [(1000, np.uint16, 2), (65535, np.uint16, 2),
                                                         (70000, np.uint32, 4)])
def test_round_trip(tmp_path, vocab_size, dtype, itemsize):
    samples = [[1, 2, 3], [vocab_size - 1], [], [0, 5]]
    with TokenStoreWriter(tmp_path, "train", vocab_size) as w:
        for s in samples:
            w.add(s)
    assert w.close() == {"samples": 4, "tokens": 6}
    write_meta(tmp_path, meta_for(vocab_size))
    assert (tmp_path / "train.bin").stat().st_size == 6 * itemsize
    assert (tmp_path / "train.idx").stat().st_size == 5 * 8
    assert not (tmp_path / "train.labels").exists()
    store = TokenStore(tmp_path, "train")
    assert len(store) == 4 and store.labels is None
    assert store.tokens.dtype == dtype and isinstance(store.tokens, np.memmap)
    assert [store[i].tolist() for i in range(4)] == samples
    assert store[-1].tolist() == [0, 5]
    assert store.offsets.tolist() == [0, 3, 4, 4, 6]
    assert store.tokens.tolist() == [1, 2, 3, vocab_size - 1, 0, 5]
    assert store.meta["vocab_size"] == vocab_size
    with pytest.raises(IndexError):
        store[4]


def test_labels_pieces_and_batches(tmp_path):
    w = TokenStoreWriter(tmp_path, "val", 50)
    w.write([1, 2])
    w.write(np.array([3], dtype=np.int32))
    w.end_sample(label=1)
    w.add([4], label=0)
    assert w.close() == {"samples": 2, "tokens": 4}
    u = TokenStoreWriter(tmp_path, "train", 50)
    u.write_batch([7, 8, 9, 10, 11], ends=[2, 2, 4])  # samples [7, 8], [], [9, 10], then 11 open
    u.write_batch([12], ends=[1])
    assert u.close() == {"samples": 4, "tokens": 6}
    write_meta(tmp_path, meta_for(50))
    val, train = TokenStore(tmp_path, "val"), TokenStore(tmp_path, "train")
    assert val.labels.tolist() == [1, 0] and val[0].tolist() == [1, 2, 3]
    assert [train[i].tolist() for i in range(4)] == [[7, 8], [], [9, 10], [11, 12]]


def test_empty_split_is_readable(tmp_path):
    assert TokenStoreWriter(tmp_path, "test", 10).close() == {"samples": 0, "tokens": 0}
    write_meta(tmp_path, meta_for(10))
    store = TokenStore(tmp_path, "test")
    assert len(store) == 0 and len(store.tokens) == 0


def test_writer_errors(tmp_path):
    w = TokenStoreWriter(tmp_path, "train", 100)
    with pytest.raises(ValueError, match="token id 100 is outside the vocabulary"):
        w.add([1, 100])
    with pytest.raises(ValueError, match="token id -1"):
        w.add([-1])
    w.add([1], label=3)
    with pytest.raises(ValueError, match="has no label but earlier samples do"):
        w.add([2])
    assert w.close() == {"samples": 1, "tokens": 1}


def test_meta_round_trip_and_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        TokenStore(tmp_path, "train")
    meta = meta_for(300, special_ids={"eos": 0}, label_names=["ham", "spam"])
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    with pytest.raises(FileNotFoundError, match="train.bin not found"):
        TokenStore(tmp_path, "train")
    with TokenStoreWriter(tmp_path, "train", 300) as w:
        w.add([1, 2, 3])
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(4)  # one token lost
    with pytest.raises(ValueError, match=r"train.idx: the last offset 3 is past the end of train.bin \(2 tokens"):
        TokenStore(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{broken")
    with pytest.raises(ValueError, match="damaged meta.json"):
        read_meta(tmp_path)


def write_split(folder, split, samples, vocab_size=100):
    with TokenStoreWriter(folder, split, vocab_size) as w:
        for s in samples:
            w.add(s)


def test_roles_round_trip_and_errors(tmp_path):
    roles = RolesWriter(tmp_path, "train")
    roles.add([0, 1, 1])
    roles.add([0])
    roles.close()
    assert read_roles(tmp_path, "train", 4).tolist() == [0, 1, 1, 0]
    assert (tmp_path / "train.roles").stat().st_size == 4  # uint8, one per token
    with pytest.raises(ValueError, match="4 roles for 5 tokens"):
        read_roles(tmp_path, "train", 5)
    with pytest.raises(FileNotFoundError, match="val.roles not found.*--task dialogue"):
        read_roles(tmp_path, "val", 4)
    RolesWriter(tmp_path, "val").close()
    assert read_roles(tmp_path, "val", 0).tolist() == []


def test_counts_and_edits_after_writing(tmp_path):
    write_split(tmp_path, "train", [[1, 2, 3], [4, 5], [6]])
    write_split(tmp_path, "val", [])
    assert has_split(tmp_path, "train") and not has_split(tmp_path, "test")
    assert split_counts(tmp_path, "train") == {"samples": 3, "tokens": 6}
    assert split_counts(tmp_path, "val") == {"samples": 0, "tokens": 0}
    move_last_sample(tmp_path, "train", "val", np.dtype("<u2"))
    write_meta(tmp_path, meta_for(100))
    assert [TokenStore(tmp_path, "train")[i].tolist() for i in range(2)] == [[1, 2, 3], [4, 5]]
    assert TokenStore(tmp_path, "val")[0].tolist() == [6]

    write_split(tmp_path, "train", [[1, 2, 3, 4, 5, 6, 7]])
    cut_sample(tmp_path, "train", {"train": 4, "val": 3, "test": 0}, np.dtype("<u2"))
    assert TokenStore(tmp_path, "train")[0].tolist() == [1, 2, 3, 4]
    assert TokenStore(tmp_path, "val")[0].tolist() == [5, 6, 7]
    assert len(TokenStore(tmp_path, "test")) == 0
    assert not (tmp_path / ".single.bin").exists()


def test_an_empty_labelled_split_still_has_its_labels_file(tmp_path):
    with TokenStoreWriter(tmp_path, "val", 100, labelled=True) as w:
        pass
    write_meta(tmp_path, meta_for(100, label_names=["a", "b"]))
    store = TokenStore(tmp_path, "val")
    assert len(store) == 0 and store.labels is not None and len(store.labels) == 0


def test_values_are_checked_on_open_but_not_in_a_worker_reopening_the_store(tmp_path):
    import pickle

    write_split(tmp_path, "train", [[1, 2], [3]], vocab_size=300)
    write_meta(tmp_path, meta_for(10))
    assert len(TokenStore(tmp_path, "train")) == 2
    write_meta(tmp_path, meta_for(3))
    with pytest.raises(ValueError, match=r"train.bin: token id 3 at position 2 is outside the vocabulary of 3"):
        TokenStore(tmp_path, "train")
    unchecked = TokenStore(tmp_path, "train", check=False)
    assert len(pickle.loads(pickle.dumps(unchecked))) == 2


def test_roles_other_than_user_and_reply_are_named(tmp_path):
    roles = RolesWriter(tmp_path, "train")
    roles.add([0, 1, 1, 2])
    roles.close()
    with pytest.raises(ValueError, match=r"train.roles: role 2 at token 3; roles are 0 \(user\) or 1 \(reply\)"):
        read_roles(tmp_path, "train", 4)
