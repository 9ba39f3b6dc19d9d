"""`lmforge eval`'s arguments (a group of cli.py, kept beside it): a checkpoint on a split of a
prepared data folder (`--data`), or a causal LM's perplexity on raw text (`--text`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("eval", help="metrics of a checkpoint on a split of a prepared data folder, or the "
                                    "perplexity of a causal LM on raw text (--text)")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses best, else last)")
    p.add_argument("--data", type=Path, help="a folder written by `lmforge prepare`")
    p.add_argument("--split", default="test", help="--data: the split to evaluate")
    p.add_argument("--text", nargs="+", type=Path, metavar="FILE",
                   help="raw text files (.txt whole; .jsonl, .csv, .parquet, ...: the documents joined by a blank "
                        "line): sliding-window perplexity and bits per byte, one row per file")
    p.add_argument("--stride", type=int, default=None, help="--text: window step (default: half the context)")
    p.add_argument("--field", default="text", help="--text: JSONL field or table column of the text")
    p.add_argument("--json", action="store_true", help="--text: print one JSON object")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (--text: windows per pass, 8)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from lmforge.commands.evaluate import eval_command, text_eval_command
    if (args.data is None) == (args.text is None):
        raise ValueError("eval: give --data DIR (a prepared folder) or --text FILE... (raw text), one of them")
    if args.text is not None:
        column = int(args.field) if args.field.isdigit() else args.field
        text_eval_command(sys.stdout, args.checkpoint, args.text, stride=args.stride, batch_size=args.batch_size or 8,
                          device=args.device, as_json=args.json, text_field=args.field, text_column=column)
    else:
        eval_command(sys.stdout, args.checkpoint, args.data, args.split, args.batch_size or 32, args.device)
    return 0
