"""Plain causal attention over more than KERNEL_MAX_CONTEXT positions takes torch's flash kernel
(faster there than lmforge's CPU kernel), with the same outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import kernels
from lmforge.ops.attention import KERNEL_MAX_CONTEXT, attend, kernel_attention, sdpa

needs_kernels = pytest.mark.skipif(kernels.ops() is None, reason=f"CPU kernels unavailable: {kernels.unavailable_reason()}")


def _reference(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[-1] // 3
    q, k, v = qkv.view(B, T, 3, n_head, C // n_head).permute(2, 0, 3, 1, 4).unbind(0)
    return sdpa(q, k, v, None, True, 0.0).transpose(1, 2).reshape(B, T, C)


@needs_kernels
def test_the_kernel_runs_up_to_the_limit_and_not_past_it():
    at_limit = torch.randn(1, KERNEL_MAX_CONTEXT, 3 * 16)
    past = torch.randn(1, KERNEL_MAX_CONTEXT + 1, 3 * 16)
    assert kernel_attention(at_limit, 2, causal=True) is not None
    assert kernel_attention(past, 2, causal=True) is None
    assert kernel_attention(past, 2, causal=True, dropout_p=0.1) is not None  # torch has no fast CPU path with dropout


@pytest.mark.parametrize("T", [KERNEL_MAX_CONTEXT, KERNEL_MAX_CONTEXT + 7])
def test_attention_on_both_sides_of_the_limit_equals_the_reference_with_gradients(T):
    torch.manual_seed(0)
    qkv = torch.randn(1, T, 3 * 16, requires_grad=True)
    out = attend(qkv, 2, causal=True)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    ref = _reference(ref_qkv, 2)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_qkv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-4, rtol=1e-4)
