"""Prepare for the task "mlm" (BERT pretraining): paragraphs -> sentences -> a token store.

A paragraph is a document of `lmforge.base.readers` (.txt: a blank-line-separated block with
doc_split="blank_line", one line with "line" — WikiText's layout; .jsonl: a field;
.csv/.tsv: a column). Line breaks inside a paragraph are spaces. Paragraphs are cut into
sentences after `. ! ?` followed by a space (closing quotes/brackets stay with the sentence;
not after an initial such as "H." or "Mr.") and after `。！？` (Chinese needs no space),
tokenized without special tokens, and written one sample per sentence; `{split}.labels`
holds each sentence's paragraph number (counted per split), which is what
`lmforge.data.mlm.SentencePairDataset` needs to draw pairs.

Every paragraph goes to train, val or test by the same seeded draw as the "lm" task
(`lmforge.data.pipeline.Splitter`); the folder is written to a temp folder and renamed into
place (`lmforge.data.staging`). Pretraining draws its next-sentence pairs from consecutive
sentences of one paragraph: a train split without such a pair, or a val / test split asked for
without one, is an error naming the counts (meta.json keeps them as `splits.{split}.pairs`).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.base.readers import iter_documents
from lmforge.base.sources import input_size
from lmforge.data.fixed_splits import FixedSplitter, check_fixed_splits, plan_splits
from lmforge.data.pipeline import (check_numbers, check_wanted_splits, open_tokenizer, parallelism, write_folder_meta,
                                   writing_folder)
from lmforge.data.store import TokenStoreWriter, split_counts

# Not after an initial ("H. gammarus") or a common title abbreviation ("Mr. Smith").
_NOT_ABBREVIATION = r"(?<!\b[A-Z])(?<!\bMr)(?<!\bMrs)(?<!\bMs)(?<!\bDr)(?<!\bSt)(?<!\bvs)(?<!\bNo)"
_SENTENCE_END = re.compile(_NOT_ABBREVIATION + r"[.!?]+[\"'”’)\]»]*(?=\s)|[。！？]+[”’」』）)]*")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph (English and Chinese sentence ends), stripped, non-empty."""
    text = " ".join(text.split())  # line breaks and runs of spaces -> one space
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        sentences.append(text[start:m.end()].strip())
        start = m.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def prepare_mlm(inputs: list[Path], tokenizer_path: Path, out_dir: Path, *, val_fraction: float = 0.05,
                test_fraction: float = 0.0, seed: int = 1337, text_field: str = "text",
                text_column: str | int = "text", batch_size: int = 1000, workers: int | None = None,
                show_progress: bool = True, overwrite: bool = False, doc_split: str = "blank_line",
                val_files: list[Path] | None = None, test_files: list[Path] | None = None) -> dict:
    """Tokenize the paragraphs of `inputs` into sentences in `out_dir`; returns the meta.json dict.
    Paragraphs of `val_files` / `test_files` go to val / test (`lmforge.data.fixed_splits`)."""
    check_numbers(val_fraction, test_fraction, batch_size, workers)
    plan = plan_splits(inputs, val_files, test_files, val_fraction, test_fraction)
    paths, val_fraction, test_fraction = plan.paths, plan.val_fraction, plan.test_fraction
    tokenizer = open_tokenizer(tokenizer_path)
    ids = tokenizer.ids
    lacking = [n for n, i in (("[CLS]", ids.cls), ("[SEP]", ids.sep), ("[MASK]", ids.mask), ("[PAD]", ids.pad))
               if i is None]
    if lacking:
        raise ValueError(f"{tokenizer.file}: the tokenizer has no {', '.join(lacking)} token(s), which BERT "
                         "pretraining needs; train one with `lmforge tokenizer train --kind wordpiece`")
    splits = plan.split_names()
    t0 = time.perf_counter()
    with writing_folder(out_dir, paths, overwrite) as tmp:
        with parallelism(workers), contextlib.ExitStack() as stack:
            writers = {s: stack.enter_context(TokenStoreWriter(tmp, s, tokenizer.vocab_size, labelled=True))
                       for s in splits}
            paragraphs, pairs = _write_sentences(tokenizer.tok, paths, writers,
                                                 plan.splitter(seed), batch_size,
                                                 show_progress, dict(text_field=text_field, text_column=text_column,
                                                                     doc_split=doc_split))
        counts = {s: {**split_counts(tmp, s), "pairs": pairs[s]} for s in splits}
        if counts["train"]["pairs"] == 0:
            raise ValueError(f"{', '.join(str(p) for p in paths)}: no paragraph of two or more sentences for "
                             f"training ({counts['train']['samples']} sentences in {paragraphs['train']} "
                             "paragraphs); BERT pretraining draws its sentence pairs from such paragraphs")
        check_wanted_splits(counts, val_fraction, test_fraction, paths,
                            "sentence pairs within a paragraph", key="pairs")
        check_fixed_splits(plan, counts, "sentence pairs within a paragraph", key="pairs")
        meta = write_folder_meta(tmp, "mlm", tokenizer, paths, counts, seed=seed, val_fraction=val_fraction,
                                 test_fraction=test_fraction, split_sources=plan.sources(),
                                 documents=sum(paragraphs.values()),
                                 paragraphs=paragraphs, split_by="paragraph")
    seconds = time.perf_counter() - t0
    total = sum(c["tokens"] for c in counts.values())
    per_split = " / ".join(f"{s} {c['samples']:,} sentences" for s, c in counts.items())
    print(f"prepared: {sum(paragraphs.values()):,} paragraphs, {total:,} tokens ({per_split}) in {seconds:.2f}s")
    return meta


def _write_sentences(tok, paths: list[Path], writers: dict[str, TokenStoreWriter], splitter: FixedSplitter,
                     batch_size: int, show_progress: bool, read_options: dict
                     ) -> tuple[dict[str, int], dict[str, int]]:
    """Read, split and tokenize paragraphs in batches; returns the paragraphs and the sentence
    pairs within a paragraph (a next-sentence example each) written per split."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    paragraphs = {s: 0 for s in writers}
    pairs = {s: 0 for s in writers}
    batch: list[tuple[str, list[str]]] = []  # (split, sentences) per paragraph

    def flush() -> None:
        flat = [s for _, sentences in batch for s in sentences]
        encodings = iter(encode(flat, add_special_tokens=False)) if flat else iter(())
        for split, sentences in batch:
            kept = [e.ids for e in (next(encodings) for _ in sentences) if e.ids]
            if not kept:
                continue
            writer = writers[split]
            for ids in kept:
                writer.add(np.asarray(ids, dtype=np.int64), label=paragraphs[split])
            paragraphs[split] += 1
            pairs[split] += len(kept) - 1
        batch.clear()

    total = sum(input_size(p) for p in paths)
    with tqdm(total=total, unit="B", unit_scale=True, desc="prepare mlm", file=sys.stderr,
              disable=not show_progress, mininterval=0.5) as bar:
        base, pieces = 0, []
        for path in paths:
            for doc in iter_documents(path, **read_options):
                pieces.append(doc.text)
                if not doc.final:  # a very long paragraph comes in pieces
                    continue
                sentences = split_sentences("".join(pieces))
                pieces = []
                split = splitter.next(path)
                if split in writers and sentences:
                    batch.append((split, sentences))
                if len(batch) >= batch_size:
                    flush()
                    bar.update(base + doc.offset - bar.n)
            base += input_size(path)
        flush()
        bar.update(total - bar.n)
    return paragraphs, pairs
