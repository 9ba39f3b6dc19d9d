"""Dialogue preparation: corpus parsing, truncation to the most recent turns, roles on disk."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.prepare import prepare
from lmforge.data.dialogue_format import RESPONSE, USER, build_sample, recent_turns_start, split_turns
from lmforge.data.prepare_dialogue import iter_dialogues
from lmforge.data.store import TokenStore
from lmforge.base.tokenizer import load_tokenizer, special_ids, train_tokenizer

CORPUS = "你好\n你好呀\n\n今天天气怎么样\n挺好的\n那就出去玩吧\n\nhello there\nhi , how are you ?\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dialogue_tok")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    return train_tokenizer([corpus], kind="wordpiece", vocab_size=200, out_dir=root / "tok",
                           min_frequency=1, show_progress=False)


def _turns(path: Path) -> list[list[str]]:
    return [d.turns for d in iter_dialogues(path)]


def test_blank_lines_separate_dialogues_with_crlf_and_stray_whitespace(tmp_path: Path):
    path = tmp_path / "c.txt"
    path.write_bytes("\r\n  \r\n 你好 \r\n你好呀\t\r\n\r\n\r\n \t\r\n今天\r\n挺好\r\n\r\n最后一句".encode())
    dialogues = list(iter_dialogues(path))
    assert [d.turns for d in dialogues] == [["你好", "你好呀"], ["今天", "挺好"], ["最后一句"]]
    assert [d.line for d in dialogues] == [3, 8, 11]
    assert [d.roles for d in dialogues] == [[USER, RESPONSE], [USER, RESPONSE], [USER]]


def test_dailydialog_lines_jsonl_and_gzip(tmp_path: Path):
    daily = tmp_path / "dialogues.txt"
    daily.write_text("Hi . __eou__ Hello ! __eou__ Bye . __eou__\n\nOne __eou__ Two __eou__\n")
    assert _turns(daily) == [["Hi .", "Hello !", "Bye ."], ["One", "Two"]]
    gz = tmp_path / "dialogues.txt.gz"
    gz.write_bytes(gzip.compress(daily.read_bytes()))
    assert _turns(gz) == _turns(daily)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"turns": ["a", " ", "b "]}) + "\r\n\n" + json.dumps(
        {"messages": [{"role": "system", "content": "s"}, {"role": "Assistant", "content": "x"}]}) + "\n")
    dialogues = list(iter_dialogues(jsonl))
    assert [d.turns for d in dialogues] == [["a", "b"], ["s", "x"]]
    assert [d.roles for d in dialogues] == [[USER, USER], [USER, RESPONSE]]  # "b" was turn 3: a user turn


def test_reader_errors_name_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["a"]}\n{"messages": [{"role": "narrator", "content": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: .*unknown role 'narrator'"):
        list(iter_dialogues(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("ok\n\ncaf".encode() + b"\xe9\n")
    with pytest.raises(ValueError, match=r"latin.txt: line 3: not valid UTF-8"):
        list(iter_dialogues(latin))


def test_truncation_keeps_the_most_recent_whole_turns():
    turns = [[10] * 5, [11] * 3, [12] * 4, [13] * 2]
    roles = [USER, RESPONSE, USER, RESPONSE]
    ids, token_roles = build_sample(turns, roles, cls=2, sep=3, max_len=12)
    assert ids == [2, 12, 12, 12, 12, 3, 13, 13, 3]  # 3 + 5 + 1 = 14 > 12: turn 2 dropped whole
    assert token_roles == [USER] * 6 + [RESPONSE] * 3
    assert build_sample(turns, roles, 2, 3, max_len=None)[0] == [2] + [10] * 5 + [3] + [11] * 3 + [3] + \
        [12] * 4 + [3] + [13] * 2 + [3]
    # the last turn alone too long: its most recent tokens
    ids, token_roles = build_sample([[1, 2], list(range(20, 30))], [USER, RESPONSE], 2, 3, max_len=6)
    assert ids == [2, 26, 27, 28, 29, 3] and token_roles == [USER] + [RESPONSE] * 5
    assert split_turns(*build_sample(turns, roles, 2, 3), sep=3) == (turns, roles)


def test_truncation_never_exceeds_max_len():
    rng = random.Random(0)
    for _ in range(500):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
        turns = [[7] * n for n in lengths]
        max_len = rng.randint(3, 40)
        ids, token_roles = build_sample(turns, [i % 2 for i in range(len(turns))], 2, 3, max_len)
        start = recent_turns_start(lengths, max_len)
        assert len(ids) <= max_len and len(token_roles) == len(ids)
        kept = lengths[start:]
        if start < len(lengths) - 1 or 2 + lengths[-1] <= max_len:
            assert len(ids) == 1 + sum(n + 1 for n in kept)  # whole turns
            assert start == 0 or 1 + sum(n + 1 for n in lengths[start - 1:]) > max_len  # as many as fit


def test_prepare_writes_roles_counts_and_skips_empty_dialogues(tmp_path: Path, tokenizer: Path):
    corpus = tmp_path / "chat.jsonl"
    lines = [{"turns": ["你好", "你好呀", "今天天气怎么样", "挺好的"]}, {"turns": [" ", ""]},
             {"turns": ["\x01\x02"]}, {"messages": [{"role": "user", "content": "hello there"},
                                                   {"role": "assistant", "content": "hi"}]}]
    lines += [{"turns": ["你好", "你好呀"]}] * 6
    corpus.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines), encoding="utf-8")
    meta = prepare("dialogue", [corpus], tokenizer, tmp_path / "data", val_fraction=0.2, seed=3,
                   show_progress=False, max_len=14)
    info = meta["dialogue"]
    assert info["empty"] == 2 and info["dialogues"] == 8 and info["truncated"] == 1
    assert meta["splits"]["val"]["samples"] >= 1
    assert sum(s["samples"] for s in meta["splits"].values()) == 8
    tok = load_tokenizer(tokenizer)
    cls, sep = special_ids(tok).cls, special_ids(tok).sep
    samples = []
    for split in ("train", "val"):
        store = TokenStore(tmp_path / "data", split)
        roles = np.fromfile(tmp_path / "data" / f"{split}.roles", dtype=np.uint8)
        assert len(roles) == len(store.tokens)
        samples += [(store[i].tolist(), roles[store.offsets[i]:store.offsets[i + 1]].tolist())
                    for i in range(len(store))]
    first = build_sample([tok.encode(t).ids for t in ["今天天气怎么样", "挺好的"]], [USER, RESPONSE],
                         cls, sep)
    assert first[0] in [ids for ids, _ in samples]  # truncated to the last two whole turns
    for ids, roles in samples:
        assert ids[0] == cls and ids[-1] == sep and len(ids) <= 14
        assert roles[0] == USER and ids.count(sep) == len(split_turns(ids, roles, sep)[0])
