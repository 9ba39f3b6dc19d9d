""".gz inputs: read while decompressing, same results as the plain file, errors naming file and line."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.prepare import prepare
from lmforge.data.prepare_classify import read_records
from lmforge.base.readers import check_inputs, iter_documents
from lmforge.base.tokenizer import train_tokenizer

DOCS = [f"Speaker {i}:\nLine {i} of the play, with words {'ab' * (i % 5)} and {'cd ' * (i % 7)}.\n"
        for i in range(300)]


def gz(path: Path, data: bytes) -> Path:
    path.write_bytes(gzip.compress(data))
    return path


def docs(path: Path, **options) -> list[tuple[str, int, bool]]:
    return [(d.text, d.line, d.final) for d in iter_documents(path, **options)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gz")
    plain = root / "corpus.txt"
    plain.write_text("\n".join(DOCS), encoding="utf-8")
    return plain, gz(root / "corpus.txt.gz", plain.read_bytes())


def test_tokenizer_from_txt_gz_equals_the_plain_file(corpus, tmp_path):
    plain, packed = corpus
    a = train_tokenizer([plain], kind="bpe", vocab_size=300, out_dir=tmp_path / "a", show_progress=False)
    b = train_tokenizer([packed], kind="bpe", vocab_size=300, out_dir=tmp_path / "b", show_progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_prepare_lm_from_gz_writes_the_same_token_files(corpus, tmp_path):
    plain, packed = corpus
    tok = train_tokenizer([plain], kind="bpe", vocab_size=300, out_dir=tmp_path / "tok", show_progress=False)
    a = prepare("lm", [plain], tok, tmp_path / "a", val_fraction=0.2, show_progress=False)
    b = prepare("lm", [packed], tok, tmp_path / "b", val_fraction=0.2, show_progress=False)
    assert a["splits"] == b["splits"] and a["documents"] == b["documents"] == 300
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # the CLI takes it too (it used to refuse compressed inputs)
    code, err = _cli(["prepare", "--input", str(packed), "--tokenizer", str(tok), "--out", str(tmp_path / "c"),
                      "--val-fraction", "0.2"])
    assert code == 0, err
    assert (tmp_path / "c" / "train.bin").read_bytes() == (tmp_path / "a" / "train.bin").read_bytes()


def test_progress_offsets_of_a_gz_stay_within_the_compressed_size(corpus, monkeypatch):
    import lmforge.base.sources as sources

    _, packed = corpus
    monkeypatch.setattr(sources, "_CHUNK", 512)  # many reads, many offsets
    for options in ({}, {"doc_split": "line"}):
        offsets = [d.offset for d in iter_documents(packed, **options)]
        assert offsets == sorted(offsets) and offsets[-1] == packed.stat().st_size
    jsonl = gz(packed.with_name("c.jsonl.gz"), "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode())
    offsets = [d.offset for d in iter_documents(jsonl)]
    assert offsets == sorted(offsets) and offsets[-1] <= jsonl.stat().st_size


def test_jsonl_gz_csv_gz_tsv_gz_and_bare_gz(tmp_path):
    jsonl = gz(tmp_path / "a.jsonl.gz", '{"text": "one\\ntwo"}\n\n{"text": "  "}\r\n{"text": "三"}'.encode())
    assert docs(jsonl) == [("one\ntwo", 1, True), ("三", 4, True)]
    table = 'label,text\r\nham,"hello, you"\r\nspam,"two\r\nlines"\n\nham,\n'.encode()
    assert docs(gz(tmp_path / "a.csv.gz", table)) == [("hello, you", 2, True), ("two\nlines", 3, True)]
    assert docs(gz(tmp_path / "a.tsv.GZ", b'ham\tsay "hi\nspam\t"free" stuff\n'), text_column=1) == [
        ('say "hi', 1, True), ('"free" stuff', 2, True)]
    assert docs(gz(tmp_path / "bare.gz", "\ufeffA\nb\n\n\nC\n".encode())) == [("A\nb\n", 1, True), ("C\n", 5, True)]
    records = read_records(gz(tmp_path / "labels.csv.gz", b"text,label\nwin a prize,spam\nhello mum,ham\n"))
    assert [(r.text, r.label, r.line) for r in records] == [("win a prize", "spam", 2), ("hello mum", "ham", 3)]


def test_a_truncated_gz_is_an_error_naming_the_file(corpus, tmp_path):
    _, packed = corpus
    data = packed.read_bytes()
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.txt.gz: damaged or truncated gzip file"):
        docs(cut)
    not_gzip = tmp_path / "fake.jsonl.gz"
    not_gzip.write_bytes(b'{"text": "plain"}\n')
    with pytest.raises(ValueError, match=r"fake.jsonl.gz: damaged or truncated gzip file \(Not a gzipped"):
        docs(not_gzip)
    code, err = _cli(["tokenizer", "train", "--input", str(cut), "--vocab-size", "300",
                      "--out", str(tmp_path / "tok")])
    assert code == 2 and "Traceback" not in err and f"{cut}: damaged or truncated gzip file" in err, err


def test_non_utf8_nul_and_utf16_inside_a_gz_name_the_line(tmp_path):
    bad = gz(tmp_path / "bad.txt.gz", "ok\n\n".encode() + "中".encode() + b"\xff\n")
    with pytest.raises(ValueError, match=r"bad.txt.gz: line 3: not valid UTF-8 \(bytes b'\\xff' at byte "
                                         r"offset 7 of the decompressed text"):
        docs(bad)
    with pytest.raises(ValueError, match=r"bad.jsonl.gz: line 2: not valid UTF-8"):
        docs(gz(tmp_path / "bad.jsonl.gz", b'{"text": "a"}\n{"text": "\xe9"}\n'))
    with pytest.raises(ValueError, match=r"nul.csv.gz: line 2: NUL byte"):
        docs(gz(tmp_path / "nul.csv.gz", b"text\nab\x00c\n"))
    with pytest.raises(ValueError, match=r"u16.txt.gz: the file is UTF-16"):
        docs(gz(tmp_path / "u16.txt.gz", "hello\n".encode("utf-16")))


def test_other_compressed_formats_are_refused_and_a_gzip_named_txt_gets_a_hint(tmp_path):
    for name in ("a.txt.bz2", "a.xz", "a.jsonl.zst", "a.zip", "a.7z"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ValueError, match=rf"{name}: .* not read directly; decompress it first"):
            check_inputs([tmp_path / name])
    for name in ("a.tgz", "a.tar.gz"):
        (tmp_path / name).write_bytes(b"x")
        with pytest.raises(ValueError, match=rf"{name}: tar archives are not read directly"):
            check_inputs([tmp_path / name])
    with pytest.raises(ValueError, match="compressed twice"):
        check_inputs([gz(tmp_path / "a.txt.gz.gz", b"x")])
    with pytest.raises(ValueError, match=r"plain.txt: the file is gzip-compressed.*plain.txt.gz"):
        docs(gz(tmp_path / "plain.txt", b"hello\n"))


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()
