"""The `lmforge` command line: argument parsing only.

Each subcommand's parser is built by an `_add_*` function, which sets `args.run` to a handler
that calls one library function (the command's module in `lmforge.commands`, or the library
function itself) with the parsed values. Handlers import their module when they run, so a
short command never imports training, plotting or the kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.inference.generate import SamplingConfig


def _column(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",")]


def _keep_freed_memory() -> None:
    """A training process keeps the memory it frees (glibc malloc tuning, process-wide): the
    command line asks for it, the library never does."""
    from lmforge.base.runtime import keep_freed_memory
    keep_freed_memory()


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="bundled Shakespeare -> tokenizer -> data -> GPT -> samples -> report")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where everything is written")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    p.add_argument("--arch", choices=["gpt", "llama"], default="gpt",
                   help="gpt: GPT-2 style; llama: rotary positions, RMSNorm, SwiGLU, grouped-query attention")
    p.set_defaults(run=_quickstart)


def _quickstart(args: argparse.Namespace) -> int:
    from lmforge.commands.quickstart import quickstart
    _keep_freed_memory()
    quickstart(args.out, minutes=args.minutes, arch=args.arch)
    return 0


def _add_init(sub) -> None:
    p = sub.add_parser("init", help="write an example run config to start from (no NAME: list them)")
    p.add_argument("name", nargs="?", help="a task (lm, mlm, classify, dialogue) or an example's name")
    p.add_argument("--out", default=None, help="the file (or folder: ending in /) to write; default ./NAME.yaml")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=_init)


def _init(args: argparse.Namespace) -> int:
    from lmforge.commands.init import init_command
    return init_command(args.name, args.out, overwrite=args.overwrite)


def _add_tokenizer(sub) -> None:
    tok = sub.add_parser("tokenizer", help="train a tokenizer on your corpus")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = tok_sub.add_parser("train", help="train a byte-level BPE or WordPiece tokenizer")
    p.add_argument("--input", nargs="+", required=True, type=Path,
                   help=".txt, .jsonl, .csv or .tsv files, or .gz of them (e.g. corpus.txt.gz, read directly), "
                        ".parquet / .arrow files, `datasets` save_to_disk folders; quoted globs are expanded")
    p.add_argument("--kind", choices=["bpe", "wordpiece"], default="bpe",
                   help="bpe: byte-level, GPT-2 style; wordpiece: BERT style, CJK one character per token")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json")
    p.add_argument("--special-tokens", nargs="*", default=None, help="override the default special tokens")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--column", default="text", help="CSV/TSV/Parquet/Arrow column (name or 0-based index)")
    p.add_argument("--lowercase", action="store_true", help="WordPiece: lowercase (uncased model)")
    p.add_argument("--overwrite", action="store_true", help="replace the tokenizer of an existing folder")
    p.set_defaults(run=_tokenizer)


def _tokenizer(args: argparse.Namespace) -> int:
    from lmforge.base.tokenizer import train_tokenizer
    path = train_tokenizer(args.input, kind=args.kind, vocab_size=args.vocab_size, out_dir=args.out,
                           special_tokens=args.special_tokens, min_frequency=args.min_frequency,
                           text_field=args.field, text_column=_column(args.column), lowercase=args.lowercase,
                           overwrite=args.overwrite)
    print(f"tokenizer saved: {path}")
    return 0


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into a memory-mapped token store")
    p.add_argument("--task", choices=["lm", "mlm", "classify", "dialogue"], default="lm")
    p.add_argument("--input", nargs="+", required=True, type=Path,
                   help=".txt, .jsonl, .csv or .tsv files (classify: .csv/.tsv/.jsonl; dialogue: text or "
                        ".jsonl), or .gz of them; .parquet / .arrow files and `datasets` save_to_disk folders "
                        "(every task); quoted globs ('data/train-*.parquet') are expanded")
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer.json or its folder (a model folder or checkpoint), or a BERT vocab.txt")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--val-fraction", type=float, default=None, help="default 0.05 (classify: 0.1)")
    p.add_argument("--test-fraction", type=float, default=None, help="default 0 (classify: 0.2)")
    p.add_argument("--val", nargs="+", type=Path, default=None, metavar="FILE",
                   help="your own validation file(s): all of it is val, and no --input document is drawn for val")
    p.add_argument("--test", nargs="+", type=Path, default=None, metavar="FILE", help="your own test file(s), as --val")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--column", default="text", help="CSV/TSV/Parquet/Arrow column (name or 0-based index)")
    p.add_argument("--doc-split", choices=["blank_line", "line", "file"], default="blank_line",
                   help=".txt: one document per blank-line-separated block, per line, or per file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c = p.add_argument_group("classify (labelled texts; the text column is --column, or --field for JSONL)")
    c.add_argument("--format", choices=["auto", "csv", "tsv", "jsonl", "sms"], default="auto",
                   help="auto: by extension; sms: the SMS Spam Collection as distributed (label<TAB>text, no header)")
    c.add_argument("--label-column", default="label", help="CSV/TSV column or JSONL field of the label")
    c.add_argument("--no-header", action="store_true", help="CSV/TSV without a header row (name columns with --columns)")
    c.add_argument("--columns", default=None, help="names of the columns of a header-less file, e.g. label,text")
    c.add_argument("--labels", default=None, help="the allowed labels in id order, e.g. ham,spam (default: sorted)")
    c.add_argument("--balance", action="store_true", help="undersample every class to the smallest one")
    c.add_argument("--regression", action="store_true", help="the label column is a number to predict (model.num_labels: 1)")
    c.add_argument("--max-tokens", type=int, default=None, help="truncate each text to this many tokens")
    p.add_argument("--max-len", type=int, default=None,
                   help="dialogue: keep each dialogue's most recent whole turns within this many "
                        "tokens (default: keep all; training trims to the model context anyway)")
    p.add_argument("--chat-format", choices=["auto", "template", "chitchat"], default="auto",
                   help="dialogue: auto renders with the tokenizer folder's chat template when it has one "
                        "(loss on the assistant's turns), else GPT2-chitchat's [CLS] u1 [SEP] u2 [SEP]")
    p.set_defaults(run=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    for split in ("val", "test"):
        if getattr(args, split) and getattr(args, f"{split}_fraction") is not None:
            raise ValueError(f"--{split} and --{split}-fraction: give one (the --{split} files are the whole "
                             f"{split} split)")
    fixed = dict(val_files=args.val, test_files=args.test)
    if args.task == "classify":
        from lmforge.data.prepare_classify import prepare_classify
        prepare_classify(args.input, args.tokenizer, args.out, fmt=args.format,
                         text_column=args.field if args.field != "text" else _column(args.column),
                         label_column=_column(args.label_column), header=not args.no_header,
                         columns=_names(args.columns), labels=_names(args.labels),
                         val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                         test_fraction=0.2 if args.test_fraction is None else args.test_fraction,
                         seed=args.seed, balance=args.balance, max_tokens=args.max_tokens,
                         overwrite=args.overwrite, regression=args.regression, **fixed)
        return 0
    from lmforge.data.prepare import prepare
    prepare(args.task, args.input, args.tokenizer, args.out,
            val_fraction=0.05 if args.val_fraction is None else args.val_fraction,
            test_fraction=args.test_fraction or 0.0, seed=args.seed, text_field=args.field,
            text_column=_column(args.column), overwrite=args.overwrite,
            doc_split=args.doc_split, max_len=args.max_len, **fixed, chat_format=args.chat_format)
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train from CONFIG.yaml; override any field as section.key=value.")
    p.add_argument("config", nargs="?", help="run config (YAML); optional with --resume")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    p.add_argument("--resume", type=Path, help="a run folder (newest complete checkpoint) or a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no console lines (train.log still written)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit; no training")
    p.set_defaults(run=_train)


def _train(args: argparse.Namespace) -> int:
    if args.print_config:
        from lmforge.cli_config import print_train_config
        return print_train_config(args)
    from lmforge.train.entry import train_command
    _keep_freed_memory()
    return train_command(args.config, args.overrides, resume=args.resume, quiet=args.quiet)


def _add_sampling(p, *, length_flag: str, length: int, top_k: int | None, repetition_penalty: float,
                  penalty_help: str | None = None) -> None:
    """The checkpoint and the sampling options `generate` and `chat` share, with their own defaults."""
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses best, else last)")
    p.add_argument(length_flag, type=int, default=length)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=top_k)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=repetition_penalty, help=penalty_help)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")


def _sampling(args: argparse.Namespace, length_flag: str) -> SamplingConfig:
    """The sampling options as a SamplingConfig; its errors name the flags."""
    from lmforge.inference.generate import SamplingConfig
    fields = {"max_new_tokens": length_flag, "temperature": "--temperature", "top_k": "--top-k",
              "top_p": "--top-p", "repetition_penalty": "--repetition-penalty", "seed": "--seed"}
    try:
        return SamplingConfig(**{field: getattr(args, flag[2:].replace("-", "_")) for field, flag in fields.items()})
    except ValueError as err:
        message = str(err).removeprefix("invalid sampling config: ")
        for field, flag in fields.items():
            message = message.replace(f"{field}=", f"{flag} ").replace(" or None", "")
        raise ValueError(message) from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a GPT checkpoint")
    _add_sampling(p, length_flag="--max-new-tokens", length=200, top_k=None, repetition_penalty=1.0)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--num-samples", type=int, default=1)
    p.set_defaults(run=_generate)


def _generate(args: argparse.Namespace) -> int:
    from lmforge.commands.generate import generate_command
    generate_command(sys.stdout, args.checkpoint, args.prompt, _sampling(args, "--max-new-tokens"),
                     num_samples=args.num_samples, device=args.device)
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat with a dialogue GPT (keeps the history)",
                       description="Interactive on a terminal (/reset /history /save FILE /quit; "
                                   "Ctrl-C stops a reply, Ctrl-D leaves). With standard input not a "
                                   "terminal, every line is a turn and gets one reply line; a blank "
                                   "line starts a new conversation.")
    _add_sampling(p, length_flag="--max-reply-tokens", length=50, top_k=8, repetition_penalty=1.2,
                  penalty_help="> 1 lowers tokens already in the context (1 = off)")
    p.add_argument("--max-history", type=int, default=3,
                   help="turns in the context, the new one included (GPT2-chitchat: 3)")
    p.add_argument("--transcript", type=Path, default=None,
                   help="save the conversation here when the chat ends (.txt, or .jsonl as messages)")
    p.add_argument("--chat-format", choices=["auto", "template", "chitchat"], default="auto",
                   help="auto: the checkpoint's chat template when it has one, else GPT2-chitchat's format")
    p.add_argument("--system", default=None, help="a system message put before the conversation")
    p.set_defaults(run=_chat)


def _chat(args: argparse.Namespace) -> int:
    from lmforge.commands.chat import run_chat
    return run_chat(args.checkpoint, _sampling(args, "--max-reply-tokens"), max_history=args.max_history,
                    device=args.device, transcript=args.transcript, chat_format=args.chat_format,
                    system=args.system)


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label texts with a fine-tuned classifier")
    p.add_argument("checkpoint", help="a classifier checkpoint, or a run folder (uses best, else last)")
    p.add_argument("texts", nargs="*", help="texts to classify (prints label and probability)")
    p.add_argument("--input", type=Path, help="a file of texts (.txt: one per line, a blank line is an empty "
                                              "text; .csv/.tsv/.jsonl: --column); row i of the output is text i")
    p.add_argument("--output", type=Path, help="CSV of text,label,probability for --input (default: stdout)")
    p.add_argument("--column", default="text", help="CSV/TSV column or JSONL field of the text in --input")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_classify)


def _classify(args: argparse.Namespace) -> int:
    from lmforge.commands.classify import classify_command
    classify_command(sys.stdout, args.checkpoint, args.texts, input_file=args.input, output=args.output,
                     text_column=_column(args.column), batch_size=args.batch_size, device=args.device)
    return 0


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="token and sentence vectors from a BERT or GPT checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses best, else last)")
    p.add_argument("text", nargs="?", help="the text (BERT: sentence A)")
    p.add_argument("text_b", nargs="?", help="BERT: sentence B of a pair")
    p.add_argument("--input", type=Path, help="many texts: one per line (.txt; a blank line is an empty text), "
                                              "a \"text\" field (.jsonl) or column (.csv/.tsv); row i of the "
                                              "output is text i")
    p.add_argument("--out", type=Path, help=".json (default: stdout) or .npy (sentence vectors only)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="sentence vector for .npy")
    p.add_argument("--per-token", action="store_true", help="JSON: add the per-token vectors")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_embed)


def _embed(args: argparse.Namespace) -> int:
    from lmforge.commands.embed import embed_command
    embed_command(args.checkpoint, [args.text] if args.text is not None else [], args.text_b,
                  input_file=args.input, out=args.out, pooling=args.pooling, per_token=args.per_token,
                  device=args.device)
    return 0


def _add_interop(sub) -> None:
    p = sub.add_parser("import-hf", help="a transformers BERT, GPT-2, Llama, Qwen2 or Mistral folder -> an lmforge checkpoint")
    p.add_argument("src", type=Path, help="folder with config.json, model.safetensors, tokenizer files")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    p.add_argument("--adapter", type=Path, help="a peft LoRA folder (adapter_config.json, adapter_model.safetensors) "
                                                "for this model: merged into the weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_import_hf)
    p = sub.add_parser("export", help="an lmforge checkpoint -> a folder transformers loads")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (uses best, else last)")
    p.add_argument("--format", choices=["hf", "peft"], default="hf",
                   help="hf: a transformers model folder; peft: a LoRA run's adapter folder, its base in OUT/base")
    p.add_argument("--merge", action="store_true", help="hf format of a LoRA run: its adapters merged in")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_export)


def _import_hf(args: argparse.Namespace) -> int:
    from lmforge.commands.interop import import_hf
    print(f"checkpoint written: {import_hf(args.src, args.out, overwrite=args.overwrite, adapter=args.adapter)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "peft":
        from lmforge.commands.interop import export_peft
        print(f"exported (peft): {export_peft(args.checkpoint, args.out, overwrite=args.overwrite)}")
        return 0
    from lmforge.commands.interop import export_hf
    out = export_hf(args.checkpoint, args.out, overwrite=args.overwrite, merge=args.merge)
    print(f"exported ({args.format}{', merged' if args.merge else ''}): {out}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="plots and an HTML page from a run folder")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    from lmforge.report import write_report
    print(f"report: {write_report(args.run_dir)}")
    return 0


def _add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="build lmforge's CPU kernels now (else the first CPU run does) and say if they load")
    p.set_defaults(run=_kernels)


def _kernels(args: argparse.Namespace) -> int:
    from lmforge.ops import kernels
    if kernels.ops() is None:
        print(f"lmforge CPU kernels: off, torch's attention and softmax are used ({kernels.unavailable_reason()})")
    else:
        print(f"lmforge CPU kernels: loaded from {kernels.build_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train GPT and BERT models on your own text.")
    from lmforge.base.version import __version__
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    from lmforge import cli_eval
    from lmforge import cli_config, cli_serve
    for add in (_add_quickstart, _add_init, _add_tokenizer, _add_prepare, _add_train, _add_generate, _add_classify,
                cli_eval.add, _add_chat, _add_embed, _add_interop, _add_report, _add_kernels, cli_serve.add,
                cli_config.add):
        add(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; its exit status."""
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train cfg.yaml --quiet train.lr=1e-3`: overrides after an option are still overrides.
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine, not the user's input: disk full, I/O error, too many files
        import errno
        full = (err.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
                or " requested and " in str(err))  # numpy's tofile: a short write, no errno
        print(f"error: {'disk full: ' if full else ''}{err}"
              + ("; free some space (or choose another output folder) and run it again" if full else ""),
              file=sys.stderr)
        return 1
