"""Streaming readers: raw corpus files (.txt, .jsonl, .csv, .tsv, .parquet, .arrow, `datasets`
folders) -> a stream of documents.

Owns cutting decoded text into documents: .txt blocks (or lines, or whole files), .jsonl
fields, .csv/.tsv cells, the text column of a table, and the pieces of very long documents;
and the list of inputs (`check_inputs`: globs expanded, folders refused unless `datasets` wrote them). The bytes come from
`lmforge.base.sources` (read in 1 MiB chunks for .txt, line by line otherwise, strict UTF-8
with errors that name the file, the line and the byte offset). Used by `lmforge.base.tokenizer`
(training) and the lm and mlm preparation of `lmforge.data` (tokenizing into a token store).

The format comes from the file extension; a `.gz` file is decompressed while it is read (never
whole) and its format comes from the extension before `.gz` (`a.jsonl.gz` is JSONL, a bare
`x.gz` is text):

- `.txt` and any other extension: a document is a block of lines separated by one or more
  blank (whitespace-only) lines. Lines keep their "\\n" and every document ends with "\\n".
  With `doc_split="line"` every non-blank line is one document, without its line ending;
  with `doc_split="file"` the whole file is one document (a book, a play: nanoGPT's view).
- `.jsonl`: one JSON object per line; the document is the string under `text_field`.
- `.csv` / `.tsv`: the document is the cell in `text_column`. A column name means the first
  row is a header; an int (or a string of digits) is a 0-based index and there is no header.
  `.tsv` is read without quote handling (tab-separated text often holds lone `"`).
- Parquet, Arrow (IPC file or stream) and `datasets` save_to_disk folders, known by their first
  bytes or a `.parquet` / `.arrow` name (`lmforge.base.readers_arrow`, streamed by record batch):
  the document is the value in the column `text_column` names, or `text_field` when only that
  one is given (`--column` / `--field`: a name or a 0-based index); a null is skipped like a blank.

CRLF line endings read as "\\n" and a UTF-8 byte-order mark is dropped. Blank documents are
skipped. Other compressed files (.bz2, .xz, .zst, .zip, .7z, .tgz, .tar.gz) are refused with a
hint; a damaged or cut-short .gz is an error naming the file (`lmforge.base.sources`).

To bound memory, a `.txt` document longer than `max_chars` characters (1 Mi by default)
comes out in pieces: every piece but the last has `final=False`. Pieces are cut where the
next line starts with a non-space character, or, inside one very long line, before a space
that sits between two non-space characters. GPT-2 byte-level and BERT pre-tokenization both
split there anyway, so the pieces give the same tokens as the whole document would (except
when 4 * max_chars characters hold no such place: then the cut falls where it must).
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

from lmforge.base.readers_arrow import columnar_format, is_dataset_folder, iter_rows
from lmforge.base.sources import READ_FORMATS, format_suffix, iter_chunks, iter_lines, sniff_binary

MAX_DOC_CHARS = 1 << 20


class Document(NamedTuple):
    """One document (or one piece of a very long one) read from an input file."""

    text: str
    path: Path
    line: int  # 1-based line where this document (piece) starts
    final: bool  # False: the next Document continues this one
    # bytes of the file on disk read so far, for progress bars against its size (of a .gz: the
    # compressed position, so progress never passes 100%)
    offset: int


def input_format(path: Path) -> str:
    """'txt', 'jsonl', 'csv' or 'tsv' for `path`, by extension (the one before `.gz` for a gzip
    file); 'parquet', 'arrow' or 'dataset' for a table (by its first bytes, or a .parquet/.arrow
    name); ValueError for unsupported ones and for other binary files."""
    path = Path(path)
    gz = path.suffix.lower() == ".gz"  # its content is checked as it is read (lmforge.base.sources)
    suffix = format_suffix(path)  # first: a .bz2 / .zip / .tar name gets its own hint
    columnar = None if gz else columnar_format(path)
    if columnar is not None:
        return columnar
    known = None if gz or path.is_dir() else sniff_binary(path)
    if known is not None:
        raise ValueError(f"{path}: this is a {known[1]} file (binary), not text; lmforge reads {READ_FORMATS}")
    if suffix == ".json":
        raise ValueError(f"{path}: .json is not supported; write one JSON object per line and "
                         f"name the file .jsonl")
    return {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix, "txt")


def expand_globs(paths: Iterable[Path | str]) -> list[Path]:
    """Each path, or the sorted files a pattern with * ? or [ matches (`data/train-*.parquet`,
    `**` for any depth); FileNotFoundError naming a pattern that matches nothing."""
    out: list[Path] = []
    for p in paths:
        text = str(p)
        if not any(c in text for c in "*?[") or Path(text).exists():
            out.append(Path(p))
            continue
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches the pattern {text!r}")
        out += [Path(m) for m in matches]
    return out


def check_inputs(paths: Iterable[Path], *, kinds: str = READ_FORMATS, check_format: bool = True) -> list[Path]:
    """The inputs as Paths, globs expanded; FileNotFoundError listing every missing one,
    ValueError for folders other than `datasets` ones (and, with `check_format`, for formats
    these readers do not take)."""
    paths = expand_globs(paths)
    if not paths:
        raise ValueError(f"no input files given; pass at least one of {kinds}")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    folders = [str(p) for p in paths if p.is_dir() and not is_dataset_folder(p)]
    if folders:
        raise ValueError(f"input(s) {', '.join(folders)} are folders; pass the files inside them (a folder "
                         f"is read only when `datasets` save_to_disk wrote it)")
    for p in paths if check_format else ():
        input_format(p)
    return paths


def iter_documents(path: Path, *, text_field: str = "text", text_column: str | int = "text",
                   doc_split: str = "blank_line", max_chars: int = MAX_DOC_CHARS) -> Iterator[Document]:
    """Stream the documents of one file (format by extension, see the module docstring)."""
    path = Path(path)
    fmt = input_format(path)
    if fmt in ("parquet", "arrow", "dataset"):
        return _table_column_documents(path, text_column if text_column != "text" else text_field)
    if fmt == "jsonl":
        return _jsonl_documents(path, text_field)
    if fmt in ("csv", "tsv"):
        return _table_documents(path, text_column, "\t" if fmt == "tsv" else ",")
    if doc_split not in DOC_SPLITS:
        raise ValueError(f"doc_split {doc_split!r}: choose one of {', '.join(DOC_SPLITS)}")
    return _txt_documents(path, doc_split, max_chars)


def iter_corpus(paths: Iterable[Path], **options) -> Iterator[Document]:
    """Stream the documents of several files, one after the other (options as iter_documents)."""
    for path in paths:
        yield from iter_documents(path, **options)


def iter_texts(paths: Iterable[Path], **options) -> Iterator[str]:
    """Only the texts of iter_corpus (pieces of very long documents come separately)."""
    for doc in iter_corpus(paths, **options):
        yield doc.text


# -- .txt ----------------------------------------------------------------------------------------

_SEPARATOR = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line end, then one or more blank lines
_LEADING_BLANKS = re.compile(r"(?:[^\S\n]*\n)+")
# doc_split="file": only the end-of-file marker (appended by the reader itself) separates.
_FILE_END = "\n\x00\x00"
_FILE_SEPARATOR = re.compile(re.escape(_FILE_END))
DOC_SPLITS = ("blank_line", "line", "file")
# After a line end between two non-space characters: after a blank line or trailing spaces,
# byte-level BPE would join the whitespace run at a piece's end into one token.
_LINE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
_SPACE_CUT = re.compile(r"(?<=\S) (?=\S)")  # a space between two non-space characters


def _find_cut(text: str, max_chars: int, by_lines: bool) -> int | None:
    """A place to cut `text` so that tokenizing both sides gives the same tokens: the last one
    within max_chars characters (a line start if by_lines, else a space between words), else
    the first one within 4 * max_chars; None if there is none."""
    window = text[:max_chars + 1]
    if by_lines:
        i = window.rfind("\n", 0, len(window) - 1)
        while i >= 0:
            if not window[i + 1].isspace() and i > 0 and not window[i - 1].isspace():
                return i + 1
            i = window.rfind("\n", 0, i)
    i = window.rfind(" ", 0, len(window) - 1)
    while i > 0:
        if not window[i - 1].isspace() and not window[i + 1].isspace():
            return i
        i = window.rfind(" ", 0, i)
    far = text[:4 * max_chars]
    m = (_LINE_CUT.search(far, max_chars) if by_lines else None) or _SPACE_CUT.search(far, max_chars)
    if m is None:
        return None
    return m.end() if m.re is _LINE_CUT else m.start()


def _split_long(text: str, max_chars: int, by_lines: bool, wait: bool) -> tuple[list[str], str]:
    """Cut pieces of about max_chars off the front of `text`; returns (pieces, rest). With
    wait=True, stop when no cut place is in sight (more text may bring one) instead of cutting
    at max_chars."""
    pieces = []
    while len(text) > max_chars:
        cut = _find_cut(text, max_chars, by_lines)
        if cut is None:
            if wait and len(text) < 4 * max_chars:
                break
            cut = max_chars
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces, text


def _txt_documents(path: Path, doc_split: str, max_chars: int) -> Iterator[Document]:
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    doc_per_line = doc_split == "line"
    separator = _FILE_SEPARATOR if doc_split == "file" else _SEPARATOR
    by_lines = not doc_per_line
    rest = ""  # text read but not given out yet: the start of the next document
    line = 1  # the line where `rest` starts
    cut_open = False  # a piece of the current document went out with final=False
    offset = 0

    def finished(doc: str, line: int) -> Iterator[Document]:
        """The end of a document (all of it unless pieces already went out), cut if long."""
        pieces, last = _split_long(doc, max_chars, by_lines, wait=False)
        for piece in pieces:
            yield Document(piece, path, line, False, offset)
            line += piece.count("\n")
        yield Document(last, path, line, True, offset)

    # The end of the file ends the last line and the last block.
    end = [("\n" if doc_per_line else _FILE_END if doc_split == "file" else "\n\n", None)]
    for text, at in itertools.chain(iter_chunks(path), end):
        offset = offset if at is None else at
        buf = rest + text
        if doc_per_line:
            lines = buf.split("\n")
            rest = lines.pop()
            for doc in lines:
                if cut_open or (doc and not doc.isspace()):
                    yield from finished(doc, line)
                    cut_open = False
                line += 1
        else:
            pos = 0
            for m in separator.finditer(buf):
                doc = buf[pos:m.start() + 1]  # keeps the "\n" of its last line
                doc_line = line
                skip = None if cut_open else _LEADING_BLANKS.match(doc)
                if skip:  # blank lines at the start of the file or of a chunk
                    doc_line += doc.count("\n", 0, skip.end())
                    doc = doc[skip.end():]
                if cut_open or doc:
                    yield from finished(doc, doc_line)
                    cut_open = False
                line += buf.count("\n", pos, m.end())
                pos = m.end()
            rest = buf[pos:]
        if len(rest) > max_chars:  # bound memory: give the unfinished document out in pieces
            skip = None if cut_open or doc_per_line else _LEADING_BLANKS.match(rest)
            if skip:
                line += rest.count("\n", 0, skip.end())
                rest = rest[skip.end():]
            pieces, rest = _split_long(rest, max_chars, by_lines, wait=True)
            for piece in pieces:
                yield Document(piece, path, line, False, offset)
                line += piece.count("\n")
                cut_open = True


# -- .jsonl --------------------------------------------------------------------------------------


def parse_json_line(path: Path, line_no: int, text: str):
    """One line of a .jsonl file, or an error naming the file, line and column."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                         f"a .jsonl file holds one JSON object per line") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[Document]:
    for line_no, text, offset in iter_lines(path):
        if not text.strip():
            continue
        record = parse_json_line(path, line_no, text)
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {line_no}: expected a JSON object, got "
                             f"{type(record).__name__}")
        if text_field not in record:
            raise ValueError(f"{path}: line {line_no}: no field {text_field!r}; the keys on this line "
                             f"are {sorted(record)}; choose one with text_field (--field)")
        value = record[text_field]
        if not isinstance(value, str):
            raise ValueError(f"{path}: line {line_no}: field {text_field!r} is "
                             f"{type(value).__name__}, not a string")
        if value.strip():
            yield Document(value, path, line_no, True, offset)


# -- Parquet / Arrow / datasets folders ----------------------------------------------------------


def _table_column_documents(path: Path, column: str | int) -> Iterator[Document]:
    for row in iter_rows(path, [column], flag="--column (or --field)"):
        value = row.values[0]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{path}: row {row.number}: column {column!r} holds {type(value).__name__}, not "
                             f"text; choose the text column with --column (or --field)")
        if value.strip():
            yield Document(value, path, row.number, True, row.position)


# -- .csv / .tsv ---------------------------------------------------------------------------------


def _column_index(path: Path, header: list[str], column: str) -> int:
    if column not in header:
        raise ValueError(f"{path}: line 1: no column {column!r} in the header; the columns are "
                         f"{header}; choose one with text_column (--column), by name or by "
                         f"0-based index (an index means the file has no header)")
    return header.index(column)


def _table_documents(path: Path, column: str | int, delimiter: str) -> Iterator[Document]:
    if isinstance(column, str) and column.isdigit():
        column = int(column)
    if isinstance(column, int) and column < 0:
        raise ValueError(f"text_column must be a column name or an index >= 0, got {column}")
    # Long text cells are normal in corpora; the csv default limit (128 KiB) is not.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    state = {"offset": 0}

    def lines() -> Iterator[str]:
        for _, text, offset in iter_lines(path):
            state["offset"] = offset
            yield text

    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # strict: a stray or unclosed quote is an error, not a field that swallows the next lines
    reader = csv.reader(lines(), delimiter=delimiter, quoting=quoting, strict=True)
    index = column if isinstance(column, int) else None
    start = 1  # the line where the next row starts
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if index is None:
                index = _column_index(path, row, str(column))
                continue
            if index >= len(row):
                raise ValueError(f"{path}: line {line}: {len(row)} column(s), no column at index "
                                 f"{index}; check text_column (--column) and the delimiter "
                                 f"({delimiter!r})")
            if row[index].strip():
                yield Document(row[index], path, line, True, state["offset"])
    except csv.Error as e:
        kind = "TSV" if delimiter == "\t" else "CSV"
        where = f"line {start}" + (f" (to line {reader.line_num})" if reader.line_num > start else "")
        raise ValueError(f"{path}: {where}: malformed {kind} ({e}); check the quotes on that row: a "
                         f'field that holds a quote must be quoted as a whole, with the quote doubled ("")'
                         ) from None
