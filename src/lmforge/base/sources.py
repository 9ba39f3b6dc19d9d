"""Input files as byte and text streams: which compressed files are read, how they are opened
and decoded, progress.

Owns the rules shared by every reader (`lmforge.base.readers`, the classify and dialogue
readers of `lmforge.data`):

- a `.gz` file is decompressed while it is read, never whole, and its format is named by the
  extension before `.gz` (`a.jsonl.gz` is JSONL; a bare `x.gz` has none, so it is text). Other
  compressed files and archives (.bz2, .xz, .zst, .zip, .7z, .tgz, .tar, .tar.gz) are refused
  with a hint. A damaged or cut-short gzip stream is a ValueError naming the file.
- text is strict UTF-8, read line by line (`iter_lines`) or in 1 MiB chunks (`iter_chunks`),
  so memory stays bounded; CRLF reads as "\\n" and a byte-order mark is dropped; a decoding
  error, a NUL byte, a UTF-16 or an unnamed gzip file is a ValueError naming the file, the
  line and the byte offset.
- progress bars count the bytes read of the file on disk (the compressed position of a .gz),
  so they end at its size (`input_size`: of a folder, the sum of its files).
- a binary file is known by its first bytes (`sniff_binary`): Parquet and Arrow files are read
  as tables (`lmforge.base.readers_arrow`) whatever their name; any other binary (zip, bzip2,
  xz, zstd, 7z, PDF, NumPy, pickle, safetensors, SQLite, images, executables) read as text is a
  ValueError naming what it is and the formats lmforge reads (`binary_error`), not a UTF-8 error.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20  # bytes per read of iter_chunks
_BOM = b"\xef\xbb\xbf"
_GZIP_MAGIC = b"\x1f\x8b"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_COMPRESSED = {".bz2", ".xz", ".zst", ".zip", ".7z", ".tgz", ".tar"}  # refused (.gz is read)
# What a damaged or cut-short gzip stream raises while it is read.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


# (leading bytes, trailing bytes, the format lmforge reads it as or None, what it is). A check on
# both ends where a text file could start with the bytes ("PAR1 ...").
_MAGIC: tuple[tuple[bytes, bytes, str | None, str], ...] = (
    (b"PAR1", b"PAR1", "parquet", "Parquet"),
    (b"ARROW1", b"ARROW1", "arrow", "Arrow IPC"),
    (b"\xff\xff\xff\xff", b"", "arrow", "Arrow IPC stream"),
    (b"PK\x03\x04", b"", None, "zip archive"),
    (b"7z\xbc\xaf\x27\x1c", b"", None, "7z archive"),
    (b"\xfd7zXZ\x00", b"", None, "xz-compressed"),
    (b"\x28\xb5\x2f\xfd", b"", None, "zstd-compressed"),
    (b"%PDF-", b"", None, "PDF"),
    (b"\x93NUMPY", b"", None, "NumPy .npy"),
    (b"SQLite format 3\x00", b"", None, "SQLite database"),
    (b"\x89PNG\r\n\x1a\n", b"", None, "PNG image"),
    (b"\xff\xd8\xff", b"", None, "JPEG image"),
    (b"\x7fELF", b"", None, "executable (ELF)"),
) + tuple((b"\x80" + bytes([v]), b"", None, "Python pickle") for v in (2, 3, 4, 5))
READ_FORMATS = (".txt, .jsonl, .csv, .tsv (or .gz of them), .parquet, .arrow, or a folder written by "
                "`datasets` save_to_disk")
"""What lmforge reads, for error messages."""


def sniff_binary(path: Path, head: bytes | None = None) -> tuple[str | None, str] | None:
    """(the format lmforge reads it as, or None; what it is) for a binary file known by its first
    bytes (`head`: the first bytes already read, e.g. of a decompressed stream), else None."""
    path = Path(path)
    if head is None:
        with open(path, "rb") as f:
            head = f.read(64)
    for start, end, fmt, what in _MAGIC:
        if head.startswith(start) and (not end or _ends_with(path, end)):
            return fmt, what
    if bz2_magic(head) or _safetensors_head(head):
        return None, "bzip2-compressed" if bz2_magic(head) else "safetensors weights"
    return None


def bz2_magic(head: bytes) -> bool:
    return len(head) >= 10 and head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY"


def _safetensors_head(head: bytes) -> bool:
    """An 8-byte little-endian header length (well under 4 GiB), then the JSON header."""
    return len(head) >= 10 and head[4:8] == b"\0\0\0\0" and head[8:10] in (b"{\"", b"{}")


def _ends_with(path: Path, end: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() < len(end) * 2:
                return False
            f.seek(-len(end), 2)
            return f.read() == end
    except OSError:
        return False


def binary_error(path: Path, what: str, inside_gzip: bool = False) -> ValueError:
    """The error for a binary file read as text: what it is, and what lmforge reads."""
    where = "the gzip file holds " if inside_gzip else "this is "
    return ValueError(f"{path}: {where}a {what} file (binary), not text; lmforge reads {READ_FORMATS}")


def input_size(path: Path) -> int:
    """Bytes on disk of an input: a file's size, a folder's files summed (for progress bars)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


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


# -- decoding ------------------------------------------------------------------------------------


def _utf8_error(path: Path, line_no: int, offset: int, bad: bytes) -> ValueError:
    where = "of the decompressed text" if is_gzip(path) else "of the file"
    return ValueError(f"{path}: line {line_no}: not valid UTF-8 (bytes {bad!r} at byte offset "
                      f"{offset} {where}); save the file as UTF-8, for example "
                      f"`iconv -f latin1 -t utf-8 in.txt > out.txt`")


def _check_start(path: Path, head: bytes) -> None:
    """UTF-16 (Windows "Unicode") files: say so, instead of a UTF-8 error at byte 0."""
    if head.startswith(_UTF16_BOMS):
        raise ValueError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark), not "
                         f"UTF-8; convert it, for example `iconv -f utf-16 -t utf-8 {path.name} > "
                         f"{path.stem}-utf8{path.suffix}`")
    if head.startswith(_GZIP_MAGIC) and not is_gzip(path):
        raise ValueError(f"{path}: the file is gzip-compressed (it starts with the gzip magic bytes); "
                         f"name it {path.name}.gz and it is decompressed while read")
    known = _sniff_inside_gzip(head) if is_gzip(path) else sniff_binary(path)
    if known is not None:
        raise binary_error(path, known[1], inside_gzip=is_gzip(path))


def _sniff_inside_gzip(head: bytes) -> tuple[str | None, str] | None:
    """What a decompressed stream holds, by its first bytes alone (no file end to check)."""
    for start, _, fmt, what in _MAGIC:
        if head.startswith(start) and start not in (b"PAR1", b"ARROW1"):
            return fmt, what
    if head.startswith(b"PAR1\x15") or head.startswith(b"ARROW1\0"):
        return None, "Parquet" if head.startswith(b"PAR1") else "Arrow IPC"
    return (None, "bzip2-compressed") if bz2_magic(head) else None


def _nul_error(path: Path, line_no: int) -> ValueError:
    return ValueError(f"{path}: line {line_no}: NUL byte (\\x00) in the text; this looks like a binary "
                      f"file or UTF-16 without a byte-order mark, not UTF-8 text; convert it to UTF-8 "
                      f"(for example `iconv -f utf-16 -t utf-8`) or remove the NUL bytes")


def iter_lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """Yield (line_no, text, position) per line: strict UTF-8, CRLF -> "\\n", BOM dropped; .gz
    decompressed; position as `input_position` (for progress bars)."""
    offset = 0  # bytes of the (decompressed) text consumed, for error messages
    with open_input(path) as f:
        gz = is_gzip(path)
        for line_no, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            if line_no == 1:
                _check_start(path, raw)
            if line_no == 1 and raw.startswith(_BOM):
                raw, start = raw[3:], 3
            if raw.endswith(b"\r\n"):
                raw = raw[:-2] + b"\n"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _utf8_error(path, line_no, start + e.start, raw[e.start:e.end]) from None
            if "\x00" in text:
                raise _nul_error(path, line_no)
            yield line_no, text, input_position(f) if gz else offset


def iter_chunks(path: Path) -> Iterator[tuple[str, int]]:
    """Yield (text, position) for ~1 MiB chunks of the file, decoded as strict UTF-8 (a character
    cut by a chunk edge is completed by the next read), CRLF -> "\\n", BOM dropped; .gz
    decompressed; position as `input_position` (for progress bars)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0  # bytes of the (decompressed) text consumed, for error messages
    newlines = 0  # b"\n" in the bytes consumed (for the line of an error)
    held = ""  # a "\r" at a chunk end, until we know whether "\n" follows
    with open_input(path) as f:
        gz = is_gzip(path)
        while True:
            raw = f.read(_CHUNK)
            final = not raw
            if offset == 0:
                _check_start(path, raw)
            if offset == 0 and raw.startswith(_BOM):
                raw, offset = raw[3:], 3
            pending = decoder.getstate()[0]  # bytes of a cut character, held by the decoder
            try:
                text = decoder.decode(raw, final)
            except UnicodeDecodeError as e:
                data = e.object  # pending + raw
                line = newlines + data[:e.start].count(b"\n") + 1
                raise _utf8_error(path, line, offset - len(pending) + e.start,
                                  data[e.start:e.end]) from None
            if (nul := text.find("\x00")) >= 0:
                raise _nul_error(path, newlines + text.count("\n", 0, nul) + 1)
            offset += len(raw)
            newlines += raw.count(b"\n")
            if held:
                text, held = held + text, ""
            if not final and text.endswith("\r"):
                text, held = text[:-1], "\r"
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            if text:
                yield text, input_position(f) if gz else offset
            if final:
                return
