"""Classifiers to and from transformers: GPT2 / Bert / LlamaForSequenceClassification with their
labels, the same logits (1e-4) both ways, `pipeline("text-classification")` agreeing with lmforge's
classify, and a head lmforge does not use named loudly on import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.base.tokenizer import train_tokenizer
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.commands.interop import export_hf, import_hf
from lmforge.inference.classifier import class_probabilities, load_classifier, predict_texts
from lmforge.models.heads import classifier_architecture
from lmforge.models.registry import model_from_architecture

transformers = pytest.importorskip("transformers")
TEXTS = ["win a free prize now", "see you at lunch", "urgent call now to claim", "ok", "the bus is late again"]
LABELS = ["ham", "spam", "maybe"]
SHAPE = {"vocab_size": 300, "context": 32, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}
BACKBONES = {
    "gpt": ({"model_type": "gpt", **SHAPE, "activation": "gelu"}, "bpe", "GPT2ForSequenceClassification"),
    "bert": ({"model_type": "bert", **SHAPE, "intermediate_size": 24}, "wordpiece", "BertForSequenceClassification"),
    "llama": ({"model_type": "llama", **SHAPE, "n_kv_head": 1, "intermediate_size": 40}, "bpe",
              "LlamaForSequenceClassification"),
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clf_tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 30) + "\n", encoding="utf-8")
    return {kind: train_tokenizer([corpus], kind=kind, vocab_size=300, out_dir=root / kind, lowercase=kind == "wordpiece",
                                  show_progress=False) for kind in ("bpe", "wordpiece")}


def _classifier(kind: str, tokenizers: dict[str, Path], folder: Path) -> Path:
    backbone, tok, _ = BACKBONES[kind]
    torch.manual_seed(0)
    arch = classifier_architecture(backbone, LABELS)
    model = model_from_architecture(arch)
    with torch.no_grad():  # non-trivial norms and biases, and a head that separates the labels
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or name.startswith("classifier."):
                p.add_(torch.randn_like(p) * 0.5)
    return save_checkpoint(folder, model_state=model.state_dict(), model_config=arch, tokenizer_file=tokenizers[tok])


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_a_classifier_exports_and_imports_with_its_head_labels_and_logits(kind, tokenizers, tmp_path):
    ckpt = _classifier(kind, tokenizers, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [BACKBONES[kind][2]]
    assert config["id2label"] == {"0": "ham", "1": "spam", "2": "maybe"} and config["label2id"]["maybe"] == 2
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(hf_model).__name__ == BACKBONES[kind][2]
    loaded, labels = load_classifier(ckpt, device="cpu")
    ours = class_probabilities(loaded, TEXTS).log()  # (N, 3), log-softmax of lmforge's logits
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        for i, text in enumerate(TEXTS):  # one text at a time: no padding on either side
            logits = hf_model(**hf_tok(text, return_tensors="pt")).logits[0]
            torch.testing.assert_close(torch.log_softmax(logits, -1), ours[i], atol=1e-4, rtol=1e-4)
    pipe = transformers.pipeline("text-classification", model=str(out), device="cpu")
    assert [r["label"] for r in pipe(TEXTS)] == [label for label, _ in predict_texts(loaded, labels, TEXTS)]
    # and back: the import is a classifier with the same head, labels and weights
    import_hf(out, tmp_path / "again")
    again, ckpt_again = load_model(tmp_path / "again")
    assert ckpt_again.model_config["label_names"] == LABELS and ckpt_again.model_config["model_type"] == "classifier"
    original = loaded.model.state_dict()
    for name, value in again.state_dict().items():
        if not name.startswith(("backbone.cls.", "backbone.lm_head.")):  # output layers a classifier lacks
            assert torch.equal(value, original[name]), name


def test_an_import_that_drops_a_head_says_which(tokenizers, tmp_path, capsys):
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32)
    model = transformers.BertForQuestionAnswering(config)
    model.save_pretrained(tmp_path / "qa")
    (tmp_path / "qa" / "tokenizer.json").write_bytes((tokenizers["wordpiece"]).read_bytes())
    import_hf(tmp_path / "qa", tmp_path / "ckpt")
    err = capsys.readouterr().err
    assert "NOT imported" in err and "qa_outputs.weight" in err and "qa_outputs.bias" in err
