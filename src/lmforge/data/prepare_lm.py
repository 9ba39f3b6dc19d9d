"""Prepare for the task "lm" (GPT pretraining): documents -> one sample each, EOS appended.

Documents are read by `lmforge.base.readers` (.txt: blank-line-separated blocks; .jsonl: a
field; .csv/.tsv: a column), tokenized in batches by the Rust tokenizer (parallel on all
cores) and written one sample per document with the EOS id appended. Each document goes to
train, val or test by the seeded draw of `lmforge.data.pipeline.Splitter`, in reading order,
so the same inputs and seed give byte-identical folders.

Small corpora get a guarantee: when val_fraction > 0 (or test_fraction > 0) and there are at
least two documents, that split is never left empty (the last train document moves there).
A corpus that is a single document (a .txt without blank lines, or doc_split="file") is split
by tokens instead: the last val_fraction of its tokens is val (and the last test_fraction
after it is test). Documents of `val_files` / `test_files` land in val / test whole and are
never moved (`lmforge.data.fixed_splits`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.base.readers import iter_documents
from lmforge.base.sources import input_size
from lmforge.data.fixed_splits import FixedSplitter, SplitPlan, check_fixed_splits, plan_splits
from lmforge.data.pipeline import (check_numbers, open_tokenizer, parallelism, wanted_splits, write_folder_meta,
                                   writing_folder)
from lmforge.data.store import TokenStoreWriter, cut_sample, dtype_for, move_last_sample, split_counts

_BATCH_CHARS = 2 << 20  # characters per tokenizer batch at most (bounds memory; ~2 pieces of a huge line)


def prepare_lm(inputs: list[Path], tokenizer_path: Path, out_dir: Path, *,
               val_fraction: float = 0.05, test_fraction: float = 0.0, seed: int = 1337,
               text_field: str = "text", text_column: str | int = "text", batch_size: int = 1000,
               workers: int | None = None, show_progress: bool = True, overwrite: bool = False,
               doc_split: str = "blank_line", val_files: list[Path] | None = None,
               test_files: list[Path] | None = None) -> dict:
    """Tokenize the documents of `inputs` into the data folder `out_dir`; returns the meta.json
    dict (options as `lmforge.data.prepare.prepare`)."""
    check_numbers(val_fraction, test_fraction, batch_size, workers)
    plan = plan_splits(inputs, val_files, test_files, val_fraction, test_fraction)
    paths, val_fraction, test_fraction = plan.paths, plan.val_fraction, plan.test_fraction
    tokenizer = open_tokenizer(tokenizer_path)
    if tokenizer.ids.eos is None:
        raise ValueError(f"{tokenizer.file}: the tokenizer has no end-of-text token (<|endoftext|> "
                         f"or [SEP]); train one with `lmforge tokenizer train`")
    splits = plan.split_names()
    fractions = {"val": val_fraction, "test": test_fraction}
    read_options = dict(text_field=text_field, text_column=text_column, doc_split=doc_split)

    t0 = time.perf_counter()
    with writing_folder(out_dir, paths, overwrite) as tmp:
        with parallelism(workers), contextlib.ExitStack() as stack:  # closes the writers, also on errors
            writers = {s: stack.enter_context(TokenStoreWriter(tmp, s, tokenizer.vocab_size))
                       for s in splits}
            n_docs = _tokenize_into(tokenizer.tok, paths, writers, plan.splitter(seed),
                                    tokenizer.ids.eos, batch_size, show_progress, read_options)
        if n_docs == 0:
            raise ValueError(f"no text found in {', '.join(str(p) for p in paths)}: the corpus is "
                             f"empty (only blank lines, or no rows)")
        split_by = _rebalance(tmp, plan, fractions, dtype_for(tokenizer.vocab_size))
        counts = {s: split_counts(tmp, s) for s in splits}
        check_fixed_splits(plan, counts, "documents")
        meta = write_folder_meta(tmp, "lm", tokenizer, paths, counts, seed=seed,
                                 val_fraction=val_fraction, test_fraction=test_fraction,
                                 split_sources=plan.sources(), documents=n_docs, split_by=split_by)
    print(_summary(n_docs, counts, time.perf_counter() - t0))
    return meta


def _summary(n_docs: int, counts: dict[str, dict[str, int]], seconds: float) -> str:
    total = sum(c["tokens"] for c in counts.values())
    per_split = " / ".join(f"{s} {c['tokens']:,}" for s, c in counts.items())
    return (f"prepared: {n_docs:,} documents, {total:,} tokens ({per_split}) in {seconds:.2f}s, "
            f"{total / max(seconds, 1e-9):,.0f} tokens/s")


def _tokenize_into(tok, paths: list[Path], writers: dict[str, TokenStoreWriter], splitter: FixedSplitter,
                   eos: int, batch_size: int, show_progress: bool, read_options: dict) -> int:
    """Stream, tokenize and write every document; returns the number of documents."""
    texts: list[str] = []  # the batch being read
    where: list[tuple[str, bool]] = []  # (split, final) per text of the batch
    n_docs = 0
    open_split: str | None = None  # split of a long document whose pieces are still coming
    encode_and_write = _batch_writer(tok, writers, eos)

    # One worker thread encodes and writes batches in order while this thread reads the next
    # ones: the Rust encoder releases the GIL, so reading overlaps with tokenizing.
    pending: deque[Future] = deque()
    total = sum(input_size(p) for p in paths)
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
                    split = splitter.next(path) if open_split is None else open_split
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
                base += input_size(path)
            if texts:
                submit(total)
            while pending:
                pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
        bar.update(total - bar.n)
    return n_docs


def _batch_writer(tok, writers: dict[str, TokenStoreWriter], eos: int):
    """The worker's job: encode one batch of texts and write them, EOS after each final piece."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: faster

    def encode_and_write(texts: list[str], where: list[tuple[str, bool]]) -> None:
        flat: dict[str, list[int]] = {s: [] for s in writers}
        ends: dict[str, list[int]] = {s: [] for s in writers}
        for enc, (s, final) in zip(encode(texts, add_special_tokens=False), where):
            f = flat[s]
            f.extend(enc.ids)
            if final:
                f.append(eos)
                ends[s].append(len(f))
        for s, ids in flat.items():
            if ids:
                writers[s].write_batch(np.array(ids, dtype=np.int64), ends[s])

    return encode_and_write


def _rebalance(folder: Path, plan: SplitPlan, fractions: dict, dtype: np.dtype) -> str:
    """Keep wanted splits non-empty (see the module docstring); returns "document" or "tokens".
    Only the drawn splits take part: a fixed split keeps exactly its files' documents."""
    wanted = wanted_splits(fractions["val"], fractions["test"])
    splits = [s for s in plan.split_names() if s not in plan.fixed]
    n_docs = sum(split_counts(folder, s)["samples"] for s in splits)
    if n_docs == 1 and len(wanted) > 1:
        holder = next(s for s in splits if split_counts(folder, s)["samples"] == 1)
        n = split_counts(folder, holder)["tokens"]
        cut_sample(folder, holder, _token_split_sizes(n, splits, fractions), dtype)
        return "tokens"
    for dst in wanted:
        counts = {s: split_counts(folder, s)["samples"] for s in splits}
        if counts[dst] == 0:
            donors = [s for s in splits if s != dst and counts[s] >= 2]
            if donors:  # train first (it is the big one), then the fuller of the others
                donor = "train" if "train" in donors else max(donors, key=counts.__getitem__)
                move_last_sample(folder, donor, dst, dtype)
    return "document"


def _token_split_sizes(n: int, splits: list[str], fractions: dict) -> dict[str, int]:
    """Tokens per split when one document of `n` tokens is cut into train | val | test."""
    sizes = {s: int(round(n * fractions[s])) if s in fractions else 0 for s in splits}
    for s in splits[1:]:  # a wanted split gets at least one token while train keeps one
        if fractions[s] > 0 and sizes[s] == 0 and n - sum(sizes.values()) > 1:
            sizes[s] = 1
    sizes["train"] = n - sum(sizes[s] for s in splits[1:])
    return {s: sizes[s] for s in splits}
