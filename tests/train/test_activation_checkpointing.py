"""train.activation_checkpointing: the same losses and gradients as without it (dropout included) and
less activation memory kept for the backward (a whole run: tests/slow/test_adapting_e2e.py)."""

from __future__ import annotations

import torch

from lmforge.models.registry import model_from_architecture
from lmforge.train.activation_checkpointing import enable

GPT = {"model_type": "gpt", "vocab_size": 97, "context": 64, "n_layer": 3, "n_head": 2, "n_embd": 32,
       "dropout": 0.1, "activation": "gelu"}
BERT = {"model_type": "bert", "vocab_size": 97, "context": 64, "n_layer": 3, "n_head": 2, "n_embd": 32,
        "dropout": 0.1}


def _loss(model, ids):
    out = model(ids)
    logits = out[0] if isinstance(out, tuple) else out
    return logits.float().square().mean()


def _step(arch: dict, checkpointing: bool, ids: torch.Tensor) -> tuple[float, dict, int]:
    """(loss, gradients, bytes of tensors kept for the backward) of one training step."""
    torch.manual_seed(0)
    model = model_from_architecture(arch).train()
    if checkpointing:
        enable(model)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # the dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(model, ids)
    saved = sum(kept)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_less_memory_kept():
    ids = torch.randint(0, 97, (4, 64))
    for arch in (GPT, BERT):
        loss, grads, kept = _step(arch, False, ids)
        loss_ac, grads_ac, kept_ac = _step(arch, True, ids)
        assert abs(loss - loss_ac) <= 1e-6, arch["model_type"]
        assert grads.keys() == grads_ac.keys()
        for name in grads:
            torch.testing.assert_close(grads_ac[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
        assert kept_ac < 0.6 * kept, (arch["model_type"], kept_ac, kept)
