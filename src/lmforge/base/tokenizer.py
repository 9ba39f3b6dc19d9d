"""Tokenizers: train, save, load (Hugging Face `tokenizers`), special token ids, decoding.

Two kinds, both saved as one `tokenizer.json`:

- "bpe": byte-level BPE as in GPT-2 (ByteLevel pre-tokenizer without a prefix space,
  ByteLevel decoder, no normalizer). Any text, newlines and Chinese included, round-trips
  exactly through encode/decode. Specials: <|endoftext|> (eos, also bos), <|pad|>.
- "wordpiece": as in BERT (BertNormalizer with Chinese characters split one per token,
  lowercasing optional, BertPreTokenizer, WordPiece decoder with "##"). Specials: [PAD],
  [UNK], [CLS], [SEP], [MASK]; [SEP] is the eos for generation.

No post-processor template is added: callers put [CLS]/[SEP]/EOS in themselves, so
`encode(text).ids` is exactly the text's tokens. Training streams the inputs (see
`lmforge.base.readers`) through `train_from_iterator`, so a corpus larger than memory works.
It holds the output folder for its whole run (`lmforge.base.locks.hold_folder`) and writes
there only after the shared output guard (`lmforge.base.outputs.check_output_folder`, kind
"tokenizer") agrees: never over a data folder, a checkpoint or a run, and over another
tokenizer only with `overwrite`. Fault point (`lmforge.base.faults`): tokenizer_before_save.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.base.faults import fault_point
from lmforge.base.locks import hold_folder, pid_alive
from lmforge.base.outputs import check_output_folder
from lmforge.base.readers import check_inputs, iter_texts
from lmforge.base.tokenizer_config import TokenizerSettings, as_transformers_builds, tokenizer_settings

BPE_SPECIALS = ["<|endoftext|>", "<|pad|>"]
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
KINDS = ("bpe", "wordpiece")
VOCAB_TXT = "vocab.txt"  # a BERT vocabulary: `load_tokenizer` builds the WordPiece tokenizer from it
_BATCH = 1000  # texts handed to the Rust trainer at a time


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens a tokenizer has (None where it has no such token)."""

    eos: int | None
    pad: int | None
    bos: int | None
    cls: int | None
    sep: int | None
    mask: int | None
    unk: int | None


def _new_tokenizer(kind: str, lowercase: bool) -> Tokenizer:
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only, as GPT-2
        return tok
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _specials_for(kind: str, special_tokens: Sequence[str] | None) -> list[str]:
    """The kind's required specials first (in their fixed order), then any extra ones given."""
    base = list(BPE_SPECIALS if kind == "bpe" else WORDPIECE_SPECIALS)
    return base + [t for t in dict.fromkeys(special_tokens or []) if t not in base]


def _batches(texts: Iterator[str], counter: dict) -> Iterator[list[str]]:
    batch: list[str] = []
    try:
        for text in texts:
            counter["texts"] += 1
            batch.append(text)
            if len(batch) >= _BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
    except Exception as e:  # the Rust trainer re-raises it as a plain Exception: keep the original
        counter["error"] = e
        raise


def _trainer(kind: str, vocab_size: int, min_frequency: int, specials: list[str], show_progress: bool):
    progress = show_progress and sys.stderr.isatty()
    if kind == "bpe":
        return trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                   show_progress=progress, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                     show_progress=progress, continuing_subword_prefix="##")


def train_tokenizer(inputs: list[Path], *, kind: Literal["bpe", "wordpiece"], vocab_size: int,
                    out_dir: Path, special_tokens: list[str] | None = None, min_frequency: int = 2,
                    text_field: str = "text", text_column: str | int = "text",
                    lowercase: bool = False, show_progress: bool = True, overwrite: bool = False) -> Path:
    """Train a tokenizer on `inputs` and write `out_dir/tokenizer.json`; returns that path.

    `special_tokens` adds to the kind's required specials (which always come first: ids 0, 1, ...).
    `lowercase` applies to wordpiece only (byte-level BPE never normalizes, to round-trip exactly).
    `overwrite`: replace the tokenizer of an existing non-empty `out_dir` (refused otherwise, and
    always for a folder holding prepared data, a checkpoint or a run).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    paths = check_inputs(inputs)
    specials = _specials_for(kind, special_tokens)
    smallest = len(specials) + (256 if kind == "bpe" else 1)
    if vocab_size < smallest:
        what = "256 bytes + " if kind == "bpe" else "1 + "
        raise ValueError(f"vocab_size {vocab_size} is too small for {kind}: it needs at least "
                         f"{smallest} ({what}{len(specials)} special tokens)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    out_dir = Path(out_dir)
    with hold_folder(out_dir, "tokenizer folder"):
        check_output_folder(out_dir, inputs=paths, overwrite=overwrite, kind="tokenizer")
        tok = _new_tokenizer(kind, lowercase)
        counter: dict = {"texts": 0, "error": None}
        texts = iter_texts(paths, text_field=text_field, text_column=text_column)
        try:
            tok.train_from_iterator(_batches(texts, counter),
                                    trainer=_trainer(kind, vocab_size, min_frequency, specials, show_progress))
        except Exception:
            if counter["error"] is not None:
                raise counter["error"] from None
            raise
        if counter["texts"] == 0:
            raise ValueError(f"no text found in {', '.join(str(p) for p in paths)}: the corpus is empty "
                             f"(only blank lines, or no rows)")
        _note_smaller_vocabulary(tok, kind, vocab_size, min_frequency)
        fault_point("tokenizer_before_save")
        return _save(tok, out_dir)


def _note_smaller_vocabulary(tok: Tokenizer, kind: str, asked: int, min_frequency: int) -> None:
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < asked:
        what = "pairs of tokens to merge" if kind == "bpe" else "words or subwords"
        print(f"note: vocab_size {asked:,} asked, {got:,} tokens made: the corpus has no more {what} "
              f"occurring at least min_frequency={min_frequency} times; a larger corpus (or a lower "
              f"--min-frequency) gives more", file=sys.stderr)


def _save(tok: Tokenizer, out_dir: Path) -> Path:
    """Write `out_dir/tokenizer.json` through a temp file renamed into place; temp files of
    killed earlier runs are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for left in out_dir.glob(".tokenizer.json.tmp-*"):
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            left.unlink(missing_ok=True)
    path = out_dir / "tokenizer.json"
    tmp = out_dir / f".tokenizer.json.tmp-{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, path)
    return path


def tokenizer_file(path: Path) -> Path:
    """The tokenizer file that `path` names: a tokenizer.json (the file itself or a folder holding
    one), or a BERT `vocab.txt` (the file, or a folder holding one and no tokenizer.json, as
    GPT2-chitchat's model folders do), which `load_tokenizer` builds a WordPiece tokenizer from."""
    path = Path(path)
    if path.is_dir() and not (path / "tokenizer.json").exists() and (path / VOCAB_TXT).is_file():
        return path / VOCAB_TXT
    if path.is_dir() and path.name != "tokenizer.json":
        path = path / "tokenizer.json"
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a tokenizer.json file")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} does not exist; train one with "
                                f"`lmforge tokenizer train` or pass the folder holding tokenizer.json")
    return path


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json file or a folder holding one (or a BERT vocab.txt,
    see `tokenizer_file`); a damaged file is a ValueError naming it and what is wrong, never a
    traceback from the Rust side."""
    file = tokenizer_file(path)
    if file.suffix == ".txt":
        return wordpiece_from_vocab(file)
    try:
        tok = Tokenizer.from_file(str(file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a bare Exception for malformed files; a PanicException (BaseException) may come
        raise ValueError(f"{file}: not a valid tokenizer.json: {_damage(file, e)}; train one with `lmforge "
                         f"tokenizer train`, or put back the tokenizer.json the data or model was made with") from None
    return as_transformers_builds(tok, tokenizer_settings(file))  # a Llama file: transformers' own pipeline


def wordpiece_from_vocab(vocab_file: Path, options: dict | None = None) -> Tokenizer:
    """A BERT WordPiece tokenizer from a `vocab.txt` (one token per line, the line number its id),
    as transformers' BertTokenizerFast builds it: lowercase, Chinese characters one token each,
    no post-processor (callers add [CLS]/[SEP]). `options` are tokenizer_config.json's keys
    (do_lower_case, tokenize_chinese_chars, strip_accents, unk_token); None reads the
    tokenizer_config.json beside the file, if any."""
    vocab_file = Path(vocab_file)
    if options is None:
        config = vocab_file.parent / "tokenizer_config.json"
        options = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        options = options if isinstance(options, dict) else {}
    try:
        lines = vocab_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{vocab_file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    vocab: dict[str, int] = {}
    for i, line in enumerate(lines):
        vocab.setdefault(line.rstrip("\n"), i)
    unk = options.get("unk_token", "[UNK]") if isinstance(options.get("unk_token", "[UNK]"), str) else "[UNK]"
    if unk not in vocab:
        raise ValueError(f"{vocab_file}: no {unk} token among its {len(vocab):,} lines; a BERT vocab.txt holds "
                         f"[PAD], [UNK], [CLS], [SEP] and [MASK] as well as the words")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True) is not False,
        strip_accents=options.get("strip_accents"), lowercase=options.get("do_lower_case", True) is not False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in WORDPIECE_SPECIALS if t in vocab])
    return tok


def _damage(file: Path, error: BaseException) -> str:
    """What is wrong with a tokenizer.json the library refused, in words."""
    try:
        data = json.loads(file.read_bytes())
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    except json.JSONDecodeError as e:
        return f"broken JSON at line {e.lineno}, column {e.colno} ({e.msg})"
    except (ValueError, RecursionError):
        return "it is not JSON"
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(type(data), "a number")
        return f"the JSON is {kind}, not an object with the tokenizer's \"model\""
    return str(error).strip() or type(error).__name__


def special_ids(tok: Tokenizer, settings: TokenizerSettings | None = None) -> SpecialIds:
    """Special token ids by name; works for our BPE and WordPiece and for GPT-2/BERT files.

    `settings` (`lmforge.base.tokenizer_config.tokenizer_settings` of the tokenizer's folder):
    the tokens a Hugging Face folder names (a Llama's <s> and </s>, a Qwen2's <|im_end|>) win
    over the names guessed here; a folder that names no bos_token has none, as in transformers."""

    def find(*names: str) -> int | None:
        for name in names:
            i = tok.token_to_id(name)
            if i is not None:
                return i
        return None

    sep = find("[SEP]")
    cls = find("[CLS]")
    endoftext = find("<|endoftext|>")
    ids = SpecialIds(
        eos=endoftext if endoftext is not None else sep,
        pad=find("<|pad|>", "[PAD]"),
        bos=endoftext if endoftext is not None else cls,  # GPT-2: bos = eos; BERT-style: [CLS]
        cls=cls, sep=sep, mask=find("[MASK]"), unk=find("[UNK]", "<|unk|>"),
    )
    if settings is None or not settings.tokens:
        return ids
    named = {key.removesuffix("_token"): tok.token_to_id(text) for key, text in settings.tokens.items()}
    if "bos" not in named and settings.config and "bos_token" in settings.config:
        named["bos"] = None  # the config says null: no BOS (Qwen2)
    return dataclasses.replace(ids, **{k: v for k, v in named.items() if v is not None or k == "bos"})


def decode(tok: Tokenizer, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
    """Ids -> text. Keeps special tokens by default, so BPE round-trips exactly."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
