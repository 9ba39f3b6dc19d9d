"""train.trainable on every task: head and last_blocks:K freeze the rest of an lm run's GPT, and
the header counts what trains."""

from __future__ import annotations

import torch

from conftest import tiny_run
from lmforge.base.config import load_config
from lmforge.checkpoint import load_checkpoint
from lmforge.models.registry import model_from_architecture
from lmforge.train.loop import train
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


def test_an_lm_run_with_trainable_last_blocks_leaves_the_rest_unchanged(lm_data, tmp_path, capsys):
    start = train(load_config(None, base=tiny_run(lm_data, tmp_path, max_steps=2)), quiet=True)
    cfg = tiny_run(lm_data, tmp_path, max_steps=4, trainable="last_blocks:1")
    cfg["model"] = {"init_from": str(start.run_dir / "checkpoints" / "last")}
    cfg["run"]["name"] = "tuned"
    tuned = train(load_config(None, base=cfg))
    assert "trainable (" in capsys.readouterr().out
    before = load_checkpoint(start.run_dir / "checkpoints" / "last").state_dict
    after = load_checkpoint(tuned.run_dir / "checkpoints" / "last").state_dict
    for name, value in before.items():
        frozen = name.startswith(("transformer.h.0.", "transformer.wpe."))
        assert torch.equal(value, after[name]) == frozen, name
