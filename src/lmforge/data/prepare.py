"""Prepare: raw text files -> a prepared data folder (token store splits + meta.json), per task.

Owns the entry point `prepare(task, ...)` that `lmforge prepare` and the library call: it
checks the task name and hands the options each task takes to that task's module. The tasks
(`TASKS`) and their modules:

- "lm" (GPT pretraining): `lmforge.data.prepare_lm`, one sample per document, EOS appended;
- "mlm" (BERT pretraining): `lmforge.data.prepare_mlm`, one sample per sentence, paragraph
  numbers as labels;
- "classify": `lmforge.data.prepare_classify`, labelled texts, stratified split (it has more
  options than this entry passes; call `prepare_classify` for them);
- "dialogue": `lmforge.data.prepare_dialogue`, one sample per dialogue with per-token roles.

They share the steps of `lmforge.data.pipeline` and write through `lmforge.data.store` into a
temp folder renamed into place at the end (`lmforge.data.staging`), so a crash never leaves a
half-written folder that looks complete. One prepare at a time writes a given folder (the
second gets an error naming the first's pid); an existing non-empty folder is replaced only
with `overwrite`, and only when it holds prepared data (`lmforge.base.outputs`).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.data.prepare_classify import prepare_classify
from lmforge.data.prepare_dialogue import prepare_dialogue
from lmforge.data.prepare_lm import prepare_lm
from lmforge.data.prepare_mlm import prepare_mlm

TASKS = ("lm", "mlm", "classify", "dialogue")


def prepare(task: str, inputs: list[Path], tokenizer_path: Path, out_dir: Path, *,
            val_fraction: float = 0.05, test_fraction: float = 0.0, seed: int = 1337,
            text_field: str = "text", text_column: str | int = "text", batch_size: int = 1000,
            workers: int | None = None, show_progress: bool = True, overwrite: bool = False,
            doc_split: str = "blank_line", max_len: int | None = None, chat_format: str = "auto",
            val_files: list[Path] | None = None, test_files: list[Path] | None = None) -> dict:
    """Tokenize `inputs` into the data folder `out_dir` for `task`; returns the meta.json dict.

    `workers`: None = the tokenizer's Rust thread pool on all cores, 1 = single-threaded.
    `overwrite`: replace an existing non-empty `out_dir` (refused otherwise).
    `text_field` / `text_column`: the .jsonl field / .csv-.tsv column of the text (classify:
    `text_column` only).
    `doc_split`: lm and mlm, for .txt inputs: what one document is: a block between blank lines
    ("blank_line"), a line ("line"), or the whole file ("file").
    `max_len`: dialogue only: keep the most recent whole turns that fit (None: keep all).
    `chat_format`: dialogue only: "auto" (the tokenizer folder's chat template when it has one,
    else GPT2-chitchat's format), "template" or "chitchat".
    `val_files` / `test_files`: files whose every sample lands in val / test, kept whole instead of
    drawn from `inputs` (whose fraction for that split is then 0; `lmforge.data.fixed_splits`).
    """
    common = dict(val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                  show_progress=show_progress, overwrite=overwrite, val_files=val_files, test_files=test_files)
    streamed = dict(batch_size=batch_size, workers=workers)
    documents = dict(text_field=text_field, text_column=text_column, doc_split=doc_split)
    if task == "lm":
        return prepare_lm(inputs, tokenizer_path, out_dir, **common, **streamed, **documents)
    if task == "mlm":
        return prepare_mlm(inputs, tokenizer_path, out_dir, **common, **streamed, **documents)
    if task == "classify":
        return prepare_classify(inputs, tokenizer_path, out_dir, text_column=text_column, **common)
    if task == "dialogue":
        return prepare_dialogue(inputs, tokenizer_path, out_dir, max_len=max_len, chat_format=chat_format,
                                **common, **streamed)
    raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
