"""Classifiers to and from transformers: `GPT2ForSequenceClassification`,
`BertForSequenceClassification` and `LlamaForSequenceClassification` (Qwen2 and Mistral alike).

lmforge's `SequenceClassifier` keeps its backbone under `backbone.` and its head as `classifier`;
transformers keeps the backbone under its own prefix (`transformer.`, `bert.`, `model.`) and the
head as `score` (GPT-2, Llama: no bias, the hidden state at the last token that is not padding)
or `classifier` (BERT: with a bias, on the pooler's output). The backbone's names go through the
backbone's own map (`lmforge.models.hf`, `hf_llama`). Labels travel as `id2label` / `label2id`;
a regression head as `problem_type: "regression"` with `num_labels` 1 and no labels (a
transformers head of one output without a problem_type is one too: transformers trains it so).

A transformers folder whose head is not a sequence classifier's (question answering, token
classification) imports as its backbone: `head_keys` names the weights left behind, so that
import can say so.
"""

from __future__ import annotations

import re

from torch import Tensor


SCORE_HEAD = {"gpt": "score", "llama": "score", "bert": "classifier"}
"""transformers' name of the classification head on each backbone."""
_HEADS = re.compile(r"^(classifier|score|qa_outputs|lm_head|cls\.seq_relationship)\.")
"""Heads some transformers class puts beside the backbone (lm_head and the NSP head are
lmforge's own for GPT / Llama and BERT, so those are never left behind)."""


def is_sequence_classifier(hf_config: dict) -> bool:
    architectures = hf_config.get("architectures") or []
    return any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures)


def head_keys(names: list[str], backbone_kind: str) -> list[str]:
    """Weights of a head lmforge's backbone does not have (the transformers class's own)."""
    own = ("lm_head.",) if backbone_kind in ("gpt", "llama") else ("cls.",)
    return [n for n in names if _HEADS.match(n) and not n.startswith(own)]


def label_names_from_hf(hf_config: dict, num_labels: int) -> list[str]:
    """id2label in id order; ids as names where the config has none (LABEL_0, ... as transformers)."""
    id2label = hf_config.get("id2label") or {}
    try:
        names = [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in range(num_labels)]
    except KeyError:
        names = [f"LABEL_{i}" for i in range(num_labels)]
    return names


def classifier_arch_from_hf(hf_config: dict, backbone_arch: dict) -> dict:
    """The lmforge classifier config.json for a transformers *ForSequenceClassification config."""
    kind = backbone_arch["model_type"]
    problem = hf_config.get("problem_type")
    num_labels = int(hf_config.get("num_labels") or len(hf_config.get("id2label") or {}) or 2)
    if problem not in (None, "regression", "single_label_classification"):
        raise ValueError(f"problem_type {problem!r}: lmforge's classifiers pick one label per text or predict "
                         "one number (regression); a multi-label head is not supported by this version")
    if problem == "regression" and num_labels != 1:
        raise ValueError(f"problem_type regression with num_labels={num_labels}: lmforge's regression head "
                         "predicts one number per text")
    labels = {"num_labels": 1, "problem_type": "regression"} if num_labels == 1 and problem != \
        "single_label_classification" else {"num_labels": num_labels,
                                            "label_names": label_names_from_hf(hf_config, num_labels)}
    return {"model_type": "classifier", "vocab_size": backbone_arch["vocab_size"], **labels,
            "pooling": "cls" if kind == "bert" else "last", "dropout": 0.0, "head_bias": kind == "bert",
            "backbone": dict(backbone_arch)}


def classifier_mapper(kind: str, backbone_mapper):
    """A weights map (the `*_from_hf` signature) for a transformers sequence classifier: the
    backbone's own map under `backbone.`, the head as `classifier`."""
    head = SCORE_HEAD[kind] + "."

    def mapper(hf_state: dict[str, Tensor], expected: list[str]) -> tuple[dict[str, Tensor], list[str]]:
        body = {k: v for k, v in hf_state.items() if not k.startswith(head)}
        state, missing = backbone_mapper(body, [])
        out = {f"backbone.{k}": v for k, v in state.items()}
        out.update({"classifier." + k[len(head):]: v for k, v in hf_state.items() if k.startswith(head)})
        return out, [k for k in expected if k not in out]
    return mapper


def without_heads(backbone_mapper, kind: str, dropped: list[str]):
    """`backbone_mapper` with the weights of heads lmforge has no place for left out (`dropped`)."""
    def mapper(hf_state: dict[str, Tensor], expected: list[str]) -> tuple[dict[str, Tensor], list[str]]:
        left = set(head_keys(list(hf_state), kind))
        dropped[:] = sorted(left)
        return backbone_mapper({k: v for k, v in hf_state.items() if k not in left}, expected)
    return mapper


def classifier_to_hf(arch: dict, state: dict[str, Tensor], backbone_config: dict,
                     backbone_weights: dict[str, Tensor]) -> tuple[dict, dict[str, Tensor]]:
    """(config.json, weights) of the transformers sequence classifier for an lmforge classifier,
    from its backbone's own transformers config and weights (its pretraining heads left out)."""
    backbone = arch["backbone"]
    kind = backbone["model_type"]
    head = SCORE_HEAD[kind]
    weights = {k: v for k, v in backbone_weights.items() if not k.startswith(("cls.", "lm_head."))}
    weights[f"{head}.weight"] = state["classifier.weight"].contiguous().clone()
    bias = state.get("classifier.bias")
    if kind == "bert":
        weights[f"{head}.bias"] = bias.contiguous().clone()
    elif bias is not None and bool(bias.any()):
        raise ValueError(f"this classifier's head has a bias, which transformers' {kind} sequence classifier "
                         "lacks; it cannot be exported exactly (classifiers made by this version of lmforge "
                         "have none)")
    prefix = {"gpt": "GPT2", "bert": "Bert", "llama": _llama_class(backbone_config)}[kind]
    if arch.get("problem_type") == "regression":
        head_config = {"num_labels": 1, "problem_type": "regression"}
    else:
        labels = list(arch.get("label_names") or [str(i) for i in range(int(arch["num_labels"]))])
        head_config = {"num_labels": len(labels), "id2label": {str(i): name for i, name in enumerate(labels)},
                       "label2id": {name: i for i, name in enumerate(labels)}}
    config = dict(backbone_config, architectures=[f"{prefix}ForSequenceClassification"], **head_config)
    if kind != "bert" and config.get("pad_token_id") is None:
        raise ValueError("this classifier's tokenizer has no padding token; transformers' "
                         f"{prefix}ForSequenceClassification finds each text's last token by it")
    return config, weights


def _llama_class(config: dict) -> str:
    return {"qwen2": "Qwen2", "mistral": "Mistral"}.get(config.get("model_type"), "Llama")
