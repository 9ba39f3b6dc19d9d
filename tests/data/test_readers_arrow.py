"""Parquet, Arrow and `datasets` folders read as the same documents as JSONL; globs; binary files
named as binary."""

import builtins
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.base.readers import check_inputs, iter_documents
from lmforge.base.readers_arrow import iter_rows
from lmforge.base.tokenizer import train_tokenizer
from lmforge.data.prepare import prepare
from lmforge.data.prepare_classify import prepare_classify

TEXTS = [f"Speaker {i}:\nLine {i} of the play, with words {'ab' * (i % 5)}.\n" for i in range(50)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tables(folder: Path, table: pa.Table) -> dict[str, Path]:
    """The same table as Parquet (small row groups), an Arrow IPC file and an Arrow IPC stream."""
    pq.write_table(table, folder / "t.parquet", row_group_size=7)
    with pa.ipc.new_file(str(folder / "t.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=9)
    with pa.ipc.new_stream(str(folder / "stream.arrow"), table.schema) as w:
        w.write_table(table, max_chunksize=5)
    return {"parquet": folder / "t.parquet", "arrow": folder / "t.arrow", "stream": folder / "stream.arrow"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrow")
    rows = [{"id": i, "text": t} for i, t in enumerate(TEXTS)]
    files = {"jsonl": write_jsonl(d / "c.jsonl", rows)}
    files |= write_tables(d, pa.Table.from_pylist(rows))
    import datasets
    datasets.Dataset.from_list(rows).save_to_disk(str(d / "ds"))
    files["dataset"] = d / "ds"
    tok = train_tokenizer([files["jsonl"]], kind="bpe", vocab_size=300, out_dir=d / "tok", show_progress=False)
    return files, tok


def store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".bin", ".idx", ".labels")}


@pytest.mark.parametrize("kind", ["parquet", "arrow", "stream", "dataset"])
def test_columnar_inputs_give_the_same_token_store_as_jsonl(corpus, kind, tmp_path):
    files, tok = corpus
    want = prepare("lm", [files["jsonl"]], tok, tmp_path / "from-jsonl", show_progress=False)
    got = prepare("lm", [files[kind]], tok, tmp_path / kind, show_progress=False)
    assert store_bytes(tmp_path / kind) == store_bytes(tmp_path / "from-jsonl")
    assert got["splits"] == want["splits"] and got["documents"] == 50


def test_columns_by_name_or_index_and_row_numbers(corpus):
    files, _ = corpus
    by_name = [(d.text, d.line) for d in iter_documents(files["parquet"], text_column="text")]
    by_index = [(d.text, d.line) for d in iter_documents(files["parquet"], text_column=1)]
    assert by_name == by_index == [(t, i + 1) for i, t in enumerate(TEXTS)]
    assert [d.text for d in iter_documents(files["dataset"], text_field="text")] == TEXTS
    with pytest.raises(ValueError, match=r"no column 'body'; the columns are \['id', 'text'\]"):
        list(iter_documents(files["arrow"], text_column="body"))
    with pytest.raises(ValueError, match="row 1: column 'id' holds int, not text"):
        list(iter_documents(files["stream"], text_column="id"))


def test_a_parquet_file_is_read_in_record_batches(corpus, monkeypatch):
    files, _ = corpus
    import lmforge.base.readers_arrow as ra
    monkeypatch.setattr(ra, "BATCH_ROWS", 8)
    positions = [row.position for row in iter_rows(files["parquet"], ["text"])]
    size = files["parquet"].stat().st_size
    assert len(set(positions)) == 7 and positions == sorted(positions) and positions[-1] == size


def test_tokenizer_trained_on_parquet_equals_jsonl(corpus, tmp_path):
    files, _ = corpus
    a = train_tokenizer([files["jsonl"]], kind="bpe", vocab_size=280, out_dir=tmp_path / "a", show_progress=False)
    b = train_tokenizer([files["parquet"]], kind="bpe", vocab_size=280, out_dir=tmp_path / "b", show_progress=False)
    assert a.read_bytes() == b.read_bytes()


def test_globs_expand_sorted_and_an_empty_glob_is_named(tmp_path):
    for name in ("b.parquet", "a.parquet", "c.txt"):
        (tmp_path / name).write_text("x")
    assert check_inputs([str(tmp_path / "*.parquet")]) == [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    with pytest.raises(FileNotFoundError, match=r"no file matches the pattern '.*\*\.arrow'"):
        check_inputs([str(tmp_path / "*.arrow")])


def test_a_dataset_dict_folder_names_its_splits(tmp_path):
    import datasets
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                               "test": datasets.Dataset.from_dict({"text": ["b"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"a DatasetDict folder \(splits: test, train\); pass the folder of one split"):
        list(iter_documents(tmp_path / "dd"))
    assert [d.text for d in iter_documents(tmp_path / "dd" / "train")] == ["a"]


def test_binary_files_are_named_as_binary_with_the_formats_read(corpus, tmp_path):
    files, _ = corpus
    misnamed = tmp_path / "data.txt"  # a Parquet file under a text name is still read as Parquet
    misnamed.write_bytes(files["parquet"].read_bytes())
    assert [d.text for d in iter_documents(misnamed)] == TEXTS
    import zipfile
    with zipfile.ZipFile(tmp_path / "a.txt", "w") as z:
        z.writestr("inner.txt", "hello")
    with pytest.raises(ValueError, match=r"a\.txt: this is a zip archive file \(binary\), not text; lmforge "
                                         r"reads \.txt, \.jsonl.*\.parquet, \.arrow"):
        list(iter_documents(tmp_path / "a.txt"))
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(files["parquet"].read_bytes()))
    with pytest.raises(ValueError, match="the gzip file holds a Parquet file"):
        list(iter_documents(gz))
    (tmp_path / "w.txt").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(ValueError, match="Python pickle file"):
        list(iter_documents(tmp_path / "w.txt"))
    text = tmp_path / "p.txt"  # starts like Parquet, but is text
    text.write_text("PAR1 is the first paragraph.\n")
    assert [d.text for d in iter_documents(text)] == ["PAR1 is the first paragraph.\n"]


def test_without_pyarrow_the_error_says_what_to_install(corpus, monkeypatch):
    files, _ = corpus
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ValueError, match=r"needs pyarrow; install it with `pip install 'lmforge\[parquet\]'`"):
        list(iter_documents(files["parquet"]))


def test_classify_from_a_datasets_folder_maps_class_labels_to_names(tmp_path):
    import datasets
    texts = [f"message number {i} {'win cash now' if i % 3 == 0 else 'see you at lunch'}" for i in range(30)]
    labels = [1 if i % 3 == 0 else 0 for i in range(30)]
    features = datasets.Features({"sms": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["ham", "spam"])})
    datasets.Dataset.from_dict({"sms": texts, "label": labels}, features=features).save_to_disk(str(tmp_path / "ds"))
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"sms": t, "label": ["ham", "spam"][y]} for t, y in zip(texts, labels)])
    tok = train_tokenizer([jsonl], kind="bpe", vocab_size=280, out_dir=tmp_path / "tok", text_field="sms",
                          show_progress=False)
    want = prepare_classify([jsonl], tok, tmp_path / "a", text_column="sms", show_progress=False)
    got = prepare_classify([tmp_path / "ds"], tok, tmp_path / "b", text_column="sms", show_progress=False)
    assert got["label_names"] == want["label_names"] == ["ham", "spam"]
    assert store_bytes(tmp_path / "b") == store_bytes(tmp_path / "a")


def test_dialogues_from_a_parquet_messages_column_equal_jsonl(tmp_path):
    dialogues = [{"messages": [{"role": "user", "content": f"hello {i}"},
                               {"role": "assistant", "content": f"hi there {i}"}]} for i in range(20)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", dialogues)
    pq.write_table(pa.Table.from_pylist(dialogues), tmp_path / "d.parquet")
    text = tmp_path / "words.txt"
    text.write_text("\n".join(f"hello hi there {i}" for i in range(20)))
    tok = train_tokenizer([text], kind="wordpiece", vocab_size=200, out_dir=tmp_path / "tok", show_progress=False)
    prepare("dialogue", [jsonl], tok, tmp_path / "a", show_progress=False)
    prepare("dialogue", [tmp_path / "d.parquet"], tok, tmp_path / "b", show_progress=False)
    assert store_bytes(tmp_path / "b") == store_bytes(tmp_path / "a")
    assert (tmp_path / "b" / "train.roles").read_bytes() == (tmp_path / "a" / "train.roles").read_bytes()


def test_a_large_parquet_file_is_never_held_whole(tmp_path):
    """Arrow memory stays at a row group's worth while the whole file is read (pyarrow's default
    pre-buffering would hold every column chunk at once)."""
    import random
    import subprocess
    import sys
    rng = random.Random(0)
    words = [f"w{rng.randrange(100_000)}" for _ in range(1_000_000)]
    texts = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=5000, compression="none")
    size = (tmp_path / "big.parquet").stat().st_size
    code = ("import sys, pyarrow as pa\nfrom lmforge.base.readers import iter_documents\n"
            "n = sum(1 for _ in iter_documents(sys.argv[1]))\nprint(n, pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.parquet")], capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert int(out[0]) == 50_000 and size > 6_000_000
    assert int(out[1]) < size / 2, (int(out[1]), size)  # pre-buffered: more than the whole file
