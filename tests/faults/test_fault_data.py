"""Data folders and tokenizers that stay whole: outputs that are not theirs, two writers at once,
kill -9 at every step of a prepare, data that trains to nothing, damaged stores and tokenizers.

Kills use lmforge's own fault points (`LMFORGE_FAULT`, lmforge.base.faults) in a `python -m
lmforge` child: prepare_before_swap, prepare_between_renames, tokenizer_before_save (and
`hang:` of them for a writer that holds its folder)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import faultkit as fk
from faultkit import data_fixture  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def corpus(data: Path) -> Path:
    return data.parent / "corpus.txt"


def _child(args: list[str], fault: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "LMFORGE_FAULT": fault, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hidden(folder: Path, *, lock: bool = True) -> list[str]:
    """The hidden names beside `folder`: temp and old folders, and its lock file unless `lock` is
    False (a kill -9 leaves the lock file; the kernel has dropped the lock itself)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")
                  and (lock or p.name != f".{folder.name}.lock"))


def _prepare_args(corpus: Path, tokenizer: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--out", str(out),
            "--val-fraction", "0.1", *extra]


def _fake_checkpoint(path: Path, tokenizer: Path) -> Path:
    path.mkdir(parents=True)
    shutil.copy(tokenizer, path / "tokenizer.json")
    (path / "config.json").write_text('{"model_type": "gpt"}')
    (path / "manifest.json").write_text('{"step": 3, "files": {}}')
    return path


# -- outputs that are not theirs -----------------------------------------------------------------


@pytest.mark.parametrize("target", ["data_folder", "checkpoint"])
def test_tokenizer_train_never_replaces_the_tokenizer_of_a_data_folder_or_checkpoint(
        target: str, data: Path, corpus: Path, tmp_path: Path):
    out = shutil.copytree(data, tmp_path / "data") if target == "data_folder" else \
        _fake_checkpoint(tmp_path / "run" / "checkpoints" / "last", data / "tokenizer.json")
    before = (out / "tokenizer.json").read_bytes()
    train = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)]
    fk.clean_error(*fk.run_cli(train), str(out), "already exists and is not empty", "--overwrite")
    kind = "prepared data folder" if target == "data_folder" else "checkpoint"
    fk.clean_error(*fk.run_cli([*train, "--overwrite"]), f"holds a {kind}, not a tokenizer")
    assert (out / "tokenizer.json").read_bytes() == before
    tok = tmp_path / "tok"
    assert fk.run_cli(train[:-1] + [str(tok)])[0] == 0
    assert fk.run_cli(train[:-1] + [str(tok)])[0] == 2  # another tokenizer: only with --overwrite
    assert fk.run_cli(train[:-1] + [str(tok), "--overwrite"])[0] == 0


def test_prepare_never_replaces_a_checkpoint_or_a_tokenizer_folder(data: Path, corpus: Path, tmp_path: Path):
    checkpoint = _fake_checkpoint(tmp_path / "ckpt", data / "tokenizer.json")
    fk.clean_error(*fk.run_cli(_prepare_args(corpus, data, checkpoint, "--overwrite")),
                   "holds a checkpoint, not a prepared data folder")
    for task in ("lm", "classify", "dialogue", "mlm"):
        tok = tmp_path / f"tok-{task}"
        kind = "wordpiece" if task == "mlm" else "bpe"
        assert fk.run_cli(["tokenizer", "train", "--kind", kind, "--input", str(corpus), "--vocab-size", "300",
                          "--out", str(tok)])[0] == 0
        fk.clean_error(*fk.run_cli([*_prepare_args(corpus, tok, tok, "--overwrite"), "--task", task]),
                       "holds a tokenizer, not a prepared data folder")
        assert sorted(p.name for p in tok.iterdir()) == ["tokenizer.json"]
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "manifest.json", "tokenizer.json"]


# -- one writer at a time ------------------------------------------------------------------------


def _wait_for_lock(proc: subprocess.Popen, folder: Path) -> None:
    lock = folder.parent / f".{folder.name}.lock"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the first writer ended (rc {proc.returncode}): {proc.stderr.read()}")
        with contextlib.suppress(OSError):
            if f'"pid": {proc.pid}' in lock.read_text():
                return
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named process {proc.pid}")


@pytest.mark.parametrize("command", ["prepare", "tokenizer_train"])
def test_a_second_writer_into_the_same_folder_names_the_first_ones_pid(
        command: str, data: Path, corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    if command == "prepare":
        args, fault = _prepare_args(corpus, data, out), "hang:prepare_before_swap"
    else:
        args = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)]
        fault = "hang:tokenizer_before_save"
    first = _child(args, fault, tmp_path)
    try:
        _wait_for_lock(first, out)
        what = "data folder" if command == "prepare" else "tokenizer folder"
        fk.clean_error(*fk.run_cli(args), f"{what} {out} is in use by process {first.pid}")
    finally:
        first.kill()
        first.communicate()
    assert fk.run_cli(args)[0] == 0  # the killed holder's lock is taken over
    assert _hidden(out) == []


# -- kill -9 during prepare ----------------------------------------------------------------------


def test_kill_9_while_preparing_leaves_no_temp_folder_after_the_next_prepare(
        data: Path, corpus: Path, tmp_path: Path):
    out = tmp_path / "data"
    child = _child(_prepare_args(corpus, data, out), "prepare_before_swap", tmp_path)
    child.communicate()
    assert child.returncode == 137 and not out.exists()
    assert _hidden(out, lock=False) == [f".data.tmp-{child.pid}"]
    code, message = fk.run_cli(_prepare_args(corpus, data, out))
    assert code == 0, message
    assert _hidden(out) == [] and (out / "meta.json").is_file()


@pytest.mark.parametrize("then", ["open_the_folder", "prepare_again"])
def test_kill_9_between_the_renames_of_overwrite_finishes_the_swap(
        then: str, data: Path, corpus: Path, tmp_path: Path):
    from lmforge.data.store import TokenStore

    out = tmp_path / "data"
    assert fk.run_cli(_prepare_args(corpus, data, out, "--seed", "1"))[0] == 0
    child = _child(_prepare_args(corpus, data, out, "--seed", "2", "--overwrite"), "prepare_between_renames",
                   tmp_path)
    child.communicate()
    assert child.returncode == 137 and not out.exists()
    assert _hidden(out, lock=False) == [f".data.old-{child.pid}", f".data.tmp-{child.pid}"]
    if then == "open_the_folder":
        with contextlib.redirect_stderr(io.StringIO()) as err:
            assert len(TokenStore(out, "train")) > 0
        assert "finished replacing" in err.getvalue()
        assert json.loads((out / "meta.json").read_text())["seed"] == 2  # the new, complete folder
    else:
        code, message = fk.run_cli(_prepare_args(corpus, data, out, "--seed", "3", "--overwrite"))
        assert code == 0, message
        assert json.loads((out / "meta.json").read_text())["seed"] == 3
    assert _hidden(out, lock=then == "prepare_again") == []


def test_a_swap_whose_new_folder_is_gone_restores_the_old_one(data: Path, tmp_path: Path):
    from lmforge.data.store import TokenStore

    out = tmp_path / "data"
    pid = _dead_pid()
    shutil.copytree(data, tmp_path / f".data.old-{pid}")
    (tmp_path / f".data.tmp-{pid}").mkdir()  # half-written: no meta.json
    with contextlib.redirect_stderr(io.StringIO()) as err:
        store = TokenStore(out, "val")
    assert "restored the previous" in err.getvalue() and len(store) > 0
    assert (out / "meta.json").read_bytes() == (data / "meta.json").read_bytes()
    assert _hidden(out) == []


# -- data that trains to nothing -----------------------------------------------------------------


def test_dialogues_without_a_reply_are_an_error_at_prepare(data: Path, tmp_path: Path):
    source = tmp_path / "monologues.jsonl"
    source.write_text("".join(json.dumps({"turns": [f"hello number {i}"]}) + "\n" for i in range(30)))
    out = tmp_path / "out" / "dialogue"
    code, message = fk.run_cli(_prepare_args(source, data, out, "--task", "dialogue"))
    fk.clean_error(code, message, str(source), "no reply to learn in the train and val split(s)",
                   "dialogue(s), 0 reply tokens", "the user's turn alone")
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.parametrize("task", ["classify", "mlm"])
def test_an_empty_val_split_is_an_error_at_prepare_naming_the_counts(task: str, data: Path, tmp_path: Path):
    if task == "classify":
        source = tmp_path / "few.csv"
        source.write_text("text,label\nwin a prize now,spam\nhello mum,ham\nfree eggs today,spam\nsee you,ham\n")
        expected = ("the val split is empty (labelled texts: train 4, val 0, test 0)", "--val-fraction (now 0.1)")
        extra = ("--task", "classify")
    else:
        source = tmp_path / "few.txt"
        source.write_text("One sentence here. And a second one.\n\nAnother paragraph. With two sentences.\n")
        expected = ("the val split is empty (sentence pairs within a paragraph: train 2, val 0)",
                    "--val-fraction (now 0.05)")
        extra = ("--task", "mlm", "--val-fraction", "0.05")
        tok = tmp_path / "wordpiece"
        assert fk.run_cli(["tokenizer", "train", "--kind", "wordpiece", "--input", str(data.parent / "corpus.txt"),
                          "--vocab-size", "300", "--out", str(tok)])[0] == 0
        data = tok
    out = tmp_path / "out" / "data"
    fk.clean_error(*fk.run_cli([*_prepare_args(source, data, out), *extra]), str(source), *expected)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_a_classify_label_seen_once_is_noted(data: Path, tmp_path: Path):
    source = tmp_path / "labels.csv"
    rows = [f"message {i},{'spam' if i % 2 else 'ham'}" for i in range(40)] + ["one of a kind,eggs"]
    source.write_text("text,label\n" + "\n".join(rows) + "\n")
    code, message = fk.run_cli([*_prepare_args(source, data, tmp_path / "cls"), "--task", "classify"])
    assert code == 0, message
    assert "label(s) 'eggs' (1 example) are only in train: val and test have none of them" in message


def test_a_vocabulary_smaller_than_asked_is_said(corpus: Path, tmp_path: Path):
    code, message = fk.run_cli(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "10000000",
                               "--out", str(tmp_path / "tok")])
    assert code == 0, message
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert f"vocab_size 10,000,000 asked, {size:,} tokens made" in message, message
    assert "no more pairs of tokens to merge" in message


# -- damaged files -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["broken_json", "json_list"])
@pytest.mark.parametrize("holder", ["data_folder", "checkpoint"])
def test_a_damaged_tokenizer_json_is_named_with_what_is_wrong(
        damage: str, holder: str, data: Path, corpus: Path, tmp_path: Path):
    from lmforge.base.tokenizer import load_tokenizer

    folder = shutil.copytree(data, tmp_path / "data") if holder == "data_folder" else \
        _fake_checkpoint(tmp_path / "ckpt", data / "tokenizer.json")
    file = folder / "tokenizer.json"
    file.write_text('{"version": "1.0", "model": {"type": "BPE",' if damage == "broken_json" else "[1, 2, 3]\n")
    expected = ("broken JSON at line 1" if damage == "broken_json" else "the JSON is a list", str(file),
                "lmforge tokenizer train")
    fk.clean_error(*fk.run_cli(_prepare_args(corpus, folder, tmp_path / "out")), *expected)
    with pytest.raises(ValueError) as e:
        load_tokenizer(folder)
    assert all(text in str(e.value) for text in expected), str(e.value)


def _classify_store(data: Path, tmp_path: Path) -> Path:
    source = tmp_path / "labels.csv"
    source.write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(30)))
    assert fk.run_cli([*_prepare_args(source, data, tmp_path / "cls"), "--task", "classify"])[0] == 0
    return tmp_path / "cls"


def _damage(folder: Path, damage: str) -> tuple[str, ...]:
    idx = np.fromfile(folder / "train.idx", dtype="<i8")
    tokens = np.fromfile(folder / "train.bin", dtype="<u2")
    if damage == "token_id_past_vocabulary":
        tokens[5] = 60_000
        tokens.tofile(folder / "train.bin")
        return "train.bin", "token id 60000 at position 5", "vocabulary of 384"
    if damage == "label_outside_the_labels":
        labels = np.fromfile(folder / "train.labels", dtype="<i8")
        labels[3] = 7
        labels.tofile(folder / "train.labels")
        return "train.labels", "label 7 of sample 3", "2 label names"
    if damage == "offsets_not_increasing":
        idx[2], idx[3] = idx[3], idx[2]
        idx.tofile(folder / "train.idx")
        return "train.idx", "offsets decrease at sample"
    if damage == "offset_past_the_bin":
        idx[-1] += 10
        idx.tofile(folder / "train.idx")
        return "train.idx", "past the end of train.bin"
    idx[0] = 4  # not_starting_at_0
    idx.tofile(folder / "train.idx")
    return "train.idx", "the first offset is 4, not 0"


_DAMAGES = ["token_id_past_vocabulary", "offsets_not_increasing", "offset_past_the_bin", "offset_not_starting_at_0"]


@pytest.mark.parametrize("store, damage", [("lm", d) for d in _DAMAGES] +
                         [("classify", d) for d in [*_DAMAGES, "label_outside_the_labels"]])
def test_a_damaged_token_store_is_named_when_opened(store: str, damage: str, data: Path, tmp_path: Path):
    from lmforge.data.store import TokenStore

    folder = shutil.copytree(data, tmp_path / "lm") if store == "lm" else _classify_store(data, tmp_path)
    expected = _damage(folder, damage)
    with pytest.raises(ValueError) as e:
        TokenStore(folder, "train")
    message = str(e.value)
    assert str(folder) in message and "prepare the data again" in message, message
    for text in expected:
        assert text in message, (text, message)


def test_meta_json_records_a_content_hash_and_the_samples_per_split(data: Path, corpus: Path, tmp_path: Path):
    metas = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert fk.run_cli(_prepare_args(corpus, data, tmp_path / name, "--seed", seed))[0] == 0
        metas.append(json.loads((tmp_path / name / "meta.json").read_text()))
    a, b, c = metas
    assert a["content_sha256"] == b["content_sha256"] != c["content_sha256"]
    assert set(a["split_sha256"]) == {"train", "val"} and a["split_sha256"] != c["split_sha256"]
    assert {s: a["splits"][s]["samples"] for s in ("train", "val")} == {
        s: len(np.fromfile(tmp_path / "a" / f"{s}.idx", dtype="<i8")) - 1 for s in ("train", "val")}
