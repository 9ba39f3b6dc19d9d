"""The gradient norm clipping reads: the kernel's float64 sum of squares against torch's norm,
its non-finite cases, its bits on one and two threads, and torch's path where it does not apply."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import grad_norm, kernels
from lmforge.ops.grad_norm import total_norm

library = kernels.ops()
needs_kernels = pytest.mark.skipif(library is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def _grads() -> list[torch.Tensor]:
    torch.manual_seed(0)  # blocks of 65,536 elements: a tensor over several, one under one, a scalar
    return [torch.randn(300, 700), torch.randn(5), torch.randn(()), torch.randn(65536), torch.randn(3, 0)]


def _norm_in_float64(grads: list[torch.Tensor]) -> float:
    return float(torch.stack([g.double().square().sum() for g in grads]).sum().sqrt())


@needs_kernels
def test_the_kernel_gives_the_float64_norm():
    grads = _grads()
    norm = total_norm(grads)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert float(norm) == pytest.approx(_norm_in_float64(grads), rel=1e-7)
    assert float(norm) == pytest.approx(float(torch.nn.utils.get_total_norm(grads)), rel=1e-5)


@needs_kernels
def test_the_kernel_gives_the_same_bits_on_two_threads():
    grads = _grads()
    before = torch.get_num_threads()
    sums = []
    for threads in (1, 2):  # the suite runs on one thread: the blocks split over two here
        torch.set_num_threads(threads)
        try:
            sums.append(library.sum_of_squares(grads))
        finally:
            torch.set_num_threads(before)
    assert sums[0].dtype == torch.float64 and torch.equal(sums[0], sums[1])


@needs_kernels
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_gradient_gives_a_non_finite_norm(bad):
    grads = _grads()
    grads[0][7, 3] = bad
    norm = float(total_norm(grads))
    assert norm == bad if bad == float("inf") else norm != norm


@needs_kernels
def test_the_kernel_refuses_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="contiguous float32"):
        library.sum_of_squares([torch.randn(4, 4).t()])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        library.sum_of_squares([torch.randn(4).double()])


@pytest.mark.parametrize("grads", [
    [torch.randn(4, 6).t(), torch.randn(3)],  # not contiguous
    [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)],
    [],
], ids=["transposed", "float64", "none"])
def test_other_gradients_take_torch_s_norm(grads, monkeypatch):
    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(grad_norm.torch.nn.utils, "get_total_norm", lambda g: calls.append(1) or real(g))
    norm = total_norm(grads)
    assert calls and float(norm) == pytest.approx(_norm_in_float64(grads) if grads else 0.0, rel=1e-6)


def test_without_the_kernels_the_norm_is_torch_s(monkeypatch):
    grads = _grads()
    monkeypatch.setattr(kernels, "ops", lambda **_: None)
    assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads))
