"""Grouped-query attention: the kernel path (shared key / value heads read in place) against
SDPA on repeated heads, forward and backward, and the decode step's grouped queries."""

from __future__ import annotations

import pytest
import torch

from lmforge.ops import kernels
from lmforge.ops.decode import KVCache
from lmforge.ops.grouped_attention import attend_grouped


def _reference(qk, v, nh, nkv):
    """softmax(q k^T / sqrt(hs)) v with key / value head h // (nh / nkv) for query head h, causal."""
    B, T, _ = v.shape
    hs = v.shape[-1] // nkv
    q, k = qk.split((nh * hs, nkv * hs), dim=-1)
    q = q.view(B, T, nh, hs).transpose(1, 2)
    k, v = (t.view(B, T, nkv, hs).transpose(1, 2).repeat_interleave(nh // nkv, dim=1) for t in (k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(B, T, nh * hs)


@pytest.mark.parametrize("nkv", [1, 2, 4])
def test_training_path_equals_repeated_heads_forward_and_backward(nkv):
    torch.manual_seed(0)
    nh, hs, B, T = 4, 16, 2, 70
    qk = torch.randn(B, T, (nh + nkv) * hs, requires_grad=True)
    v = torch.randn(B, T, nkv * hs, requires_grad=True)
    grad = torch.randn(B, T, nh * hs)
    got = attend_grouped(qk, v, nh, nkv, causal=True)
    got_grads = torch.autograd.grad(got, (qk, v), grad)
    want = _reference(qk, v, nh, nkv)
    want_grads = torch.autograd.grad(want, (qk, v), grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert kernels.applies_to(qk) == (kernels.ops(build=False) is not None)


def test_decode_rows_against_the_cache_equal_the_full_sequence():
    torch.manual_seed(1)
    nh, nkv, hs, B, T = 6, 2, 8, 3, 9
    qk, v = torch.randn(B, T, (nh + nkv) * hs), torch.randn(B, T, nkv * hs)
    want = _reference(qk, v, nh, nkv)
    cache = KVCache(1, B, nkv, T, hs)
    with torch.inference_mode():
        first = attend_grouped(qk[:, :5], v[:, :5], nh, nkv, causal=True, kv=cache.layers[0], start=0)
        rows = [attend_grouped(qk[:, t], v[:, t], nh, nkv, causal=False, kv=cache.layers[0], start=t)
                for t in range(5, T)]  # (B, nh * hs) each: one query per row
    torch.testing.assert_close(torch.cat([first, torch.stack(rows, dim=1)], dim=1), want, atol=1e-5, rtol=1e-5)
