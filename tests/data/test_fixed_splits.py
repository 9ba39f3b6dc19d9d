"""prepare --val / --test: the user's own validation and test files land in those splits exactly,
for every task; the inputs are drawn only for the splits not given; files given twice are refused."""

import json
import os
from pathlib import Path

import pytest

from lmforge.base.tokenizer import load_tokenizer, train_tokenizer
from lmforge.data.prepare import prepare
from lmforge.data.prepare_classify import prepare_classify
from lmforge.data.store import TokenStore, read_meta


def docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {i}: the quick brown fox number {i} jumps. Over the lazy dog {i % 7}!\n" for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixed")
    texts = {"train": docs("Train", 40), "val": docs("Val", 6), "test": docs("Test", 5)}
    paths = {}
    for split, items in texts.items():
        paths[split] = d / f"{split}.txt"
        paths[split].write_text("\n".join(items), encoding="utf-8")  # blank line between documents
    tok = train_tokenizer([paths["train"]], kind="bpe", vocab_size=300, out_dir=d / "tok", show_progress=False)
    wp = train_tokenizer([paths["train"]], kind="wordpiece", vocab_size=300, out_dir=d / "wp", show_progress=False)
    return paths, texts, tok, wp


def samples(folder: Path, split: str) -> list[list[int]]:
    store = TokenStore(folder, split)
    return [store[i].tolist() for i in range(len(store))]


def test_lm_val_and_test_files_land_in_their_splits_exactly(files, tmp_path):
    paths, texts, tok_path, _ = files
    meta = prepare("lm", [paths["train"]], tok_path, tmp_path / "d", val_files=[paths["val"]],
                   test_files=[paths["test"]], show_progress=False)
    tok = load_tokenizer(tok_path)
    eos = meta["special_ids"]["eos"]
    for split in ("val", "test"):
        assert samples(tmp_path / "d", split) == [tok.encode(t, add_special_tokens=False).ids + [eos]
                                                   for t in texts[split]]
    assert len(samples(tmp_path / "d", "train")) == 40  # every input document is train: nothing drawn
    assert meta["split_sources"]["val"] == {"files": [str(paths["val"].resolve())]}
    assert meta["split_sources"]["test"] == {"files": [str(paths["test"].resolve())]}
    assert meta["split_sources"]["train"] == {"drawn": 1.0}
    assert read_meta(tmp_path / "d")["val_fraction"] == 0.0


def test_a_fixed_test_split_leaves_val_drawn_from_the_inputs(files, tmp_path):
    paths, texts, tok_path, _ = files
    meta = prepare("lm", [paths["train"]], tok_path, tmp_path / "d", val_fraction=0.2, test_files=[paths["test"]],
                   show_progress=False)
    without = prepare("lm", [paths["train"]], tok_path, tmp_path / "plain", val_fraction=0.2, show_progress=False)
    # the draws over the inputs are those of a prepare without the test file
    for split in ("train", "val"):
        assert samples(tmp_path / "d", split) == samples(tmp_path / "plain", split)
    assert meta["splits"]["test"]["samples"] == 5 and meta["split_sources"]["val"] == {"drawn": 0.2}
    assert without["splits"]["val"]["samples"] == meta["splits"]["val"]["samples"] > 0


def test_a_file_given_twice_is_refused_by_name(files, tmp_path):
    paths, _, tok_path, _ = files
    with pytest.raises(ValueError, match=r"val\.txt: given both in --input and in --val"):
        prepare("lm", [paths["train"], paths["val"]], tok_path, tmp_path / "a", val_files=[paths["val"]],
                show_progress=False)
    link = tmp_path / "same-test.txt"
    os.symlink(paths["test"], link)
    with pytest.raises(ValueError, match=r"test\.txt: given both in --val and in --test"):
        prepare("lm", [paths["train"]], tok_path, tmp_path / "b", val_files=[paths["test"]], test_files=[link],
                show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_empty_fixed_split_is_an_error_naming_its_files(files, tmp_path):
    paths, _, tok_path, _ = files
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"--val .*blank\.txt: no documents in the val file\(s\)"):
        prepare("lm", [paths["train"]], tok_path, tmp_path / "d", val_files=[blank], show_progress=False)


def test_mlm_paragraphs_of_a_val_file_are_val(files, tmp_path):
    paths, texts, _, wp = files
    meta = prepare("mlm", [paths["train"]], wp, tmp_path / "d", val_files=[paths["val"]], show_progress=False)
    assert meta["paragraphs"] == {"train": 40, "val": 6}
    assert meta["splits"]["val"]["samples"] == 6 * 2  # two sentences a paragraph
    assert meta["split_sources"]["val"]["files"] == [str(paths["val"].resolve())]


def write_labelled(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    return path


def test_classify_fixed_files_stay_whole_and_balance_touches_the_inputs_only(files, tmp_path):
    _, _, tok_path, _ = files
    train = write_labelled(tmp_path / "train.jsonl", [(f"win cash {i}", "spam") for i in range(8)]
                           + [(f"see you at {i}", "ham") for i in range(30)])
    val = write_labelled(tmp_path / "val.jsonl", [(f"lunch at {i}", "ham") for i in range(7)] + [("free prize", "spam")])
    test = write_labelled(tmp_path / "test.jsonl", [(f"call me {i}", "ham") for i in range(3)]
                          + [(f"claim {i}", "spam") for i in range(2)])
    meta = prepare_classify([train], tok_path, tmp_path / "d", val_files=[val], test_files=[test], balance=True,
                            show_progress=False)
    assert meta["splits"]["val"]["labels"] == {"ham": 7, "spam": 1}
    assert meta["splits"]["test"]["labels"] == {"ham": 3, "spam": 2}
    assert meta["splits"]["train"]["labels"] == {"ham": 8, "spam": 8}  # balanced, nothing drawn away
    tok = load_tokenizer(tok_path)
    want = sorted(tok.encode(t).ids for t in ["free prize"] + [f"lunch at {i}" for i in range(7)])
    assert sorted(samples(tmp_path / "d", "val")) == want


def test_dialogue_val_file(files, tmp_path):
    _, _, _, wp = files
    lines = [json.dumps({"turns": [f"the quick {i}", f"brown fox {i}"]}) for i in range(12)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines[:9]) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(lines[9:]) + "\n")
    meta = prepare("dialogue", [train], wp, tmp_path / "d", val_files=[val], show_progress=False)
    assert meta["splits"]["train"]["samples"] == 9 and meta["splits"]["val"]["samples"] == 3
    tok = load_tokenizer(wp)
    decoded = [tok.decode(ids) for ids in samples(tmp_path / "d", "val")]
    assert decoded == [f"the quick {i} brown fox {i}" for i in range(9, 12)]
