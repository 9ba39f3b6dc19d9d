"""The wide layer's product: the same output and gradients as F.linear, the weight gradient in
the weight's layout, and F.linear itself wherever the other orientation is not the faster one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.ops import kernels, product
from lmforge.ops.product import linear


def _grads(fn, x, weight, bias):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    out = fn(x, weight, bias)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out, x.grad, weight.grad, None if bias is None else bias.grad


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 8), (7, 8)])
def test_a_wide_layer_matches_f_linear(shape, with_bias):
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(24, 8)
    bias = torch.randn(24) if with_bias else None
    ours, theirs = _grads(linear, x, weight, bias), _grads(F.linear, x, weight, bias)
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours[2].is_contiguous()  # the weight gradient in the weight's layout


def test_the_wide_function_runs_only_where_it_is_faster(monkeypatch):
    calls = []
    monkeypatch.setattr(product._WideProduct, "apply", lambda *a: calls.append(a) or F.linear(*a))
    weight = torch.randn(24, 8, requires_grad=True)
    linear(torch.randn(4, 8), weight, None)
    assert len(calls) == 1
    linear(torch.randn(4, 24), torch.randn(8, 24, requires_grad=True), None)  # narrow out: F.linear's own
    with torch.no_grad():
        linear(torch.randn(4, 8), weight, None)  # nothing to differentiate
    linear(torch.randn(4, 8, dtype=torch.float64), weight.double(), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        linear(torch.randn(4, 8), weight, None)
    assert len(calls) == 1


@pytest.mark.parametrize("shape", [(256, 1408), (37, 5), (1, 16), (16, 1), (0, 3)])
def test_the_tiled_transpose_is_exact(shape):
    library = kernels.ops()
    if library is None:
        pytest.skip(f"CPU kernels unavailable: {kernels.unavailable_reason()}")
    m = torch.randn(shape)
    for threads in (1, 2):  # the suite runs on one thread: the tiles split over two here
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = library.transposed(m)
        finally:
            torch.set_num_threads(before)
        assert out.is_contiguous() and torch.equal(out, m.t())
    with pytest.raises(RuntimeError, match="contiguous float32"):
        library.transposed(m.t() if min(shape) > 1 else m.double())


def test_the_wide_gradient_is_the_same_without_the_kernels(monkeypatch):
    torch.manual_seed(0)
    x, weight = torch.randn(6, 8), torch.randn(24, 8)
    with_kernels = _grads(linear, x, weight, None)
    monkeypatch.setattr(kernels, "ops", lambda **_: None)
    assert torch.equal(_grads(linear, x, weight, None)[2], with_kernels[2])
