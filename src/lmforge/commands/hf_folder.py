"""Reading a transformers model folder for `import-hf`: config.json, the weights' names and
shapes (from the safetensors headers, before any tensor is read), the weights, the tokenizer.

Every file is named in its error: a config.json that is no JSON object, a weights file whose
header is damaged or cut short, a shard index that names missing files, a pickle that holds
more than tensors (`pytorch_model.bin` is only read with `torch.load(weights_only=True)`), a
tokenizer.json the tokenizers library does not read.

Tokenizers: lmforge's tokenizer.json has no post-processor template (callers add [CLS]/[SEP]
themselves), so a template that adds special tokens is removed, as are fixed
truncation/padding settings; a folder with only `vocab.txt` (BERT, or a GPT-2 with a BERT
vocabulary as GPT2-chitchat saves its models: BertTokenizerFast's WordPiece) or `vocab.json` +
`merges.txt` (GPT-2) gets a tokenizer.json built from them. A Llama, Qwen2 or Mistral tokenizer
is kept whole, post-processor included, so a prompt starts with BOS where the model expects
one, as in transformers; its tokenizer_config.json (chat template, special tokens),
generation_config.json and special_tokens_map.json are kept beside it (`import_tokenizer_extras`).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from lmforge.base.tokenizer import wordpiece_from_vocab
from lmforge.base.tokenizer_config import read_json_object

_ADDS_SPECIALS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")
LLAMA_FAMILIES = ("llama", "qwen2", "mistral")
"""transformers model types whose tokenizer keeps its post-processor (a Llama's BOS)."""
_INDEX = "model.safetensors.index.json"


def weight_files(src: Path) -> list[Path]:
    """The files that hold the weights: model.safetensors, the shards an index names, or pytorch_model.bin."""
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    index = src / _INDEX
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
            raise ValueError(f'{index}: no "weight_map" from tensor names to shard files')
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if Path(s).name != s or s in (".", "..")]
        if outside:
            raise ValueError(f"{index}: shard names must be files beside it, not paths: {outside[:3]}")
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: shard file(s) {missing[:3]} not found in {src}")
        return [src / s for s in shards]
    if (src / "pytorch_model.bin").is_file():
        return [src / "pytorch_model.bin"]
    raise FileNotFoundError(f"{src}: no model.safetensors (or {_INDEX} / pytorch_model.bin) with the weights")


def weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over all weight files; safetensors headers only, no tensor is read."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        if file.suffix == ".bin":
            shapes.update({name: tuple(t.shape) for name, t in _read_bin(file).items()})
            continue
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except SafetensorError as err:
            raise _damaged(file, err) from None
    return shapes


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".bin":
            state.update(_read_bin(file))
            continue
        try:
            state.update(load_file(str(file)))
        except SafetensorError as err:
            raise _damaged(file, err) from None
    return state


def _damaged(file: Path, err: Exception) -> ValueError:
    return ValueError(f"{file}: not a readable safetensors file ({err}); it is damaged or cut short: "
                      "download or save it again")


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, memory-mapped; only tensors and plain containers may unpickle."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # an old (not zip) file cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{file}: refused, it holds more than plain tensors and lmforge never unpickles "
                         f"code ({str(err).splitlines()[0][:200]}); convert it to model.safetensors with "
                         "transformers (save_pretrained(..., safe_serialization=True))") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{file}: not a readable PyTorch weights file ({str(err).splitlines()[0][:200]}); "
                         "it is damaged or cut short") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{file}: not a state dict of tensor names to tensors")
    return state


def import_tokenizer(src: Path, kind: str) -> Tokenizer:
    """The folder's tokenizer as lmforge keeps it (see the module docstring)."""
    if (src / "tokenizer.json").is_file():
        data = read_json_object(src / "tokenizer.json")
        post = data.get("post_processor") or {}
        if isinstance(post, dict) and post.get("type") in _ADDS_SPECIALS and kind not in LLAMA_FAMILIES:
            data["post_processor"] = None
        data["truncation"], data["padding"] = None, None
        return _built(src / "tokenizer.json", lambda: Tokenizer.from_str(json.dumps(data)))
    tok_cfg = read_json_object(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    if kind == "bert" and (src / "vocab.txt").is_file():
        return _built(src / "vocab.txt", lambda: wordpiece_from_vocab(src / "vocab.txt", tok_cfg))
    if kind == "gpt2" and (src / "vocab.txt").is_file() and not (src / "vocab.json").is_file():
        # GPT2-chitchat's layout: GPT-2 weights with a BERT vocab.txt (BertTokenizerFast)
        return _built(src / "vocab.txt", lambda: wordpiece_from_vocab(src / "vocab.txt", tok_cfg))
    if kind == "gpt2" and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return _built(src / "vocab.json", lambda: _byte_level_bpe(src))
    if kind in LLAMA_FAMILIES:
        raise FileNotFoundError(f"{src}: no tokenizer.json; lmforge reads the fast tokenizer's file (a folder with "
                                "only tokenizer.model: load it with transformers' AutoTokenizer and save_pretrained "
                                "it, which writes tokenizer.json)")
    wanted = "vocab.txt" if kind == "bert" else "vocab.json + merges.txt"
    raise FileNotFoundError(f"{src}: no tokenizer.json (or {wanted}); the checkpoint needs its tokenizer")


def import_tokenizer_extras(src: Path, dest: Path) -> list[Path]:
    """Copy the folder's tokenizer_config.json, generation_config.json and special_tokens_map.json
    to `dest` (each checked to be a JSON object); a chat template kept in chat_template.jinja (or
    chat_template.json) goes into tokenizer_config.json's "chat_template", the one place lmforge
    reads it. Returns the files written."""
    written = []
    config = read_json_object(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else None
    template = _chat_template_file(src)
    if template is not None and (config is None or not config.get("chat_template")):
        config = {**(config or {}), "chat_template": template}
    if config is not None:
        config.pop("auto_map", None)  # code a model repository would run: lmforge never does
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                    encoding="utf-8")
        written.append(dest / "tokenizer_config.json")
    for name in ("generation_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            data = read_json_object(src / name)
            (dest / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(dest / name)
    return written


def _chat_template_file(src: Path) -> str | None:
    if (src / "chat_template.jinja").is_file():
        try:
            return (src / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{src / 'chat_template.jinja'}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if (src / "chat_template.json").is_file():
        template = read_json_object(src / "chat_template.json").get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f'{src / "chat_template.json"}: no "chat_template" string')
        return template
    return None


def _built(file: Path, build) -> Tokenizer:
    try:
        return build()
    except ValueError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exceptions
        raise ValueError(f"{file}: the tokenizers library cannot read it ({err})") from None


def _byte_level_bpe(src: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(["<|endoftext|>"])
    return tok
