"""The ops seam: every fast path against its plain torch path, forward and backward."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import kernels
from lmforge.ops.attention import attend, attend_projections, causal_mask, keeps_probabilities, sdpa
from lmforge.ops.decode import append_to_cache
from lmforge.ops.dropout import Dropout
from lmforge.ops.linear import add_projection
from lmforge.ops.lm_loss import lm_head_cross_entropy, reference_lm_head_cross_entropy

needs_kernels = pytest.mark.skipif(kernels.ops() is None, reason="CPU kernels unavailable")


def _with_and_without_kernels(monkeypatch, run):
    """run() once with the kernels, once with torch's ops only."""
    fast = run()
    monkeypatch.setitem(kernels._state, "ops", None)
    return fast, run()


def _assert_same(fast, reference, rtol=1e-5, atol=1e-5):
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@needs_kernels
@pytest.mark.parametrize("causal", [True, False])
def test_attend_equals_torch_sdpa_forward_and_backward(monkeypatch, causal):
    qkv = torch.randn(2, 37, 3 * 24, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(2, 37, 24, generator=torch.Generator().manual_seed(1))

    def run():
        x = qkv.clone().requires_grad_()
        out = attend(x, 3, causal=causal)
        out.backward(grad)
        return out.detach(), x.grad

    _assert_same(*_with_and_without_kernels(monkeypatch, run))


@needs_kernels
def test_bert_attention_with_key_padding_equals_torch_forward_and_backward(monkeypatch):
    torch.manual_seed(0)
    query, key, value = (torch.nn.Linear(16, 16) for _ in range(3))
    x = torch.randn(3, 11, 16)
    real = torch.ones(3, 11, dtype=torch.bool)
    real[1, 7:] = False
    real[2, 2:] = False

    def run():
        h = x.clone().requires_grad_()
        out = attend_projections(h, query, key, value, 2, key_padding=real[:, None, None, :], dropout_p=0.0)
        weights = [p for lin in (query, key, value) for p in lin.parameters()]
        grads = torch.autograd.grad(out[real].square().sum(), [h, *weights])
        return out[real].detach(), *grads

    _assert_same(*_with_and_without_kernels(monkeypatch, run), rtol=1e-4)


def test_a_decode_step_on_rows_is_the_step_on_one_position():
    qkv = torch.randn(2, 1, 3 * 8, generator=torch.Generator().manual_seed(0))
    caches = [(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)) for _ in range(2)]
    caches[1] = (caches[0][0].clone(), caches[0][1].clone())
    with torch.inference_mode():
        sequence = attend(qkv, 2, causal=False, kv=caches[0], start=3)  # (B, 1, C)
        rows = attend(qkv.view(2, -1), 2, causal=False, kv=caches[1], start=3)  # (B, C)
    assert rows.shape == (2, 8) and torch.equal(rows, sequence.view(2, 8))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_append_to_cache_writes_in_place_and_returns_the_prefix():
    k_buf, v_buf = torch.zeros(1, 2, 6, 3), torch.zeros(1, 2, 6, 3)
    k, v = torch.ones(1, 2, 2, 3), torch.full((1, 2, 2, 3), 2.0)
    keys, values = append_to_cache((k_buf, v_buf), 1, k, v)
    assert keys.shape == values.shape == (1, 2, 3, 3) and keys.data_ptr() == k_buf.data_ptr()
    assert k_buf[:, :, 1:3].eq(1).all() and v_buf[:, :, 1:3].eq(2).all() and k_buf[:, :, 3:].eq(0).all()


def test_causal_mask_picks_the_cheapest_exact_form():
    right_padded = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert causal_mask(right_padded, 0, 3, 2, torch.device("cpu")) == (None, True)
    assert causal_mask(None, 0, 3, 2, torch.device("cpu")) == (None, True)
    assert causal_mask(None, 4, 1, 2, torch.device("cpu")) == (None, False)  # one query sees all keys
    mask, is_causal = causal_mask(None, 2, 2, 1, torch.device("cpu"))  # two queries after two cached keys
    assert not is_causal and mask.tolist() == [[[[True, True, True, False], [True, True, True, True]]]]
    left_padded = torch.tensor([[0, 1, 1]])
    mask, is_causal = causal_mask(left_padded, 0, 3, 1, torch.device("cpu"))
    assert not is_causal and mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    q = k = v = torch.randn(1, 1, 3, 4)
    torch.testing.assert_close(sdpa(q, k, v, mask, False, 0.0)[0, 0, 1], v[0, 0, 1])


def test_add_projection_on_rows_is_the_same_product_as_on_a_sequence():
    torch.manual_seed(0)
    linear, dropout = torch.nn.Linear(12, 8), Dropout(0.1).eval()
    residual, x = torch.randn(5, 1, 8), torch.randn(5, 1, 12)
    with torch.no_grad():
        assert torch.equal(add_projection(residual.view(5, 8), linear, x.view(5, 12), dropout),
                           add_projection(residual, linear, x, dropout).view(5, 8))


@pytest.mark.parametrize("ignored_every", [None, 100, 9])
def test_fused_output_layer_equals_its_reference_forward_and_backward(ignored_every):
    """Every row with a target; one row in 100 ignored (kept in the product, masked); one in 9 (left out)."""
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(200, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (200,), generator=g)
    if ignored_every is not None:
        targets[::ignored_every] = -100
    results = []
    for loss_fn in (lm_head_cross_entropy, reference_lm_head_cross_entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss_sum, correct, counted = loss_fn(h, w, targets)
        loss_sum.backward()
        results.append((loss_sum.detach(), correct, counted, h.grad, w.grad))
    _assert_same(*results)


def test_the_kernel_keeps_probabilities_only_for_short_contexts_without_dropout():
    assert keeps_probabilities(torch.empty(8, 256, 512), 4, 0.0)  # the Llama benchmark's shape: 1.25x qkv
    assert not keeps_probabilities(torch.empty(8, 256, 512), 4, 0.1)
    assert not keeps_probabilities(torch.empty(8, 1024, 3 * 768), 12, 0.0)  # GPT-2 small: 225 MB a layer
