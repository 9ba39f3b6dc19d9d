"""The CPU kernels' parallel loops split rows over threads: two threads give one thread's bits.

The rest of the suite runs with one intra-op thread (tests/conftest.py), so this is where the
kernels' multi-threaded paths are exercised."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmforge.models.gpt import GPT, GPTConfig
from lmforge.ops import kernels

ops = kernels.ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _attention(qkv: torch.Tensor, grad: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
    out, lse = ops.self_attention(qkv, 3, True, lengths, 0.2, 11)
    grad_qkv = ops.self_attention_backward(grad, qkv, out, lse, 3, True, lengths, 0.2, 11)
    logits = qkv.reshape(-1, qkv.shape[-1]).clone()
    targets = torch.arange(logits.shape[0]) % logits.shape[1]
    stats = [torch.empty(logits.shape[0]) for _ in range(3)]
    ops.softmax_rows_(logits, targets, *stats)
    return [out, lse, grad_qkv, logits, *stats]


def test_attention_and_softmax_rows_are_the_same_on_two_threads():
    torch.manual_seed(0)
    qkv, grad = torch.randn(4, 50, 3 * 48), torch.randn(4, 50, 48)
    lengths = torch.tensor([50, 31, 7, 50])
    with _threads(1):
        one = _attention(qkv, grad, lengths)
    with _threads(2):
        two = _attention(qkv, grad, lengths)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_a_gpt_training_step_is_the_same_on_two_threads():
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context=64, dropout=0.1)
    tokens = torch.randint(0, 97, (4, 57), generator=torch.Generator().manual_seed(0))
    grads = []
    for count in (1, 2):
        with _threads(count):
            torch.manual_seed(0)
            model = GPT(config).train()
            loss_sum, _, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
            loss_sum.backward()
            grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # torch's own ops may sum in another order
