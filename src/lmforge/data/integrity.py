"""Is a token store what prepare wrote? Cheap checks when a split is opened, and content hashes.

`lmforge.data.store.TokenStore` runs the checks on the arrays it memory-maps, so a damaged
folder is named before training reads an impossible sample:

- `check_offsets`: `{split}.idx` starts at 0, never decreases and ends exactly at the end of
  `{split}.bin` (vectorised over the offsets, which are 8 bytes per sample);
- `check_token_ids`: no id at or above the vocabulary size (the embedding would index past its
  table). The maximum is taken in chunks; a split of up to `FULL_SCAN_TOKENS` tokens is read
  whole (tiny Shakespeare: about a millisecond), a larger one at evenly spaced chunks of that
  many tokens in all, so opening stays well under a second;
- `check_labels`: every label inside `[0, count)` (classify: the label names; mlm: the split's
  paragraphs).

`content_sha256` hashes a prepared folder's split files for meta.json, so a resumed run can
tell that the data it trains on changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

FULL_SCAN_TOKENS = 1 << 27  # 256 MiB of uint16 ids: read whole; beyond, a spread sample of this size
_CHUNK = 1 << 22
SPLIT_FILES = ("{split}.bin", "{split}.idx", "{split}.labels", "{split}.roles")
_AGAIN = "prepare the data again"


def check_offsets(idx_path: Path, offsets: np.ndarray, n_tokens: int) -> None:
    """ValueError naming `idx_path` unless the offsets run from 0 to `n_tokens` without decreasing."""
    if len(offsets) == 0:
        raise ValueError(f"{idx_path}: empty (it needs at least the offset 0; file damaged); {_AGAIN}")
    first, last = int(offsets[0]), int(offsets[-1])
    if first != 0:
        raise ValueError(f"{idx_path}: the first offset is {first}, not 0 (file damaged); {_AGAIN}")
    drops = np.flatnonzero(offsets[1:] < offsets[:-1])
    if len(drops):
        i = int(drops[0])
        raise ValueError(f"{idx_path}: offsets decrease at sample {i} ({int(offsets[i])} then "
                         f"{int(offsets[i + 1])}; file damaged); {_AGAIN}")
    if last != n_tokens:
        where = "past the end of" if last > n_tokens else "short of the end of"
        raise ValueError(f"{idx_path}: the last offset {last} is {where} {idx_path.stem}.bin ({n_tokens} tokens; "
                         f"file damaged); {_AGAIN}")


def _chunk_starts(n: int) -> range | np.ndarray:
    if n <= FULL_SCAN_TOKENS:
        return range(0, n, _CHUNK)
    count = FULL_SCAN_TOKENS // _CHUNK
    return np.linspace(0, n - _CHUNK, count).astype(np.int64)


def check_token_ids(bin_path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """ValueError naming `bin_path` and the position of an id >= `vocab_size` (see the module
    docstring for how much is read)."""
    if len(tokens) == 0 or vocab_size > np.iinfo(tokens.dtype).max:
        return
    for start in _chunk_starts(len(tokens)):
        chunk = tokens[int(start):int(start) + _CHUNK]
        if int(chunk.max()) >= vocab_size:
            at = int(start) + int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{bin_path}: token id {int(tokens[at])} at position {at} is outside the "
                             f"vocabulary of {vocab_size} tokens in meta.json (file damaged); {_AGAIN}")


def check_labels(labels_path: Path, labels: np.ndarray, count: int, what: str) -> None:
    """ValueError naming `labels_path` unless every label is in [0, count); `what` names them."""
    if len(labels) == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= count:
        bad = lo if lo < 0 else hi
        at = int(np.argmax(labels == bad))
        raise ValueError(f"{labels_path}: label {bad} of sample {at} is outside the {count} {what} in "
                         f"meta.json (file damaged); {_AGAIN}")


def _hash_into(h, path: Path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h


def sha256_file(path: Path) -> str:
    return _hash_into(hashlib.sha256(), path).hexdigest()


def content_sha256(folder: Path, splits: list[str]) -> tuple[str, dict[str, str]]:
    """(one sha256 over every split, {split: sha256}) of the split files of a prepared folder."""
    total, per_split = hashlib.sha256(), {}
    for split in splits:
        h = hashlib.sha256()
        for pattern in SPLIT_FILES:
            path = Path(folder) / pattern.format(split=split)
            if path.is_file():
                h.update(path.name.encode() + b"\0")
                _hash_into(h, path)
        per_split[split] = h.hexdigest()
        total.update(f"{split}:{per_split[split]}\n".encode())
    return total.hexdigest(), per_split
