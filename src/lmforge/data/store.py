"""The token store: every on-disk format of a prepared data folder (write, memory-map, read).

A data folder holds, per split (train, val, optional test):

- `{split}.bin`: all token ids concatenated, little-endian uint16 when the vocabulary fits
  (vocab_size <= 65535), else uint32;
- `{split}.idx`: int64 offsets, samples + 1 of them: sample i is bin[idx[i]:idx[i+1]];
- `{split}.labels`: int64, one per sample, only when samples carry labels; float32 for a
  regression folder (meta.json's `label_dtype: "float32"`, `problem_type: "regression"`);
- `{split}.roles`: dialogue folders only: uint8, one role per token of `{split}.bin`
  (`RolesWriter`, `read_roles`);

and one `meta.json` (see `write_meta`) and a copy of the tokenizer (`tokenizer.json`).
Writing streams through small buffers; reading memory-maps, so neither ever holds a whole
split in memory, and opening a split checks its offsets, token ids and labels
(`lmforge.data.integrity`). No pickle. The few edits prepare makes after writing (moving a sample
between splits, cutting a lone sample into splits) are here too, so no other module opens
these files by name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.integrity import check_labels, check_offsets, check_token_ids
from lmforge.data.staging import recover_folder

_FLUSH_TOKENS = 1 << 20  # buffered token ids before a write
_COPY_TOKENS = 1 << 24  # tokens per chunk when moving tokens between split files
ROLES_FILE = "{split}.roles"  # named in a dialogue folder's meta.json
ROLES_DTYPE = np.dtype(np.uint8)
LABEL_DTYPES = {"int64": np.dtype("<i8"), "float32": np.dtype("<f4")}  # meta.json's label_dtype (default int64)


def label_dtype(meta: dict) -> np.dtype:
    """The dtype of the `{split}.labels` files of a folder with this meta.json."""
    name = meta.get("label_dtype", "int64")
    if name not in LABEL_DTYPES:
        raise ValueError(f"meta.json: label_dtype {name!r} is not one of {', '.join(LABEL_DTYPES)}; "
                         "prepare the data again")
    return LABEL_DTYPES[name]


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 when every id of a `vocab_size` vocabulary fits, else uint32 (little-endian)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


class TokenStoreWriter:
    """Streams samples of one split into `{split}.bin/.idx(/.labels)` under `out_dir`.

    `add(ids, label)` writes one sample. For a sample too long to hold at once, call
    `write(ids)` for each part and then `end_sample(label)`. `labelled=True` writes a
    `{split}.labels` even when the split stays empty (else the first sample decides);
    `label_dtype` "float32" stores regression targets in place of label ids.
    """

    def __init__(self, out_dir: Path, split: str, vocab_size: int, *, labelled: bool | None = None,
                 label_dtype: str = "int64") -> None:
        self.out_dir = Path(out_dir)
        self.split = split
        self.vocab_size = vocab_size
        self.dtype = dtype_for(vocab_size)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._bin = open(self.out_dir / f"{split}.bin", "wb")
        self._idx = open(self.out_dir / f"{split}.idx", "wb")
        self._labels_path = self.out_dir / f"{split}.labels"
        self._labels_file = None  # opened at the first label
        self._buf: list[np.ndarray] = []
        self._buf_tokens = 0
        self._offsets: list[int] = [0]
        self._labels: list[int | float] = []
        self._label_dtype = LABEL_DTYPES[label_dtype]
        self._labelled: bool | None = labelled  # else decided by the first sample
        self._tokens = 0  # tokens written or buffered
        self._samples = 0
        self._open_tokens = 0  # tokens of the sample not yet ended
        self._last_end = 0  # token position where the last ended sample ends
        self._closed = False

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append token ids to the current (not yet ended) sample."""
        assert not self._closed, "writer already closed"
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be a 1-D sequence of ints, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary "
                             f"(size {self.vocab_size}) in split {self.split!r}")
        self._buf.append(arr.astype(self.dtype))  # a copy: the caller may reuse `ids`
        self._buf_tokens += arr.size
        self._tokens += arr.size
        self._open_tokens += arr.size
        if self._buf_tokens >= _FLUSH_TOKENS:
            self._flush()

    def end_sample(self, label: int | float | None = None) -> None:
        """End the current sample (it may be empty) with an optional label (a float target
        when the writer's label_dtype is float32)."""
        assert not self._closed, "writer already closed"
        self._check_label(label)
        self._labelled = label is not None
        if label is not None:
            self._labels.append(float(label) if self._label_dtype.kind == "f" else int(label))
        self._offsets.append(self._tokens)
        self._last_end = self._tokens
        self._samples += 1
        self._open_tokens = 0
        if len(self._offsets) >= 1 << 16:
            self._flush()

    def _check_label(self, label: int | None) -> None:
        if self._labelled is not None and self._labelled != (label is not None):
            raise ValueError(f"split {self.split!r}: sample {self._samples} "
                             f"{'has no label' if label is None else 'has a label'} but earlier "
                             f"samples {'do' if self._labelled else 'do not'}; label all or none")

    def add(self, ids: Sequence[int] | np.ndarray, label: int | float | None = None) -> None:
        """Write one whole sample."""
        self._check_label(label)
        self.write(ids)
        self.end_sample(label)

    def write_batch(self, ids: Sequence[int] | np.ndarray, ends: Sequence[int]) -> None:
        """Write many unlabelled samples at once: `ids` concatenated, a sample ending after each
        position in `ends` (relative to the start of `ids`, increasing). Tokens after the last
        end stay in the open sample. The fast path for prepare."""
        if len(ends):
            self._check_label(None)
        start = self._tokens
        self.write(ids)
        if not len(ends):
            return
        self._labelled = False
        ends_abs = [start + int(e) for e in ends]
        assert self._last_end <= ends_abs[0] and ends_abs[-1] <= self._tokens, "ends out of order"
        self._offsets.extend(ends_abs)
        self._last_end = ends_abs[-1]
        self._samples += len(ends_abs)
        self._open_tokens = self._tokens - ends_abs[-1]
        if len(self._offsets) >= 1 << 16:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            np.concatenate(self._buf).tofile(self._bin)
            self._buf, self._buf_tokens = [], 0
        if self._offsets:
            np.asarray(self._offsets, dtype="<i8").tofile(self._idx)
            self._offsets = []
        if self._labels:
            if self._labels_file is None:
                self._labels_file = open(self._labels_path, "wb")
            np.asarray(self._labels, dtype=self._label_dtype).tofile(self._labels_file)
            self._labels = []

    def close(self) -> dict[str, int]:
        """Write out the buffers and close the files; returns {"samples": ..., "tokens": ...}.

        No fsync: whoever makes the folder visible (prepare's rename) syncs it first."""
        if self._closed:
            return {"samples": self._samples, "tokens": self._tokens - self._open_tokens}
        assert self._open_tokens == 0, f"split {self.split!r}: close() with an unended sample"
        self._flush()
        if self._labelled and self._labels_file is None:  # an empty labelled split
            self._labels_file = open(self._labels_path, "wb")
        self._close_files()
        return {"samples": self._samples, "tokens": self._tokens}

    def _close_files(self) -> None:
        for f in (self._bin, self._idx, self._labels_file):
            if f is not None:
                f.close()
        self._closed = True

    def __enter__(self) -> TokenStoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_files()


class RolesWriter:
    """Streams the per-token roles of one split into `{split}.roles` (dialogue folders), in step
    with the samples written to its TokenStoreWriter."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self._file = open(Path(out_dir) / ROLES_FILE.format(split=split), "wb")

    def add(self, roles: Sequence[int]) -> None:
        np.asarray(roles, dtype=ROLES_DTYPE).tofile(self._file)

    def close(self) -> None:
        self._file.close()


def tokenizer_path(data_dir: Path) -> Path:
    """Where a data folder keeps the tokenizer it was prepared with."""
    return Path(data_dir) / "tokenizer.json"


def write_tokenizer(out_dir: Path, tokenizer_file: Path) -> Path:
    """Copy the tokenizer the folder is prepared with into it; returns the copy's path."""
    return Path(shutil.copyfile(tokenizer_file, tokenizer_path(out_dir)))


def has_split(data_dir: Path, split: str) -> bool:
    """Whether the data folder holds the split (test is optional)."""
    return (Path(data_dir) / f"{split}.bin").exists()


def write_meta(out_dir: Path, meta: dict) -> Path:
    """Write `out_dir/meta.json` atomically; returns its path."""
    path = Path(out_dir) / "meta.json"
    tmp = path.with_name(f".meta.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_meta(data_dir: Path) -> dict:
    """Read `data_dir/meta.json`; FileNotFoundError / ValueError naming the file.

    A folder without meta.json whose prepare --overwrite was killed mid-swap is first put
    back in order (`lmforge.data.staging.recover_folder`)."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        for note in recover_folder(Path(data_dir)):
            print(f"note: {note}", file=sys.stderr)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {data_dir} is not a prepared data folder; "
                                f"create one with `lmforge prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: damaged meta.json ({e}); prepare the data again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: damaged meta.json (not a JSON object); prepare the data again")
    return meta


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; prepare the data again with `lmforge prepare`")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} is not a multiple of {dtype.itemsize} bytes "
                         f"(file damaged); prepare the data again")
    if size == 0:  # numpy cannot memory-map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class TokenStore:
    """Read-only, memory-mapped view of one split of a prepared data folder.

    Opening checks the offsets, the token ids against meta.json's vocab_size and the labels
    against its label names (mlm: the split's paragraphs), naming a damaged file
    (`lmforge.data.integrity`); `check=False` skips that (a DataLoader worker re-opening a
    store its parent has checked)."""

    def __init__(self, data_dir: Path, split: str, *, check: bool = True) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.meta = read_meta(self.data_dir)
        for key in ("dtype", "vocab_size"):
            if key not in self.meta:
                raise ValueError(f"{self.data_dir / 'meta.json'}: no {key!r} key; prepare the data again")
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.tokens: np.ndarray = _memmap(self.data_dir / f"{split}.bin", dtype)
        self.offsets: np.ndarray = _memmap(self.data_dir / f"{split}.idx", np.dtype("<i8"))
        labels_path = self.data_dir / f"{split}.labels"
        self.labels: np.ndarray | None = (_memmap(labels_path, label_dtype(self.meta))
                                          if labels_path.exists() else None)
        check_offsets(self.data_dir / f"{split}.idx", self.offsets, len(self.tokens))
        n = len(self.offsets) - 1
        if self.labels is not None and len(self.labels) != n:
            raise ValueError(f"{labels_path}: {len(self.labels)} labels for {n} samples "
                             f"(file damaged); prepare the data again")
        if check:
            self._check_values()

    def _check_values(self) -> None:
        check_token_ids(self.data_dir / f"{self.split}.bin", self.tokens, int(self.meta["vocab_size"]))
        if self.labels is None:
            return
        labels_path = self.data_dir / f"{self.split}.labels"
        if self.labels.dtype.kind == "f":
            bad = np.flatnonzero(~np.isfinite(self.labels))
            if len(bad):
                raise ValueError(f"{labels_path}: target {self.labels[bad[0]]} of sample {int(bad[0])} is not "
                                 "finite (file damaged); prepare the data again")
        elif isinstance(self.meta.get("label_names"), list):
            check_labels(labels_path, self.labels, len(self.meta["label_names"]), "label names")
        elif isinstance(self.meta.get("paragraphs"), dict) and self.split in self.meta["paragraphs"]:
            check_labels(labels_path, self.labels, int(self.meta["paragraphs"][self.split]),
                         f"paragraphs of split {self.split!r}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for split {self.split!r} with {n} samples")
        i %= n
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    # DataLoader workers started with "spawn" get the folder and re-open the memory maps.
    def __getstate__(self) -> dict:
        return {"data_dir": str(self.data_dir), "split": self.split}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["data_dir"]), state["split"], check=False)

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.data_dir)!r}, {self.split!r}: {len(self)} samples, "
                f"{len(self.tokens)} tokens)")


def read_roles(data_dir: Path, split: str, n_tokens: int) -> np.ndarray:
    """The memory-mapped `{split}.roles` of a dialogue folder, checked against its `n_tokens`."""
    path = Path(data_dir) / ROLES_FILE.format(split=split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; prepare the data again with "
                                f"`lmforge prepare --task dialogue`")
    if path.stat().st_size != n_tokens:
        raise ValueError(f"{path}: {path.stat().st_size} roles for {n_tokens} tokens "
                         f"(file damaged); prepare the data again")
    if not n_tokens:
        return np.empty(0, ROLES_DTYPE)
    roles = np.memmap(path, dtype=ROLES_DTYPE, mode="r")
    if int(roles.max()) > 1:
        at = int(np.argmax(roles > 1))
        raise ValueError(f"{path}: role {int(roles[at])} at token {at}; roles are 0 (user) or 1 (reply) "
                         f"(file damaged); prepare the data again")
    return roles


# -- edits after writing (prepare keeps wanted splits non-empty) ---------------------------------


def split_counts(out_dir: Path, split: str) -> dict[str, int]:
    """{"samples": ..., "tokens": ...} of a written split, from its `{split}.idx`."""
    idx = np.fromfile(Path(out_dir) / f"{split}.idx", dtype="<i8")
    return {"samples": len(idx) - 1, "tokens": int(idx[-1])}


def _copy_tokens(src: Path, start: int, stop: int, dst, dtype: np.dtype) -> None:
    """Append tokens [start, stop) of the .bin file `src` to the open binary file `dst`."""
    for a in range(start, stop, _COPY_TOKENS):
        n = min(_COPY_TOKENS, stop - a)
        np.fromfile(src, dtype=dtype, count=n, offset=a * dtype.itemsize).tofile(dst)


def move_last_sample(out_dir: Path, src: str, dst: str, dtype: np.dtype) -> None:
    """Move the last sample of split `src` to the end of split `dst` (unlabelled splits only)."""
    folder = Path(out_dir)
    idx = np.fromfile(folder / f"{src}.idx", dtype="<i8")
    a, b = int(idx[-2]), int(idx[-1])
    dst_idx = np.fromfile(folder / f"{dst}.idx", dtype="<i8")
    with open(folder / f"{dst}.bin", "ab") as f:
        _copy_tokens(folder / f"{src}.bin", a, b, f, dtype)
    with open(folder / f"{dst}.idx", "ab") as f:
        np.array([dst_idx[-1] + (b - a)], dtype="<i8").tofile(f)
    os.truncate(folder / f"{src}.bin", a * dtype.itemsize)
    os.truncate(folder / f"{src}.idx", (len(idx) - 1) * 8)


def cut_sample(out_dir: Path, holder: str, sizes: dict[str, int], dtype: np.dtype) -> None:
    """Rewrite the splits of `sizes`, in order, from the tokens of the one sample in split `holder`
    (one of them): split s gets the next sizes[s] tokens as its only sample, none when 0."""
    folder = Path(out_dir)
    whole = folder / ".single.bin"
    os.replace(folder / f"{holder}.bin", whole)
    start = 0
    for s, size in sizes.items():
        with open(folder / f"{s}.bin", "wb") as f:
            _copy_tokens(whole, start, start + size, f, dtype)
        np.array([0, size] if size else [0], dtype="<i8").tofile(folder / f"{s}.idx")
        start += size
    whole.unlink()
