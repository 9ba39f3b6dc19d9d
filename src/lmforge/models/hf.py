"""Weight names and config fields to and from transformers' GPT-2 and BERT, both ways.

Owns the explicit key maps. lmforge's parameter names already follow transformers
(`GPT2LMHeadModel`, `BertForPreTraining`), so the maps are near-identity:

- GPT-2: transformers stores attn.c_attn / attn.c_proj / mlp.c_fc / mlp.c_proj in `Conv1D`
  layout (in, out); lmforge uses `nn.Linear` (out, in): those weights are transposed. A bare
  `GPT2Model` checkpoint has no "transformer." prefix. `lm_head.weight` is tied to wte.
- BERT: identical names; a bare `BertModel` checkpoint (e.g. sentence-transformers) has no
  "bert." prefix and no pretraining heads. Old checkpoints name LayerNorm parameters
  gamma/beta. The decoder weight and bias are tied (word embeddings, cls.predictions.bias).

Buffers that transformers keeps in some files (position_ids, attn.bias, attn.masked_bias)
are dropped. Each `*_from_hf` returns (lmforge state dict, list of lmforge keys not found).
"""

from __future__ import annotations

import re

from torch import Tensor

from lmforge.models.activations import ACTIVATIONS

_GPT2_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_GPT2_BUFFERS = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias)$")
_BERT_TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


# -- GPT-2 -----------------------------------------------------------------------------------------


def gpt2_from_hf(hf_state: dict[str, Tensor], expected: list[str]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers GPT2LMHeadModel / GPT2Model weights -> lmforge GPT names and layout."""
    out: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if _GPT2_BUFFERS.search(key):
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if _GPT2_CONV1D.search(name):
            value = value.t()
        out[name] = value.contiguous()
    out["lm_head.weight"] = out.get("transformer.wte.weight")  # tied (GPT-2 always ties)
    missing = [k for k in expected if out.get(k) is None]
    return {k: v for k, v in out.items() if v is not None}, missing


def gpt2_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """lmforge GPT weights -> transformers GPT2LMHeadModel names (Conv1D layout, lm_head tied away)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight; transformers re-ties it on load
        out[key] = (value.t() if _GPT2_CONV1D.search(key) else value).contiguous().clone()
    return out


def gpt2_config_from_hf(hf: dict) -> dict:
    """transformers GPT2Config dict -> lmforge architecture dict; ValueError for what we can't run."""
    problems = []
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner={hf['n_inner']} (lmforge's MLP is 4 x n_embd = {4 * n_embd})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        problems.append(f"activation_function={activation!r} (lmforge: {', '.join(ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            problems.append(f"{flag}=true")
    if hf.get("scale_attn_weights") is False:
        problems.append("scale_attn_weights=false")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings=false (lmforge ties lm_head to wte)")
    if problems:
        raise ValueError("this GPT-2 config uses features lmforge's GPT does not have: " + "; ".join(problems))
    return {"model_type": "gpt", "vocab_size": hf.get("vocab_size", 50257), "context": hf.get("n_positions", 1024),
            "n_layer": hf.get("n_layer", 12), "n_head": hf.get("n_head", 12), "n_embd": n_embd,
            "dropout": 0.0, "layer_norm_eps": hf.get("layer_norm_epsilon", 1e-5), "bias": True,
            "activation": activation}


def gpt2_config_to_hf(arch: dict, bos: int | None, eos: int | None, pad: int | None) -> dict:
    if not arch.get("bias", True):
        raise ValueError("this GPT has no biases (bias=false); transformers' GPT-2 always has them, "
                         "so it cannot be exported in the GPT-2 format")
    p = float(arch.get("dropout", 0.0))
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": arch["vocab_size"],
            "n_positions": arch["context"], "n_ctx": arch["context"], "n_embd": arch["n_embd"],
            "n_layer": arch["n_layer"], "n_head": arch["n_head"], "n_inner": None,
            "activation_function": arch.get("activation", "gelu_new"), "resid_pdrop": p, "embd_pdrop": p, "attn_pdrop": p,
            "layer_norm_epsilon": arch.get("layer_norm_eps", 1e-5), "initializer_range": 0.02,
            "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


# -- BERT ------------------------------------------------------------------------------------------


def bert_from_hf(hf_state: dict[str, Tensor], expected: list[str]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers BertForPreTraining / BertForMaskedLM / BertModel weights -> lmforge BERT names."""
    out: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key.endswith("position_ids") or key.startswith(("classifier.", "qa_outputs.")):
            continue
        name = key if key.startswith(("bert.", "cls.")) else f"bert.{key}"
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
        name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
        out[name] = value.contiguous()
    if "cls.predictions.bias" not in out and "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"]
    # the tied names, as lmforge's module has them (one tensor, two names)
    if "bert.embeddings.word_embeddings.weight" in out:
        out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    if "cls.predictions.bias" in out:
        out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    missing = [k for k in expected if k not in out]
    return out, missing


def bert_to_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """lmforge BERT weights -> transformers BertForPreTraining names (tied names left out)."""
    return {k: v.contiguous().clone() for k, v in state.items() if k not in _BERT_TIED}


def bert_config_from_hf(hf: dict) -> dict:
    """transformers BertConfig dict -> lmforge architecture dict; ValueError for what we can't run."""
    problems = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={hf['position_embedding_type']!r} (lmforge: absolute)")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("is_decoder / add_cross_attention (lmforge's BERT is an encoder only)")
    act = hf.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (lmforge: {', '.join(ACTIVATIONS)})")
    if problems:
        raise ValueError("this BERT config uses features lmforge's BERT does not have: " + "; ".join(problems))
    hidden = hf.get("hidden_size", 768)
    inter = hf.get("intermediate_size", 4 * hidden)
    return {"model_type": "bert", "vocab_size": hf.get("vocab_size", 30522),
            "context": hf.get("max_position_embeddings", 512), "n_layer": hf.get("num_hidden_layers", 12),
            "n_head": hf.get("num_attention_heads", 12), "n_embd": hidden,
            "intermediate_size": None if inter == 4 * hidden else inter,
            "type_vocab_size": hf.get("type_vocab_size", 2), "dropout": 0.0,
            "layer_norm_eps": hf.get("layer_norm_eps", 1e-12), "hidden_act": act}


def bert_config_to_hf(arch: dict, pad: int | None) -> dict:
    p = float(arch.get("dropout", 0.0))
    n_embd = arch["n_embd"]
    return {"architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": arch["vocab_size"],
            "hidden_size": n_embd, "num_hidden_layers": arch["n_layer"], "num_attention_heads": arch["n_head"],
            "intermediate_size": arch.get("intermediate_size") or 4 * n_embd,
            "hidden_act": arch.get("hidden_act", "gelu"), "hidden_dropout_prob": p,
            "attention_probs_dropout_prob": p, "max_position_embeddings": arch["context"],
            "type_vocab_size": arch.get("type_vocab_size", 2), "layer_norm_eps": arch.get("layer_norm_eps", 1e-12),
            "initializer_range": 0.02, "position_embedding_type": "absolute", "pad_token_id": pad or 0,
            "tie_word_embeddings": True, "use_cache": False}

