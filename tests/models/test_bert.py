"""The BERT model: shapes, tied weights, padding, masked-position logits, config checks."""

from __future__ import annotations

import pytest
import torch

from lmforge.base.config import ModelConfig
from lmforge.models.bert import BERT_PRESETS, Bert, BertConfig
from lmforge.models.registry import architecture, flops_per_token, model_from_architecture


def _tiny(**kw) -> Bert:
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=97, context=24, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def test_shapes_and_tied_weights():
    model = _tiny()
    ids = torch.randint(0, 97, (3, 10))
    mlm, nsp = model(ids)
    assert mlm.shape == (3, 10, 97) and nsp.shape == (3, 2)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    hidden, pooled = model.encode(ids)
    assert hidden.shape == (3, 10, 16) and pooled.shape == (3, 16) and bool((pooled.abs() <= 1).all())


def test_padding_does_not_change_real_positions():
    model = _tiny()
    ids = torch.randint(5, 97, (1, 7))
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    alone = model.hidden_states(ids, token_type_ids=types)
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    together = model.hidden_states(padded, mask, torch.cat([types, torch.zeros(1, 5, dtype=torch.long)], 1))
    torch.testing.assert_close(together[:, :7], alone, atol=1e-5, rtol=1e-5)


def test_mlm_positions_give_the_same_logits_as_the_full_projection():
    model = _tiny()
    ids = torch.randint(0, 97, (2, 12))
    positions = torch.rand(2, 12) < 0.3
    full, nsp = model(ids)
    some, nsp2 = model(ids, mlm_positions=positions)
    torch.testing.assert_close(some, full[positions])
    torch.testing.assert_close(nsp, nsp2)


def test_too_long_input_and_bad_config_are_user_errors():
    with pytest.raises(ValueError, match="longer than the model context"):
        _tiny()(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="did you mean 'n_layer'"):
        BertConfig.from_dict({"n_layers": 2})


def test_registry_builds_bert_from_a_run_config():
    arch = architecture(ModelConfig(kind="bert", preset="tiny"), vocab_size=120)
    assert arch == {"model_type": "bert", **BERT_PRESETS["tiny"], "vocab_size": 120, "dropout": 0.0, "hidden_act": "gelu"}
    model = model_from_architecture(arch)
    assert isinstance(model, Bert) and model.config.context == 128
    assert flops_per_token(model.config) > 6 * sum(p.numel() for p in model.bert.encoder.parameters())
    with pytest.raises(ValueError, match="unknown bert preset 'gpt2'"):
        architecture(ModelConfig(kind="bert", preset="gpt2"), vocab_size=120)
