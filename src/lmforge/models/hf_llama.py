"""Config fields and weight names to and from transformers' Llama, Qwen2 and Mistral, both ways.

lmforge's Llama uses transformers' parameter names and layout, so the weight map only handles
the tied output layer (absent from a tied checkpoint's file, written once on export) and the
rotary buffers some old files carry. The config map reads both transformers' current form
(`rope_parameters`) and the older one (`rope_theta` + `rope_scaling`).

Refused, naming the field: MoE configs (num_experts, num_local_experts), activations other
than SiLU, rope types lmforge does not compute (see `ops.rotary.ROPE_TYPES`), pretraining_tp
other than 1. A sliding window shorter than max_position_embeddings (Mistral 7B v0.1's 4096,
Qwen2 with use_sliding_window) becomes the checkpoint's context, where full attention is
exactly the window's: `note` says so.
"""

from __future__ import annotations

from torch import Tensor

from lmforge.models.llama_config import LlamaConfig

HF_FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
"""transformers model_type -> the class export names in config.json's "architectures"."""
_MOE_FIELDS = ("num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size")


def llama_from_hf(hf_state: dict[str, Tensor], expected: list[str]) -> tuple[dict[str, Tensor], list[str]]:
    """transformers *ForCausalLM / *Model weights -> lmforge Llama names (the same, "model." prefixed)."""
    out: dict[str, Tensor] = {}
    for key, value in hf_state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        name = key if key.startswith(("model.", "lm_head.")) else f"model.{key}"
        out[name] = value.contiguous()
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # tied: one tensor, two names
    missing = [k for k in expected if k not in out]
    return out, missing


def llama_to_hf(state: dict[str, Tensor], tied: bool) -> dict[str, Tensor]:
    """lmforge Llama weights -> transformers names (lm_head left out when tied: it re-ties on load)."""
    return {k: v.contiguous().clone() for k, v in state.items() if not (tied and k == "lm_head.weight")}


def _rope(hf: dict, problems: list[str]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either form of the config."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    if isinstance(scaling, dict) and "type" in scaling and "rope_type" not in scaling:
        scaling = {"rope_type": scaling["type"], **{k: v for k, v in scaling.items() if k != "type"}}
    if isinstance(scaling, dict) and scaling.get("rope_type") not in ("linear", "llama3"):
        problems.append(f"rope_scaling.rope_type={scaling.get('rope_type')!r} (lmforge computes default, "
                        "linear and llama3 rotary angles)")
    return theta, scaling


def _window(hf: dict, kind: str, context: int) -> int | None:
    """The sliding window that applies to this config, when it is shorter than the context."""
    window = hf.get("sliding_window")
    if kind == "qwen2":
        layer_types = hf.get("layer_types") or []
        if not hf.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < context:
        return window
    return None


def llama_config_from_hf(hf: dict) -> tuple[dict, list[str]]:
    """transformers Llama / Qwen2 / Mistral config dict -> (lmforge architecture dict, notes);
    ValueError naming every field lmforge cannot run."""
    kind = hf.get("model_type")
    problems: list[str] = [f"{f}={hf[f]!r} (mixture of experts)" for f in _MOE_FIELDS if hf.get(f)]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act={act!r} (lmforge's SwiGLU uses silu)")
    if hf.get("pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp={hf['pretraining_tp']} (only 1)")
    theta, scaling = _rope(hf, problems)
    if problems:
        raise ValueError(f"this {kind} config uses features lmforge's Llama does not have: " + "; ".join(problems))
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    context = hf.get("max_position_embeddings", 2048)
    notes = []
    window = _window(hf, kind, context)
    if window is not None:
        notes.append(f"sliding_window={window} is shorter than max_position_embeddings={context}: the "
                     f"checkpoint's context is {window} (attention over the whole context is the window's)")
        context = window
    head_dim = hf.get("head_dim")
    if kind == "qwen2":
        bias = "qkv"
    else:
        bias = "all" if hf.get("attention_bias") else "none"
    return {"model_type": "llama", "vocab_size": hf.get("vocab_size", 32000), "context": context,
            "n_layer": hf.get("num_hidden_layers", 32), "n_head": heads,
            "n_kv_head": hf.get("num_key_value_heads") or heads, "n_embd": hidden,
            "head_dim": None if head_dim in (None, hidden // heads) else head_dim,
            "intermediate_size": hf.get("intermediate_size", 11008), "rope_theta": float(theta),
            "rope_scaling": scaling, "rms_norm_eps": hf.get("rms_norm_eps", 1e-6), "attention_bias": bias,
            "mlp_bias": bool(hf.get("mlp_bias", False)), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "dropout": 0.0}, notes


def llama_config_to_hf(arch: dict, bos: int | None, eos: int | None, pad: int | None,
                       family: str | None = None) -> dict:
    """The config.json transformers reads for this lmforge Llama: Qwen2 for q/k/v-only biases,
    Mistral when `family` (the imported one) is and it has no biases, else Llama."""
    c = LlamaConfig.from_dict(arch)
    if c.attention_bias == "qkv":  # only Qwen2 has biases on q, k, v and not on o
        if c.mlp_bias:
            raise ValueError("attention_bias=qkv with mlp_bias=true has no transformers family (Qwen2's MLP "
                             "has no biases)")
        family = "qwen2"
    elif family != "mistral" or c.attention_bias != "none" or c.mlp_bias:
        family = "llama"  # Llama expresses every other combination
    rope = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    out = {"architectures": [HF_FAMILIES[family]], "model_type": family, "vocab_size": c.vocab_size,
           "hidden_size": c.n_embd, "intermediate_size": c.ffn, "num_hidden_layers": c.n_layer,
           "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads, "head_dim": c.hs,
           "hidden_act": "silu", "max_position_embeddings": c.context, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "rope_parameters": rope,
           "tie_word_embeddings": c.tie_embeddings, "attention_dropout": float(c.dropout),
           "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos, "eos_token_id": eos,
           "pad_token_id": pad}
    if family == "llama":
        out.update(attention_bias=c.attention_bias == "all", mlp_bias=c.mlp_bias, pretraining_tp=1)
    elif family == "mistral":
        out.update(sliding_window=None)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=c.n_layer)
    return out
