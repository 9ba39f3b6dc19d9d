"""prepare --task classify: formats, label names, stratified seeded split, balancing, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.data.prepare import prepare
from lmforge.data.prepare_classify import prepare_classify
from lmforge.data.store import TokenStore
from lmforge.base.tokenizer import train_tokenizer

HAM = [f"see you at {i} tonight, ok lar" for i in range(80)]
SPAM = [f"WINNER claim your free prize {i} now" for i in range(20)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    sms = d / "SMSSpamCollection"
    rows = [("ham", t) for t in HAM] + [("spam", t) for t in SPAM]
    sms.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    bpe = train_tokenizer([sms], kind="bpe", vocab_size=300, out_dir=d / "bpe", show_progress=False)
    wp = train_tokenizer([sms], kind="wordpiece", vocab_size=200, out_dir=d / "wp", show_progress=False)
    return d, sms, bpe, wp


def run(inputs, tok, out, **kw):
    return prepare_classify(inputs if isinstance(inputs, list) else [inputs], tok, out,
                            show_progress=False, **kw)


def test_sms_format_keeps_label_names_and_stratifies_70_10_20(files, tmp_path):
    _, sms, bpe, _ = files
    meta = run(sms, bpe, tmp_path / "out", fmt="sms")
    assert meta["label_names"] == ["ham", "spam"] and meta["task"] == "classify"
    counts = {s: meta["splits"][s]["labels"] for s in ("train", "val", "test")}
    assert counts == {"train": {"ham": 56, "spam": 14}, "val": {"ham": 8, "spam": 2},
                      "test": {"ham": 16, "spam": 4}}
    store = TokenStore(tmp_path / "out", "test")
    assert len(store) == 20 and sorted(np.bincount(store.labels).tolist()) == [4, 16]
    # the split is shuffled: the first val samples are not all one class
    assert len(set(TokenStore(tmp_path / "out", "val").labels[:5].tolist())) == 2


def test_same_seed_same_bytes_and_other_seed_other_split(files, tmp_path):
    _, sms, bpe, _ = files
    run(sms, bpe, tmp_path / "a", fmt="sms", seed=3)
    run(sms, bpe, tmp_path / "b", fmt="sms", seed=3)
    run(sms, bpe, tmp_path / "c", fmt="sms", seed=4)
    for name in ("train.bin", "train.labels", "test.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "test.bin").read_bytes() != (tmp_path / "c" / "test.bin").read_bytes()


def test_balance_undersamples_to_the_smallest_class(files, tmp_path):
    _, sms, bpe, _ = files
    meta = run(sms, bpe, tmp_path / "out", fmt="sms", balance=True)
    total = {k: sum(meta["splits"][s]["labels"][k] for s in ("train", "val", "test")) for k in ("ham", "spam")}
    assert total == {"ham": 20, "spam": 20}


def test_csv_header_jsonl_and_headerless_columns_read_the_same_records(files, tmp_path):
    d, _, bpe, _ = files
    rows = [("pos", "good film"), ("neg", "bad film"), ("pos", 'a "great" one, truly')] * 5
    csv_file = tmp_path / "r.csv"
    csv_file.write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{l}\n' for l, t in rows))
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t, "y": l}) + "\n" for l, t in rows))
    tsv = tmp_path / "r.tsv"
    tsv.write_text("".join(f"{l}\t{t}\n" for l, t in rows))
    a = run(csv_file, bpe, tmp_path / "a")
    b = run(jsonl, bpe, tmp_path / "b", text_column="review", label_column="y")
    c = run(tsv, bpe, tmp_path / "c", header=False, columns=["label", "text"])
    for m in (a, b, c):
        assert m["label_names"] == ["neg", "pos"] and m["records"] == 15
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "c" / "train.bin").read_bytes()
    assert (tmp_path / "a" / "train.labels").read_bytes() == (tmp_path / "b" / "train.labels").read_bytes()


def test_labels_option_orders_ids_and_wordpiece_wraps_cls_sep(files, tmp_path):
    _, sms, _, wp = files
    meta = run(sms, wp, tmp_path / "out", fmt="sms", labels=["spam", "ham"])
    assert meta["label_names"] == ["spam", "ham"] and meta["special_wrap"] == "cls_sep"
    store = TokenStore(tmp_path / "out", "train")
    ids = meta["special_ids"]
    assert all(store[i][0] == ids["cls"] and store[i][-1] == ids["sep"] for i in range(len(store)))
    assert meta["splits"]["train"]["labels"] == {"spam": 14, "ham": 56}


def test_errors_name_the_line(files, tmp_path):
    _, _, bpe, _ = files
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\thello there\nspam\t   \nham\tok\n")
    with pytest.raises(ValueError, match=r"bad.tsv: line 2: missing text"):
        run(bad, bpe, tmp_path / "o", fmt="sms")
    bad.write_text("ham\thello there\nham\tok\n\tno label here\n")
    with pytest.raises(ValueError, match=r"line 3: missing label"):
        run(bad, bpe, tmp_path / "o", fmt="sms")
    bad.write_text("ham\thello there\nspam\tfree\nhm\ttypo\n")
    with pytest.raises(ValueError, match=r"line 3: label 'hm' is not one of --labels ham,spam"):
        run(bad, bpe, tmp_path / "o", fmt="sms", labels=["ham", "spam"])
    with pytest.raises(ValueError, match="cannot tell the format"):
        run(bad.rename(tmp_path / "bad.dat"), bpe, tmp_path / "o")
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("body,label\nhi,a\n")
    with pytest.raises(ValueError, match=r"no text column 'text' in the header.*\['body', 'label'\]"):
        run(csv_file, bpe, tmp_path / "o")


def test_the_generic_prepare_entry_point_delegates(files, tmp_path):
    d, _, bpe, _ = files
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("text,label\n" + "hello,a\nbye,b\n" * 10)
    meta = prepare("classify", [csv_file], bpe, tmp_path / "o", val_fraction=0.1, test_fraction=0.2,
                   show_progress=False)
    assert meta["label_names"] == ["a", "b"] and meta["splits"]["test"]["samples"] == 4
