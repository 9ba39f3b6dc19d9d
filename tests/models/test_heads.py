"""SequenceClassifier: pooling ignores padding, backbone names under `backbone.`, trainable subsets."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.bert import Bert, BertConfig
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.heads import SequenceClassifier, apply_trainable, classifier_architecture
from lmforge.models.registry import classifier_from_architecture, load_weights, model_from_architecture

GPT_ARCH = {"model_type": "gpt", "vocab_size": 50, "context": 16, "n_layer": 2, "n_head": 2, "n_embd": 16,
            "dropout": 0.0}
BERT_ARCH = {"model_type": "bert", "vocab_size": 50, "context": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}


def _padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


@pytest.mark.parametrize("arch", [GPT_ARCH, BERT_ARCH], ids=["gpt", "bert"])
def test_padded_batch_gives_the_logits_of_each_text_alone(arch):
    torch.manual_seed(0)
    model = classifier_from_architecture(classifier_architecture(arch, ["a", "b", "c"])).eval()
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    ids, mask = _padded(rows, pad=3)
    batch = model(ids, attention_mask=mask)  # (3, 3)
    assert batch.shape == (3, 3)
    for i, r in enumerate(rows):
        alone = model(torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_gpt_pooling_reads_the_last_real_token_and_bert_the_pooler():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.from_dict({k: v for k, v in GPT_ARCH.items() if k != "model_type"})).eval()
    clf = SequenceClassifier(gpt, 2, "last").eval()
    ids, mask = _padded([[5, 6, 7], [8, 9]])
    torch.testing.assert_close(clf.pooled(ids, mask)[1], gpt.hidden_states(ids[1:, :2])[0, -1])
    bert = Bert(BertConfig.from_dict({k: v for k, v in BERT_ARCH.items() if k != "model_type"})).eval()
    clf = SequenceClassifier(bert, 2, "cls").eval()
    torch.testing.assert_close(clf.pooled(ids, mask), bert.encode(ids, mask)[1])


def test_backbone_names_keep_their_prefix_and_the_checkpoint_round_trips():
    torch.manual_seed(0)
    arch = classifier_architecture(GPT_ARCH, ["ham", "spam"])
    assert arch["pooling"] == "last" and arch["vocab_size"] == 50 and arch["backbone"] == GPT_ARCH
    model = model_from_architecture(arch)
    gpt_names = set(GPT(GPTConfig.from_dict({k: v for k, v in GPT_ARCH.items() if k != "model_type"}))
                    .state_dict())
    names = set(model.state_dict())
    assert {n.removeprefix("backbone.") for n in names if n.startswith("backbone.")} == gpt_names
    assert names - {f"backbone.{n}" for n in gpt_names} == {"classifier.weight"}
    old = dict(arch)  # a checkpoint from before head_bias: its GPT head has a bias
    del old["head_bias"]
    assert "classifier.bias" in model_from_architecture(old).state_dict()
    state = {k: v for k, v in model.state_dict().items() if k != "backbone.lm_head.weight"}  # tied, as saved
    again = model_from_architecture(arch)
    load_weights(again, state, "test")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again(ids), model(ids))


def test_trainable_subsets():
    torch.manual_seed(0)
    model = classifier_from_architecture(classifier_architecture(GPT_ARCH, ["a", "b"]))
    trainable, total = apply_trainable(model, "head")
    assert trainable == 16 * 2  # a last-token head has no bias, as transformers' `score`
    names = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert names() == {"classifier.weight"}
    apply_trainable(model, "last_blocks:1")
    assert {n.split(".")[3] if ".h." in n else n for n in names()} == {
        "1", "backbone.transformer.ln_f.weight", "backbone.transformer.ln_f.bias", "classifier.weight"}
    assert apply_trainable(model, "all") == (total, total)
    bert = classifier_from_architecture(classifier_architecture(BERT_ARCH, ["a", "b"]))
    apply_trainable(bert, "last_blocks:1")
    assert {n for n, p in bert.named_parameters() if p.requires_grad and "layer.1." not in n} == {
        "backbone.bert.pooler.dense.weight", "backbone.bert.pooler.dense.bias",
        "classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="only 2 blocks"):
        apply_trainable(model, "last_blocks:3")
    with pytest.raises(ValueError, match="choose all, head or last_blocks:K"):
        apply_trainable(model, "some")


def test_bert_pretraining_heads_are_frozen_but_the_tied_embeddings_train():
    # DDP waits for a gradient of every trainable parameter: unused heads must not be trainable.
    from lmforge.models.bert import BERT_PRESETS
    from lmforge.models.heads import apply_trainable, classifier_architecture
    from lmforge.models.registry import model_from_architecture

    arch = classifier_architecture({"model_type": "bert", **BERT_PRESETS["tiny"], "vocab_size": 100}, ["a", "b"])
    model = model_from_architecture(arch)
    apply_trainable(model, "all")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.cls.") for n in frozen)
    assert model.backbone.bert.embeddings.word_embeddings.weight.requires_grad
    logits = model(torch.randint(0, 100, (2, 8)))
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
