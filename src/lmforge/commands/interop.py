"""Hugging Face interop: `import_hf` (a transformers folder -> an lmforge checkpoint) and
`export_hf` (an lmforge checkpoint -> a folder transformers loads), for BERT, GPT-2 and the
Llama class (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM; `lmforge.models.hf_llama`).

Owns the folder-level work: config translation, the checks, and writing. Reading the
transformers folder is `lmforge.commands.hf_folder`; weight names are mapped by
`lmforge.models.hf`. Export reads the checkpoint's state dict and never builds a model.

Import checks config.json against the weights before anything is allocated: the names and
shapes come from the safetensors headers, go through the name map as meta tensors, and must be
exactly what the architecture holds (`lmforge.checkpoint.model.check_weights_fit`), so a
config.json with a width of 1e9 or 48 layers over 1-layer weights is refused in a moment.

Both write through `lmforge.base.outputs.check_output_folder` (an output may not be, contain or
sit inside its input; an existing folder needs --overwrite and is only replaced by one of the
same kind) while holding the target (`lmforge.base.locks.hold_folder`), and swap the new folder
in whole, so a failed write leaves the old one.

On export a BERT tokenizer gets transformers' "[CLS] A [SEP] B [SEP]" template back, plus
tokenizer_config.json, special_tokens_map.json and vocab.txt, so
`AutoTokenizer.from_pretrained` encodes as BERT does.

An imported model's tokenizer_config.json (with its chat template and special tokens),
generation_config.json and special_tokens_map.json live in the checkpoint beside
tokenizer.json; export writes them back as they are. A Llama trained by lmforge gets a
tokenizer_config.json and a generation_config.json made from its tokenizer's special tokens.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from lmforge.base.locks import hold_folder
from lmforge.base.outputs import check_output_folder
from lmforge.base.tokenizer import load_tokenizer, special_ids
from lmforge.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from lmforge.checkpoint.format import TOKENIZER_EXTRAS
from lmforge.checkpoint.model import check_weights_fit
from lmforge.commands.hf_folder import (LLAMA_FAMILIES, import_tokenizer, import_tokenizer_extras, read_json_object,
                                        read_weights, weight_files, weight_shapes)
from lmforge.data.staging import staged_folder
from lmforge.commands.export_peft import adapter_files, exported_weights, merge_peft, task_form
from lmforge.models import hf, hf_classifier, hf_llama
from lmforge.models.heads import backbone_config
from lmforge.models.lora import ADAPTER_KEYS, without_lora
from lmforge.models.registry import model_from_architecture

_FRESH_HEADS = ("cls.", "bert.pooler.", "backbone.cls.")  # a bare BertModel has none: they start from initialisation


@contextlib.contextmanager
def _writing(out: Path, inputs: tuple[Path, ...], overwrite: bool, kind: str, what: str) -> Iterator[Path]:
    """Hold `out` for the block, once `check_output_folder` allows writing a `kind` folder there.

    Checked before the lock too: an output that is its own input is refused by what it is, not
    reported as busy while the input's own writer holds it."""
    check_output_folder(out, inputs=inputs, overwrite=overwrite, kind=kind)
    with hold_folder(out, what):
        yield check_output_folder(out, inputs=inputs, overwrite=overwrite, kind=kind)


def import_hf(src: Path, out: Path, *, overwrite: bool = False, adapter: Path | None = None) -> Path:
    """Convert the transformers folder `src` (BERT, GPT-2, Llama class; a *ForSequenceClassification
    with its head) into the lmforge checkpoint `out`; with `adapter` (a peft LoRA folder) its
    adapters merged into the weights."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src / 'config.json'} not found: pass a transformers model folder "
                                "(config.json, model.safetensors, tokenizer.json or vocab files)")
    inputs = (src,) if adapter is None else (src, Path(adapter))
    with _writing(out, inputs, overwrite, "checkpoint", "checkpoint"):
        kind, arch = _architecture(src / "config.json")
        files = weight_files(src)
        mapper = {"bert": hf.bert_from_hf, "gpt2": hf.gpt2_from_hf}.get(kind, hf_llama.llama_from_hf)
        arch, mapper, dropped = task_form(read_json_object(src / "config.json"), arch, mapper)
        fresh = _check_weights(arch, mapper, weight_shapes(files), src)
        if dropped:
            print(f"warning: {src}: {len(dropped)} weight(s) of a head lmforge does not use are NOT imported: "
                  f"{', '.join(dropped)}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            tok_file = Path(tmp) / "tokenizer.json"
            import_tokenizer(src, kind).save(str(tok_file))
            extras = import_tokenizer_extras(src, Path(tmp))
            vocab = load_tokenizer(tok_file).get_vocab_size(with_added_tokens=True)
            if vocab > arch["vocab_size"]:
                raise ValueError(f"{src}: the tokenizer has {vocab} tokens but the model only "
                                 f"{arch['vocab_size']} embeddings; the files do not belong together")
            hf_state = read_weights(files)
            state, _ = mapper(hf_state if adapter is None else merge_peft(hf_state, Path(adapter), kind), [])
            model = model_from_architecture(arch)
            if fresh:
                heads = sorted({".".join(k.split(".")[:2]) for k in fresh})
                print(f"note: {src} has no {', '.join(heads)} weights (a bare BertModel); they start from a "
                      "fresh initialisation: fine for embed and classify, train them before using the "
                      "MLM/NSP heads")
                state.update({k: v for k, v in model.state_dict().items() if k in fresh})
            model.load_state_dict(state, strict=False)  # names and shapes were checked against the headers
            save_checkpoint(out, model_state=model.state_dict(), model_config=arch, tokenizer_file=tok_file,
                            tokenizer_extras=extras)
    return out


def _architecture(file: Path) -> tuple[str, dict]:
    """The folder's model_type and the lmforge architecture its config.json describes."""
    hf_config = read_json_object(file)
    kind = hf_config.get("model_type")
    if kind not in ("bert", "gpt2", *LLAMA_FAMILIES):
        raise ValueError(f"{file}: model_type {kind!r} is not supported (bert, gpt2, {', '.join(LLAMA_FAMILIES)})")
    notes: list[str] = []
    try:
        if kind in LLAMA_FAMILIES:
            arch, notes = hf_llama.llama_config_from_hf(hf_config)
        else:
            arch = hf.bert_config_from_hf(hf_config) if kind == "bert" else hf.gpt2_config_from_hf(hf_config)
    except (TypeError, ValueError) as err:  # a field of the wrong type, a feature lmforge lacks
        raise ValueError(f"{file}: {err}") from None
    for note in notes:
        print(f"note: {file}: {note}")
    return kind, arch


def _check_weights(arch: dict, mapper, hf_shapes: dict[str, tuple[int, ...]], src: Path) -> set[str]:
    """Refuse weights that do not fit config.json, from names and shapes alone; the names of the
    BERT heads the weights lack (they start fresh)."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in hf_shapes.items()}
    shapes = {name: tuple(t.shape) for name, t in mapper(meta, [])[0].items()}
    # A one-layer model on the meta device: config.json's values checked, and the BERT heads' shapes.
    layers = arch.get("n_layer")
    probe = dict(arch, n_layer=min(layers, 1)) if isinstance(layers, int) else arch
    try:
        with torch.device("meta"):
            probe_shapes = {k: tuple(v.shape) for k, v in model_from_architecture(probe).state_dict().items()}
    except (RuntimeError, OverflowError, TypeError, ValueError) as err:
        raise ValueError(f"{src / 'config.json'}: {str(err).splitlines()[0]}") from None
    fresh = {k for k in probe_shapes if backbone_config(arch)["model_type"] == "bert" and k.startswith(_FRESH_HEADS)
             and k not in shapes}
    shapes.update({k: probe_shapes[k] for k in fresh})
    check_weights_fit(arch, shapes, src / "config.json")
    return fresh


def export_hf(checkpoint: Path, out: Path, *, overwrite: bool = False, merge: bool = False) -> Path:
    """Write the lmforge checkpoint (GPT, BERT, Llama class, or a classifier on one) as a
    transformers folder at `out`; a LoRA checkpoint with `merge`, its adapters merged in.

    BERT loads with `BertForPreTraining.from_pretrained(out)`, GPT with `GPT2LMHeadModel`, a Llama
    with `LlamaForCausalLM` (Qwen2, Mistral alike), a classifier with
    `AutoModelForSequenceClassification`; the tokenizers with `AutoTokenizer.from_pretrained(out)`.
    """
    source = Path(checkpoint)
    path = resolve_checkpoint(source)
    with _writing(Path(out), (path, source), overwrite, "hf-model", "export target") as out:
        ckpt = load_checkpoint(path)
        arch, state = exported_weights(ckpt, merge)
        with staged_folder(out) as tmp:  # the old folder stays until the new one is complete
            write_hf_folder(arch, state, ckpt.tokenizer_file, ckpt.path, tmp)
    return out


def export_peft(checkpoint: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write a LoRA checkpoint as a peft adapter folder at `out`, with its base as a transformers
    folder in `out/base`: `PeftModel.from_pretrained(AutoModel...from_pretrained(out / "base"), out)`."""
    source = Path(checkpoint)
    path = resolve_checkpoint(source)
    with _writing(Path(out), (path, source), overwrite, "hf-model", "export target") as out:
        ckpt = load_checkpoint(path)
        arch = ckpt.model_config
        if "lora" not in arch:
            raise ValueError(f"{ckpt.path}: not a LoRA checkpoint (no adapters); export it with --format hf")
        base_state = {k: v for k, v in ckpt.state_dict.items() if not ADAPTER_KEYS.search(k)}
        config, tensors = adapter_files(arch, ckpt.state_dict, out.absolute() / "base")
        with staged_folder(out) as tmp:
            (tmp / "base").mkdir()
            write_hf_folder(without_lora(arch), base_state, ckpt.tokenizer_file, ckpt.path, tmp / "base")
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def write_hf_folder(arch: dict, state: dict[str, torch.Tensor], tokenizer_file: Path, checkpoint: Path,
                    folder: Path) -> dict:
    """config.json, model.safetensors and the tokenizer files of the transformers model for
    (arch, state) into `folder`; returns the config."""
    tok = load_tokenizer(tokenizer_file)
    config, weights = hf_form(arch, state, special_ids(tok), checkpoint)
    inner = backbone_config(arch)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _export_tokenizer(tok, inner["model_type"], inner["context"], folder)
    _export_tokenizer_extras(checkpoint, inner["model_type"], config, folder)
    return config


def hf_form(arch: dict, state: dict[str, torch.Tensor], ids, source: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(transformers config.json, weights under transformers' names) of an lmforge model."""
    kind = arch.get("model_type")
    if kind == "classifier":
        body = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        return hf_classifier.classifier_to_hf(arch, state, *hf_form(arch["backbone"], body, ids, source))
    if kind == "bert":
        return hf.bert_config_to_hf(arch, ids.pad), hf.bert_to_hf(state)
    if kind == "llama":
        config = hf_llama.llama_config_to_hf(arch, ids.bos, ids.eos, ids.pad)
        return config, hf_llama.llama_to_hf(state, bool(arch.get("tie_embeddings")))
    if kind == "gpt":
        return hf.gpt2_config_to_hf(arch, ids.bos, ids.eos, ids.pad), hf.gpt2_to_hf(state)
    raise ValueError(f"{source}: model_type {kind!r} cannot be exported to the HF format "
                     "(gpt, bert, llama and classifiers on them can)")


def _export_tokenizer_extras(checkpoint: Path, kind: str, config: dict, folder: Path) -> None:
    """The checkpoint's own tokenizer_config.json, generation_config.json and special_tokens_map.json
    (an imported model's) over the ones made here; a Llama without them gets a generation_config.json."""
    kept = [name for name in TOKENIZER_EXTRAS if (checkpoint / name).is_file()]
    for name in kept:
        (folder / name).write_bytes((checkpoint / name).read_bytes())
    if kind == "llama" and "generation_config.json" not in kept:
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


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
