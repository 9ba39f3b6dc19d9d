"""The files the inference commands read and write: `read_input_texts` (the `--input FILE` of
`embed` and `classify`: one text per line, record or row, in order) and `check_output_file`
(their output file and chat's transcript, checked before any work).

Row i of what these commands write is text i of the input, always: blank lines of a .txt
file are empty texts (they get their vectors, or their label), not skipped. A .jsonl file
holds one JSON object per line, the text under `column`; a blank line there is an error (it
is no record; an empty text is `{"text": ""}`). A .csv/.tsv file gives the cell in `column`
(a name means a header row; a 0-based index, no header) of every row, an empty cell being
an empty text; a Parquet / Arrow file or a `datasets` folder gives the value in `column` of
every row (a null is an empty text). Files are decoded as strict UTF-8 by `lmforge.base.sources`, so a bad byte is
an error naming the file and the line; .gz files are read directly.

An output file may not be a folder, sit in a folder that does not exist, or be one of the
command's input files: these are refused before the model is even loaded.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.base.readers import check_inputs, input_format, parse_json_line
from lmforge.base.readers_arrow import iter_rows
from lmforge.base.sources import iter_lines


def read_input_texts(path: Path, column: str | int = "text", flag: str = "--input") -> list[str]:
    """Every text of `path` in order, empty ones included (see the module docstring)."""
    (path,) = check_inputs([path])
    fmt = input_format(path)
    if fmt == "jsonl":
        texts = list(_jsonl_texts(path, str(column)))
    elif fmt in ("csv", "tsv"):
        texts = list(_table_texts(path, column, "\t" if fmt == "tsv" else ","))
    elif fmt in ("parquet", "arrow", "dataset"):  # a null is an empty text: row i stays text i
        texts = ["" if row.values[0] is None else str(row.values[0]) for row in iter_rows(path, [column])]
    else:
        texts = [text.removesuffix("\n") for _, text, _ in iter_lines(path)]
    if not texts:
        raise ValueError(f"{flag} {path}: no texts in the file; give one text per line (or row)")
    return texts


def check_output_file(path: Path | str, flag: str, inputs: tuple[Path | str | None, ...] = ()) -> Path:
    """`path` as a Path if a file can be written there, else a ValueError saying why and what to do."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; name a file (inside it, or elsewhere)")
    if not path.parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist; create it first or "
                         "choose another place")
    if any(source is not None and path.resolve() == Path(source).resolve() for source in inputs):
        raise ValueError(f"{flag} {path} is also an input; writing it would destroy what is being read; "
                         "choose another file")
    return path


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for line_no, line, _ in iter_lines(path):
        if not line.strip():
            raise ValueError(f"{path}: line {line_no} is blank; every line of a .jsonl input is one "
                             f'text (write {{"{field}": ""}} for an empty one)')
        record = parse_json_line(path, line_no, line)
        value = record.get(field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            found = (f"the keys are {sorted(record)}" if isinstance(record, dict)
                     else f"a JSON {type(record).__name__}, not an object")
            raise ValueError(f"{path}: line {line_no}: no text under {field!r} ({found}); choose the "
                             "field with --column")
        yield value


def _table_texts(path: Path, column: str | int, delimiter: str) -> Iterator[str]:
    index = int(column) if str(column).isdigit() else None
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long text cells are normal
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader((line for _, line, _ in iter_lines(path)), delimiter=delimiter, quoting=quoting,
                        strict=True)
    try:
        for row in reader:
            if index is None:
                if column not in row:
                    raise ValueError(f"{path}: line 1: no column {column!r} in the header {row}; choose one "
                                     "with --column, by name or by 0-based index (an index means no header)")
                index = row.index(column)
            elif not row:
                yield ""  # a blank line: an empty text, as in a .txt file
            elif index >= len(row):
                raise ValueError(f"{path}: line {reader.line_num}: {len(row)} column(s), none at index "
                                 f"{index}; check --column and the delimiter ({delimiter!r})")
            else:
                yield row[index]
    except csv.Error as err:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise ValueError(f"{path}: line {reader.line_num}: malformed {kind} ({err}); a field that holds a "
                         'quote must be quoted as a whole, with the quote doubled ("")') from None
