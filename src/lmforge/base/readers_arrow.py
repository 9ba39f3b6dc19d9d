"""Columnar inputs: Parquet files, Arrow IPC files (random-access and stream formats) and the
folders `datasets.Dataset.save_to_disk` writes, read as rows of the columns asked for.

Owns finding the data files of a `datasets` folder (its `state.json` lists the `data-*.arrow`
stream files; no dependency on `datasets`), resolving a column by name or 0-based index, the
class names a `datasets` ClassLabel column carries, and streaming: a Parquet file is read one
record batch of at most `BATCH_ROWS` rows at a time (never whole), an Arrow file batch by batch,
both through plain reads rather than a memory map (whose pages would count in the process's
memory as the file is read), so memory stays bounded whatever the corpus size.

pyarrow is an optional dependency (`pip install 'lmforge[parquet]'`); without it these formats
are a ValueError that says what to install. Used by `lmforge.base.readers` (documents),
`lmforge.data.prepare_classify` (text + label) and `lmforge.data.prepare_dialogue` (turns).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from lmforge.base.sources import sniff_binary

BATCH_ROWS = 1024
COLUMNAR = ("parquet", "arrow", "dataset")


class Row(NamedTuple):
    """One row of a table: its 1-based number in the input, the values of the columns asked for
    (in that order), and the bytes of the input read so far (for progress bars)."""

    number: int
    values: tuple
    position: int


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodules used below)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ValueError(f"{path}: reading Parquet and Arrow files needs pyarrow; install it with "
                         "`pip install 'lmforge[parquet]'` (or `pip install pyarrow`)") from None
    return pyarrow


def is_dataset_folder(path: Path) -> bool:
    """A folder written by `datasets` save_to_disk (a Dataset, or a DatasetDict of them)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def columnar_format(path: Path) -> str | None:
    """'parquet', 'arrow' or 'dataset' for a columnar input (by its first bytes for a file,
    whatever its name; a .parquet or .arrow name is enough too), else None."""
    path = Path(path)
    if is_dataset_folder(path):
        return "dataset"
    if path.is_dir():
        return None
    known = sniff_binary(path)
    if known is not None and known[0] is not None:
        return known[0]
    suffix = path.suffix.lower()
    return {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}.get(suffix)


def dataset_files(folder: Path) -> list[Path]:
    """The data files of a `datasets` folder, in order (state.json's `_data_files`, else the
    sorted `data-*.arrow`); ValueError for a DatasetDict folder, naming its splits."""
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if is_dataset_folder(p))
        first = folder / (splits[0] if splits else "train")
        raise ValueError(f"{folder}: a DatasetDict folder (splits: {', '.join(splits) or 'none'}); pass the "
                         f"folder of one split, e.g. {first} (and the others with --val / --test)")
    state_file = folder / "state.json"
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            names = [entry["filename"] for entry in state["_data_files"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{state_file}: not a `datasets` state file ({err}); save the dataset again "
                             "with save_to_disk") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
        if bad:
            raise ValueError(f"{state_file}: data file names must be plain names inside the folder, got {bad}")
    else:
        names = sorted(p.name for p in folder.glob("data-*.arrow"))
    files = [folder / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise FileNotFoundError(f"{folder}: data file(s) missing: {', '.join(missing) or 'no data-*.arrow'}")
    return files


def _open_batches(path: Path, fmt: str, pa, columns: Sequence[str] | None) -> tuple[Any, Iterator]:
    """(schema, iterator of (record batch, bytes read so far)) of one Parquet or Arrow file."""
    if fmt == "parquet":
        # pre_buffer (pyarrow's default) would read every column chunk of the file up front
        pf = pa.parquet.ParquetFile(path, memory_map=False, pre_buffer=False, buffer_size=1 << 20)
        size, rows = path.stat().st_size, max(pf.metadata.num_rows, 1)

        def parquet_batches() -> Iterator:
            done = 0
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                done += batch.num_rows
                yield batch, size * done // rows
        return pf.schema_arrow, parquet_batches()
    source = pa.OSFile(str(path))
    try:
        reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid:
        source.seek(0)
        reader = pa.ipc.open_stream(source)  # datasets' data-*.arrow files are streams

    def ipc_batches() -> Iterator:
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            n = max(reader.num_record_batches, 1)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i), source.size() * (i + 1) // n
        else:
            for batch in reader:
                yield batch, source.tell()
    return reader.schema, ipc_batches()


def resolve_columns(path: Path, names: Sequence[str], wanted: Sequence[str | int], flag: str) -> list[str]:
    """The column names of `wanted` (names, or 0-based indices); ValueError naming the columns."""
    out = []
    for column in wanted:
        if isinstance(column, str) and column.isdigit():
            column = int(column)
        if isinstance(column, int):
            if not 0 <= column < len(names):
                raise ValueError(f"{path}: no column at index {column}; the {len(names)} columns are {list(names)}")
            out.append(names[column])
        elif column not in names:
            raise ValueError(f"{path}: no column {column!r}; the columns are {list(names)}; choose one "
                             f"with {flag}")
        else:
            out.append(column)
    return out


def iter_rows(path: Path, columns: Sequence[str | int], *, flag: str = "--column") -> Iterator[Row]:
    """Stream the rows of a Parquet / Arrow file or a `datasets` folder: the values of `columns`
    (names or 0-based indices) as Python objects, one record batch in memory at a time."""
    path = Path(path)
    fmt = columnar_format(path)
    if fmt is None:
        raise ValueError(f"{path}: not a Parquet or Arrow file nor a `datasets` folder")
    pa = _pyarrow(path)
    files = dataset_files(path) if fmt == "dataset" else [path]
    number, base = 0, 0
    for file in files:
        file_fmt = "arrow" if fmt == "dataset" else fmt
        try:
            schema, batches = _open_batches(file, file_fmt, pa, None)
            names = resolve_columns(path, schema.names, columns, flag)
            if file_fmt == "parquet":
                schema, batches = _open_batches(file, file_fmt, pa, names)  # read only these columns
            for batch, done in batches:
                lists = [batch.column(name).to_pylist() for name in names]
                for values in zip(*lists):
                    number += 1
                    yield Row(number, values, base + done)
        except (pa.ArrowException, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{file}: not a readable {'Parquet' if file_fmt == 'parquet' else 'Arrow'} "
                             f"file ({str(err).splitlines()[0]})") from None
        base += file.stat().st_size


def column_names(path: Path) -> list[str]:
    """The columns of a Parquet / Arrow file or a `datasets` folder (of its first data file)."""
    path = Path(path)
    fmt = columnar_format(path)
    pa = _pyarrow(path)
    file = dataset_files(path)[0] if fmt == "dataset" else path
    try:
        return list(_open_batches(file, "arrow" if fmt == "dataset" else fmt, pa, None)[0].names)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{file}: not a readable Parquet or Arrow file ({str(err).splitlines()[0]})") from None


def class_names(path: Path, column: str | int) -> list[str] | None:
    """The class names of a `datasets` ClassLabel column (its features, kept in the schema's
    "huggingface" metadata or a folder's dataset_info.json), else None."""
    path = Path(path)
    fmt = columnar_format(path)
    if fmt is None:
        return None
    pa = _pyarrow(path)
    file = dataset_files(path)[0] if fmt == "dataset" else path
    try:
        schema, _ = _open_batches(file, "arrow" if fmt == "dataset" else fmt, pa, None)
    except (pa.ArrowException, OSError):
        return None
    name = resolve_columns(path, schema.names, [column], "--label-column")[0]
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        features = json.loads(meta)["info"]["features"] if meta else None
        if features is None and fmt == "dataset":
            features = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))["features"]
        feature = (features or {}).get(name) or {}
    except (ValueError, KeyError, TypeError, OSError):
        return None
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None
