"""The `lmforge` command line: argument parsing only; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a tokenizer on your corpus")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE or WordPiece tokenizer")
    p.add_argument("--input", nargs="+", required=True, type=Path, help=".txt, .jsonl, .csv or .tsv files")
    p.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                   help="bpe: byte-level, GPT-2 style; wordpiece: BERT style, CJK one character per token")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json")
    p.add_argument("--special-tokens", nargs="*", default=None, help="override the default special tokens")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--column", default="text", help="CSV/TSV column (name or 0-based index)")
    p.add_argument("--lowercase", action="store_true", help="WordPiece: lowercase (uncased model)")


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into a memory-mapped token store")
    p.add_argument("--task", choices=["lm", "mlm", "classify", "dialogue"], default="lm")
    p.add_argument("--input", nargs="+", required=True, type=Path)
    p.add_argument("--tokenizer", required=True, type=Path, help="tokenizer.json or its folder")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--column", default="text", help="CSV/TSV column (name or 0-based index)")
    p.add_argument("--doc-split", choices=["blank_line", "line", "file"], default="blank_line",
                   help=".txt: one document per blank-line-separated block, per line, or per file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train from CONFIG.yaml; override any field as section.key=value.")
    p.add_argument("config", nargs="?", help="run config (YAML); optional with --resume")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    p.add_argument("--resume", type=Path, help="a run folder (newest complete checkpoint) or a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no console lines (train.log still written)")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a GPT checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses best, else last)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train GPT and BERT models on your own text.")
    from lmforge import __version__
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="bundled Shakespeare -> tokenizer -> data -> GPT -> samples -> report")
    q.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where everything is written")
    q.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    _add_tokenizer(sub)
    _add_prepare(sub)
    _add_train(sub)
    _add_generate(sub)
    r = sub.add_parser("report", help="plots and an HTML page from a run folder")
    r.add_argument("run_dir", type=Path)
    return parser


def _column(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def run(args: argparse.Namespace) -> int:
    if args.command == "quickstart":
        from lmforge.quickstart import quickstart
        quickstart(args.out, minutes=args.minutes)
    elif args.command == "tokenizer":
        from lmforge.tokenizer import train_tokenizer
        path = train_tokenizer(args.input, kind=args.kind, vocab_size=args.vocab_size, out_dir=args.out,
                               special_tokens=args.special_tokens, min_frequency=args.min_frequency,
                               text_field=args.field, text_column=_column(args.column),
                               lowercase=args.lowercase)
        print(f"tokenizer saved: {path}")
    elif args.command == "prepare":
        from lmforge.data.prepare import prepare
        prepare(args.task, args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                test_fraction=args.test_fraction, seed=args.seed, text_field=args.field,
                text_column=_column(args.column), overwrite=args.overwrite,
                doc_split=args.doc_split)
    elif args.command == "train":
        from lmforge.train.entry import train_command
        return train_command(args.config, args.overrides, resume=args.resume, quiet=args.quiet)
    elif args.command == "generate":
        from lmforge.generate import SamplingConfig
        from lmforge.inference import generate_to
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                             seed=args.seed)
        generate_to(sys.stdout, args.checkpoint, args.prompt, cfg, num_samples=args.num_samples,
                    device=args.device)
    elif args.command == "report":
        from lmforge.report import write_report
        print(f"report: {write_report(args.run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
