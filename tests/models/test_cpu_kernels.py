"""lmforge's C++ CPU kernels against torch's ops: the same numbers forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.models.cpu_attention import causal_attention
from lmforge.models.gpt import GPT, GPTConfig
from lmforge.models.lm_loss import lm_head_cross_entropy

ops = kernels.ops()
needs_kernels = pytest.mark.skipif(ops is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


@pytest.fixture
def kernels_off(monkeypatch):
    """Makes kernels.ops() answer None, as on a machine without them."""
    monkeypatch.setitem(kernels._state, "ops", None)


def reference_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_head, C3 // 3 // n_head).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C3 // 3)


@needs_kernels
@pytest.mark.parametrize("B,T,C,n_head", [(1, 1, 8, 2), (2, 5, 8, 2), (3, 100, 48, 3), (2, 64, 32, 1), (1, 300, 64, 2)])
def test_causal_attention_matches_float64_reference(B, T, C, n_head):
    torch.manual_seed(T)
    qkv64 = torch.randn(B, T, 3 * C, dtype=torch.float64, requires_grad=True)
    qkv = qkv64.detach().float().requires_grad_()
    grad = torch.randn(B, T, C, dtype=torch.float64)
    expected = reference_attention(qkv64, n_head)
    expected.backward(grad)
    out = causal_attention(qkv, n_head)
    out.backward(grad.float())
    assert out.shape == (B, T, C)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(qkv.grad.double(), qkv64.grad, atol=2e-5, rtol=1e-4)


@needs_kernels
def test_causal_attention_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.causal_attention(torch.zeros(2, 4, 24, dtype=torch.float64), 2)
    with pytest.raises(RuntimeError, match="multiple of 3 \\* n_head"):
        ops.causal_attention(torch.zeros(2, 4, 24), 5)


def test_causal_attention_declines_what_it_does_not_cover():
    assert causal_attention(torch.zeros(1, 4, 24, dtype=torch.bfloat16), 2) is None
    assert causal_attention(torch.zeros(1, 4, 24, dtype=torch.float64), 2) is None


def test_gpt_gives_the_same_loss_and_gradients_with_and_without_kernels(monkeypatch):
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context=80)
    tokens = torch.randint(0, 97, (3, 71), generator=torch.Generator().manual_seed(0))
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        torch.manual_seed(0)
        model = GPT(config)
        loss_sum, correct, counted = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, [p.grad for p in model.parameters()]))
    (loss_a, correct_a, grads_a), (loss_b, correct_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-4)
    assert correct_a == correct_b
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_softmax_rows_matches_torch():
    torch.manual_seed(1)
    logits = torch.randn(37, 1001) * 30
    targets = torch.randint(0, 1001, (37,))
    expected_max = logits.amax(dim=1)
    expected_exp = (logits - expected_max[:, None]).exp()
    target_logit, row_max, sum_exp = torch.empty(37), torch.empty(37), torch.empty(37)
    expected_target = logits.gather(1, targets[:, None]).squeeze(1)
    ops.softmax_rows_(logits, targets, target_logit, row_max, sum_exp)
    torch.testing.assert_close(target_logit, expected_target)
    torch.testing.assert_close(row_max, expected_max)
    torch.testing.assert_close(logits, expected_exp, rtol=2e-6, atol=1e-30)
    torch.testing.assert_close(sum_exp, expected_exp.sum(dim=1), rtol=1e-5, atol=0)


@needs_kernels
def test_softmax_rows_names_a_target_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="target 12 is outside the vocabulary of 10"):
        ops.softmax_rows_(torch.zeros(2, 10), torch.tensor([3, 12]), torch.empty(2), torch.empty(2), torch.empty(2))


def test_fused_output_layer_is_the_same_with_and_without_the_row_pass(monkeypatch):
    torch.manual_seed(2)
    hidden, weight = torch.randn(600, 16), torch.randn(300, 16)
    targets = torch.randint(0, 300, (600,))
    targets[::7] = -100
    results = []
    for available in (True, False):
        if not available:
            monkeypatch.setitem(kernels._state, "ops", None)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, correct, counted = lm_head_cross_entropy(h, w, targets)
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, counted, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is None
    assert kernels.unavailable_reason() == "LMFORGE_CPU_KERNELS=0"


def test_a_failed_build_leaves_torch_ops_in_place(monkeypatch, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_build", no_compiler)
    assert kernels.ops() is None
    assert "Ninja is required" in kernels.unavailable_reason()
    assert str(tmp_path) in kernels.unavailable_reason()
