"""Prepare: raw text files -> a prepared data folder (TokenStore splits + meta.json), per task.

Owns the task "lm" (GPT pretraining): documents are read by `lmforge.base.readers` (.txt:
blank-line-separated blocks; .jsonl: a field; .csv/.tsv: a column), tokenized in batches by
the Rust tokenizer (parallel on all cores), and written one sample per document with the EOS
id appended. Each document goes to train, val or test by a seeded RNG draw, in reading order,
so the same inputs and seed give byte-identical folders.

Small corpora get a guarantee: when val_fraction > 0 (or test_fraction > 0) and there are at
least two documents, that split is never left empty (the last train document moves there).
A corpus that is a single document (a .txt without blank lines) is split by tokens instead:
the last val_fraction of its tokens is val (and the last test_fraction after it is test).

Everything is written to a sibling temp folder and renamed into place at the end, so a
crash never leaves a half-written folder that looks complete. Other tasks ("mlm",
"classify", "dialogue") are not available yet in this version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.base.version import __version__
from lmforge.base.readers import check_inputs, iter_documents
from lmforge.data.staging import sha256_file, staged_folder
from lmforge.data.store import TokenStoreWriter, dtype_for, write_meta
from lmforge.base.tokenizer import load_tokenizer, special_ids, tokenizer_file

TASKS = ("lm", "mlm", "classify", "dialogue")
_COPY_TOKENS = 1 << 24  # tokens per chunk when moving tokens between split files
_RNG_BLOCK = 4096  # split draws are taken in fixed blocks: independent of batch_size
_BATCH_CHARS = 2 << 20  # characters per tokenizer batch at most (bounds memory; ~2 pieces of a huge line)


def prepare(task: str, inputs: list[Path], tokenizer_path: Path, out_dir: Path, *,
            val_fraction: float = 0.05, test_fraction: float = 0.0, seed: int = 1337,
            text_field: str = "text", text_column: str | int = "text", batch_size: int = 1000,
            workers: int | None = None, show_progress: bool = True, overwrite: bool = False,
            doc_split: str = "blank_line", max_len: int | None = None) -> dict:
    """Tokenize `inputs` into the data folder `out_dir`; returns the meta.json dict.

    `workers`: None = the tokenizer's Rust thread pool on all cores, 1 = single-threaded.
    `overwrite`: replace an existing non-empty `out_dir` (refused otherwise).
    `doc_split`: for .txt inputs, what one document is: a block between blank lines
    ("blank_line"), a line ("line"), or the whole file ("file").
    `max_len`: dialogue only: keep the most recent whole turns that fit (None: keep all).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if task == "dialogue":  # its own module: turns, roles, [CLS]/[SEP]
        from lmforge.data.prepare_dialogue import prepare_dialogue
        return prepare_dialogue(inputs, tokenizer_path, out_dir, max_len=max_len,
                                val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                batch_size=batch_size, workers=workers,
                                show_progress=show_progress, overwrite=overwrite)
    if task == "classify":  # its own module: labels, stratified split (more options there)
        from lmforge.data.prepare_classify import prepare_classify
        return prepare_classify(inputs, tokenizer_path, out_dir, text_column=text_column,
                                val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                                overwrite=overwrite, show_progress=show_progress)
    if task == "mlm":  # its own module: paragraphs -> sentences (+ paragraph numbers)
        from lmforge.data.prepare_mlm import prepare_mlm
        return prepare_mlm(inputs, tokenizer_path, out_dir, val_fraction=val_fraction,
                           test_fraction=test_fraction, seed=seed, text_field=text_field,
                           text_column=text_column, batch_size=batch_size, workers=workers,
                           show_progress=show_progress, overwrite=overwrite, doc_split=doc_split)
    if task != "lm":
        raise ValueError(f"task {task!r}: not available yet in this version of lmforge "
                         f"(only 'lm' can be prepared for now)")
    _check_numbers(val_fraction, test_fraction, batch_size, workers)
    paths = check_inputs(inputs)
    tok_file = tokenizer_file(tokenizer_path)
    tok = load_tokenizer(tok_file)
    ids = special_ids(tok)
    if ids.eos is None:
        raise ValueError(f"{tok_file}: the tokenizer has no end-of-text token (<|endoftext|> or "
                         f"[SEP]); train one with `lmforge tokenizer train`")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, paths, overwrite)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for(vocab_size)
    splits = ["train", "val"] + (["test"] if test_fraction > 0 else [])
    fractions = {"val": val_fraction, "test": test_fraction}

    t0 = time.perf_counter()
    read_options = dict(text_field=text_field, text_column=text_column, doc_split=doc_split)
    with staged_folder(out_dir) as tmp:
        with _parallelism(workers):
            n_docs = _tokenize_lm(tok, paths, tmp, splits, fractions, vocab_size, ids.eos, seed,
                                  batch_size, show_progress, read_options)
        if n_docs == 0:
            raise ValueError(f"no text found in {', '.join(str(p) for p in paths)}: the corpus is "
                             f"empty (only blank lines, or no rows)")
        split_by = _rebalance(tmp, splits, fractions, n_docs, dtype)
        counts = {s: _split_counts(tmp, s) for s in splits}
        shutil.copyfile(tok_file, tmp / "tokenizer.json")
        meta = {
            "task": task,
            "tokenizer": str(tok_file.resolve()),
            "tokenizer_sha256": sha256_file(tok_file),
            "vocab_size": vocab_size,
            "dtype": dtype.name,
            "special_ids": dataclasses.asdict(ids),
            "label_names": None,
            "splits": counts,
            "lmforge_version": __version__,
            "inputs": [str(p.resolve()) for p in paths],
            "documents": n_docs,
            "split_by": split_by,
            "seed": seed,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
        }
        write_meta(tmp, meta)
    print(_summary(n_docs, counts, time.perf_counter() - t0))
    return meta


def _summary(n_docs: int, counts: dict[str, dict[str, int]], seconds: float) -> str:
    total = sum(c["tokens"] for c in counts.values())
    per_split = " / ".join(f"{s} {c['tokens']:,}" for s, c in counts.items())
    return (f"prepared: {n_docs:,} documents, {total:,} tokens ({per_split}) in {seconds:.2f}s, "
            f"{total / max(seconds, 1e-9):,.0f} tokens/s")


def _check_numbers(val_fraction: float, test_fraction: float, batch_size: int,
                   workers: int | None) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (train needs data), got "
                         f"{val_fraction} + {test_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for all cores), got {workers}")


def _check_out_dir(out_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {out_dir} exists and is a file; choose a folder for --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise ValueError(f"output folder {out_dir} already exists and is not empty; pass "
                             f"overwrite=True (--overwrite) to replace it, or choose another --out")
        root = out_dir.resolve()
        inside = [str(p) for p in inputs if root in p.resolve().parents]
        if inside:
            raise ValueError(f"refusing to overwrite {out_dir}: it holds the input(s) "
                             f"{', '.join(inside)}; choose another --out")


@contextlib.contextmanager
def _parallelism(workers: int | None) -> Iterator[None]:
    """workers=1 turns the tokenizer's thread pool off for the call; otherwise leave it on.

    RAYON_NUM_THREADS (workers > 1) only takes effect if the Rust pool has not started yet.
    An inherited TOKENIZERS_PARALLELISM=false is respected (the library sets it in forked
    children, where turning it back on could deadlock) but reported, since it costs speed.
    """
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        if workers is not None and saved["RAYON_NUM_THREADS"] is None:
            os.environ["RAYON_NUM_THREADS"] = str(workers)
        flag = saved["TOKENIZERS_PARALLELISM"]
        if flag is not None and flag.strip().lower() in ("", "0", "false", "off", "no", "f", "n"):
            print(f"note: TOKENIZERS_PARALLELISM={saved['TOKENIZERS_PARALLELISM']} keeps the "
                  f"tokenizer on one core; unset it to use all cores", file=sys.stderr)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Splitter:
    """Seeded per-document split draws: 0 = train, 1 = val, 2 = test."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float) -> None:
        self._rng = np.random.default_rng(seed)
        self._edges = np.array([val_fraction, val_fraction + test_fraction])
        self._block: list[int] = []

    def next(self) -> int:
        if not self._block:
            u = self._rng.random(_RNG_BLOCK)
            # u < val -> 1 (val); val <= u < val+test -> 2 (test); else 0 (train)
            k = np.searchsorted(self._edges, u, side="right")
            self._block = np.where(k == 0, 1, np.where(k == 1, 2, 0))[::-1].tolist()
        return self._block.pop()


def _tokenize_lm(tok, paths: list[Path], tmp: Path, splits: list[str], fractions: dict,
                 vocab_size: int, eos: int, seed: int, batch_size: int, show_progress: bool,
                 read_options: dict) -> int:
    """Stream, tokenize and write every document; returns the number of documents."""
    with contextlib.ExitStack() as stack:  # closes the writers, also on errors
        writers = {s: stack.enter_context(TokenStoreWriter(tmp, s, vocab_size)) for s in splits}
        return _tokenize_into(tok, paths, writers, fractions, eos, seed, batch_size,
                              show_progress, read_options)


def _tokenize_into(tok, paths: list[Path], writers: dict[str, TokenStoreWriter], fractions: dict,
                   eos: int, seed: int, batch_size: int, show_progress: bool,
                   read_options: dict) -> int:
    names = ["train", "val", "test"]
    splits = list(writers)
    splitter = _Splitter(seed, fractions["val"], fractions["test"])
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster
    texts: list[str] = []  # the batch being read
    where: list[tuple[str, bool]] = []  # (split, final) per text of the batch
    n_docs = 0
    open_split: str | None = None  # split of a long document whose pieces are still coming

    def encode_and_write(texts: list[str], where: list[tuple[str, bool]]) -> None:
        flat: dict[str, list[int]] = {s: [] for s in splits}
        ends: dict[str, list[int]] = {s: [] for s in splits}
        for enc, (s, final) in zip(encode(texts, add_special_tokens=False), where):
            f = flat[s]
            f.extend(enc.ids)
            if final:
                f.append(eos)
                ends[s].append(len(f))
        for s in splits:
            if flat[s]:
                writers[s].write_batch(np.array(flat[s], dtype=np.int64), ends[s])

    # One worker thread encodes and writes batches in order while this thread reads the next
    # ones: the Rust encoder releases the GIL, so reading overlaps with tokenizing.
    pending: deque[Future] = deque()
    total = sum(p.stat().st_size for p in paths)
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr,
                 disable=not show_progress, mininterval=0.5) as bar:

        def submit(done_bytes: int) -> None:
            pending.append(pool.submit(encode_and_write, texts[:], where[:]))
            texts.clear()
            where.clear()
            while len(pending) > 2 or (pending and pending[0].done()):
                pending.popleft().result()  # re-raises an error from the worker
            bar.update(done_bytes - bar.n)

        try:
            base, batch_chars = 0, 0
            for path in paths:
                for doc in iter_documents(path, **read_options):
                    if open_split is None:
                        split = names[splitter.next()]
                    else:
                        split = open_split
                    open_split = None if doc.final else split
                    n_docs += doc.final
                    texts.append(doc.text)
                    where.append((split, doc.final))
                    batch_chars += len(doc.text)
                    # A batch is also cut by characters: pieces of one huge line would otherwise
                    # pile up in one batch and hold all their encodings at once.
                    if len(texts) >= batch_size or batch_chars >= _BATCH_CHARS:
                        submit(base + doc.offset)
                        batch_chars = 0
                base += path.stat().st_size
            if texts:
                submit(total)
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
        bar.update(total - bar.n)
    return n_docs


# -- after writing: counts, rebalancing, moving into place ---------------------------------------


def _split_counts(folder: Path, split: str) -> dict[str, int]:
    idx = np.fromfile(folder / f"{split}.idx", dtype="<i8")
    return {"samples": len(idx) - 1, "tokens": int(idx[-1])}


def _copy_tokens(src: Path, start: int, stop: int, dst, dtype: np.dtype) -> None:
    """Append tokens [start, stop) of the .bin file `src` to the open binary file `dst`."""
    for a in range(start, stop, _COPY_TOKENS):
        n = min(_COPY_TOKENS, stop - a)
        np.fromfile(src, dtype=dtype, count=n, offset=a * dtype.itemsize).tofile(dst)


def _move_last_sample(folder: Path, src: str, dst: str, dtype: np.dtype) -> None:
    """Move the last sample of split `src` to the end of split `dst` (files only, no labels)."""
    idx = np.fromfile(folder / f"{src}.idx", dtype="<i8")
    a, b = int(idx[-2]), int(idx[-1])
    dst_idx = np.fromfile(folder / f"{dst}.idx", dtype="<i8")
    with open(folder / f"{dst}.bin", "ab") as f:
        _copy_tokens(folder / f"{src}.bin", a, b, f, dtype)
    with open(folder / f"{dst}.idx", "ab") as f:
        np.array([dst_idx[-1] + (b - a)], dtype="<i8").tofile(f)
    os.truncate(folder / f"{src}.bin", a * dtype.itemsize)
    os.truncate(folder / f"{src}.idx", (len(idx) - 1) * 8)


def _split_single_document(folder: Path, splits: list[str], fractions: dict,
                           dtype: np.dtype) -> None:
    """The corpus is one document: cut its tokens into train | val | test, one sample each."""
    holder = next(s for s in splits if _split_counts(folder, s)["samples"] == 1)
    whole = folder / ".single.bin"
    os.replace(folder / f"{holder}.bin", whole)
    n = whole.stat().st_size // dtype.itemsize
    sizes = {s: int(round(n * fractions[s])) if s in fractions else 0 for s in splits}
    for s in splits[1:]:  # a wanted split gets at least one token while train keeps one
        if fractions[s] > 0 and sizes[s] == 0 and n - sum(sizes.values()) > 1:
            sizes[s] = 1
    sizes["train"] = n - sum(sizes[s] for s in splits[1:])
    start = 0
    for s in splits:
        with open(folder / f"{s}.bin", "wb") as f:
            _copy_tokens(whole, start, start + sizes[s], f, dtype)
        offsets = [0, sizes[s]] if sizes[s] else [0]
        np.array(offsets, dtype="<i8").tofile(folder / f"{s}.idx")
        start += sizes[s]
    whole.unlink()


def _rebalance(folder: Path, splits: list[str], fractions: dict, n_docs: int,
               dtype: np.dtype) -> str:
    """Keep wanted splits non-empty (see the module docstring); returns "document" or "tokens"."""
    wanted = ["train"] + [s for s in splits[1:] if fractions[s] > 0]
    if n_docs == 1 and len(wanted) > 1:
        _split_single_document(folder, splits, fractions, dtype)
        return "tokens"
    for dst in wanted:
        counts = {s: _split_counts(folder, s)["samples"] for s in splits}
        if counts[dst] == 0:
            donors = [s for s in splits if s != dst and counts[s] >= 2]
            if donors:  # train first (it is the big one), then the fuller of the others
                donor = "train" if "train" in donors else max(donors, key=counts.__getitem__)
                _move_last_sample(folder, donor, dst, dtype)
    return "document"
