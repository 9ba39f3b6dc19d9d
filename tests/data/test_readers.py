"""Streaming readers: document boundaries, line numbers, encodings, long documents, errors."""

from pathlib import Path

import pytest

import lmforge.base.readers as readers
import lmforge.base.sources as sources
from lmforge.base.readers import iter_documents
from lmforge.base.tokenizer import load_tokenizer, train_tokenizer


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def docs(path: Path, **options) -> list[tuple[str, int, bool]]:
    return [(d.text, d.line, d.final) for d in iter_documents(path, **options)]


TXT = "\n\n  \nA\nb \n \n\n\nC c\r\n中文\n\n\nlast line"


def test_txt_blocks_line_numbers_crlf_and_last_newline(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeff" + TXT)
    assert docs(path) == [("A\nb \n", 4, True), ("C c\n中文\n", 9, True), ("last line\n", 13, True)]


def test_txt_doc_per_line(tmp_path):
    path = write(tmp_path / "a.txt", TXT)
    assert docs(path, doc_split="line") == [
        ("A", 4, True), ("b ", 5, True), ("C c", 9, True), ("中文", 10, True), ("last line", 13, True)]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7])
def test_chunk_edges_change_nothing(tmp_path, monkeypatch, chunk):
    path = write(tmp_path / "a.txt", TXT + "\r\n\r\n你好 world\r\n")
    expected = docs(path)
    monkeypatch.setattr(sources, "_CHUNK", chunk)  # cut CRLF pairs and UTF-8 characters
    assert docs(path) == expected
    assert expected[-1] == ("你好 world\n", 15, True)


def test_long_documents_come_in_pieces_with_the_same_tokens(tmp_path):
    text = ("ROMEO:\nBut soft, what light through yonder window breaks?\n"
            "  It is the east, and Juliet is the sun.\n") * 30
    path = write(tmp_path / "play.txt", text + "\n\nEND\n")
    pieces = docs(path, max_chars=100)
    assert len(pieces) > 10
    assert all(len(t) <= 200 for t, _, _ in pieces)
    assert [f for _, _, f in pieces].count(True) == 2 and pieces[-1] == ("END\n", 93, True)
    assert "".join(t for t, _, _ in pieces[:-1]) == text
    tok = load_tokenizer(train_tokenizer([path], kind="bpe", vocab_size=300, out_dir=tmp_path / "tok",
                                         show_progress=False))
    whole = tok.encode(text).ids
    assert sum((tok.encode(t).ids for t, _, _ in pieces[:-1]), []) == whole
    # one long line: cut before a space between two words
    line = "word " * 100
    path = write(tmp_path / "line.txt", line)
    pieces = docs(path, max_chars=64)
    assert len(pieces) > 5 and all(t.startswith(" word") for t, _, _ in pieces[1:])
    assert "".join(t for t, _, _ in pieces) == line + "\n"
    assert sum((tok.encode(t).ids for t, _, _ in pieces), []) == tok.encode(line + "\n").ids


def test_jsonl(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"text": "one\\ntwo"}\n\n{"text": "  "}\r\n{"text": "三"}')
    assert docs(path) == [("one\ntwo", 1, True), ("三", 4, True)]
    assert docs(path, text_field="text")[1] == ("三", 4, True)
    with pytest.raises(ValueError, match=r"a.jsonl: line 1: no field 'body'; .*\['text'\]"):
        docs(path, text_field="body")


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": oops}\n', r"b.jsonl: line 2: not valid JSON"),
    ('["text"]\n', r"b.jsonl: line 1: expected a JSON object, got list"),
    ('{"text": 3}\n', r"b.jsonl: line 1: field 'text' is int, not a string"),
])
def test_jsonl_errors(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        docs(write(tmp_path / "b.jsonl", content))


def test_csv_header_quotes_and_multiline(tmp_path):
    path = write(tmp_path / "a.csv", 'label,text\r\nham,"hello, you"\r\nspam,"two\r\nlines"\n\nham,\n')
    assert docs(path) == [("hello, you", 2, True), ("two\nlines", 3, True)]
    assert docs(path, text_column=0) == [("label", 1, True), ("ham", 2, True), ("spam", 3, True),
                                         ("ham", 6, True)]
    assert docs(path, text_column="1")[0] == ("text", 1, True)
    with pytest.raises(ValueError, match=r"a.csv: line 1: no column 'body'.*\['label', 'text'\]"):
        docs(path, text_column="body")
    with pytest.raises(ValueError, match=r"a.csv: line 1: 2 column\(s\), no column at index 5"):
        docs(path, text_column=5)


def test_tsv_keeps_quotes(tmp_path):
    path = write(tmp_path / "a.tsv", 'ham\tsay "hi\nspam\t"free" stuff\n')
    assert docs(path, text_column=1) == [('say "hi', 1, True), ('"free" stuff', 2, True)]


def test_non_utf8_names_file_line_and_offset(tmp_path):
    bad = "ok\n\n".encode() + "中".encode() + b"\xff\n"
    with pytest.raises(ValueError, match=r"c.txt: line 3: not valid UTF-8 \(bytes b'\\xff' at byte offset 7"):
        docs(write(tmp_path / "c.txt", bad))
    with pytest.raises(ValueError, match=r"c.jsonl: line 2: not valid UTF-8"):
        docs(write(tmp_path / "c.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n'))
    with pytest.raises(ValueError, match=r"t.txt: line 1: not valid UTF-8"):
        docs(write(tmp_path / "t.txt", "中".encode()[:2]))  # ends inside a character


def test_unsupported_inputs(tmp_path):
    with pytest.raises(ValueError, match="decompress it first"):  # .gz is read: tests/data/test_readers_gzip.py
        docs(write(tmp_path / "a.txt.bz2", b"BZh9"))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        readers.check_inputs([tmp_path / "nope.txt"])
    with pytest.raises(ValueError, match="are folders"):
        readers.check_inputs([tmp_path])


def test_txt_whole_file_is_one_document(tmp_path):
    path = tmp_path / "play.txt"
    path.write_text("\n\nFIRST:\nSpeak.\n\nALL:\nSpeak, speak.", encoding="utf-8")
    assert docs(path, doc_split="file") == [("FIRST:\nSpeak.\n\nALL:\nSpeak, speak.\n", 3, True)]
