"""train.trainable beyond classifiers: head and last_blocks:K on a GPT and a BERT (an lm run with
it: tests/slow/test_adapting_e2e.py)."""

from __future__ import annotations

from lmforge.models.registry import model_from_architecture
from lmforge.train.trainable import apply_trainable

ARCH = {"model_type": "gpt", "vocab_size": 50, "context": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}


def test_head_and_last_blocks_on_a_gpt_and_a_bert():
    gpt = model_from_architecture(ARCH)
    trainable, total = apply_trainable(gpt, "head")
    assert trainable == 50 * 16  # lm_head, tied to the token embeddings
    apply_trainable(gpt, "last_blocks:1")
    grads = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert grads == {"transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"} | {
        n for n, _ in gpt.named_parameters() if n.startswith("transformer.h.1.")}
    assert apply_trainable(gpt, "all") == (total, total)
    bert = model_from_architecture(dict(ARCH, model_type="bert"))
    apply_trainable(bert, "last_blocks:1")
    grads = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.1.output.dense.weight" in grads and "bert.pooler.dense.weight" in grads
    assert "cls.seq_relationship.weight" in grads and "bert.encoder.layer.0.output.dense.weight" not in grads
