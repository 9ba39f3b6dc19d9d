"""Input files as byte streams: which compressed files are read, how they are opened, progress.

Owns the rule shared by every reader (`lmforge.base.readers`, the classify and dialogue
readers): a `.gz` file is decompressed while it is read, never whole, and its format is named
by the extension before `.gz` (`a.jsonl.gz` is JSONL; a bare `x.gz` has none, so it is text).
Other compressed files and archives (.bz2, .xz, .zst, .zip, .7z, .tgz, .tar, .tar.gz) are
refused with a hint. A damaged or cut-short gzip stream is a ValueError naming the file.
Progress bars count the bytes read of the file on disk (the compressed position of a .gz),
so they end at its size.
"""

from __future__ import annotations

import contextlib
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_COMPRESSED = {".bz2", ".xz", ".zst", ".zip", ".7z", ".tgz", ".tar"}  # refused (.gz is read)
# What a damaged or cut-short gzip stream raises while it is read.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def is_gzip(path: Path) -> bool:
    """True for a `.gz` file: the readers decompress it while reading."""
    return Path(path).suffix.lower() == ".gz"


def format_suffix(path: Path) -> str:
    """The lower-case extension that names the format of `path`, the one before `.gz` for a
    gzip file ("" for none); ValueError for other compressed files and archives."""
    path = Path(path)
    inner = Path(path.stem) if is_gzip(path) else path
    suffix = inner.suffix.lower()
    if suffix == ".gz" and inner is not path:
        raise ValueError(f"{path}: compressed twice; decompress it once first (`gunzip {path}`)")
    if suffix in (".tgz", ".tar"):
        raise ValueError(f"{path}: tar archives are not read directly; extract it first "
                         f"(`tar -xf {path}`) and pass the files inside")
    if suffix in _COMPRESSED:
        raise ValueError(f"{path}: {suffix} files are not read directly; decompress it first (only "
                         f".gz is decompressed while read: `a.txt.gz`, `a.jsonl.gz`, `a.csv.gz`)")
    return suffix


@contextlib.contextmanager
def open_input(path: Path) -> Iterator[BinaryIO]:
    """`path` open for binary reads, a .gz decompressed as it is read; a damaged or cut-short
    gzip stream becomes a ValueError naming the file (see `input_position` for progress)."""
    path = Path(path)
    if not is_gzip(path):
        with open(path, "rb") as f:
            yield f
        return
    with gzip.open(path, "rb") as f:
        try:
            yield f
        except _GZIP_ERRORS as e:
            raise _gzip_error(path, e) from None


def input_position(f: BinaryIO) -> int:
    """Bytes of the file on disk read so far through `f` (from open_input): for a .gz the
    position in the compressed file, so it never passes the file size."""
    return f.fileobj.tell() if isinstance(f, gzip.GzipFile) else f.tell()


def _gzip_error(path: Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: damaged or truncated gzip file ({e}); `gzip -t {path}` checks it; "
                      f"copy or compress the file again")
