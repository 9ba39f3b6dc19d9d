"""Tokenizer training/loading: exact BPE round trip, BERT-style CJK splitting, clear errors."""

from pathlib import Path

import pytest

from lmforge.base.tokenizer import decode, load_tokenizer, special_ids, train_tokenizer

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "我爱你。你好，世界！今天天气很好。\n我们一起去公园吧。\n\n"
    "The quick brown fox jumps over the lazy dog.\n\tIndented line,  two  spaces.\n"
) * 20


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    path = train_tokenizer([write(d / "c.txt", CORPUS)], kind="bpe", vocab_size=300,
                           out_dir=d / "tok", show_progress=False)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    d = tmp_path_factory.mktemp("wp")
    path = train_tokenizer([write(d / "c.txt", CORPUS)], kind="wordpiece", vocab_size=200,
                           out_dir=d / "tok", show_progress=False)
    return load_tokenizer(path)


@pytest.mark.parametrize("text", [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n",
    "我爱你。你好，世界！\n第二行\n",
    "  leading spaces,\ttabs,\r\nCRLF, trailing spaces   \n\n\n",
    "unseen: Ünïcödé, emoji 🙂, Arabic مرحبا, <|endoftext|> inside text",
    "",
])
def test_bpe_round_trip_is_exact(bpe, text):
    ids = bpe.encode(text).ids
    assert decode(bpe, ids) == text


def test_bpe_specials_and_no_template(bpe):
    ids = special_ids(bpe)
    assert (ids.eos, ids.pad, ids.bos) == (0, 1, 0)
    assert (ids.cls, ids.sep, ids.mask, ids.unk) == (None, None, None, None)
    assert bpe.get_vocab_size() == 300
    # No post-processor template: encoding adds nothing around the text.
    assert bpe.encode("All:").ids == bpe.encode("All:", add_special_tokens=True).ids
    assert 0 not in bpe.encode("speak.").ids
    assert bpe.encode("<|endoftext|>").ids == [0]


def test_wordpiece_splits_chinese_one_char_per_token(wordpiece):
    enc = wordpiece.encode("我爱你")
    assert enc.tokens == ["我", "爱", "你"]
    assert len(enc.ids) == 3
    ids = special_ids(wordpiece)
    assert (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask) == (0, 1, 2, 3, 4)
    assert ids.eos == 3 and ids.bos == 2
    # No [CLS]/[SEP] added: callers do that themselves.
    assert 2 not in enc.ids and 3 not in enc.ids
    assert decode(wordpiece, enc.ids) == "我 爱 你"


def test_wordpiece_lowercase_is_an_option(tmp_path):
    corpus = write(tmp_path / "c.txt", "Hello World\n\nhello world\n" * 10)
    cased = load_tokenizer(train_tokenizer([corpus], kind="wordpiece", vocab_size=100,
                                           out_dir=tmp_path / "cased", show_progress=False))
    lower = load_tokenizer(train_tokenizer([corpus], kind="wordpiece", vocab_size=100,
                                           out_dir=tmp_path / "lower", lowercase=True,
                                           show_progress=False))
    assert cased.encode("Hello").tokens == ["Hello"]
    assert lower.encode("Hello").tokens == ["hello"]


def test_extra_special_tokens_come_after_the_defaults(tmp_path):
    corpus = write(tmp_path / "c.txt", CORPUS)
    tok = load_tokenizer(train_tokenizer([corpus], kind="bpe", vocab_size=300,
                                         special_tokens=["<|user|>", "<|pad|>"],
                                         out_dir=tmp_path / "tok", show_progress=False))
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|pad|>", "<|user|>"]


def test_train_from_jsonl_csv_and_tsv(tmp_path):
    jsonl = write(tmp_path / "a.jsonl", '{"content": "我爱你", "id": 1}\n\n{"content": "hello"}\n')
    csv = write(tmp_path / "b.csv", 'label,body\nspam,"win, now"\nham,"multi\nline"\n')
    tsv = write(tmp_path / "c.tsv", 'ham\tsay "hi\nspam\tfree 我\n')
    path = train_tokenizer([jsonl], kind="wordpiece", vocab_size=60, out_dir=tmp_path / "j",
                           text_field="content", show_progress=False)
    assert load_tokenizer(path).encode("我爱你").tokens == ["我", "爱", "你"]
    path = train_tokenizer([csv], kind="wordpiece", vocab_size=60, out_dir=tmp_path / "c",
                           text_column="body", min_frequency=1, show_progress=False)
    vocab = load_tokenizer(path).get_vocab()
    assert {"win", "now", "multi", "line"} <= set(vocab)
    assert "spam" not in vocab and "body" not in vocab and "p" not in vocab
    path = train_tokenizer([tsv], kind="wordpiece", vocab_size=60, out_dir=tmp_path / "t",
                           text_column=1, min_frequency=1, show_progress=False)
    vocab = load_tokenizer(path).get_vocab()
    assert {"free", "say", "hi", '"'} <= set(vocab)
    assert "ham" not in vocab and "m" not in vocab


def test_load_tokenizer_from_folder_or_file_and_missing(tmp_path, bpe):
    bpe.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).get_vocab_size() == 300
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab_size() == 300
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    write(tmp_path / "bad" / "tokenizer.json", "{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad")


def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = write(tmp_path / "empty.txt", "\n\n   \n")
    with pytest.raises(ValueError, match="no text found in .*empty.txt"):
        train_tokenizer([empty], kind="bpe", vocab_size=300, out_dir=tmp_path / "t",
                        show_progress=False)
    assert not (tmp_path / "t" / "tokenizer.json").exists()


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    bad = write(tmp_path / "latin1.txt", "good line\n\n".encode() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: line 3: not valid UTF-8 .*byte offset 14"):
        train_tokenizer([bad], kind="bpe", vocab_size=300, out_dir=tmp_path / "t",
                        show_progress=False)


def test_missing_jsonl_field_names_line_and_keys(tmp_path):
    data = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"body": "no text here", "id": 2}\n')
    with pytest.raises(ValueError, match=r"d.jsonl: line 2: no field 'text'.*\['body', 'id'\]"):
        train_tokenizer([data], kind="wordpiece", vocab_size=50, out_dir=tmp_path / "t",
                        show_progress=False)


def test_bad_arguments(tmp_path):
    corpus = write(tmp_path / "c.txt", CORPUS)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], kind="bpe", vocab_size=300, out_dir=tmp_path)
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer([corpus], kind="bpe", vocab_size=100, out_dir=tmp_path)
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer([corpus], kind="unigram", vocab_size=300, out_dir=tmp_path)
