"""prepare(task="lm"): EOS between documents, seeded split, counts, atomic output, errors."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.prepare import prepare
from lmforge.data.store import TokenStore
from lmforge.base.tokenizer import load_tokenizer, train_tokenizer

DOCS = [f"Speaker {i}:\nLine {i} of the play, with words {'ab' * (i % 5)}.\n" for i in range(60)]


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("prep")
    corpus = write(d / "corpus.txt", "\n".join(DOCS))
    tok_path = train_tokenizer([corpus], kind="bpe", vocab_size=300, out_dir=d / "tok",
                               show_progress=False)
    return corpus, tok_path


def run(corpus, tok_path, out, **kw):
    kw.setdefault("show_progress", False)
    return prepare("lm", corpus if isinstance(corpus, list) else [corpus], tok_path, out, **kw)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_eos_after_every_document_and_counts_match_files(setup, tmp_path, capsys):
    corpus, tok_path = setup
    meta = run(corpus, tok_path, tmp_path / "data", val_fraction=0.2, test_fraction=0.1)
    out = capsys.readouterr().out
    assert out.startswith("prepared: 60 documents, ") and "tokens/s" in out
    tok = load_tokenizer(tok_path)
    eos = tok.token_to_id("<|endoftext|>")
    assert meta["special_ids"]["eos"] == eos == 0 and meta["dtype"] == "uint16"
    texts = []
    for split in ("train", "val", "test"):
        store = TokenStore(tmp_path / "data", split)
        assert meta["splits"][split] == {"samples": len(store), "tokens": len(store.tokens)}
        assert (tmp_path / "data" / f"{split}.bin").stat().st_size == 2 * len(store.tokens)
        for i in range(len(store)):
            ids = store[i].tolist()
            assert ids[-1] == eos and eos not in ids[:-1]
            texts.append(tok.decode(ids[:-1], skip_special_tokens=False))
    assert sorted(texts) == sorted(DOCS)  # every document exactly once, lossless
    assert sum(meta["splits"][s]["samples"] for s in meta["splits"]) == 60
    assert meta["splits"]["val"]["samples"] > 0 and meta["splits"]["test"]["samples"] > 0
    copied = tmp_path / "data" / "tokenizer.json"
    assert copied.read_bytes() == Path(tok_path).read_bytes()
    assert meta["tokenizer_sha256"] == hashlib.sha256(copied.read_bytes()).hexdigest()
    assert meta["tokenizer"] == str(Path(tok_path).resolve()) and meta["split_by"] == "document"
    assert meta["task"] == "lm" and meta["label_names"] is None


def test_split_is_seeded_and_deterministic(setup, tmp_path):
    corpus, tok_path = setup
    a = run(corpus, tok_path, tmp_path / "a", val_fraction=0.3, seed=1)
    b = run(corpus, tok_path, tmp_path / "b", val_fraction=0.3, seed=1, batch_size=7, workers=1)
    c = run(corpus, tok_path, tmp_path / "c", val_fraction=0.3, seed=2)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b") and a == b
    assert (tmp_path / "a" / "val.bin").read_bytes() != (tmp_path / "c" / "val.bin").read_bytes()
    assert c["splits"]["val"]["samples"] + c["splits"]["train"]["samples"] == 60


def test_val_never_empty_with_two_documents(setup, tmp_path):
    _, tok_path = setup
    corpus = write(tmp_path / "two.txt", "first doc\n\nsecond doc\n")
    for seed in range(5):
        meta = run(corpus, tok_path, tmp_path / f"d{seed}", val_fraction=0.01, seed=seed)
        assert meta["splits"]["train"]["samples"] == 1 and meta["splits"]["val"]["samples"] == 1


def test_single_document_is_split_by_tokens(setup, tmp_path):
    _, tok_path = setup
    corpus = write(tmp_path / "one.txt", "".join(DOCS).replace("\n\n", "\n"))
    meta = run(corpus, tok_path, tmp_path / "d", val_fraction=0.1)
    assert meta["split_by"] == "tokens" and meta["documents"] == 1
    train, val = TokenStore(tmp_path / "d", "train"), TokenStore(tmp_path / "d", "val")
    n = len(train.tokens) + len(val.tokens)
    assert len(val.tokens) == round(0.1 * n) and (len(train), len(val)) == (1, 1)
    whole = load_tokenizer(tok_path).encode(corpus.read_text()).ids + [0]
    assert np.concatenate([train.tokens, val.tokens]).tolist() == whole


def test_jsonl_input_and_several_files(setup, tmp_path):
    corpus, tok_path = setup
    jsonl = write(tmp_path / "x.jsonl", '{"body": "hello"}\n{"body": "world"}\n')
    meta = run([corpus, jsonl], tok_path, tmp_path / "d", text_field="body", val_fraction=0.0)
    assert meta["documents"] == 62 and meta["splits"]["val"] == {"samples": 0, "tokens": 0}
    store = TokenStore(tmp_path / "d", "train")
    tok = load_tokenizer(tok_path)
    assert tok.decode(store[-1].tolist(), skip_special_tokens=False) == "world<|endoftext|>"


def test_refuses_to_overwrite_unless_asked(setup, tmp_path):
    corpus, tok_path = setup
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists and is not empty.*overwrite=True"):
        run(corpus, tok_path, out)
    assert (out / "keep.txt").exists()
    run(corpus, tok_path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "meta.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "\n \n\n", r"no text found in .*empty.txt"),
    ("bad.txt", b"ok\n\n\xff\xfe\n", r"bad.txt: line 3: not valid UTF-8"),
    ("bad.jsonl", '{"text": "a"}\n{"txt": "b"}\n', r"bad.jsonl: line 2: no field 'text'.*\['txt'\]"),
])
def test_clear_errors_leave_nothing_behind(setup, tmp_path, name, content, match):
    _, tok_path = setup
    data = tmp_path / "in"
    data.mkdir()
    with pytest.raises(ValueError, match=match):
        run(write(data / name, content), tok_path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_argument_errors(setup, tmp_path):
    corpus, tok_path = setup
    with pytest.raises(ValueError, match=r"no \[CLS\].*--kind wordpiece"):  # mlm: BERT specials needed
        prepare("mlm", [corpus], tok_path, tmp_path / "d")
    with pytest.raises(ValueError, match="cannot tell the format.*--format"):  # classify needs a table
        prepare("classify", [corpus], tok_path, tmp_path / "d")
    with pytest.raises(ValueError, match="unknown task 'lm2'"):
        prepare("lm2", [corpus], tok_path, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        run(tmp_path / "missing.txt", tok_path, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        run(corpus, tmp_path / "no-tok", tmp_path / "d")
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be < 1"):
        run(corpus, tok_path, tmp_path / "d", val_fraction=0.5, test_fraction=0.5)
    assert not (tmp_path / "d").exists()


def test_long_documents_read_in_pieces_stay_one_sample(setup, tmp_path, monkeypatch):
    corpus, tok_path = setup
    import functools

    import lmforge.data.prepare_lm as prep
    from lmforge.base.readers import iter_documents

    monkeypatch.setattr(prep, "iter_documents", functools.partial(iter_documents, max_chars=40))
    meta = run(corpus, tok_path, tmp_path / "d", val_fraction=0.25, batch_size=3)
    assert meta["documents"] == 60
    tok = load_tokenizer(tok_path)
    texts = []
    for split in ("train", "val"):
        store = TokenStore(tmp_path / "d", split)
        texts += [tok.decode(store[i].tolist()[:-1], skip_special_tokens=False)
                  for i in range(len(store))]
        assert len(store.tokens) == sum(len(tok.encode(t).ids) + 1 for t in texts[-len(store):])
    assert sorted(texts) == sorted(DOCS)
