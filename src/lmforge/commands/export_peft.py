"""LoRA checkpoints and transformers, for `lmforge.commands.interop`: the adapter folder of
`export --format peft` (`adapter_files`; peft loads it onto the exported base), the weights of
`export --format hf --merge` (`exported_weights`), a peft adapter merged on `import-hf --adapter`
(`merge_peft`), and which lmforge model a transformers folder becomes (`task_form`: a sequence
classifier with its head; any other head left behind, by name).

A peft LoRA folder is `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules, ...)
and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (rank, in) and
`.lora_B.weight` (out, rank) per adapted module, and `base_model.model.<module>.<param>` for the
modules trained in full (modules_to_save), all under the transformers model's names. lmforge's
LoRA layers have the same shapes (for GPT-2's Conv1D layers too: peft sets fan_in_fan_out), so
the export is a renaming: the classifier's `backbone.` prefix goes and its head takes
transformers' name (`score`, or BERT's `classifier`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.checkpoint import Checkpoint
from lmforge.commands.hf_folder import read_json_object
from lmforge.models import hf_classifier
from lmforge.models.lora import ADAPTER_KEYS, merged_state, without_lora

PEFT_PREFIX = "base_model.model."
TASK_TYPES = {"gpt": "CAUSAL_LM", "llama": "CAUSAL_LM", "classifier": "SEQ_CLS"}


def exported_weights(ckpt: Checkpoint, merge: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """(architecture, weights) to export as one transformers model: a LoRA checkpoint merged
    (with `merge`; refused without it), any other as it is (`merge` then changes nothing)."""
    arch = ckpt.model_config
    if "lora" not in arch:
        return arch, ckpt.state_dict
    if not merge:
        raise ValueError(f"{ckpt.path}: a LoRA adapter; export it merged into its base (--format hf --merge) "
                         "or as a peft adapter folder (--format peft)")
    return without_lora(arch), merged_state(ckpt.state_dict, arch["lora"])


def hf_module_name(name: str, arch: dict) -> str:
    """An lmforge module name -> the transformers model's (a classifier loses `backbone.`, its head
    takes transformers' name)."""
    if arch.get("model_type") != "classifier":
        return name
    if name == "classifier" or name.startswith("classifier."):
        return hf_classifier.SCORE_HEAD[arch["backbone"]["model_type"]] + name[len("classifier"):]
    return name.removeprefix("backbone.")


def adapter_files(arch: dict, state: dict[str, torch.Tensor], base_folder: Path) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors tensors) of a LoRA checkpoint."""
    spec, inner = arch["lora"], without_lora(arch)
    kept = tuple(f"{name}." for name in spec["trainable"])
    tensors = {}
    for key, value in state.items():
        if ADAPTER_KEYS.search(key) or key.startswith(kept):
            module, _, param = key.rpartition(".")
            if ADAPTER_KEYS.search(key):  # <layer>.lora_A.weight: the layer's name maps
                layer, _, which = module.rpartition(".")
                name = f"{hf_module_name(layer, inner)}.{which}.{param}"
            else:
                name = f"{hf_module_name(module, inner)}.{param}"
            tensors[PEFT_PREFIX + name] = value.contiguous().clone()
    backbone = inner["backbone"]["model_type"] if inner["model_type"] == "classifier" else inner["model_type"]
    config = {"peft_type": "LORA", "task_type": TASK_TYPES.get(inner["model_type"]),
              "base_model_name_or_path": str(base_folder), "r": int(spec["rank"]),
              "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"],
              "target_modules": [hf_module_name(n, inner) for n in spec["targets"]],
              "modules_to_save": [hf_module_name(n, inner) for n in spec["trainable"]] or None,
              "fan_in_fan_out": backbone == "gpt", "bias": "none", "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
              "rank_pattern": {}, "alpha_pattern": {}}
    return config, tensors


def merge_peft(hf_state: dict[str, torch.Tensor], adapter: Path, kind: str) -> dict[str, torch.Tensor]:
    """transformers weights with a peft LoRA folder's adapters merged in (W + scale * B @ A, in the
    layer's own layout: GPT-2's Conv1D weights are (in, out)) and its modules_to_save put in place."""
    config = _adapter_config(adapter)
    file = adapter / "adapter_model.safetensors"
    try:
        tensors = load_file(str(file))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ValueError(f"{file}: cannot read the adapter's weights ({err})") from None
    rank = int(config["r"])
    scale = float(config.get("lora_alpha", rank)) / (rank ** 0.5 if config.get("use_rslora") else rank)
    transposed = bool(config.get("fan_in_fan_out")) or kind == "gpt2"
    out = dict(hf_state)
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_B." in name:
            continue  # merged with its lora_A
        if ".lora_" in name and ".lora_A." not in name:
            raise ValueError(f"{file}: {key}: an adapter tensor lmforge does not merge (LoRA on linear layers only)")
        if ".lora_A." in name:
            layer = name.split(".lora_A.")[0]
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            target = f"{layer}.weight"
            if b is None or target not in out:
                raise ValueError(f"{file}: {key} has no lora_B beside it, or the model has no {target}")
            delta = (b.float() @ value.float()) * scale  # (out, in)
            weight = out[target]
            out[target] = (weight.float() + (delta.t() if transposed else delta)).to(weight.dtype)
        else:  # a module trained in full (modules_to_save)
            name = name.replace(".modules_to_save.default.", ".")
            if name not in out:
                raise ValueError(f"{file}: {key} names {name}, which the model does not have")
            out[name] = value
    return out


def _adapter_config(adapter: Path) -> dict:
    file = adapter / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: --adapter takes a peft adapter folder "
                                "(adapter_config.json, adapter_model.safetensors)")
    config = read_json_object(file)
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (lmforge merges LORA)")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        problems.append(f"r={config.get('r')!r}")
    for flag in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(flag):
            problems.append(f"{flag}={config[flag]!r}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r}")
    if problems:
        raise ValueError(f"{file}: an adapter lmforge cannot merge: {'; '.join(problems)}")
    return config


def task_form(hf_config: dict, arch: dict, mapper) -> tuple[dict, object, list[str]]:
    """(architecture, weights map, the names of weights left behind) for a transformers folder: a
    *ForSequenceClassification becomes an lmforge classifier with its head; the weights of any
    other head lmforge's model does not have are listed (filled in when the map runs)."""
    if hf_classifier.is_sequence_classifier(hf_config):
        kind = arch["model_type"]
        return (hf_classifier.classifier_arch_from_hf(hf_config, arch),
                hf_classifier.classifier_mapper(kind, mapper), [])
    dropped: list[str] = []
    return arch, hf_classifier.without_heads(mapper, arch["model_type"], dropped), dropped
