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
@pytest.mark.parametrize("B,T,C,n_head", [(2, 5, 8, 2), (1, 130, 32, 2)])
def test_causal_attention_with_dropout_matches_the_reference_with_the_same_mask(B, T, C, n_head):
    torch.manual_seed(T)
    p, seed = 0.3, 12345
    qkv64 = torch.randn(B, T, 3 * C, dtype=torch.float64, requires_grad=True)
    qkv = qkv64.detach().float().requires_grad_()
    grad = torch.randn(B, T, C, dtype=torch.float64)
    factors = ops.attention_dropout_factors(B * n_head, T, p, seed).double().view(B, n_head, T, T)
    q, k, v = qkv64.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / (C // n_head) ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = (torch.softmax(scores, -1) * factors) @ v
    expected = expected.transpose(1, 2).reshape(B, T, C)
    expected.backward(grad)
    out, lse = ops.causal_attention(qkv.detach(), n_head, p, seed)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    grad_qkv = ops.causal_attention_backward(grad.float(), qkv.detach(), out, lse, n_head, p, seed)
    torch.testing.assert_close(grad_qkv.double(), qkv64.grad, atol=2e-5, rtol=1e-4)


@needs_kernels
def test_attention_dropout_mask_drops_the_asked_share_independently():
    factors = ops.attention_dropout_factors(16, 256, 0.1, 7)
    kept = factors > 0
    assert factors.unique().tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert kept.float().mean().item() == pytest.approx(0.9, abs=0.003)  # 1M draws: sd 0.0003
    rows = kept.float().mean(dim=-1)  # no row or column pattern
    assert rows.min() > 0.8 and rows.max() < 0.98
    assert (kept[:, 1:] == kept[:, :-1]).float().mean().item() == pytest.approx(0.82, abs=0.005)  # 0.9^2 + 0.1^2
    assert not torch.equal(kept, ops.attention_dropout_factors(16, 256, 0.1, 8) > 0)
    assert torch.equal(factors, ops.attention_dropout_factors(16, 256, 0.1, 7))


def test_gpt_with_dropout_is_reproducible_from_torch_seed():
    config = GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, context=40, dropout=0.2)
    tokens = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (5, 5, 6):
        torch.manual_seed(0)
        model = GPT(config).train()
        torch.manual_seed(seed)
        losses.append(model(tokens[:, :-1], targets=tokens[:, 1:])[0].item())
    assert losses[0] == losses[1] != losses[2]


@needs_kernels
def test_causal_attention_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous float32"):
        ops.causal_attention(torch.zeros(2, 4, 24, dtype=torch.float64), 2, 0.0, 0)
    with pytest.raises(RuntimeError, match="multiple of 3 \\* n_head"):
        ops.causal_attention(torch.zeros(2, 4, 24), 5, 0.0, 0)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.causal_attention(torch.zeros(2, 4, 24), 2, 1.0, 0)


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


def test_a_failed_build_falls_back_and_is_not_retried_by_later_runs(monkeypatch, tmp_path, capsys):
    builds = []

    def no_compiler(name, folder):
        builds.append(folder)
        raise RuntimeError("Error building extension\nNinja is required to load C++ extensions")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_build", no_compiler)
    for _ in range(2):  # a second process finds the reason left by the first
        monkeypatch.setattr(kernels, "_state", {})
        assert kernels.ops() is None
        assert "Ninja is required to load C++ extensions" in kernels.unavailable_reason()
        assert str(tmp_path) in kernels.unavailable_reason()
    assert len(builds) == 1
    assert "CPU kernels unavailable, using torch's" in capsys.readouterr().err


@needs_kernels
def test_a_damaged_library_is_built_again_not_loaded(monkeypatch, tmp_path):
    builds, loads = [], []

    def fake_build(name, folder):
        builds.append(name)
        (folder / f"{name}.so").write_bytes(b"a whole library")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_build", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", loads.append)
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 1
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 1  # whole: loaded as it is
    library = kernels.build_dir() / f"{builds[0]}.so"
    library.write_bytes(b"a half")  # as a build killed while linking leaves it
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.ops() is not None and len(builds) == 2
    assert loads == [str(library)] * 3
