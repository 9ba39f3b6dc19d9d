"""The steps every task's preparation shares: checks, the split draw, tokenizer threads, meta.json.

Each task module (`prepare_lm`, `prepare_mlm`, `prepare_classify`, `prepare_dialogue`) runs
the same pipeline with its own reader and sample writer:

1. check the numbers (`check_numbers`), the inputs (`lmforge.base.readers.check_inputs`) and
   the tokenizer (`open_tokenizer`, then the task's own special-token needs), before any work;
2. `writing_folder`: hold the output folder (one prepare at a time per folder), settle what a
   killed prepare left beside it (`lmforge.data.staging.recover_folder`), check it with the
   shared output guard (`lmforge.base.outputs.check_output_folder`, kind "data") and yield a
   staged temp folder (`lmforge.data.staging.staged_folder`);
3. read, tokenize (`parallelism` sets the tokenizer's threads) and write samples there, each
   document going to train, val or test by a seeded `Splitter` draw (classify splits by class
   instead); a split asked for that came out empty is an error (`check_wanted_splits`);
4. copy the tokenizer (with a Hugging Face folder's tokenizer_config.json: chat template, named
   special tokens) and write meta.json with the keys every task shares
   (`write_folder_meta`: counts per split, hashes of the tokenizer and of the written splits),
   then rename the folder into place.

The files themselves belong to `lmforge.data.store`; this module never opens them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from lmforge.base.locks import hold_folder
from lmforge.base.outputs import check_output_folder
from lmforge.base.tokenizer import SpecialIds, load_tokenizer, special_ids, tokenizer_file
from lmforge.base.tokenizer_config import tokenizer_settings, write_settings
from lmforge.base.version import __version__
from lmforge.data.integrity import content_sha256, sha256_file
from lmforge.data.staging import recover_folder, staged_folder
from lmforge.data.store import dtype_for, tokenizer_path, write_meta, write_tokenizer

SPLIT_NAMES = ("train", "val", "test")
_RNG_BLOCK = 4096  # split draws are taken in fixed blocks: independent of batch_size


def check_numbers(val_fraction: float, test_fraction: float, batch_size: int = 1,
                  workers: int | None = None) -> None:
    """ValueError for fractions outside [0, 1) or leaving train no data, or bad batch/workers."""
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 (train needs data), got "
                         f"{val_fraction} + {test_fraction}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1 (or None for all cores), got {workers}")


@contextlib.contextmanager
def writing_folder(out_dir: Path, inputs: list[Path], overwrite: bool) -> Iterator[Path]:
    """Own the data folder `out_dir` for the block (step 2 of the module docstring): a second
    prepare into it gets an error naming this process; yields the staged temp folder, which
    replaces `out_dir` when the block ends without error."""
    out_dir = Path(out_dir)
    with hold_folder(out_dir, "data folder"):
        for note in recover_folder(out_dir, clean=True):
            print(f"note: {note}", file=sys.stderr)
        check_output_folder(out_dir, inputs=inputs, overwrite=overwrite, kind="data")
        with staged_folder(out_dir) as tmp:
            yield tmp


def check_wanted_splits(counts: dict[str, dict], val_fraction: float, test_fraction: float,
                        paths: list[Path], unit: str, key: str = "samples") -> None:
    """ValueError naming the counts when val or test, asked for (fraction > 0), got no `key`."""
    fractions = {"val": val_fraction, "test": test_fraction}
    for split in wanted_splits(val_fraction, test_fraction)[1:]:
        if counts[split][key] == 0:
            per_split = ", ".join(f"{s} {c[key]:,}" for s, c in counts.items())
            raise ValueError(f"{', '.join(map(str, paths))}: the {split} split is empty ({unit}: {per_split}); "
                             f"give more data or a larger --{split}-fraction (now {fractions[split]})")


def split_names(test_fraction: float) -> list[str]:
    """The splits a folder gets: train and val always, test when it is wanted."""
    return ["train", "val"] + (["test"] if test_fraction > 0 else [])


def wanted_splits(val_fraction: float, test_fraction: float) -> list[str]:
    """The splits that must not stay empty when there is data to spare: train, and val and test
    when their fraction is above 0."""
    return ["train"] + [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0]


class OpenTokenizer(NamedTuple):
    """A loaded tokenizer with what preparation needs to know about it."""

    file: Path  # the tokenizer.json read
    tok: Tokenizer
    ids: SpecialIds
    vocab_size: int  # added tokens included


def open_tokenizer(tokenizer_path: Path) -> OpenTokenizer:
    """Load the tokenizer of a file or folder (FileNotFoundError/ValueError naming it); a Hugging
    Face folder's tokenizer_config.json names its special tokens (`lmforge.base.tokenizer_config`)."""
    file = tokenizer_file(tokenizer_path)
    tok = load_tokenizer(file)
    ids = special_ids(tok, tokenizer_settings(file))
    return OpenTokenizer(file, tok, ids, tok.get_vocab_size(with_added_tokens=True))


@contextlib.contextmanager
def parallelism(workers: int | None) -> Iterator[None]:
    """workers=1 turns the tokenizer's thread pool off for the call; otherwise leave it on.

    RAYON_NUM_THREADS (workers > 1) only takes effect if the Rust pool has not started yet.
    An inherited TOKENIZERS_PARALLELISM=false is respected (the library sets it in forked
    children, where turning it back on could deadlock) but reported, since it costs speed.
    """
    saved = {k: os.environ.get(k) for k in ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")}
    if workers == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        if workers is not None and saved["RAYON_NUM_THREADS"] is None:
            os.environ["RAYON_NUM_THREADS"] = str(workers)
        flag = saved["TOKENIZERS_PARALLELISM"]
        if flag is not None and flag.strip().lower() in ("", "0", "false", "off", "no", "f", "n"):
            print(f"note: TOKENIZERS_PARALLELISM={saved['TOKENIZERS_PARALLELISM']} keeps the "
                  f"tokenizer on one core; unset it to use all cores", file=sys.stderr)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Splitter:
    """Seeded per-document split draws, in reading order: "train", "val" or "test"."""

    def __init__(self, seed: int, val_fraction: float, test_fraction: float) -> None:
        self._rng = np.random.default_rng(seed)
        self._edges = np.array([val_fraction, val_fraction + test_fraction])
        self._block: list[int] = []

    def next(self) -> str:
        if not self._block:
            u = self._rng.random(_RNG_BLOCK)
            # u < val -> 1 (val); val <= u < val+test -> 2 (test); else 0 (train)
            k = np.searchsorted(self._edges, u, side="right")
            self._block = np.where(k == 0, 1, np.where(k == 1, 2, 0))[::-1].tolist()
        return SPLIT_NAMES[self._block.pop()]


def write_folder_meta(folder: Path, task: str, tokenizer: OpenTokenizer, paths: list[Path],
                      counts: dict[str, dict], *, seed: int, val_fraction: float,
                      test_fraction: float, label_names: list[str] | None = None,
                      split_sources: dict[str, dict] | None = None, **task_keys) -> dict:
    """Copy the tokenizer into the staged `folder` and write its meta.json: the keys every task
    shares, then `task_keys` (the task's own). Returns the meta dict.

    `splits` holds each split's counts (`samples`, `tokens`, and the task's own); `content_sha256`
    is one sha256 over every split's files, `split_sha256` one per split: a resumed run compares
    them with those it started with. `split_sources` (`lmforge.data.fixed_splits`) says where each
    split came from: {"files": [...]} for a fixed split, {"drawn": fraction} otherwise."""
    if tokenizer.file.suffix == ".txt":  # a BERT vocab.txt: the folder keeps the tokenizer built from it
        tokenizer.tok.save(str(tokenizer_path(folder)))
    else:
        write_tokenizer(folder, tokenizer.file)
    write_settings(tokenizer.file, folder, tokenizer.tok)  # the chat template and named tokens travel with it
    content, per_split = content_sha256(folder, list(counts))
    meta = {
        "task": task,
        "tokenizer": str(tokenizer.file.resolve()),
        "tokenizer_sha256": sha256_file(tokenizer.file),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype_for(tokenizer.vocab_size).name,
        "special_ids": dataclasses.asdict(tokenizer.ids),
        "label_names": label_names,
        "splits": counts,
        **({"split_sources": split_sources} if split_sources else {}),
        "content_sha256": content,
        "split_sha256": per_split,
        "lmforge_version": __version__,
        "inputs": [str(p.resolve()) for p in paths],
        **task_keys,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }
    write_meta(folder, meta)
    return meta
