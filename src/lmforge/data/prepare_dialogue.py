"""Prepare for the `dialogue` task: dialogue corpora -> token store with per-token roles.

Owns the dialogue readers and writing each dialogue as one sample with its per-token roles;
the sample format itself (shared by training and `lmforge chat`) is
`lmforge.data.dialogue_format`. One dialogue is one sample, as in GPT2-chitchat:

    [CLS] u1 [SEP] u2 [SEP] u3 [SEP] ...

Turns alternate between the user (role 0) and the model's replies (role 1), starting with
the user, unless the input names the roles (JSONL "messages"). A prepared folder holds, per
split, the usual `{split}.bin` / `{split}.idx` and (files and checks: `lmforge.data.store`)

- `{split}.roles`: uint8, one per token of `{split}.bin` (same positions): 1 on the tokens of
  a reply turn and on the [SEP] that closes it, 0 on [CLS] and on the user's turns with their
  [SEP]. With `train.loss_on: responses` only role-1 tokens are learned.

Every turn ends with exactly one [SEP] and [SEP] never occurs inside a turn (special-token
text typed in a turn is tokenized as plain text), so turn boundaries are the [SEP]
positions. meta.json repeats this under "dialogue" (ids, files, counts).

Input formats (by extension; `.gz` of any of them is read directly):

- text (GPT2-chitchat): one utterance per line, a blank line between dialogues. A file whose
  first non-blank line holds `__eou__` is read as DailyDialog instead: one dialogue per line,
  utterances separated by `__eou__`.
- `.jsonl`: one dialogue per line, `{"turns": ["...", ...]}` or
  `{"messages": [{"role": "user"|"assistant"|..., "content": "..."}, ...]}`.
- Parquet, Arrow and `datasets` save_to_disk folders: one dialogue per row, in a `messages` or
  `turns` column shaped as in JSONL.

CRLF, a byte-order mark and whitespace around utterances are dropped. A dialogue whose
turns are all empty is counted and skipped. A split holding dialogues but no reply token
(every dialogue a lone user turn) is an error naming the dialogues and reply tokens per split,
which meta.json keeps as `splits.{split}.reply_tokens`. With `max_len`, a dialogue longer than that
keeps its most recent whole turns (`build_sample`); the task trims again to the model
context when it reads, so the same folder serves models of any context.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from lmforge.base.readers import check_inputs, parse_json_line
from lmforge.base.readers_arrow import column_names, columnar_format, iter_rows
from lmforge.base.sources import format_suffix, iter_lines
from lmforge.data.dialogue_format import RESPONSE, USER, dialogue_specials
from lmforge.data.dialogue_samples import ChitchatSamples, TemplateSamples, chat_template_of
from lmforge.data.messages import alternating, check_messages
from lmforge.data.fixed_splits import FixedSplitter, check_fixed_splits, plan_splits
from lmforge.data.pipeline import (check_numbers, check_wanted_splits, open_tokenizer, parallelism, wanted_splits,
                                   write_folder_meta, writing_folder)
from lmforge.data.store import ROLES_DTYPE, ROLES_FILE, RolesWriter, TokenStoreWriter

_EOU = "__eou__"


class Dialogue(NamedTuple):
    """One dialogue as read: stripped, non-empty turns, their roles (0 user, 1 reply) and speakers."""

    turns: list[str]
    roles: list[int]
    path: Path
    line: int  # 1-based line where the dialogue starts
    speakers: list[str]  # "system", "user", "assistant" or "tool", one per turn

    def messages(self) -> list[dict[str, str]]:
        """The dialogue as a conversation for a chat template."""
        return [{"role": s, "content": t} for s, t in zip(self.speakers, self.turns)]


# -- readers -------------------------------------------------------------------------------------


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line_no, text without its line ending): the shared line reader of lmforge.base.readers
    (strict UTF-8, errors naming file and line, .gz decompressed while read)."""
    for line_no, text, _ in iter_lines(path):
        yield line_no, text.rstrip("\r\n")


def _dialogue(messages: list[dict[str, str]], path: Path, line: int) -> Dialogue:
    kept = [(m["content"].strip(), m["role"]) for m in messages if m["content"].strip()]
    return Dialogue([t for t, _ in kept], [RESPONSE if s == "assistant" else USER for _, s in kept], path, line,
                    [s for _, s in kept])


def _text_dialogues(path: Path) -> Iterator[Dialogue]:
    block: list[str] = []
    start = 0
    daily: bool | None = None
    for line_no, text in _lines(path):
        if daily is None and text.strip():
            daily = _EOU in text
        if daily:
            if text.strip():
                yield _dialogue(alternating(text.split(_EOU)), path, line_no)
            continue
        if text.strip():
            if not block:
                start = line_no
            block.append(text)
        elif block:
            yield _dialogue(alternating(block), path, start)
            block = []
    if block:
        yield _dialogue(alternating(block), path, start)


def _jsonl_dialogue(record: object, path: Path, line_no: int, unit: str = "line") -> Dialogue:
    where = f"{path}: {unit} {line_no}"
    if isinstance(record, dict) and isinstance(record.get("turns"), list):
        turns = record["turns"]
        if not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where}: every item of \"turns\" must be a string")
        return _dialogue(alternating(turns), path, line_no)
    if isinstance(record, dict) and "messages" in record:
        return _dialogue(check_messages(record["messages"], where), path, line_no)
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"{where}: expected {{\"turns\": [...]}} or {{\"messages\": [...]}}, got {keys}")


def _jsonl_dialogues(path: Path) -> Iterator[Dialogue]:
    for line_no, text in _lines(path):
        if not text.strip():
            continue
        yield _jsonl_dialogue(parse_json_line(path, line_no, text), path, line_no)


def _table_dialogues(path: Path) -> Iterator[Dialogue]:
    names = column_names(path)
    key = next((k for k in ("messages", "turns") if k in names), None)
    if key is None:
        raise ValueError(f"{path}: no \"messages\" or \"turns\" column; the columns are {names}")
    for row in iter_rows(path, [key]):
        yield _jsonl_dialogue({key: row.values[0]}, path, row.number, unit="row")


def iter_dialogues(path: Path) -> Iterator[Dialogue]:
    """Stream the dialogues of one file (format by extension, see the module docstring)."""
    path = Path(path)
    if columnar_format(path) is not None and path.suffix.lower() != ".gz":
        return _table_dialogues(path)
    suffix = format_suffix(path)  # the one before .gz; refuses other compressed files
    if suffix == ".jsonl":
        return _jsonl_dialogues(path)
    if suffix in (".csv", ".tsv", ".json"):
        raise ValueError(f"{path}: dialogues are read from text (GPT2-chitchat or DailyDialog "
                         f"format) or .jsonl files; convert it to one of those")
    return _text_dialogues(path)


def check_dialogue_inputs(inputs: Sequence[Path]) -> list[Path]:
    return check_inputs(inputs, kinds="dialogue", check_format=False)  # formats: iter_dialogues


# -- prepare -------------------------------------------------------------------------------------


class _SplitWriter:
    """The token store of one split plus its roles file, written in step."""

    def __init__(self, folder: Path, split: str, vocab_size: int) -> None:
        self.tokens = TokenStoreWriter(folder, split, vocab_size)
        self.roles = RolesWriter(folder, split)
        self.samples = 0
        self.reply_tokens = 0  # what `train.loss_on: responses` learns

    def add(self, ids: list[int], roles: list[int]) -> None:
        self.tokens.add(np.asarray(ids, dtype=np.int64))
        self.roles.add(roles)
        self.samples += 1
        self.reply_tokens += sum(roles)

    def close(self) -> dict[str, int]:
        self.roles.close()
        return {**self.tokens.close(), "reply_tokens": self.reply_tokens}


def prepare_dialogue(inputs: list[Path], tokenizer_path: Path, out_dir: Path, *,
                     max_len: int | None = None, val_fraction: float = 0.05,
                     test_fraction: float = 0.0, seed: int = 1337, batch_size: int = 1000,
                     workers: int | None = None, show_progress: bool = True,
                     overwrite: bool = False, chat_format: str = "auto", val_files: list[Path] | None = None,
                     test_files: list[Path] | None = None) -> dict:
    """Tokenize dialogue files into the data folder `out_dir`; returns the meta.json dict.

    Each dialogue goes to train, val or test by a seeded draw (as for `lm`), or whole to val / test
    for `val_files` / `test_files` (`lmforge.data.fixed_splits`); a wanted (drawn) val/test
    split is never left empty when there are at least two dialogues. `chat_format`: "auto"
    renders with the tokenizer folder's chat template when it has one, else the chitchat
    format; "template" or "chitchat" insist (`lmforge.data.dialogue_samples`).
    """
    check_numbers(val_fraction, test_fraction, batch_size, workers)
    if max_len is not None and max_len < 3:
        raise ValueError(f"max_len must be >= 3 ([CLS], one token, [SEP]), got {max_len}")
    plan = plan_splits(inputs, val_files, test_files, val_fraction, test_fraction, check_format=False)
    paths, val_fraction, test_fraction = plan.paths, plan.val_fraction, plan.test_fraction
    tokenizer = open_tokenizer(tokenizer_path)
    template = chat_template_of(tokenizer.file, chat_format)
    if template is not None:
        builder = TemplateSamples(tokenizer.tok, template, max_len)
    else:
        builder = ChitchatSamples(tokenizer.tok, *dialogue_specials(tokenizer.ids, str(tokenizer.file)), max_len)
    splits = plan.split_names()
    t0 = time.perf_counter()
    with writing_folder(out_dir, paths, overwrite) as tmp:
        with parallelism(workers):
            writers = {s: _SplitWriter(tmp, s, tokenizer.vocab_size) for s in splits}
            try:
                stats = _write_dialogues(builder, paths, writers, plan.splitter(seed),
                                         wanted_splits(val_fraction, test_fraction)[1:], batch_size, show_progress)
            finally:
                counts = {s: writers[s].close() for s in splits}
        if stats["dialogues"] == 0:
            raise ValueError(f"no dialogue found in {', '.join(str(p) for p in paths)} "
                             f"({stats['empty']} empty ones skipped)")
        check_wanted_splits(counts, val_fraction, test_fraction, paths, "dialogues")
        check_fixed_splits(plan, counts, "dialogues")
        _check_replies(counts, paths)
        dialogue = {**builder.meta(), "roles_file": ROLES_FILE, "roles_dtype": ROLES_DTYPE.name,
                    "max_len": max_len, **stats}
        meta = write_folder_meta(tmp, "dialogue", tokenizer, paths, counts, seed=seed,
                                 val_fraction=val_fraction, test_fraction=test_fraction,
                                 split_sources=plan.sources(), documents=stats["dialogues"], split_by="document", dialogue=dialogue)
    seconds = time.perf_counter() - t0
    total = sum(c["tokens"] for c in counts.values())
    per_split = " / ".join(f"{s} {c['samples']:,}" for s, c in counts.items())
    print(f"prepared: {stats['dialogues']:,} dialogues ({per_split}), {stats['turns']:,} turns, "
          f"{total:,} tokens in {seconds:.2f}s | {stats['empty']:,} empty skipped, "
          f"{stats['truncated']:,} truncated to max_len")
    return meta


def _check_replies(counts: dict[str, dict], paths: list[Path]) -> None:
    """ValueError when a split holding dialogues has no reply token: nothing to learn there."""
    empty = [s for s, c in counts.items() if (c["samples"] or s == "train") and c["reply_tokens"] == 0]
    if empty:
        per_split = "; ".join(f"{s}: {c['samples']:,} dialogue(s), {c['reply_tokens']:,} reply tokens"
                              for s, c in counts.items())
        raise ValueError(f"{', '.join(map(str, paths))}: no reply to learn in the {' and '.join(empty)} split(s) "
                         f"({per_split}); every dialogue there is the user's turn alone. A reply is the "
                         f"second utterance (text: the next line of the block; JSONL: a second \"turns\" "
                         f"item or an \"assistant\" message)")


def _write_dialogues(builder: ChitchatSamples | TemplateSamples, paths: list[Path],
                     writers: dict[str, _SplitWriter], splitter: FixedSplitter, wanted: list[str], batch_size: int,
                     show_progress: bool) -> dict[str, int]:
    """Read, tokenize and write every dialogue; returns the counts for meta.json. The last train
    dialogue goes to the first split of `wanted` that got none, if any."""
    stats = {"dialogues": 0, "empty": 0, "truncated": 0, "turns": 0}
    held: tuple[list[int], list[int]] | None = None  # the latest train sample, not written yet
    with tqdm(unit=" dialogues", desc="prepare", file=sys.stderr, disable=not show_progress,
              mininterval=0.5) as bar:
        for batch in _batches((d for p in paths for d in iter_dialogues(p)), batch_size):
            for dialogue, built in zip(batch, builder.samples(batch)):  # one (or None) per dialogue
                if built is None:
                    stats["empty"] += 1
                    continue
                sample = (built.ids, built.roles)
                stats["dialogues"] += 1
                stats["turns"] += built.turns
                stats["truncated"] += built.truncated
                split = splitter.next(dialogue.path)
                if split == "train":
                    if held is not None:
                        writers["train"].add(*held)
                    held = sample
                else:
                    writers[split].add(*sample)
            bar.update(len(batch))
    if held is not None:
        empty = [s for s in wanted if writers[s].samples == 0]
        target = empty[0] if empty and writers["train"].samples > 0 else "train"
        writers[target].add(*held)
    return stats


def _batches(dialogues: Iterator[Dialogue], size: int) -> Iterator[list[Dialogue]]:
    batch: list[Dialogue] = []
    for d in dialogues:
        batch.append(d)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
