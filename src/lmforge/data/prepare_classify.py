"""Prepare for `classify`: labelled texts (.csv, .tsv, .jsonl, SMS Spam Collection) -> a token store.

Owns reading (text, label) records, the label vocabulary, class balancing, the seeded
stratified train/val/test split, and writing one labelled sample per text.

- `.csv` / `.tsv`: the text and label columns are named (`text_column`, `label_column`) by the
  header row, or, with `header=False`, by `columns` (names for the positions, e.g.
  ["label", "text"]) or by 0-based indices. `.tsv` is read without quote handling.
- `.jsonl`: one object per line with the text and label fields.
- any of these gzip-compressed (`.csv.gz`, ...): decompressed while read.
- Parquet, Arrow and `datasets` save_to_disk folders: the two columns by name or index; an
  integer label of a `datasets` ClassLabel column becomes its class name.
- `fmt="sms"`: the SMS Spam Collection as distributed (`label<TAB>text`, no header, any file
  name); the same as a header-less `.tsv` with columns ["label", "text"].

`regression=True` reads the label column as a number per text (a target for
`model.num_labels: 1`): a value that is not a finite number is an error naming the file and line;
the targets are stored as float32 (meta.json: `problem_type: "regression"`, `label_dtype:
"float32"`, each split's target mean / std / min / max), and the split is a seeded random one.

Label ids follow `labels` when given (a label outside it is an error naming the line), else the
sorted label names. The split is stratified: each class is shuffled with the seed and cut by
the fractions, so every split keeps the class proportions; each split is then shuffled, so the
first batches of val hold every class. `balance=True` first undersamples every class to the
size of the smallest (as chapter 6 of "Build a Large Language Model (From Scratch)" does).
Texts of `val_files` / `test_files` go to val / test whole (`lmforge.data.fixed_splits`), only
shuffled with the seed; the stratified draw and the balancing then concern the inputs alone.
A val or test split asked for that comes out empty (too few texts per class) is an error
naming the counts; a label that some wanted split has no example of (one seen once lands in
train) gets a note on stderr, as does a label of `labels` without any example.

The records are held in memory (labelled sets are small next to pretraining corpora); the
token store is written through a temp folder renamed into place, as for every task
(`lmforge.data.pipeline`).
Texts are encoded without truncation or padding (a tokenizer.json from the Hub may carry
both); a WordPiece tokenizer (one with [CLS] and [SEP]) gets `[CLS] text [SEP]`, a BPE one the
text's tokens only (the GPT head reads the last real token). `max_tokens` truncates at prepare
time; the task also truncates to the model context when it reads.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import numpy as np

from lmforge.base.readers_arrow import class_names, columnar_format, iter_rows
from lmforge.base.sources import format_suffix, iter_lines
from lmforge.data.fixed_splits import SplitPlan, check_fixed_splits, plan_splits
from lmforge.data.pipeline import (SPLIT_NAMES, OpenTokenizer, check_numbers, check_wanted_splits, open_tokenizer,
                                   wanted_splits, write_folder_meta, writing_folder)
from lmforge.data.store import TokenStoreWriter, split_counts

Format = Literal["auto", "csv", "tsv", "jsonl", "sms"]


class Record(NamedTuple):
    text: str
    label: str
    path: Path
    line: int


def prepare_classify(inputs: list[Path], tokenizer_path: Path, out_dir: Path, *,
                     fmt: Format = "auto", text_column: str | int = "text",
                     label_column: str | int = "label", header: bool = True,
                     columns: list[str] | None = None, labels: list[str] | None = None,
                     val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 1337,
                     balance: bool = False, max_tokens: int | None = None,
                     overwrite: bool = False, show_progress: bool = True, val_files: list[Path] | None = None,
                     test_files: list[Path] | None = None, regression: bool = False) -> dict:
    """Read, split and tokenize labelled texts into `out_dir`; returns the meta.json dict."""
    check_numbers(val_fraction, test_fraction)
    if regression and (labels is not None or balance):
        raise ValueError(f"{'--labels' if labels is not None else '--balance'} is for class labels; "
                         "--regression reads a number per text")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 or None, got {max_tokens}")
    if labels is not None and len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels}: each label name must appear once")
    plan = plan_splits(inputs, val_files, test_files, val_fraction, test_fraction)
    paths, val_fraction, test_fraction = plan.paths, plan.val_fraction, plan.test_fraction
    tokenizer = open_tokenizer(tokenizer_path)
    tokenizer.tok.no_truncation()
    tokenizer.tok.no_padding()
    t0 = time.perf_counter()
    read_options = dict(fmt=fmt, text_column=text_column, label_column=label_column, header=header,
                        columns=columns, allowed=labels)
    with writing_folder(out_dir, paths, overwrite) as tmp:
        records, label_names, y = (_read_targets(paths, read_options) if regression
                                   else _read_labelled(paths, labels, read_options))
        strata = np.zeros(len(y), dtype=np.int64) if regression else y  # one stratum: a plain random split
        parts = _split_records(records, strata, plan, balance, np.random.default_rng(seed))
        ids = tokenizer.ids
        wrap = "cls_sep" if ids.cls is not None and ids.sep is not None else "none"
        counts = {}
        for split in plan.split_names():
            texts = [records[i].text for i in parts[split]]
            samples = [_wrap(enc.ids, ids, wrap, max_tokens) for enc in
                       (tokenizer.tok.encode_batch(texts, add_special_tokens=False) if texts else [])]
            counts[split] = _write_split(tmp, split, tokenizer, samples, y[parts[split]], label_names)
        check_wanted_splits(counts, val_fraction, test_fraction, paths, "labelled texts")
        check_fixed_splits(plan, counts, "labelled texts")
        if not regression:
            _note_missing_labels(counts, label_names, wanted_splits(val_fraction, test_fraction))
        target_keys = {"problem_type": "regression", "label_dtype": "float32",
                       "target_column": str(read_options["label_column"])} if regression else {}
        meta = write_folder_meta(tmp, "classify", tokenizer, paths, counts, seed=seed,
                                 val_fraction=val_fraction, test_fraction=test_fraction,
                                 label_names=label_names, split_sources=plan.sources(), special_wrap=wrap,
                                 records=len(records),
                                 balanced=balance, max_tokens=max_tokens, **target_keys)
    if show_progress:
        per_split = " / ".join(f"{s} {c['samples']:,}" for s, c in counts.items())
        what = (f"targets mean {y.mean():.4g}, std {y.std():.4g}" if regression else f"labels {label_names}")
        print(f"prepared: {len(records):,} labelled texts ({per_split}), {what} "
              f"in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return meta


def _read_labelled(paths: list[Path], labels: list[str] | None, read_options: dict
                   ) -> tuple[list[Record], list[str], np.ndarray]:
    """The records of every file, the label names in id order and each record's label id."""
    records: list[Record] = []
    for path in paths:
        records += read_records(path, **read_options)
    if not records:
        raise ValueError(f"no labelled rows found in {', '.join(map(str, paths))}")
    label_names = list(labels) if labels is not None else sorted({r.label for r in records})
    if len(label_names) < 2:
        raise ValueError(f"{', '.join(map(str, paths))}: only one label ({label_names[0]!r}); "
                         "classification needs at least two")
    label_id = {name: i for i, name in enumerate(label_names)}
    return records, label_names, np.array([label_id[r.label] for r in records], dtype=np.int64)


def _read_targets(paths: list[Path], read_options: dict) -> tuple[list[Record], None, np.ndarray]:
    """The records of every file and each one's numeric target (regression); no label names."""
    records: list[Record] = []
    for path in paths:
        records += read_records(path, **read_options)
    if not records:
        raise ValueError(f"no labelled rows found in {', '.join(map(str, paths))}")
    targets = np.empty(len(records), dtype=np.float64)
    for i, r in enumerate(records):
        try:
            targets[i] = float(r.label)
        except ValueError:
            targets[i] = math.nan
        if not math.isfinite(targets[i]):
            raise ValueError(f"{r.path}: line {r.line}: label {r.label!r} is not a finite number; --regression "
                             f"reads a number per text from column/field {read_options['label_column']!r}")
    if abs(targets.mean()) > 10 or targets.std() > 10:
        print(f"note: the targets have mean {targets.mean():.4g} and std {targets.std():.4g}; the regression "
              "head starts near 0 and trains best on targets of about unit scale (standardize them)",
              file=sys.stderr)
    return records, None, targets


def _split_records(records: list[Record], y: np.ndarray, plan: SplitPlan, balance: bool,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Record indices per split: the inputs' balanced (if asked) and stratified, the fixed files'
    whole, each shuffled."""
    where = [plan.split_of(r.path) for r in records]
    drawn = np.array([i for i, s in enumerate(where) if s is None], dtype=np.int64)
    keep = drawn[balanced_indices(y[drawn], rng)] if balance and len(drawn) else drawn
    parts = stratified_split(y, keep, plan.val_fraction, plan.test_fraction, rng)
    for split in plan.fixed:
        parts[split] = rng.permutation(np.array([i for i, s in enumerate(where) if s == split], dtype=np.int64))
    return parts


def _write_split(folder: Path, split: str, tokenizer: OpenTokenizer, samples: list[list[int]],
                 y: np.ndarray, label_names: list[str] | None) -> dict:
    """Write one split's labelled samples; its counts for meta.json, examples per label (or the
    targets' mean, std, min and max: regression) included."""
    regression = label_names is None
    with TokenStoreWriter(folder, split, tokenizer.vocab_size, labelled=True,
                          label_dtype="float32" if regression else "int64") as writer:
        for sample, label in zip(samples, y.tolist()):
            writer.add(sample, label)
    if regression:
        stats = {f"target_{k}": float(f(y)) if len(y) else None
                 for k, f in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max))}
        return {**split_counts(folder, split), **stats}
    return {**split_counts(folder, split),
            "labels": {label_names[k]: int(v) for k, v in sorted(Counter(y.tolist()).items())}}


def _note_missing_labels(counts: dict[str, dict], label_names: list[str], wanted: list[str]) -> None:
    """A note on stderr for labels that some wanted split has no example of (they are then never
    evaluated there), and for labels of --labels without any example."""
    totals = {name: sum(c["labels"].get(name, 0) for c in counts.values()) for name in label_names}
    unused = [name for name, n in totals.items() if n == 0]
    if unused:
        print(f"note: label(s) {', '.join(map(repr, unused))} have no example at all", file=sys.stderr)
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, n in totals.items():
        lacking = tuple(s for s in wanted[1:] if name not in counts[s]["labels"])
        if n and lacking:
            groups.setdefault(lacking, []).append(f"{name!r} ({n} example{'s' if n != 1 else ''})")
    for lacking, names in groups.items():
        having = [s for s in counts if s not in lacking and s in wanted]
        print(f"note: label(s) {', '.join(names)} are only in {' and '.join(having)}: "
              f"{' and '.join(lacking)} {'have' if len(lacking) > 1 else 'has'} none of them, so they are "
              f"never evaluated there; add more examples of them", file=sys.stderr)


def read_records(path: Path, *, fmt: Format = "auto", text_column: str | int = "text",
                 label_column: str | int = "label", header: bool = True,
                 columns: list[str] | None = None, allowed: list[str] | None = None) -> list[Record]:
    """The (text, label) records of one file; ValueError naming the line for a bad one."""
    path = Path(path)
    if fmt == "auto" and columnar_format(path) is not None:
        fmt = "table"
    if fmt == "auto":
        # format_suffix: the extension before .gz (a .gz is decompressed while read)
        fmt = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}.get(format_suffix(path), "")
        if not fmt:
            raise ValueError(f"{path}: cannot tell the format from the extension; name it .csv, .tsv "
                             "or .jsonl (or .csv.gz, ...), or pass --format (sms for the SMS Spam "
                             "Collection)")
    if fmt == "sms":
        fmt, header, columns = "tsv", False, ["label", "text"]
        text_column, label_column = "text", "label"
    if fmt == "table":
        rows = _columnar_rows(path, text_column, label_column)
    elif fmt == "jsonl":
        rows = _jsonl_rows(path, text_column, label_column)
    else:
        rows = _table_rows(path, fmt, text_column, label_column, header, columns)
    records = []
    for line, text, label in rows:
        if text is None or not str(text).strip():
            raise ValueError(f"{path}: line {line}: missing text (column/field {text_column!r})")
        if label is None or not str(label).strip():
            raise ValueError(f"{path}: line {line}: missing label (column/field {label_column!r})")
        label = str(label).strip()
        if allowed is not None and label not in allowed:
            raise ValueError(f"{path}: line {line}: label {label!r} is not one of --labels "
                             f"{','.join(allowed)}")
        records.append(Record(str(text), label, path, line))
    return records


def _table_rows(path: Path, fmt: str, text_column: str | int, label_column: str | int,
                header: bool, columns: list[str] | None) -> Iterator[tuple[int, str | None, str | None]]:
    delimiter = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader((text for _, text, _ in iter_lines(path)), delimiter=delimiter, quoting=quoting)
    names = list(columns) if columns else None
    positions: tuple[int, int] | None = None
    start = 1
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if positions is None:
                if header:
                    names = [c.strip() for c in row]
                positions = (_position(path, names, text_column, "text", header),
                             _position(path, names, label_column, "label", header))
                if header:
                    continue
            text_at, label_at = positions
            yield (line, row[text_at] if text_at < len(row) else None,
                   row[label_at] if label_at < len(row) else None)
    except csv.Error as e:
        raise ValueError(f"{path}: line {reader.line_num}: malformed {fmt.upper()} ({e})") from None


def _columnar_rows(path: Path, text_column: str | int, label_column: str | int
                   ) -> Iterator[tuple[int, str | None, str | None]]:
    names = class_names(path, label_column)
    for row in iter_rows(path, [text_column, label_column], flag="--column / --label-column"):
        text, label = row.values
        if names is not None and isinstance(label, int) and 0 <= label < len(names):
            label = names[label]
        yield row.number, text, None if label is None else str(label)


def _position(path: Path, names: list[str] | None, column: str | int, what: str, header: bool) -> int:
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit()):
        return int(column)
    if names is None:
        raise ValueError(f"{path}: the file has no header, so the {what} column {column!r} cannot be "
                         f"found by name; give --columns (e.g. --columns label,text) or a 0-based index")
    if column not in names:
        where = "header (line 1)" if header else "--columns"
        raise ValueError(f"{path}: no {what} column {column!r} in the {where}; the columns are {names}")
    return names.index(column)


def _jsonl_rows(path: Path, text_field: str | int, label_field: str | int
                ) -> Iterator[tuple[int, str | None, str | None]]:
    for line, text, _ in iter_lines(path):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line}: expected a JSON object, got {type(record).__name__}")
        label = record.get(str(label_field))
        yield line, record.get(str(text_field)), None if label is None else str(label)


def balanced_indices(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping, for every class, a seeded random subset as large as the smallest class."""
    classes = [np.flatnonzero(y == k) for k in np.unique(y)]
    smallest = min(len(c) for c in classes)
    kept = [np.sort(rng.permutation(c)[:smallest]) for c in classes]
    return np.sort(np.concatenate(kept))


def stratified_split(y: np.ndarray, keep: np.ndarray, val_fraction: float, test_fraction: float,
                     rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per class: shuffle, the first round(n*test) to test, the next round(n*val) to val, the rest
    to train; then each split shuffled. A class of two or more keeps at least one train sample."""
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_NAMES}
    for k in np.unique(y[keep]):
        members = rng.permutation(keep[y[keep] == k])
        n = len(members)
        n_test = min(int(round(n * test_fraction)), max(0, n - 1))
        n_val = min(int(round(n * val_fraction)), max(0, n - 1 - n_test))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return {s: rng.permutation(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for s, p in parts.items()}


def _wrap(token_ids: list[int], ids, wrap: str, max_tokens: int | None) -> list[int]:
    if wrap == "cls_sep":
        body = token_ids if max_tokens is None else token_ids[:max_tokens - 2]
        return [ids.cls, *body, ids.sep]
    body = token_ids if max_tokens is None else token_ids[:max_tokens]
    if not body:  # a text of only characters the tokenizer drops: keep one real token to read
        body = [ids.eos if ids.eos is not None else 0]
    return body

