"""Hugging Face interop: `import_hf` (a transformers folder -> an lmforge checkpoint) and
`export_hf` (an lmforge checkpoint -> a folder transformers loads), for BERT and GPT-2.

Owns the folder-level work: reading config.json / model.safetensors (or a `pytorch_model.bin`,
read only with `torch.load(weights_only=True)`), config translation and the tokenizer files.
Weight names are mapped by `lmforge.models.hf`. Export reads the checkpoint's state dict and
never builds a model; import builds one only to check the mapped weights fit it.

Tokenizers: lmforge's tokenizer.json has no post-processor template (callers add [CLS]/[SEP]
themselves), so on import a template that adds special tokens is removed, as are fixed
truncation/padding settings; a folder with only `vocab.txt` (BERT) or `vocab.json` +
`merges.txt` (GPT-2) gets a tokenizer.json built from them. On export a BERT tokenizer gets
transformers' "[CLS] A [SEP] B [SEP]" template back, plus tokenizer_config.json,
special_tokens_map.json and vocab.txt, so `AutoTokenizer.from_pretrained` encodes as BERT does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.models import hf
from lmforge.models.registry import model_from_architecture
from lmforge.base.tokenizer import load_tokenizer, special_ids
from lmforge.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint

_ADDS_SPECIALS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def import_hf(src: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Convert the transformers folder `src` (BERT or GPT-2) into the lmforge checkpoint `out`."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src / 'config.json'} not found: pass a transformers model folder "
                                "(config.json, model.safetensors, tokenizer.json or vocab files)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    hf_config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    kind = hf_config.get("model_type")
    if kind not in ("bert", "gpt2"):
        raise ValueError(f"{src / 'config.json'}: model_type {kind!r} is not supported (bert, gpt2)")
    arch = hf.bert_config_from_hf(hf_config) if kind == "bert" else hf.gpt2_config_from_hf(hf_config)
    # not lmforge.checkpoint.load_model: there is no checkpoint yet, the weights come in under HF names
    model = model_from_architecture(arch)
    expected = list(model.state_dict())
    mapper = hf.bert_from_hf if kind == "bert" else hf.gpt2_from_hf
    state, missing = mapper(_read_hf_weights(src), expected)
    fresh = {k for k in missing if k.startswith(("cls.", "bert.pooler."))}
    if set(missing) - fresh:
        raise ValueError(f"{src}: the weights lack {sorted(set(missing) - fresh)[:5]} "
                         f"({len(set(missing) - fresh)} tensors); is this a complete {kind} checkpoint?")
    if fresh:  # a bare BertModel: its pretraining heads start from lmforge's initialisation
        heads = sorted({".".join(k.split(".")[:2]) for k in fresh})
        print(f"note: {src} has no {', '.join(heads)} weights (a bare BertModel); they start from a fresh "
              "initialisation: fine for embed and classify, train them before using the MLM/NSP heads")
        state.update({k: v for k, v in model.state_dict().items() if k in fresh})
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch
        raise ValueError(f"{src}: weights do not fit config.json ({err})") from None
    if result.unexpected_keys:
        raise ValueError(f"{src}: unexpected weights {result.unexpected_keys[:5]} for a {kind} model")
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        _import_tokenizer(src, kind).save(str(tok_file))
        vocab = load_tokenizer(tok_file).get_vocab_size(with_added_tokens=True)
        if vocab > arch["vocab_size"]:
            raise ValueError(f"{src}: the tokenizer has {vocab} tokens but the model only "
                             f"{arch['vocab_size']} embeddings; the files do not belong together")
        save_checkpoint(out, model_state=model.state_dict(), model_config=arch, tokenizer_file=tok_file)
    return out


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(src / shard)))
        return state
    if (src / "pytorch_model.bin").is_file():
        try:  # pickle, but only tensors and plain containers are allowed to unpickle
            state = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{src / 'pytorch_model.bin'}: refused, it holds more than plain tensors "
                             f"and lmforge never unpickles code ({err}); convert it to model.safetensors "
                             "with transformers (save_pretrained(..., safe_serialization=True))") from None
        if not isinstance(state, dict):
            raise ValueError(f"{src / 'pytorch_model.bin'}: not a state dict")
        return state
    raise FileNotFoundError(f"{src}: no model.safetensors (or model.safetensors.index.json / "
                            "pytorch_model.bin) with the weights")


def _import_tokenizer(src: Path, kind: str) -> Tokenizer:
    if (src / "tokenizer.json").is_file():
        data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        post = data.get("post_processor") or {}
        if post.get("type") in _ADDS_SPECIALS:
            data["post_processor"] = None
        data["truncation"], data["padding"] = None, None
        return Tokenizer.from_str(json.dumps(data))
    tok_cfg = {}
    if (src / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if kind == "bert" and (src / "vocab.txt").is_file():
        return _wordpiece_from_vocab(src / "vocab.txt", tok_cfg)
    if kind == "gpt2" and (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        tok = Tokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.add_special_tokens(["<|endoftext|>"])
        return tok
    wanted = "vocab.txt" if kind == "bert" else "vocab.json + merges.txt"
    raise FileNotFoundError(f"{src}: no tokenizer.json (or {wanted}); the checkpoint needs its tokenizer")


def _wordpiece_from_vocab(vocab_file: Path, tok_cfg: dict) -> Tokenizer:
    """A BERT WordPiece tokenizer from vocab.txt, as transformers' BertTokenizerFast builds it."""
    vocab = {}
    for i, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line.rstrip("\n"), i)
    tok = Tokenizer(models.WordPiece(vocab, unk_token=tok_cfg.get("unk_token", "[UNK]"),
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tok_cfg.get("tokenize_chinese_chars", True),
        strip_accents=tok_cfg.get("strip_accents"), lowercase=tok_cfg.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    return tok


def export_hf(checkpoint: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write the lmforge checkpoint (GPT or BERT) as a transformers folder at `out`.

    BERT loads with `BertForPreTraining.from_pretrained(out)`, GPT with
    `GPT2LMHeadModel.from_pretrained(out)`; both tokenizers with `AutoTokenizer.from_pretrained(out)`.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} already exists; choose another --out or pass --overwrite")
    ckpt = load_checkpoint(resolve_checkpoint(Path(checkpoint)))
    arch = ckpt.model_config
    kind = arch.get("model_type")
    if kind not in ("gpt", "bert"):
        raise ValueError(f"{ckpt.path}: model_type {kind!r} cannot be exported to the HF format "
                         "(gpt and bert can)")
    tok = load_tokenizer(ckpt.tokenizer_file)
    ids = special_ids(tok)
    if kind == "bert":
        config, weights = hf.bert_config_to_hf(arch, ids.pad), hf.bert_to_hf(ckpt.state_dict)
    else:
        config = hf.gpt2_config_to_hf(arch, ids.bos, ids.eos, ids.pad)
        weights = hf.gpt2_to_hf(ckpt.state_dict)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _export_tokenizer(tok, kind, arch["context"], tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_tokenizer(tok: Tokenizer, kind: str, context: int, folder: Path) -> None:
    ids = special_ids(tok)
    names = {"unk_token": ids.unk, "sep_token": ids.sep, "pad_token": ids.pad, "cls_token": ids.cls,
             "mask_token": ids.mask, "bos_token": ids.bos, "eos_token": ids.eos}
    specials = {k: tok.id_to_token(v) for k, v in names.items() if v is not None}
    data = json.loads(tok.to_str())
    is_wordpiece = data["model"]["type"] == "WordPiece"
    if kind == "bert":
        if ids.cls is None or ids.sep is None:
            raise ValueError("this BERT's tokenizer has no [CLS]/[SEP] tokens; it cannot be exported")
        cls, sep = tok.id_to_token(ids.cls), tok.id_to_token(ids.sep)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids.cls), (sep, ids.sep)])
        specials = {k: v for k, v in specials.items() if k not in ("bos_token", "eos_token")}
        tok_class = "BertTokenizer"
    elif data["model"]["type"] == "BPE" and (data.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        tok_class = "GPT2Tokenizer"
        specials = {k: v for k, v in specials.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    else:
        tok_class = "PreTrainedTokenizerFast"
    tok.save(str(folder / "tokenizer.json"))
    tok_config = {"tokenizer_class": tok_class, "model_max_length": context, **specials}
    if kind == "bert":
        tok_config["do_lower_case"] = bool((data.get("normalizer") or {}).get("lowercase", False))
    if tok_class == "GPT2Tokenizer":
        tok_config["add_prefix_space"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    if is_wordpiece:
        vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
