"""Model construction from a run config or a checkpoint's config.json, for every model family."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.base.config import ModelConfig
from lmforge.models.bert import BERT_PRESETS, Bert, BertConfig
from lmforge.models.bert import flops_per_token as bert_flops_per_token
from lmforge.models.gpt import GPT, GPT_PRESETS, GPTConfig
from lmforge.models.gpt import flops_per_token as gpt_flops_per_token
from lmforge.models.llama import Llama
from lmforge.models.llama_config import LLAMA_PRESETS, LlamaConfig
from lmforge.models.llama_config import flops_per_token as llama_flops_per_token
from lmforge.models.heads import SequenceClassifier
from lmforge.models.lora import add_adapters, without_lora


PRESETS = {"gpt": GPT_PRESETS, "bert": BERT_PRESETS, "llama": LLAMA_PRESETS}
LLAMA_FIELDS = ("n_kv_head", "rope_theta", "rms_norm_eps", "mlp_bias", "tie_embeddings")
"""model.* keys a Llama-class architecture takes as they are (None: the preset's or the default)."""


def architecture(cfg: ModelConfig, vocab_size: int) -> dict:
    """The architecture dict (`config.json` of a checkpoint): preset, then explicit fields."""
    presets = PRESETS[cfg.kind]
    if cfg.preset is not None and cfg.preset not in presets:
        raise ValueError(f"model.preset: unknown {cfg.kind} preset {cfg.preset!r} (valid: {', '.join(presets)})")
    arch = dict(presets[cfg.preset]) if cfg.preset else {}
    for name in ("n_layer", "n_head", "n_embd", "context"):
        value = getattr(cfg, name)
        if value is not None:
            arch[name] = value
    missing = [n for n in ("n_layer", "n_head", "n_embd", "context") if n not in arch]
    if missing:
        raise ValueError(f"model: set a preset or all of n_layer, n_head, n_embd, context (missing: {', '.join(missing)})")
    arch.update(vocab_size=vocab_size, dropout=cfg.dropout)
    if cfg.intermediate_size is not None:
        arch["intermediate_size"] = cfg.intermediate_size
    if cfg.kind == "llama":
        return {"model_type": "llama", **_llama_fields(cfg, arch)}
    _refuse_llama_fields(cfg)
    arch["hidden_act" if cfg.kind == "bert" else "activation"] = cfg.activation
    return {"model_type": cfg.kind, **arch}


def _llama_fields(cfg: ModelConfig, arch: dict) -> dict:
    """`arch` with the model.* keys only a Llama-class model has."""
    for name in LLAMA_FIELDS:
        value = getattr(cfg, name)
        if value is not None:
            arch[name] = value
    if cfg.attention_bias is not None:
        arch["attention_bias"] = cfg.attention_bias
    if cfg.rope_scaling != "none":
        arch["rope_scaling"] = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
    LlamaConfig.from_dict(arch)  # its checks, named, before any work
    return arch


def _refuse_llama_fields(cfg: ModelConfig) -> None:
    given = [f"model.{name}" for name in (*LLAMA_FIELDS, "attention_bias") if getattr(cfg, name) is not None]
    given += ["model.rope_scaling"] if cfg.rope_scaling != "none" else []
    if given:
        raise ValueError(f"{', '.join(given)}: only a Llama-class model has them; set model.kind=llama "
                         f"or leave them out (model.kind={cfg.kind})")


def model_from_architecture(arch: dict) -> nn.Module:
    if "lora" in arch:  # the model underneath, with low-rank adapters (lmforge.models.lora)
        return add_adapters(model_from_architecture(without_lora(arch)), arch["lora"])
    kind = arch.get("model_type")
    if kind == "gpt":
        return GPT(GPTConfig.from_dict({k: v for k, v in arch.items() if k != "model_type"}))
    if kind == "bert":
        return Bert(BertConfig.from_dict({k: v for k, v in arch.items() if k != "model_type"}))
    if kind == "llama":
        return Llama(LlamaConfig.from_dict(arch))
    if kind == "classifier":  # a GPT/BERT backbone + classification head (lmforge.models.heads)
        return classifier_from_architecture(arch)
    raise ValueError(f"config.json: unknown model_type {kind!r} (valid: gpt, bert, llama, classifier)")


def classifier_from_architecture(arch: dict) -> SequenceClassifier:
    """Build a SequenceClassifier from its config.json (weights initialised, not loaded)."""
    missing = [k for k in ("backbone", "num_labels", "pooling") if k not in arch]
    if missing:
        raise ValueError(f"config.json: a classifier needs {', '.join(missing)}")
    backbone_arch = dict(arch["backbone"])
    dropout = float(arch.get("dropout", 0.0))
    if "dropout" in backbone_arch:  # model.dropout of a fine-tune applies to the backbone too
        backbone_arch["dropout"] = dropout
    labels = arch.get("label_names")
    if labels is not None and len(labels) != arch["num_labels"]:
        raise ValueError(f"config.json: {len(labels)} label_names for num_labels={arch['num_labels']}")
    return SequenceClassifier(model_from_architecture(backbone_arch), int(arch["num_labels"]),
                              arch["pooling"], dropout, bias=bool(arch.get("head_bias", True)))


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load a state dict, reporting missing or unexpected names against `source`."""
    result = model.load_state_dict(state_dict, strict=False)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # an output layer tied to them
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys if not (k.endswith("lm_head.weight") and id(params.get(k)) in tied)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: weights do not match the architecture "
                         f"(missing: {missing[:5]}, unexpected: {result.unexpected_keys[:5]})")


def flops_per_token(config) -> int:
    """Training FLOPs per token of a model config, GPT, BERT or Llama (for MFU)."""
    if isinstance(config, BertConfig):
        return bert_flops_per_token(config)
    if isinstance(config, LlamaConfig):
        return llama_flops_per_token(config)
    return gpt_flops_per_token(config)
