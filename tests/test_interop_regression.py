"""Regression heads to and from transformers: GPT2 / Bert / LlamaForSequenceClassification with
`problem_type: "regression"` and one output, the same values (1e-4) both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.commands.interop import export_hf, import_hf
from lmforge.inference.classifier import load_classifier, predict_texts, predict_values
from lmforge.models.heads import classifier_architecture, is_regression
from lmforge.models.registry import model_from_architecture
from lmforge.serve.served import load_served

from test_interop_classifier import BACKBONES, TEXTS, tokenizers  # noqa: F401 (a fixture)

transformers = pytest.importorskip("transformers")


def _regressor(kind: str, tokenizers: dict[str, Path], folder: Path) -> Path:
    backbone, tok, _ = BACKBONES[kind]
    torch.manual_seed(0)
    arch = classifier_architecture(backbone, None)
    model = model_from_architecture(arch)
    with torch.no_grad():  # non-trivial norms, biases and head
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or name.startswith("classifier."):
                p.add_(torch.randn_like(p) * 0.5)
    return save_checkpoint(folder, model_state=model.state_dict(), model_config=arch, tokenizer_file=tokenizers[tok])


@pytest.mark.parametrize("kind", list(BACKBONES))
def test_a_regression_head_exports_and_imports_with_the_same_values(kind, tokenizers, tmp_path):
    ckpt = _regressor(kind, tokenizers, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [BACKBONES[kind][2]]
    assert config["problem_type"] == "regression" and config["num_labels"] == 1
    assert "id2label" not in config and "label2id" not in config
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert hf_model.config.problem_type == "regression" and hf_model.config.num_labels == 1
    loaded, labels = load_classifier(ckpt, device="cpu")
    assert labels == []
    ours = predict_values(loaded, TEXTS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        theirs = [float(hf_model(**hf_tok(text, return_tensors="pt")).logits[0, 0]) for text in TEXTS]
    assert max(ours) - min(ours) > 1e-6  # the texts get different values
    torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="predicts a number, not a label"):
        predict_texts(loaded, labels, TEXTS)
    with pytest.raises(ValueError, match="a regression head .* serving one is not supported"):
        load_served(str(ckpt), "cpu")
    # and back: a regression head with the same weights
    import_hf(out, tmp_path / "again")
    again, ckpt_again = load_model(tmp_path / "again")
    assert is_regression(ckpt_again.model_config) and ckpt_again.model_config["num_labels"] == 1
    original = loaded.model.state_dict()
    for name, value in again.state_dict().items():
        if not name.startswith(("backbone.cls.", "backbone.lm_head.")):  # output layers a classifier lacks
            assert torch.equal(value, original[name]), name


def test_a_multi_label_head_is_refused_by_name(tokenizers, tmp_path):
    config = transformers.BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=32, num_labels=3,
                                     problem_type="multi_label_classification")
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "multi")
    (tmp_path / "multi" / "tokenizer.json").write_bytes(tokenizers["wordpiece"].read_bytes())
    with pytest.raises(ValueError, match="multi_label_classification"):
        import_hf(tmp_path / "multi", tmp_path / "ckpt")
